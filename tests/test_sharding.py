"""Meshes and global batches (patch_forcing/sharding.py) on the 8 fake CPU devices."""

import jax
import numpy as np
import pytest
from jax.sharding import Mesh

from configs import digits
from patch_forcing import sharding
from patch_forcing.data import pipeline


def test_to_global_batch_shards_over_data_axes():
    devices = np.array(jax.devices()[:8]).reshape(-1, 2)
    c = digits.get_config("smoke").data
    c.batch_size = 16
    batch = next(pipeline.make_train_iterator(c, seed=0))
    out = sharding.to_global_batch(batch, Mesh(devices, sharding.BATCH_AXES))
    assert out["image"].shape == (16, 8, 8, 1)
    assert out["image"].sharding.spec[0] == ("data", "fsdp")
    assert len(out["image"].addressable_shards) == 8
    assert out["image"].addressable_shards[0].data.shape == (2, 8, 8, 1)
    np.testing.assert_array_equal(np.asarray(out["label"]), batch["label"])
    out2 = sharding.to_global_batch(batch, sharding.flat_mesh(jax.devices()[:4]))
    np.testing.assert_array_equal(np.asarray(out2["image"]), batch["image"])


def test_make_mesh_sizes_and_errors():
    cfg = digits.get_config("smoke").mesh
    assert dict(sharding.make_mesh(cfg).shape) == {"data": 8, "fsdp": 1}
    cfg.data, cfg.fsdp = 2, -1
    assert dict(sharding.make_mesh(cfg).shape) == {"data": 2, "fsdp": 4}
    cfg.data, cfg.fsdp = 3, -1
    with pytest.raises(ValueError, match=r"config.mesh \(data=3, fsdp=-1\) does not divide the 8 devices"):
        sharding.make_mesh(cfg)
    cfg.data, cfg.fsdp = -1, -1
    with pytest.raises(ValueError, match="at most one -1"):
        sharding.make_mesh(cfg)
