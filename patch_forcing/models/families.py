"""Model families behind one interface, so the train loop, samplers and checkpoints serve both.

A family is a config dataclass (with `image_size`, `in_channels`, `patch_size`, `num_patches`,
`per_patch`, `to_dict`/`from_dict`) and three pure functions: `init(cfg, key) -> (graphdef, params,
rest)`, `make_apply(graphdef, rest) -> apply(params, x, t, cond)` and `from_params(cfg, params) ->
(apply, params)`. What differs is only `cond`: 'dit' takes class labels (B,) int (the last class
is the null class), 't2i' a text dict {'text': (B, L, D), 'text_mask': (B, L)}.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

from patch_forcing.models import dit, t2i


class Family(NamedTuple):
    name: str
    config: type  # DiTConfig | T2IConfig
    init: Callable
    make_apply: Callable
    from_params: Callable
    conditioning: str  # 'label' or 'text'


FAMILIES = {
    "dit": Family("dit", dit.DiTConfig, dit.init, dit.make_apply, dit.from_params, "label"),
    "t2i": Family("t2i", t2i.T2IConfig, t2i.init, t2i.make_apply, t2i.from_params, "text"),
}
DEFAULT = "dit"  # inference checkpoints written before families existed hold a DiT


def get(name: str) -> Family:
    if name not in FAMILIES:
        raise ValueError(f"model family={name!r} is not one of {list(FAMILIES)}")
    return FAMILIES[name]


def of(model_config: Any) -> Family:
    """The family of a config object (DiTConfig or T2IConfig)."""
    for fam in FAMILIES.values():
        if isinstance(model_config, fam.config):
            return fam
    raise ValueError(f"{type(model_config).__name__} is no model family's config; allowed: "
                     f"{[f.config.__name__ for f in FAMILIES.values()]}")
