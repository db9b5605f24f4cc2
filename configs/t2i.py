"""Text-to-image: the paper's PFT 1.2B recipe, and the captioned-digits task that runs on a CPU.

  python -m patch_forcing.main --config=configs/t2i.py:digits --workdir=/tmp/pf_t2i
  python -m patch_forcing.main --config=configs/t2i.py:digits --workdir=/tmp/pf_t2i --mode=sample \
      --config.sample.prompt="a small red 3 left of a large blue 7" --config.sampler.cfg_scale=3
  python -m patch_forcing.main --config=configs/t2i.py:pft_1p2b --workdir=gs://BUCKET/pft \
      --config.data.data_dir=/data/latents --config.data.text_dir=/data/texts \
      --config.text.encoder=/ckpt/Qwen3-VL-Embedding-2B --config.text.tokenizer=/ckpt/Qwen3-VL-Embedding-2B

`digits`: two coloured sklearn digits on a 16 x 32 canvas with captions ("a small red 3 left of
a large blue 7", data/captioned.py), 4 x 4 pixel patches, a frozen random 2-layer Qwen3 (width
32) over a word-level vocabulary, the text mask passed to the model. `digits,global` is the
global-time baseline (one logit-normal time for all patches); `digits,smoke` shrinks everything
for tests. `pft_1p2b`: FLUX.2 latents (32 x 32 x 32 at 256 px, `tools/extract_latents --vae=flux2`),
Qwen3-VL-Embedding-2B text (256 tokens, all rows attended, pre-extracted with
`tools/extract_text`), LTG (std 0.6, loc 0.5), NLL 0.01, caption dropout 0.1, AdamW 1e-4 after
1,000 warm-up steps, EMA 0.9999, bf16, 400k steps, 32 images per GPU.
"""

import ml_collections

from configs import common
from patch_forcing import presets

NAMES = ("digits", "pft_1p2b")
OPTIONS = ("global", "smoke")


def model_block(preset_name: str, **overrides) -> ml_collections.ConfigDict:
    """All T2IConfig fields of a preset, spelled out so each can be overridden."""
    fields = {**presets.T2I_PRESETS[preset_name], "dtype": "float32", "attention_impl": "", **overrides}
    size = fields["latent_size"]
    fields["latent_size"] = (size, size) if isinstance(size, int) else tuple(size)
    return ml_collections.ConfigDict({"family": "t2i", "preset": preset_name, **fields})


def text_block(**overrides) -> ml_collections.ConfigDict:
    """The frozen text encoder and how its output conditions the model (config_lib.conditioning)."""
    return ml_collections.ConfigDict(dict(
        encoder="random",  # 'random' (frozen random Qwen3: width, layers, seed) or a local Qwen3(-VL) folder
        tokenizer="words",  # 'words' (captioned digits' vocabulary) or a folder with tokenizer.json
        max_length=12,  # tokens per prompt (padded / truncated)
        use_mask=True,  # pass the real-token mask to the model (False: every row attended, as the reference)
        dropout=0.1,  # caption dropout to the empty prompt (CFG)
        width=32, layers=2, seed=0,  # the random encoder
        dtype="float32",
    ) | overrides)


PRESETS = tuple(n + o for n in NAMES for o in ("", ",global", ",smoke", ",global,smoke"))

def get_config(arg: str = "digits"):
    parts = [a for a in (arg or "digits").split(",") if a]
    name, options = parts[0], parts[1:]
    if name not in NAMES or any(o not in OPTIONS for o in options):
        raise ValueError(f"configs/t2i.py argument {arg!r}: name must be one of {list(NAMES)}, optionally "
                         f"followed by options from {list(OPTIONS)}")
    c = _pft_1p2b() if name == "pft_1p2b" else _digits()
    if "global" in options:  # the global-time baseline: every patch at one logit-normal time
        c.flow.timesteps = "logit_normal"
    if "smoke" in options:
        c.model = model_block("tiny", in_dim=c.model.in_dim, latent_size=c.model.latent_size, patch_size=4,
                              txt_in_dim=c.text.width, txt_refiner_depth=1)
        common.shrink_for_smoke(c)
    return c


def _digits():
    c = common.base_config()
    c.data.name = "captioned_digits"
    c.data.split_train, c.data.split_eval = "train", "test"
    c.data.image_size, c.data.channels = (16, 32), 3
    c.data.batch_size = 64
    c.model = model_block("digits")
    c.text = text_block()
    c.flow.ltg.loc = 0.5  # the T2I recipe's LTG
    c.optim.lr, c.optim.warmup_steps = 5e-4, 200
    c.ema.decay = 0.995  # a short run
    c.train.num_steps = 3000
    c.checkpoint.every_steps = 500
    c.log.every_steps, c.log.eval_every_steps, c.log.sample_every_steps = 100, 500, 1500
    c.log.num_samples, c.log.num_eval_examples = 16, 256
    c.sampler.steps, c.sampler.cfg_scale = 25, 3.0
    _sample_block(c)
    return c


def _pft_1p2b():
    c = common.base_config()
    c.data.name, c.data.data_dir, c.data.text_dir = "latents", "", ""
    c.data.split_train, c.data.split_eval = "train", "validation"  # a latent + text folder each
    c.data.image_size, c.data.channels = (32, 32), 32  # FLUX.2 latents of 256 px images
    c.data.hflip = False
    c.data.batch_size = 32 * 8  # 32 per GPU (the reference), here for one 8-GPU node
    c.data.num_workers = 8
    c.model = model_block("pft_1p2b", in_dim=32, dtype="bfloat16")
    c.text = text_block(encoder="Qwen3-VL-Embedding-2B", tokenizer="Qwen3-VL-Embedding-2B", max_length=256,
                        use_mask=False, width=2048, dtype="bfloat16")
    c.flow.ltg.std, c.flow.ltg.loc, c.flow.ltg.scale = 0.6, 0.5, 1.0
    c.loss.nll_weight = 0.01
    c.optim.lr, c.optim.warmup_steps, c.optim.weight_decay = 1e-4, 1000, 0.0
    c.ema.decay = 0.9999
    c.train.num_steps = 400_000
    c.checkpoint.every_steps, c.checkpoint.keep = 10_000, 3
    c.log.every_steps, c.log.eval_every_steps, c.log.sample_every_steps = 100, 10_000, 10_000
    c.log.num_samples, c.log.num_eval_examples = 16, 1024
    c.sampler.name, c.sampler.steps, c.sampler.cfg_scale = "look_ahead", 50, 5.0
    _sample_block(c)
    c.sample.vae = "flux2:FLUX.2-dev/vae"  # a local diffusers folder; flux2: picks the FLUX.2 VAE
    return c


def _sample_block(c):
    """--mode=sample from prompts: one prompt, or a file with one per line (empty: the eval split's)."""
    c.sample.prompt = ""
    c.sample.prompts_file = ""
    c.sample.num_images, c.sample.batch_size = 16, 16
    c.sample.images_per_prompt = 4  # the prompt grid: one row per prompt
