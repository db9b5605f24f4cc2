"""Every preset of every shipped config validates for every mode, keeps its validation split out
of training, and every validation error names a field that exists in the config."""

import importlib
import re

import ml_collections
import pytest

from patch_forcing import config_lib
from patch_forcing.data import pipeline
from tests import REPO

CONFIG_FILES = sorted(p.stem for p in (REPO / "configs").glob("*.py") if p.stem not in ("__init__", "common"))


def _presets():
    for name in CONFIG_FILES:
        module = importlib.import_module(f"configs.{name}")
        assert hasattr(module, "PRESETS"), f"configs/{name}.py must list its presets in PRESETS"
        for arg in module.PRESETS:
            yield name, arg


PRESETS = list(_presets())


def _config(name, arg):
    return importlib.import_module(f"configs.{name}").get_config(arg)


def _rows(split: str, n: int = 1000):
    base, _ = pipeline.parse_split(split)[0], None
    return base, set(range(n)[pipeline._slice(split, n)])


@pytest.mark.parametrize("name,arg", PRESETS)
def test_every_preset_validates_for_every_mode(name, arg):
    c = _config(name, arg)
    if config_lib.repa_aligns(c) and c.repa.encoder.startswith("dinov2") and not c.repa.encoder_path:
        with pytest.raises(ValueError, match="config.repa.encoder_path is empty"):  # the user names the weights
            config_lib.validate(c, "train")
        c.repa.encoder_path = "/ckpt/dinov2_vitb14_reg4_pretrain.pth"
    for mode in config_lib.MODES:
        if c.model.get("family") == "t2i" and mode == "evaluate":  # FID is for class models
            with pytest.raises(ValueError, match="prompt_accuracy"):
                config_lib.validate(c, mode)
            continue
        config_lib.validate(c, mode)
    # the validation split is not part of the training split
    (tb, train), (eb, held_out) = _rows(c.data.split_train), _rows(c.data.split_eval)
    assert tb != eb or not train & held_out, (c.data.split_train, c.data.split_eval)


def test_imagenet_evaluates_like_the_paper_by_default():
    """FID-50k without guidance at 100 steps against ADM's reference batch; cfg 4 is a preset."""
    from configs import imagenet

    c = imagenet.get_config()
    assert (c.sampler.name, c.sampler.steps, c.sampler.cfg_scale) == ("look_ahead", 100, 1.0)
    assert c.eval.num_samples == 50_000 and c.eval.feature_network == "inception"
    assert c.eval.reference.endswith("VIRTUAL_imagenet256_labeled.npz")
    assert imagenet.get_config("XL,cfg4").sampler.cfg_scale == 4.0
    assert imagenet.get_config("B,sit").sampler.name == "euler"
    assert c.data.split_eval == "validation"


def test_a_data_reference_for_latent_data_fails_validation():
    from configs import imagenet

    c = imagenet.get_config()
    c.eval.reference = "data"
    with pytest.raises(ValueError, match=r"config.eval.reference='data' needs pixel data"):
        config_lib.validate(c, "evaluate")


# ----------------------------------------------------------------------------- error messages
FIELD = re.compile(r"(?<![\w.-])(?:config\.)?([a-z_]+(?:\.[A-Za-z_]\w*)+)")


def _leaves(cfg, prefix=""):
    for k, v in cfg.items():
        if isinstance(v, ml_collections.ConfigDict):
            yield from _leaves(v, f"{prefix}{k}.")
        else:
            yield f"{prefix}{k}", v


def _bad_values(v):
    if isinstance(v, bool):
        return ["yes", 2]
    if isinstance(v, int):
        return [-1, 0, 3, 10**9, 1.5, "x"]
    if isinstance(v, float):
        return [-1.0, 0.0, 1.5, 1e9, float("nan"), "x"]
    if isinstance(v, str):
        return ["bogus", "", "train[a:b]"]
    if isinstance(v, tuple):
        return [(), (3,), (3, 3), ("a", "b")]
    return [None]


def _set(cfg, dotted, value):
    *path, last = dotted.split(".")
    node = cfg
    for p in path:
        node = node[p]
    with node.unlocked() if hasattr(node, "unlocked") else _nothing():
        node[last] = value


class _nothing:
    def __enter__(self):
        return self

    def __exit__(self, *a):
        return False


def _resolves(cfg, dotted: str) -> bool:
    node = cfg
    for part in dotted.split("."):
        if not isinstance(node, ml_collections.ConfigDict) or part not in node:
            return False
        node = node[part]
    return True


def _messages(name, arg):
    out = []
    for field, value in _leaves(_config(name, arg)):
        for bad in _bad_values(value):
            c = _config(name, arg)
            try:
                _set(c, field, bad)
            except (TypeError, ValueError):  # ml_collections keeps a field's type: not a validation error
                continue
            try:
                config_lib.validate(c, "train")
            except (ValueError, TypeError) as e:
                out.append((field, bad, str(e)))
    return out


@pytest.mark.parametrize("name,arg", [("digits", "smoke"), ("imagenet", "B")])
def test_every_validation_error_names_a_field_that_exists(name, arg):
    c = _config(name, arg)
    top = set(c.keys())
    messages = _messages(name, arg)
    assert len(messages) > 100  # the walk reaches the checks
    bad = []
    for field, value, message in messages:
        assert "\n" not in message, (field, value, message)
        named = [m for m in FIELD.findall(message) if m.split(".")[0] in top]
        if not named:
            bad.append(f"{field}={value!r}: names no config field: {message}")
        bad += [f"{field}={value!r}: {n} does not exist: {message}" for n in named if not _resolves(c, n)]
    assert not bad, "\n".join(bad[:20])
