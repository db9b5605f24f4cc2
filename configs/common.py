"""Config blocks shared by every experiment config (big_vision style: plain ConfigDicts).

Each experiment file (digits.py, mnist.py, imagenet.py) calls `base_config()` and overrides what
differs. Every field exists here, so anything can be overridden on the command line, e.g.
`--config.optim.lr=2e-4 --config.sampler.name=dual_loop --config.sampler.q=0.4`.
"""

import ml_collections

from patch_forcing import presets


def model_block(preset_name: str, **overrides) -> ml_collections.ConfigDict:
    """All DiTConfig fields of a preset, spelled out so each can be overridden."""
    cfg = presets.dit_fields(preset_name, **overrides)
    cfg["image_size"] = tuple(cfg["image_size"])
    cfg["attention_impl"] = cfg["attention_impl"] or ""  # "" = JAX's choice; "cudnn" on GPUs
    return ml_collections.ConfigDict({"preset": preset_name, **cfg})


def eval_block() -> ml_collections.ConfigDict:
    """--mode=evaluate and the in-training FID (patch_forcing/evaluation/fid.py)."""
    return ml_collections.ConfigDict(dict(
        num_samples=10_000,  # --mode=evaluate: 50k for tables, 10k for ablations
        batch_size=256,  # global sampling batch; divisible by the device count
        reference="data",  # 'data' (config.data.split_eval) or a reference-statistics .npz
        feature_network="auto",  # 'auto' | 'inception' | 'inception:<pth>' | 'classifier:<dir>'
        fid_every_steps=0,  # in-training FID every this many steps (0 = off)
        fid_num_samples=1_000,  # samples of the in-training FID
        save_samples=False,  # also write <workdir>/eval/<sampler name>-<N>.npz (ADM arr_0/arr_1)
    ))


def repa_block(encoder_depth: int = 0, **overrides) -> ml_collections.ConfigDict:
    """REPA (patch_forcing/repa.py): encoder_depth 0 = off; else the DiT's hidden tokens after
    that block go through a projector MLP (D -> projector_dim -> projector_dim -> z_dim) and
    `coeff * mean_tokens(1 - cos(z, encoder features))` joins the loss. The encoder is a DINOv2
    preset (encoder_path = its local weights) or 'classifier' (small data; encoder_path = a
    classifier dir, or '' to train one into <workdir>/repa_encoder)."""
    r = {k: v for k, v in presets.REPA.items() if k != "encoder_depth"}
    return ml_collections.ConfigDict(dict(r, encoder_depth=encoder_depth, encoder_path="", resolution=224,
                                          **overrides))


def study_block() -> ml_collections.ConfigDict:
    """python -m patch_forcing.study (patch_forcing/studies/): every variant and seed is an
    ordinary run of this config; these fields size the study and its FID protocol."""
    return ml_collections.ConfigDict(dict(
        seeds=3,  # training (and sampling) seeds per variant: tables give mean +- std over them
        train_steps=0,  # steps of every study run (0: train.num_steps)
        num_samples=1_000,  # FID N of the samples and of the noise-floor row (<= held-out size)
        batch_size=256,  # global sampling batch of the FID evaluations
        reference_split="",  # FID reference statistics: '' = data.split_train (all of it)
        nfe=21,  # timesteps: sampling NFE (euler / euler_pf) of every variant
        budgets=(9, 21, 42, 81),  # samplers: NFE budgets, met exactly by every sampler or refused
        n_inner=3,  # samplers: dual_loop / random_order sub-steps (3 meets ~10/20/40/80 exactly)
        num_examples=512,  # difficulty, context: held-out images (from data.split_eval)
        difficulty_times=(0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9),
        context_times=(0.1, 0.2, 0.3),
        context_ratios=(1.25, 1.5, 2.0, 2.5, 3.0, 4.0, 6.0),  # t_ctx = ratio * t (< 1), and t_ctx = 1
    ))


def base_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.seed = 0

    c.data = ml_collections.ConfigDict(dict(
        name="digits", source="auto", data_dir="", split_train="train", split_eval="test",
        image_size=(8, 8), pad=0, channels=1, num_classes=10, hflip=False, batch_size=128,
        num_workers=0, with_pixels=False,  # with_pixels: latents only, batch['pixels'] for REPA
    ))
    c.model = model_block("PF-Tiny/2", image_size=8, in_channels=1, num_classes=10)

    # Training timestep sampler (patch_forcing/flow/timesteps.py): ltg | truncated_gaussian | srm |
    # gaussian | independent | uniform | logit_normal, with one parameter block per sampler
    # (e.g. --config.flow.timesteps=srm --config.flow.srm.sharpness=4). Global-time baselines:
    # a global sampler (uniform or logit_normal) and model.per_patch=False.
    c.flow = ml_collections.ConfigDict({"timesteps": "ltg"})
    for name, params in presets.TIMESTEP_PARAMS.items():
        if params:
            c.flow[name] = dict(params)
    c.loss = ml_collections.ConfigDict(dict(nll_weight=0.01, label_dropout=0.1))
    c.repa = repa_block()  # off
    c.optim = ml_collections.ConfigDict(dict(
        lr=1e-4, warmup_steps=1000, weight_decay=0.0, b1=0.9, b2=0.999, eps=1e-8, grad_clip=1.0,
    ))
    c.ema = ml_collections.ConfigDict(dict(decay=0.9999))
    c.train = ml_collections.ConfigDict(dict(num_steps=1000))

    c.checkpoint = ml_collections.ConfigDict(dict(every_steps=1000, keep=3, async_save=True))
    c.log = ml_collections.ConfigDict(dict(
        every_steps=50, eval_every_steps=500, sample_every_steps=1000, num_samples=64,
        num_eval_examples=256, profile=False,
    ))
    # Device mesh: -1 takes all remaining devices. Pure data parallel by default; FSDP shards the
    # model width over the `fsdp` axis (e.g. mesh.data=1, mesh.fsdp=-1).
    c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1))

    # Sampler for the periodic sample grids and --mode=sample (patch_forcing/flow/samplers.py).
    c.sampler = ml_collections.ConfigDict(dict(presets.SAMPLER, guidance_interval=(0.0, 1.0)))
    # --mode=sample: how many images, which classes (empty: uniform random), where to read the
    # inference checkpoint (empty: <workdir>/inference), the VAE that decodes latents (empty: none).
    c.sample = ml_collections.ConfigDict(dict(
        num_images=64, batch_size=64, classes=(), checkpoint="", num_difficulty_rows=4, vae="",
    ))
    c.eval = eval_block()
    c.study = study_block()
    return c


def shrink_for_smoke(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """The `:smoke` presets' run length and logging: 8 steps at batch 16, everything every 4 steps."""
    c.data.batch_size = 16
    c.optim.warmup_steps = 2
    c.train.num_steps = 8
    c.checkpoint.every_steps = 4
    c.log.every_steps = c.log.eval_every_steps = c.log.sample_every_steps = 4
    c.log.num_samples, c.log.num_eval_examples = 8, 16
    c.sampler.steps = 4
    c.sample.num_images = c.sample.batch_size = 8
    return c
