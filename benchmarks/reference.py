"""The authors' PyTorch code (github CompVis/patch-forcing) for side-by-side benchmarks, or our
independent torch DiT where it cannot be had.

`load()` exports the reference's `patch_flow/` package from a local git directory (the
PF_REFERENCE_GIT environment variable, else the mirror this project reads) into the git-ignored
folder benchmarks/.reference/ at run time; it is never committed. Where an import the reference
needs is not installed (timm, jaxtyping, omegaconf, jutils: training-framework glue, none of it
the model's arithmetic except timm's three layers), a small stand-in written here is put on the path
and the report names it. Without the reference, the fallback is tests/models/torch_dit.py.
"""

from __future__ import annotations

import ast
import importlib
import io
import os
import pathlib
import shutil
import subprocess
import sys
import tarfile
import textwrap
import types

ROOT = pathlib.Path(__file__).resolve().parents[1]
HERE = pathlib.Path(__file__).resolve().parent / ".reference"
DEFAULT_GIT = pathlib.Path("/work/.mirror/CompVis+patch-forcing/repo")

# Stand-ins for packages the reference imports for glue; each is used only where the real one is
# missing. timm's layers are written from their documented behaviour (fused SDPA attention).
STUBS = {
    "jaxtyping": """
        class _Any:
            def __class_getitem__(cls, item):
                return object
        Float = Int = Bool = Shaped = _Any
    """,
    "jutils": """
        import importlib

        def exists(x):
            return x is not None

        def default(x, d):
            return x if x is not None else d

        def instantiate_from_config(config):
            module, _, name = config["target"].rpartition(".")
            return getattr(importlib.import_module(module), name)(**config.get("params", {}))
    """,
    "omegaconf": """
        class OmegaConf:
            @staticmethod
            def register_new_resolver(*args, **kwargs):
                pass

        DictConfig = dict
    """,
    "timm": """
    """,
    "timm.models": """
    """,
    "timm.models.vision_transformer": """
        import torch
        from torch import nn
        from torch.nn import functional as F

        class PatchEmbed(nn.Module):
            def __init__(self, img_size=224, patch_size=16, in_chans=3, embed_dim=768, bias=True):
                super().__init__()
                img = (img_size, img_size) if isinstance(img_size, int) else tuple(img_size)
                self.patch_size = (patch_size, patch_size)
                self.grid_size = (img[0] // patch_size, img[1] // patch_size)
                self.num_patches = self.grid_size[0] * self.grid_size[1]
                self.proj = nn.Conv2d(in_chans, embed_dim, patch_size, patch_size, bias=bias)

            def forward(self, x):
                return self.proj(x).flatten(2).transpose(1, 2)

        class Attention(nn.Module):
            def __init__(self, dim, num_heads=8, qkv_bias=False, **unused):
                super().__init__()
                self.num_heads, self.head_dim = num_heads, dim // num_heads
                self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
                self.proj = nn.Linear(dim, dim)

            def forward(self, x):
                b, n, c = x.shape
                qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
                x = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2])
                return self.proj(x.transpose(1, 2).reshape(b, n, c))

        class Mlp(nn.Module):
            def __init__(self, in_features, hidden_features=None, act_layer=nn.GELU, drop=0.0, **unused):
                super().__init__()
                hidden_features = hidden_features or in_features
                self.fc1 = nn.Linear(in_features, hidden_features)
                self.act = act_layer()
                self.fc2 = nn.Linear(hidden_features, in_features)

            def forward(self, x):
                return self.fc2(self.act(self.fc1(x)))
    """,
}


def _importable(name: str) -> bool:
    try:
        importlib.import_module(name)
        return True
    except ImportError:
        return False


def export(git_dir: pathlib.Path, dest: pathlib.Path) -> str:
    """`git archive` the reference's patch_flow/ into dest/src; returns the commit."""
    commit = subprocess.run(["git", "--git-dir", str(git_dir), "rev-parse", "HEAD"], check=True,
                            capture_output=True, text=True).stdout.strip()
    tar = subprocess.run(["git", "--git-dir", str(git_dir), "archive", "HEAD", "patch_flow"],
                         check=True, capture_output=True).stdout
    (dest / "src").mkdir(parents=True, exist_ok=True)
    with tarfile.open(fileobj=io.BytesIO(tar)) as tf:
        tf.extractall(dest / "src", filter="data")
    (dest / "COMMIT").write_text(commit + "\n")
    return commit


def _install_stubs(dest: pathlib.Path) -> list[str]:
    """Write stand-ins for the missing glue packages under dest/stubs; returns their names."""
    shutil.rmtree(dest / "stubs", ignore_errors=True)  # a stand-in never shadows a real package
    used = []
    for top in ("jaxtyping", "jutils", "omegaconf", "timm"):
        if _importable(top):
            continue
        for name, body in STUBS.items():
            if name == top or name.startswith(top + "."):
                path = dest / "stubs" / pathlib.Path(*name.split(".")) / "__init__.py"
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_text(textwrap.dedent(body))
        used.append(top)
    return used


def _function(path: pathlib.Path, qualname: str, env: dict):
    """One function (or method, 'Class.method') of a source file, defined in `env`; for code
    whose module imports a training framework (lightning) that a benchmark does not need."""
    tree = ast.parse(path.read_text())
    node, *rest = qualname.split(".")
    found = next(n for n in tree.body if getattr(n, "name", None) == node)
    for part in rest:
        found = next(n for n in found.body if getattr(n, "name", None) == part)
    exec(compile(ast.Module([found], []), str(path), "exec"), env)
    return env[found.name]


def load(git_dir: str | None = None) -> types.SimpleNamespace:
    """The reference's pieces: kind ('reference' or 'fallback'), a description, and callables.

    reference: model(**kw) (PatchForcingDiT), flow(cfg) (PatchFlowForcing with its LTG sampler),
    train_forward(self, batch) (LatentPatchForcingTrainer.forward), update_ema, samplers
    {euler_pf, dual_loop, look_ahead} (integrators.py).
    """
    git = pathlib.Path(git_dir or os.environ.get("PF_REFERENCE_GIT", DEFAULT_GIT))
    src = HERE / "src" / "patch_flow"
    if not src.exists() and (git / "HEAD").exists():
        export(git, HERE)
    if not src.exists():
        return _fallback(f"reference code not found (no {src}, no git dir {git})")
    stubs = _install_stubs(HERE)
    for p in (HERE / "stubs", HERE / "src"):
        if str(p) not in sys.path:
            sys.path.insert(0, str(p))
    try:
        pf = importlib.import_module("patch_flow.models.pf_transformer")
        flow_pf = importlib.import_module("patch_flow.flow_pf")
        integrators = importlib.import_module("patch_flow.integrators")
        importlib.import_module("patch_flow.timestep_schedules")
        dg = importlib.import_module("patch_flow.diagonal_gaussian")
    except ImportError as e:
        return _fallback(f"reference import failed: {e}")
    import torch

    trainer = src / "trainer.py"
    env = {"torch": torch, "OrderedDict": importlib.import_module("collections").OrderedDict,
           "DiagonalGaussian": dg.DiagonalGaussian, "exists": lambda x: x is not None}
    commit = (HERE / "COMMIT").read_text().strip() if (HERE / "COMMIT").exists() else "unknown"
    return types.SimpleNamespace(
        kind="reference",
        description=(f"the authors' patch_flow (CompVis/patch-forcing @ {commit[:7]}): PatchForcingDiT, "
                     "PatchFlowForcing + LogitNormalTruncatedGaussian, LatentPatchForcingTrainer.forward, "
                     "update_ema, integrators.py" + (f"; stand-ins for {', '.join(stubs)}" if stubs else "")),
        stubs=stubs,
        model=pf.PatchForcingDiT,
        flow=lambda patch_size, std=0.6, loc=0.7, scale=1.0: flow_pf.PatchFlowForcing(
            timestep_sampler={"target": "patch_flow.timestep_schedules.LogitNormalTruncatedGaussian",
                              "params": dict(std=std, loc=loc, scale=scale)}, patch_size=patch_size),
        train_forward=_function(trainer, "LatentPatchForcingTrainer.forward", env),
        update_ema=_function(trainer, "update_ema", env),
        samplers={"euler_pf": integrators.EulerPF, "dual_loop": integrators.DualLoopSampler,
                  "look_ahead": integrators.LookAheadSampler},
    )


def _fallback(why: str) -> types.SimpleNamespace:
    sys.path.insert(0, str(ROOT))
    from tests.models.torch_dit import TorchDiT

    return types.SimpleNamespace(kind="fallback", description=f"tests/models/torch_dit.py ({why})",
                                 stubs=[], model=TorchDiT, samplers={})
