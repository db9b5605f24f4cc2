"""Tests for patch_forcing.data.pipeline: sources, splits, padding, flips, host sharding, resumable state."""

import gzip
from pathlib import Path

import ml_collections
import numpy as np
import pytest

from patch_forcing.data import pipeline as data
from tests import MNIST_DIR

# Label histogram of the official MNIST test split (digits 0..9).
MNIST_TEST_COUNTS = [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]


def cfg(**kw):
    base = dict(name="digits", split_train="train", split_eval="test", image_size=(8, 8), pad=0,
                hflip=False, batch_size=50, num_classes=10, channels=1, num_workers=0,
                data_dir="", source="auto")
    base.update(kw)
    return ml_collections.ConfigDict(base)


def mnist_cfg(**kw):
    if not (MNIST_DIR / "t10k-images-idx3-ubyte.gz").exists():
        pytest.skip(f"MNIST IDX files not found at {MNIST_DIR}")
    base = dict(name="mnist", split_train="test[:8000]", split_eval="test[8000:]",
                image_size=(32, 32), pad=2, data_dir=str(MNIST_DIR), source="idx")
    base.update(kw)
    return cfg(**base)


def take(it, k):
    return [next(it) for _ in range(k)]


def assert_same_batches(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x["image"], y["image"])
        np.testing.assert_array_equal(x["label"], y["label"])


# ----------------------------------------------------------------------------- digits


def test_digits_batches_shape_range_and_determinism():
    it = data.make_train_iterator(cfg(), seed=0)
    batches = take(it, 5)
    for b in batches:
        assert b["image"].shape == (50, 8, 8, 1) and b["image"].dtype == np.float32
        assert b["label"].shape == (50,) and b["label"].dtype == np.int32
        assert b["image"].min() >= -1 and b["image"].max() <= 1
        assert set(np.unique(b["label"])) <= set(range(10))
    imgs = np.concatenate([b["image"] for b in batches])
    assert imgs.min() == -1 and imgs.max() == 1  # uses the full range 0..16 -> [-1, 1]
    assert_same_batches(batches, take(data.make_train_iterator(cfg(), seed=0), 5))
    other = next(data.make_train_iterator(cfg(), seed=1))
    assert not np.array_equal(other["label"], batches[0]["label"])


def test_digits_eval_batches_equal_scaled_sklearn_arrays():
    images, labels = data.load_digits_arrays()
    assert images.shape == (1797, 8, 8, 1) and images.max() == 16 and labels.shape == (1797,)
    batches = list(data.make_eval_batches(cfg(), "test", batch_size=100))
    assert [len(b["label"]) for b in batches] == [100, 100, 97]  # 1797 - 1500, last one partial
    got = np.concatenate([b["image"] for b in batches])
    np.testing.assert_allclose(got, images[1500:] / 8.0 - 1.0, atol=1e-6)
    np.testing.assert_array_equal(np.concatenate([b["label"] for b in batches]), labels[1500:])
    assert_same_batches(batches, list(data.make_eval_batches(cfg(), "test", batch_size=100)))
    few = list(data.make_eval_batches(cfg(), "train[10%:]", num_examples=7, batch_size=4))
    np.testing.assert_array_equal(np.concatenate([b["label"] for b in few]), labels[150:157])


# ----------------------------------------------------------------------------- IDX


def test_read_idx_real_mnist_test_split():
    if not MNIST_DIR.exists():
        pytest.skip(f"MNIST IDX files not found at {MNIST_DIR}")
    images = data.read_idx(MNIST_DIR / "t10k-images-idx3-ubyte.gz")
    labels = data.read_idx(MNIST_DIR / "t10k-labels-idx1-ubyte.gz")
    assert images.shape == (10000, 28, 28) and images.dtype == np.uint8
    assert labels.shape == (10000,) and labels[0] == 7  # the first test image is a 7
    assert np.bincount(labels, minlength=10).tolist() == MNIST_TEST_COUNTS
    assert images.max() == 255 and images[:, 0, :].max() == 0  # top rows are background


def write_idx(path, array, code, gz=False):
    header = bytes([0, 0, code, array.ndim]) + np.array(array.shape, ">u4").tobytes()
    raw = header + array.astype(array.dtype.newbyteorder(">")).tobytes()
    path.write_bytes(gzip.compress(raw) if gz else raw)


def test_read_idx_raw_gz_and_bad_files(tmp_path):
    rng = np.random.default_rng(0)
    a = rng.integers(0, 256, (5, 3, 4)).astype(np.uint8)
    write_idx(tmp_path / "a", a, 0x08)
    np.testing.assert_array_equal(data.read_idx(tmp_path / "a"), a)
    b = rng.integers(-3000, 3000, (7,)).astype(np.int16)
    write_idx(tmp_path / "b.gz", b, 0x0B, gz=True)
    np.testing.assert_array_equal(data.read_idx(tmp_path / "b.gz"), b)
    (tmp_path / "bad").write_bytes(b"\x12\x34\x08\x01" + bytes(8))
    with pytest.raises(ValueError, match="bad magic"):
        data.read_idx(tmp_path / "bad")
    (tmp_path / "short").write_bytes((tmp_path / "a").read_bytes()[:-5])
    with pytest.raises(ValueError, match=r"shape \(5, 3, 4\)"):
        data.read_idx(tmp_path / "short")


# ----------------------------------------------------------------------------- MNIST


def test_mnist_pad_border_and_splits():
    c = mnist_cfg()
    src, meta = data.make_source(c, c.split_train)
    assert meta == dict(image_shape=(32, 32, 1), num_classes=10, num_examples=8000, name="mnist")
    assert len(src) == 8000
    assert data.make_source(c, c.split_eval)[1]["num_examples"] == 2000
    assert data.make_source(c, "test[-25%:]")[1]["num_examples"] == 2500
    raw = data.read_idx(MNIST_DIR / "t10k-images-idx3-ubyte.gz")
    labels = data.read_idx(MNIST_DIR / "t10k-labels-idx1-ubyte.gz")
    b = next(iter(data.make_eval_batches(c, c.split_eval, num_examples=64, batch_size=64)))
    assert b["image"].shape == (64, 32, 32, 1)
    border = np.ones((32, 32), bool)
    border[2:-2, 2:-2] = False
    assert np.all(b["image"][:, border] == -1.0)
    np.testing.assert_allclose(b["image"][:, 2:-2, 2:-2, 0], raw[8000:8064] / 127.5 - 1, atol=1e-6)
    np.testing.assert_array_equal(b["label"], labels[8000:8064])
    t = next(data.make_train_iterator(c, seed=0))
    assert t["image"].shape == (50, 32, 32, 1) and np.all(t["image"][:, border] == -1.0)


def test_mnist_auto_falls_back_to_idx_and_missing_data_error(tmp_path):
    c = mnist_cfg(source="auto")
    assert data.make_source(c, "test[:10]")[1]["num_examples"] == 10
    with pytest.raises(FileNotFoundError, match="tfds 'mnist'.*IDX.*network"):
        data.make_source(mnist_cfg(source="auto", data_dir=str(tmp_path)), "test")
    with pytest.raises(FileNotFoundError, match="train-images-idx3-ubyte"):
        data.make_source(mnist_cfg(source="idx"), "train")


# ----------------------------------------------------------------------------- flips / epochs


def epoch(seed, hflip, **kw):
    it = data.make_train_iterator(cfg(hflip=hflip, **kw), seed=seed)
    return np.concatenate([b["image"] for b in take(it, 1500 // 50)])  # exactly one epoch


def count_flips(images, originals):
    ok = {x.tobytes() for x in originals}
    mirrored = {x[:, ::-1].tobytes() for x in originals} - ok  # skip mirror-symmetric digits
    seen = np.array([x.tobytes() in ok for x in images])
    flipped = np.array([x.tobytes() in mirrored for x in images])
    assert np.all(seen | flipped)  # every example is an original or its mirror image
    return flipped


def test_hflip_half_flipped_deterministic_and_off_never():
    images = data.load_digits_arrays()[0][:1500].astype(np.float32) / 8 - 1
    plain = epoch(0, False)
    # One epoch without flips is a permutation of the training split.
    assert sorted(x.tobytes() for x in plain) == sorted(x.tobytes() for x in images)
    assert not count_flips(plain, images).any()
    f0 = count_flips(epoch(0, True), images)
    assert 0.43 < f0.mean() < 0.57  # ~ half (std 0.013 over ~1500 non-symmetric digits)
    np.testing.assert_array_equal(f0, count_flips(epoch(0, True), images))
    f1 = count_flips(epoch(1, True), images)
    assert 0.43 < f1.mean() < 0.57 and (f0 != f1).any()


def test_epochs_are_reshuffled():
    it = data.make_train_iterator(cfg(batch_size=100), seed=3)
    labels = np.concatenate([b["label"] for b in take(it, 30)])  # 2 epochs of 1500
    e1, e2 = labels[:1500], labels[1500:]
    assert sorted(e1) == sorted(e2) and not np.array_equal(e1, e2)


# ----------------------------------------------------------------------------- hosts / state


def test_two_processes_split_the_global_batches():
    c = cfg(batch_size=20, hflip=True)
    one = take(data.make_train_iterator(c, seed=5), 80)  # 1600 examples: crosses an epoch
    p0 = take(data.make_train_iterator(c, seed=5, process_index=0, process_count=2), 80)
    p1 = take(data.make_train_iterator(c, seed=5, process_index=1, process_count=2), 80)
    for g, a, b in zip(one, p0, p1):  # flips included: they are seeded by the global position
        assert a["image"].shape == (10, 8, 8, 1)
        for k in ("image", "label"):  # host p holds rows [10p, 10p+10) of each global batch, in order,
            np.testing.assert_array_equal(g[k][:10], a[k])  # as to_global_batch puts them together
            np.testing.assert_array_equal(g[k][10:], b[k])


def test_two_processes_disjoint_within_each_epoch(tmp_path):
    # 200 examples whose (flip-invariant) pixel value is their index.
    ids = np.arange(200)
    np.savez(tmp_path / "ids.npz", images=np.broadcast_to(ids[:, None, None], (200, 4, 4)).astype(
        np.uint8), labels=ids % 10)
    c = cfg(name="arrays", data_dir=str(tmp_path / "ids.npz"), image_size=(4, 4), batch_size=20,
            hflip=True)
    seen = []
    for p in range(2):
        it = data.make_train_iterator(c, seed=9, process_index=p, process_count=2)
        z = np.concatenate([b["image"] for b in take(it, 20)])  # 2 epochs: 200 per host
        seen.append(np.round((z[:, 0, 0, 0] + 1) * 127.5).astype(int).reshape(2, 100))
    for e in range(2):
        assert len(set(seen[0][e]) | set(seen[1][e])) == 200  # cover the split, no overlap
    assert not np.array_equal(seen[0][0], seen[0][1])  # reshuffled between epochs


@pytest.mark.parametrize("process_count", [1, 2])
def test_state_round_trip_across_epoch_boundary(process_count):
    c = cfg(batch_size=64, hflip=True)
    kw = dict(seed=7, process_index=process_count - 1, process_count=process_count)
    it = data.make_train_iterator(c, **kw)
    take(it, 22)  # 22 * 64 = 1408 < 1500: the 24th batch spans the epoch boundary
    state = it.get_state()
    expected = take(it, 4)
    fresh = data.make_train_iterator(c, **kw)
    fresh.set_state(state)
    assert_same_batches(take(fresh, 4), expected)


def test_orbax_checkpoint_of_the_iterator(tmp_path):
    import grain
    import orbax.checkpoint as ocp

    c = cfg(batch_size=32)
    it = data.make_train_iterator(c, seed=2)
    take(it, 3)
    with ocp.CheckpointManager(tmp_path / "ckpt", item_names=("data",)) as mngr:
        mngr.save(3, args=ocp.args.Composite(data=grain.checkpoint.CheckpointSave(it)))
        mngr.wait_until_finished()
    expected = take(it, 2)
    fresh = data.make_train_iterator(c, seed=2)
    with ocp.CheckpointManager(tmp_path / "ckpt", item_names=("data",)) as mngr:
        mngr.restore(3, args=ocp.args.Composite(data=grain.checkpoint.CheckpointRestore(fresh)))
    assert_same_batches(take(fresh, 2), expected)


# ----------------------------------------------------------------------------- other sources


@pytest.fixture(scope="module")
def tiny_tfds(tmp_path_factory):
    tfds = pytest.importorskip("tensorflow_datasets")

    class PfTinyDigits(tfds.core.GeneratorBasedBuilder):
        VERSION = tfds.core.Version("1.0.0")

        def _info(self):
            return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
                "image": tfds.features.Image(shape=(6, 6, 1)),
                "label": tfds.features.ClassLabel(num_classes=3)}))

        def _split_generators(self, dl_manager):
            return {"train": self._generate_examples(10), "test": self._generate_examples(4)}

        def _generate_examples(self, n):
            for i in range(n):
                yield i, {"image": np.full((6, 6, 1), 25 * i, np.uint8), "label": i % 3}

    root = tmp_path_factory.mktemp("tfds")
    PfTinyDigits(data_dir=str(root), file_format="array_record").download_and_prepare()
    return str(root)


def test_tfds_source_on_local_array_record(tiny_tfds):
    c = cfg(name="tfds", tfds_name="pf_tiny_digits", data_dir=tiny_tfds, image_size=(6, 6),
            split_train="train", num_classes=3, batch_size=4)
    src, meta = data.make_source(c, "train[2:5]")
    assert meta == dict(image_shape=(6, 6, 1), num_classes=3, num_examples=3, name="pf_tiny_digits")
    batches = list(data.make_eval_batches(c, "train", batch_size=4))
    images = np.concatenate([b["image"] for b in batches])  # stored in tfds' order
    values = sorted(images[:, 0, 0, 0].tolist())
    np.testing.assert_allclose(values, [25 * i / 127.5 - 1 for i in range(10)], atol=1e-6)
    for b in batches:  # label i % 3 goes with pixel value 25 * i
        i = np.round((b["image"][:, 0, 0, 0] + 1) * 127.5 / 25).astype(int)
        np.testing.assert_array_equal(b["label"], i % 3)
    it = data.make_train_iterator(cfg(**{**c.to_dict(), "batch_size": 5}), seed=0)
    first_epoch = np.concatenate([b["image"][:, 0, 0, 0] for b in take(it, 2)])
    np.testing.assert_allclose(sorted(first_epoch), values, atol=1e-6)


def test_missing_tfds_dataset_says_prepare_with_network(tmp_path):
    c = cfg(name="tfds", tfds_name="mnist", data_dir=str(tmp_path), image_size=(28, 28))
    with pytest.raises(FileNotFoundError, match="'mnist' is not prepared.*network") as e:
        data.make_source(c, "test")
    assert "\n" not in str(e.value)
    with pytest.raises(FileNotFoundError, match="'mnist' is not prepared"):
        data.make_source(mnist_cfg(source="tfds", data_dir=str(tmp_path)), "test")
    with pytest.raises(ValueError, match="'no_such_dataset_xyz' is unknown"):
        data.make_source(cfg(name="tfds", tfds_name="no_such_dataset_xyz"), "train")


class FakeLatentSource:
    """Stands in for patch_forcing.data.latents.LatentSource: flip pairs (2, 4, 4, 3)."""

    def __init__(self, directory):
        self.directory, self.n = directory, 40

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        z = np.full((2, 4, 4, 3), 3.0 * i, np.float32)
        z[1] += 1000.0  # element 1 = latent of the flipped image
        return {"latent": z, "label": i % 5}


def test_latents_pick_one_of_the_flip_pair(tmp_path, monkeypatch):
    monkeypatch.setattr(data.latents, "LatentSource", FakeLatentSource)
    c = cfg(name="latents", data_dir=str(tmp_path), image_size=(4, 4), channels=3,
            split_train="train[:30]", batch_size=10)
    assert data.make_source(c, "train[:30]")[1]["num_examples"] == 30

    def values(hflip, seed=0):
        it = data.make_train_iterator(cfg(**{**c.to_dict(), "hflip": hflip}), seed=seed)
        bs = take(it, 30)
        z = np.concatenate([b["image"] for b in bs])
        assert z.shape == (300, 4, 4, 3) and np.all(z == z[:, :1, :1, :1])  # unscaled, unflipped
        return z[:, 0, 0, 0], np.concatenate([b["label"] for b in bs])

    v, y = values(False)
    assert v.max() < 1000 and v.max() == 87.0  # stored values, never the pair's element 1
    np.testing.assert_array_equal(y, (v / 3).astype(int) % 5)
    v1, _ = values(True)
    picked = v1 >= 1000
    assert 0.35 < picked.mean() < 0.65
    np.testing.assert_array_equal(picked, values(True)[0] >= 1000)
    assert not np.array_equal(picked, values(True, seed=1)[0] >= 1000)


def test_real_latent_directory_with_moments_and_flips(tmp_path):
    latents = data.latents
    n = 20
    writer = latents.ShardWriter(str(tmp_path), latents.shard_name(0, 1))
    for i in range(n):  # (2, h, w, 2c): [mean = 10 i (+1000 for the mirror), logvar = 0]
        z = np.zeros((2, 2, 2, 6), np.float32)
        z[0, ..., :3], z[1, ..., :3] = 10 * i, 10 * i + 1000
        writer.write(z, label=i % 4, index=i)
    latents.write_metadata(str(tmp_path), dict(
        format_version=latents.FORMAT_VERSION, num_examples=n, num_shards=1, shard_size=n,
        latent_shape=[2, 2, 3], record_shape=[2, 2, 2, 6], dtype="float32", mode="moments",
        flips=True, classes=list("abcd"), shards=[writer.commit()]))
    c = cfg(name="latents", data_dir=str(tmp_path), image_size=(2, 2), channels=3, num_classes=4,
            split_train="train", batch_size=10, hflip=True)
    ev = list(data.make_eval_batches(c, "train[-10:]"))[0]  # eval: element 0's mean
    np.testing.assert_array_equal(ev["image"], np.broadcast_to(
        10 * np.arange(10, 20, dtype=np.float32)[:, None, None, None], (10, 2, 2, 3)))
    np.testing.assert_array_equal(ev["label"], np.arange(10, 20) % 4)
    z = np.concatenate([b["image"] for b in take(data.make_train_iterator(c, seed=0), 40)])
    m = z.mean(axis=(1, 2, 3))
    mirror = m >= 900
    assert 0.4 < mirror.mean() < 0.6  # hflip picks the mirror's latent about half the time
    eps = z - (np.round(m / 10) * 10)[:, None, None, None]  # the stored mean is a multiple of 10
    assert abs(eps.std() - 1) < 0.05 and abs(eps.mean()) < 0.05  # posterior samples, std 1


def test_arrays_npz_source(tmp_path):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (12, 4, 4)).astype(np.uint8)
    np.savez(tmp_path / "a.npz", images=images, labels=np.arange(12) % 2)
    c = cfg(name="arrays", data_dir=str(tmp_path / "a.npz"), image_size=(4, 4), num_classes=2)
    b = list(data.make_eval_batches(c, "train[4:]", batch_size=8))
    assert len(b) == 1 and b[0]["image"].shape == (8, 4, 4, 1)
    np.testing.assert_allclose(b[0]["image"][..., 0], images[4:] / 127.5 - 1, atol=1e-6)


# ----------------------------------------------------------------------------- config / jax


@pytest.mark.parametrize("field,value,pc", [
    ("name", "imagenet", 1), ("source", "web", 1), ("image_size", (0, 8), 1), ("pad", -1, 1),
    ("hflip", "yes", 1), ("batch_size", 0, 1), ("batch_size", 51, 2), ("num_workers", -1, 1),
    ("split_train", 5, 1), ("split_train", "train[a:b]", 1), ("image_size", (16, 16), 1),
    ("channels", 3, 1), ("tfds_name", None, 1),
])
def test_bad_config_names_the_field(field, value, pc):
    c = cfg(**{field: value}) if field != "tfds_name" else cfg(name="tfds")
    with pytest.raises(ValueError, match=rf"data\.{field}") as e:
        data.make_train_iterator(c, seed=0, process_count=pc)
    assert "\n" not in str(e.value)


def test_num_workers_gives_the_same_batches():
    a = take(data.make_train_iterator(cfg(hflip=True), seed=4), 3)
    b = take(data.make_train_iterator(cfg(hflip=True, num_workers=1), seed=4), 3)
    assert_same_batches(a, b)
