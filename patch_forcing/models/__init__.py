"""Models: the DiT/SiT backbone with per-patch conditioning and a difficulty head."""

from patch_forcing.models.dit import (
    DiT,
    DiTConfig,
    PRESETS,
    logical_axis_rules,
    param_count,
    preset,
)

__all__ = ["DiT", "DiTConfig", "PRESETS", "logical_axis_rules", "param_count", "preset"]
