"""Named model sizes and the reference's default hyper-parameters, as plain Python.

Config files (configs/*.py) read their defaults here without importing JAX; the modules that
compute (models/dit.py, flow/timesteps.py, flow/samplers.py) take theirs from here too, so each
number lives in one place. Values are the authors' release (github.com/CompVis/patch-forcing).
"""

from __future__ import annotations

# ----------------------------------------------------------------------------- DiT sizes
# name: (depth, hidden_size, num_heads); Tiny is for CPU runs (digits, MNIST)
DIT_SIZES = {"Tiny": (4, 128, 4), "S": (12, 384, 6), "B": (12, 768, 12), "L": (24, 1024, 16),
             "XL": (28, 1152, 16)}
DIT_PATCHES = {"Tiny": (1, 2, 4), "S": (2, 4, 8), "B": (2, 4, 8), "L": (2, 4, 8), "XL": (2, 4, 8)}
DIT_PRESETS = tuple(
    f"{kind}-{size}/{p}" for kind in ("PF", "DiT") for size in DIT_SIZES for p in DIT_PATCHES[size])
# Every DiTConfig field a preset leaves at its default (ImageNet-256 latents: 32x32x4, 1000 classes).
DIT_DEFAULTS = dict(image_size=(32, 32), in_channels=4, mlp_ratio=4.0, num_classes=1000,
                    dtype="float32", attention_impl=None)


def dit_fields(name: str, **overrides) -> dict:
    """All DiTConfig fields of preset `name` ('PF-B/2' per-patch, 'DiT-B/2' global), overridden."""
    if name not in DIT_PRESETS:
        raise ValueError(f"model preset={name!r} is not one of {list(DIT_PRESETS)}")
    kind, rest = name.split("-", 1)
    size, p = rest.split("/")
    depth, width, heads = DIT_SIZES[size]
    fields = dict(DIT_DEFAULTS, patch_size=int(p), hidden_size=width, depth=depth, num_heads=heads,
                  per_patch=(kind == "PF"))
    unknown = sorted(set(overrides) - set(fields))
    if unknown:
        raise ValueError(f"preset override {unknown[0]!r} is not a DiTConfig field; allowed: {sorted(fields)}")
    fields.update(overrides)
    if isinstance(fields["image_size"], int):
        fields["image_size"] = (fields["image_size"],) * 2
    return fields


# ----------------------------------------------------------------------------- REPA
# REPA (Yu et al. 2025) as the paper trains it: the released REPAPatchForcingDiT's projector
# (hidden tokens after block 8 -> MLP 2048 -> 768) aligned to DINOv2-B/14 (with registers: the
# authors' helper package's default) patch tokens; weight 0.5 (REPA's; the paper does not say).
REPA = dict(encoder_depth=8, z_dim=768, projector_dim=2048, coeff=0.5, encoder="dinov2_vitb14_reg")

# ----------------------------------------------------------------------------- T2I sizes
# models/t2i.py T2IConfig fields per preset; `latent_size` is the training latent grid (H, W).
T2I_PRESETS = {
    # the reference's configs/model/t2i-pft-1.2b.yaml (its experiment sets in_dim=32 for FLUX.2)
    "pft_1p2b": dict(in_dim=4, depth=28, hidden_dim=1536, head_dim=96, mapping_dim=384,
                     mapping_depth=2, patch_size=2, txt_in_dim=2048, txt_refiner_dim=1536,
                     txt_refiner_head_dim=128, txt_refiner_depth=2, latent_size=32),
    # for tests and CPU smoke runs
    "tiny": dict(in_dim=3, depth=2, hidden_dim=32, head_dim=16, mapping_dim=16, mapping_depth=2,
                 patch_size=2, txt_in_dim=12, txt_refiner_dim=24, txt_refiner_head_dim=8,
                 txt_refiner_depth=2, latent_size=8),
    # the captioned-digits task (configs/t2i.py:digits): 16 x 32 RGB pixels, 4 x 4 patches
    "digits": dict(in_dim=3, depth=4, hidden_dim=128, head_dim=32, mapping_dim=64, mapping_depth=2,
                   patch_size=4, txt_in_dim=32, txt_refiner_dim=64, txt_refiner_head_dim=16,
                   txt_refiner_depth=1, latent_size=(16, 32)),
}

# ----------------------------------------------------------------------------- training times
# Training timestep sampler name -> its parameters' defaults (flow/timesteps.py).
TIMESTEP_PARAMS = {
    "uniform": {},
    "logit_normal": {"loc": 0.0, "scale": 1.0},
    "independent": {},
    "srm": {"sharpness": 1.0},
    "gaussian": {"std": 0.2},
    "truncated_gaussian": {"std": 0.2},
    "ltg": {"std": 0.6, "loc": 0.7, "scale": 1.0},
}

# ----------------------------------------------------------------------------- samplers
# flow/samplers.py SamplerConfig defaults: dual_loop q 0.4, n_inner 4; look_ahead q 0.4, ratio 1.4.
SAMPLER = dict(name="euler_pf", steps=50, cfg_scale=1.0, q=0.4, n_inner=4, ratio=1.4, pool="mean")
