"""Convert the authors' PyTorch checkpoints (CompVis/patch-forcing) into our DiT parameters.

A released checkpoint is a torch-saved dict {'config': {'target': ..., 'params': {...}},
'state_dict': {name: tensor}} with the reference's module names (timm PatchEmbed/Attention/Mlp).
The mapping below is explicit: every reference key goes to exactly one of our parameters.
Layouts: nn.Linear (out, in) -> kernel (in, out); patch-embed conv (D, C, p, p) -> (p, p, C, D).
The final linear's per-token outputs are ordered (p, p, C+1) in both codebases, so it only
transposes. `pos_embed` is checked against our fixed sin-cos embedding, then dropped.
`REPAPatchForcingDiT` checkpoints add `projector.{0, 2, 4}` (Linear, SiLU, Linear, SiLU, Linear),
which become our `projector.{fc1, fc2, fc3}` (DiTConfig.repa_depth = its encoder_depth).

CLI (writes our inference checkpoint via patch_forcing.checkpoint.save_inference; needs
`pip install -r requirements-convert.txt`: torch, omegaconf, safetensors):
  python -m patch_forcing.tools.convert --ckpt=pft-b_step400k_ema.ckpt --out=DIR
"""

from __future__ import annotations

import collections
import pickle
import typing
from collections.abc import Mapping
from typing import Any

import numpy as np
from absl import flags

from patch_forcing import checkpoint
from patch_forcing.models.dit import DiTConfig, sincos_pos_embed
from patch_forcing.tools import cli

FLAGS = flags.FlagValues()
flags.DEFINE_string("ckpt", None, "The authors' .ckpt ({'config', 'state_dict'}).", flag_values=FLAGS)
flags.DEFINE_string("out", None, "Directory for our inference checkpoint.", flag_values=FLAGS)
flags.DEFINE_bool("allow_pickle", False, "UNSAFE: full unpickling (arbitrary code); only for trusted files "
                  "holding objects other than tensors and an OmegaConf config.", flag_values=FLAGS)
flags.mark_flags_as_required(["ckpt", "out"], flag_values=FLAGS)

TORCH_PIN = "torch==2.13.0"
# Reference constructor defaults (patch_flow/models/dit.py DiT.__init__), used for absent keys.
_REF_DEFAULTS = dict(
    input_size=32, patch_size=2, in_channels=4, hidden_size=1152, depth=28, num_heads=16,
    mlp_ratio=4.0, class_dropout_prob=0.1, num_classes=1000, out_channels=None,
    learn_sigma=False, return_sigma=False, compile=False,
)
# REPAPatchForcingDiT's extra constructor defaults (patch_flow/models/pf_transformer_repa.py).
_REPA_DEFAULTS = dict(z_dim=768, encoder_depth=8, projector_dim=2048)
_TARGETS = {  # class name at the end of config['target'] -> per_patch default
    "PatchForcingDiT": True,  # per-patch unless predict_uncertainty=False
    "REPAPatchForcingDiT": True,  # always per-patch (the reference asserts predict_uncertainty)
    "DiT": False,
}


# ----------------------------------------------------------------------------- config


def _plain(obj: Any) -> Any:
    """Mappings (dict, OmegaConf DictConfig) -> dict, recursively."""
    if isinstance(obj, Mapping):
        return {str(k): _plain(v) for k, v in obj.items()}
    return obj


def cfg_from_torch_config(cfg_dict: Mapping) -> DiTConfig:
    """The reference's model config {'target': '...PatchForcingDiT' | '...dit.DiT', 'params': {...}}
    -> DiTConfig. Unknown params keys or unsupported options raise a one-line ValueError."""
    cfg_dict = _plain(cfg_dict)
    target = str(cfg_dict.get("target", ""))
    cls = target.rsplit(".", 1)[-1]
    if cls not in _TARGETS:
        raise ValueError(
            f"config.target={target!r} is not supported; its class must be one of {list(_TARGETS)}"
        )
    params = dict(cfg_dict.get("params") or {})
    repa = cls == "REPAPatchForcingDiT"
    allowed = set(_REF_DEFAULTS) | {"predict_uncertainty"} | (set(_REPA_DEFAULTS) if repa else set())
    unknown = sorted(set(params) - allowed)
    if unknown:
        raise ValueError(f"config.params has unknown keys {unknown}; allowed: {sorted(allowed)}")
    p = {**_REF_DEFAULTS, **(_REPA_DEFAULTS if repa else {}), "predict_uncertainty": True, **params}
    if repa and not p["predict_uncertainty"]:
        raise ValueError("config.params.predict_uncertainty=False: REPAPatchForcingDiT requires True")
    if p["learn_sigma"]:
        raise ValueError("config.params.learn_sigma=True is not supported (SiT/PF models use False)")
    if p["out_channels"] not in (None, p["in_channels"]):
        raise ValueError(
            f"config.params.out_channels={p['out_channels']} must be None or in_channels={p['in_channels']}"
        )
    if not p["class_dropout_prob"] > 0:
        raise ValueError(
            "config.params.class_dropout_prob must be > 0 (our label table always has the null row)"
        )
    per_patch = _TARGETS[cls] and bool(p["predict_uncertainty"])
    extra = dict(repa_depth=int(p["encoder_depth"]), repa_z_dim=int(p["z_dim"]),
                 repa_projector_dim=int(p["projector_dim"])) if repa else {}
    if repa and not 1 <= extra["repa_depth"] <= int(p["depth"]):
        raise ValueError(f"config.params.encoder_depth={extra['repa_depth']} must be in [1, depth={p['depth']}]")
    return DiTConfig(
        image_size=int(p["input_size"]), in_channels=int(p["in_channels"]),
        patch_size=int(p["patch_size"]), hidden_size=int(p["hidden_size"]), depth=int(p["depth"]),
        num_heads=int(p["num_heads"]), mlp_ratio=float(p["mlp_ratio"]),
        num_classes=int(p["num_classes"]), per_patch=per_patch, **extra,
    )


# ----------------------------------------------------------------------------- weights


def _linear(torch_prefix: str, ours: tuple) -> list:
    return [
        (f"{torch_prefix}.weight", ours + ("kernel",), "linear"),
        (f"{torch_prefix}.bias", ours + ("bias",), "id"),
    ]


def rename_table(cfg: DiTConfig) -> list[tuple[str, tuple, str]]:
    """[(reference key, our param path, transform)] for every trainable reference weight."""
    table = [
        ("x_embedder.proj.weight", ("x_embedder", "kernel"), "conv"),
        ("x_embedder.proj.bias", ("x_embedder", "bias"), "id"),
        *_linear("t_embedder.mlp.0", ("t_embedder", "fc1")),
        *_linear("t_embedder.mlp.2", ("t_embedder", "fc2")),
        ("y_embedder.embedding_table.weight", ("y_embedder", "embedding"), "id"),
    ]
    for i in range(cfg.depth):
        b = f"blocks.{i}"
        table += _linear(f"{b}.attn.qkv", ("blocks", i, "attn", "qkv"))
        table += _linear(f"{b}.attn.proj", ("blocks", i, "attn", "proj"))
        table += _linear(f"{b}.mlp.fc1", ("blocks", i, "mlp", "fc1"))
        table += _linear(f"{b}.mlp.fc2", ("blocks", i, "mlp", "fc2"))
        table += _linear(f"{b}.adaLN_modulation.1", ("blocks", i, "adaLN_modulation"))
    table += _linear("final_layer.adaLN_modulation.1", ("final_layer", "adaLN_modulation"))
    table += _linear("final_layer.linear", ("final_layer", "linear"))
    if cfg.repa_depth:  # REPA projector: nn.Sequential(Linear, SiLU, Linear, SiLU, Linear)
        for i, ours in ((0, "fc1"), (2, "fc2"), (4, "fc3")):
            table += _linear(f"projector.{i}", ("projector", ours))
    return table


_TRANSFORMS = {
    "id": lambda a: a,
    "linear": lambda a: a.T,  # (out, in) -> (in, out)
    "conv": lambda a: a.transpose(2, 3, 1, 0),  # (D, C, p, p) -> (p, p, C, D)
}


def _torch_shapes(cfg: DiTConfig) -> dict[str, tuple]:
    """Expected reference shapes, derived from the config."""
    d, p, c = cfg.hidden_size, cfg.patch_size, cfg.in_channels
    hid = int(d * cfg.mlp_ratio)
    shapes = {
        "x_embedder.proj.weight": (d, c, p, p), "x_embedder.proj.bias": (d,),
        "t_embedder.mlp.0.weight": (d, 256), "t_embedder.mlp.0.bias": (d,),
        "t_embedder.mlp.2.weight": (d, d), "t_embedder.mlp.2.bias": (d,),
        "y_embedder.embedding_table.weight": (cfg.num_classes + 1, d),
        "final_layer.adaLN_modulation.1.weight": (2 * d, d),
        "final_layer.adaLN_modulation.1.bias": (2 * d,),
        "final_layer.linear.weight": (p * p * cfg.out_channels, d),
        "final_layer.linear.bias": (p * p * cfg.out_channels,),
    }
    for i in range(cfg.depth):
        for name, (d_out, d_in) in {
            "attn.qkv": (3 * d, d), "attn.proj": (d, d), "mlp.fc1": (hid, d),
            "mlp.fc2": (d, hid), "adaLN_modulation.1": (6 * d, d),
        }.items():
            shapes[f"blocks.{i}.{name}.weight"] = (d_out, d_in)
            shapes[f"blocks.{i}.{name}.bias"] = (d_out,)
    if cfg.repa_depth:
        hp, z = cfg.repa_projector_dim, cfg.repa_z_dim
        for i, (d_out, d_in) in ((0, (hp, d)), (2, (hp, hp)), (4, (z, hp))):
            shapes[f"projector.{i}.weight"] = (d_out, d_in)
            shapes[f"projector.{i}.bias"] = (d_out,)
    return shapes


def torch_to_params(state_dict: Mapping[str, np.ndarray], cfg: DiTConfig) -> dict:
    """Reference state_dict (numpy arrays) -> our nested param dict (float32), the structure of
    nnx.to_pure_dict(nnx.state(DiT(cfg), nnx.Param)). Raises ValueError listing missing and
    unexpected keys, or naming the first key whose shape does not fit `cfg`."""
    table = rename_table(cfg)
    expected = {key for key, _, _ in table} | {"pos_embed"}
    missing = sorted(expected - set(state_dict), key=_natural)
    unexpected = sorted(set(state_dict) - expected, key=_natural)
    if missing or unexpected:
        raise ValueError(
            f"state_dict does not match {cfg.depth}-block DiT: missing keys {missing}, "
            f"unexpected keys {unexpected}"
        )
    shapes = _torch_shapes(cfg)
    shapes["pos_embed"] = (1, cfg.num_patches, cfg.hidden_size)
    for key in state_dict:  # the first mismatch in the checkpoint's own order
        got = tuple(np.shape(state_dict[key]))
        if got != shapes[key]:
            raise ValueError(f"state_dict[{key!r}] has shape {got}, expected {shapes[key]} for this config")
    pos = np.asarray(state_dict["pos_embed"], np.float32)[0]
    if not np.allclose(pos, sincos_pos_embed(cfg.hidden_size, *cfg.grid), atol=1e-5):
        raise ValueError("state_dict['pos_embed'] is not the fixed 2-D sin-cos embedding we use")
    params: dict = {}
    for key, path, kind in table:
        node = params
        for part in path[:-1]:
            node = node.setdefault(part, {})
        node[path[-1]] = _TRANSFORMS[kind](np.asarray(state_dict[key], np.float32))
    return params


def _natural(key: str):
    return [(0, int(s), "") if s.isdigit() else (1, 0, s) for s in key.split(".")]


# ----------------------------------------------------------------------------- torch files


def _omegaconf_globals() -> list:
    """The classes a pickled OmegaConf config is made of (allow-listed for weights_only loading:
    plain containers and value nodes, nothing that runs code); [] without omegaconf."""
    try:
        import omegaconf  # optional: the released files' config is an OmegaConf DictConfig
    except ImportError:
        return []
    from omegaconf import base, nodes  # optional: as above

    node_types = [getattr(nodes, n) for n in ("AnyNode", "StringNode", "IntegerNode", "FloatNode", "BooleanNode",
                                              "BytesNode", "PathNode") if hasattr(nodes, n)]
    return [omegaconf.DictConfig, omegaconf.ListConfig, base.ContainerMetadata, base.Metadata, *node_types,
            typing.Any, dict, list, tuple, set, int, float, str, bool, bytes, collections.defaultdict]


def load_torch_checkpoint(path: str, allow_pickle: bool = False) -> tuple[dict, dict[str, np.ndarray]]:
    """torch.load a reference checkpoint -> (config dict, state_dict of float32 numpy arrays).

    Loads with weights_only=True (no code execution), allowing the OmegaConf classes the released
    files' config is pickled as when omegaconf is installed (requirements-convert.txt).
    `allow_pickle=True` permits full unpickling, which can execute arbitrary code: only for files
    you trust that hold other objects still.
    """
    try:
        import torch  # optional: only to read .ckpt files
    except ImportError as e:
        raise ImportError(f"converting PyTorch checkpoints needs torch: pip install -r requirements-convert.txt "
                          f"(or {TORCH_PIN})") from e

    try:
        with torch.serialization.safe_globals(_omegaconf_globals()):
            ckpt = torch.load(path, map_location="cpu", weights_only=not allow_pickle)
    except pickle.UnpicklingError as e:
        first = next((line for line in str(e).splitlines() if "Unsupported global" in line), "")
        hint = ("" if _omegaconf_globals() else "the config is probably an OmegaConf DictConfig: pip install "
                "omegaconf (requirements-convert.txt) and rerun; ")
        raise ValueError(
            f"{path}: torch.load(weights_only=True) refused a non-tensor object ({first.strip()[:200]}); {hint}"
            "if you trust the file, --allow_pickle loads it fully (UNSAFE: unpickling can execute arbitrary code)"
        ) from None
    if not isinstance(ckpt, Mapping) or "state_dict" not in ckpt or "config" not in ckpt:
        keys = list(ckpt) if isinstance(ckpt, Mapping) else type(ckpt).__name__
        raise ValueError(f"{path}: expected a dict with 'config' and 'state_dict', got {keys}")
    state = {k: v.detach().to(torch.float32).cpu().numpy() for k, v in ckpt["state_dict"].items()}
    return _plain(ckpt["config"]), state


def convert_checkpoint(path: str, allow_pickle: bool = False) -> tuple[DiTConfig, dict]:
    """Reference checkpoint file -> (DiTConfig, our params)."""
    config, state = load_torch_checkpoint(path, allow_pickle=allow_pickle)
    cfg = cfg_from_torch_config(config)
    return cfg, torch_to_params(state, cfg)


def main(argv) -> None:
    cli.parse(FLAGS, argv, __doc__)
    cfg, params = convert_checkpoint(FLAGS.ckpt, allow_pickle=FLAGS.allow_pickle)
    checkpoint.save_inference(FLAGS.out, cfg.to_dict(), params)
    n = sum(a.size for a in _leaves(params))
    print(f"wrote {FLAGS.out}: {cfg.to_dict()} ({n:,} parameters)")


def _leaves(tree):
    for v in tree.values():
        yield from _leaves(v) if isinstance(v, dict) else [v]


if __name__ == "__main__":
    cli.run(main)
