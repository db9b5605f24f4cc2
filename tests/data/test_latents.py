"""Latent extraction (ADM crop, flip pairs, determinism, crash + resume) and LatentSource."""

import hashlib
import os

import numpy as np
import pytest
from PIL import Image

from patch_forcing.data import latents as L
from patch_forcing.models import vae as V
from patch_forcing.tools import extract_latents as E

SIZE = 32  # image_size in these tests; the tiny VAE downsamples by 2 -> 16x16x4 latents
SIZES = [(40, 33), (90, 64), (33, 70), (64, 64), (128, 50), (45, 45), (70, 100), (32, 32), (200, 66), (51, 37)]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """10 random PNGs of varied sizes: 6 in class 'ant', 4 in class 'bee' (+ a non-image file)."""
    root = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    for i, (w, h) in enumerate(SIZES):
        d = root / ("ant" if i < 6 else "bee")
        d.mkdir(exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(d / f"img{i}.png")
    (root / "ant" / "notes.txt").write_text("not an image")
    return root


@pytest.fixture(scope="module")
def vae_dir(tmp_path_factory):
    from flax import nnx

    d = tmp_path_factory.mktemp("vae")
    V.save_vae(V.AutoencoderKL(V.tiny_config(), rngs=nnx.Rngs(1)), str(d))
    return d


def _run(folder, vae_dir, out, *extra):
    return E.main(["extract_latents", "--images", str(folder), "--out", str(out), "--vae_path", str(vae_dir), "--image_size", str(SIZE),
                   "--shard_size", "4", "--batch_size", "8", "--noprogress", "--workers", "2", *extra])


def _sha(path):
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


def _shards(out):
    return sorted(n for n in os.listdir(out) if n.endswith(".array_record"))


@pytest.fixture(scope="module")
def full_run(folder, vae_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("run") / "lat"
    meta = _run(folder, vae_dir, out)
    return out, meta


def test_shards_counts_shapes_and_labels(full_run, folder):
    out, meta = full_run
    assert _shards(out) == [L.shard_name(i, 3) for i in range(3)]
    assert [s["num_examples"] for s in meta["shards"]] == [4, 4, 2]
    assert meta["num_examples"] == 10 and meta["latent_shape"] == [16, 16, 4]
    assert meta["record_shape"] == [2, 16, 16, 4] and meta["classes"] == ["ant", "bee"]
    assert L.read_metadata(str(out)) == meta
    for s in meta["shards"]:
        assert L.count_records(str(out / s["name"])) == s["num_examples"]
        assert L.file_sha256(str(out / s["name"])) == s["sha256"]
    src = L.LatentSource(str(out), verify=True)
    assert len(src) == 10
    items = [src[i] for i in range(10)]
    assert all(it["latent"].shape == (2, 16, 16, 4) and it["latent"].dtype == np.float32 for it in items)
    assert [int(it["label"]) for it in items] == [0] * 6 + [1] * 4
    assert all(isinstance(it["label"], np.int32) for it in items)
    from array_record.python.array_record_module import ArrayRecordReader

    raw = ArrayRecordReader(str(out / meta["shards"][1]["name"])).read_all()
    assert [L.decode_record(r)["index"] for r in raw] == [4, 5, 6, 7]


def test_flip_pairs_are_encodings_of_image_and_mirror(full_run, folder, vae_dir):
    out, _ = full_run
    vae = V.load_vae(local_path=str(vae_dir))
    src = L.LatentSource(str(out))
    files = sorted((folder / "ant").glob("*.png")) + sorted((folder / "bee").glob("*.png"))
    for i in (0, 7, 9):
        arr = E.center_crop_arr(Image.open(files[i]).convert("RGB"), SIZE)
        x = arr[None].astype(np.float32) / 127.5 - 1
        lat = src[i]["latent"]
        np.testing.assert_allclose(lat[0], vae.encode(x)[0], atol=1e-5, rtol=1e-5)
        np.testing.assert_allclose(lat[1], vae.encode(x[:, :, ::-1])[0], atol=1e-5, rtol=1e-5)
        assert np.abs(lat[0] - lat[1]).max() > 1e-2  # the pair is not one latent twice


def test_rerun_is_byte_identical(full_run, folder, vae_dir, tmp_path):
    out, meta = full_run
    meta2 = _run(folder, vae_dir, tmp_path / "again", "--workers", "1")
    assert [_sha(out / n) for n in _shards(out)] == [_sha(tmp_path / "again" / n) for n in _shards(out)]
    assert meta2["shards"] == meta["shards"]


def test_interrupted_run_resumes_without_redoing_finished_shards(full_run, folder, vae_dir, tmp_path, monkeypatch):
    ref, _ = full_run
    out = tmp_path / "lat"
    meta = _run(folder, vae_dir, out, "--max_shards", "1")
    assert [s["name"] for s in meta["shards"]] == [L.shard_name(0, 3)]
    first = out / L.shard_name(0, 3)
    stamp = (os.stat(first).st_ino, os.stat(first).st_mtime_ns)
    with pytest.raises(ValueError, match="incomplete: 1 of 3"):
        L.LatentSource(str(out))

    # Crash in the middle of shard 1: nothing new under a final name (the .tmp is dropped).
    write, calls = L.ShardWriter.write, []

    def crashing_write(self, *a):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt("killed")
        write(self, *a)

    monkeypatch.setattr(L.ShardWriter, "write", crashing_write)
    with pytest.raises(KeyboardInterrupt):
        _run(folder, vae_dir, out)
    assert _shards(out) == [L.shard_name(0, 3)]
    monkeypatch.undo()
    (out / (L.shard_name(1, 3) + ".tmp")).write_bytes(b"garbage")  # as a SIGKILL would leave it

    committed = []
    commit = L.ShardWriter.commit
    monkeypatch.setattr(L.ShardWriter, "commit", lambda self: committed.append(os.path.basename(self.path))
                        or commit(self))
    meta = _run(folder, vae_dir, out)
    assert committed == [L.shard_name(1, 3), L.shard_name(2, 3)]  # shard 0 not redone
    assert (os.stat(first).st_ino, os.stat(first).st_mtime_ns) == stamp
    assert not [n for n in os.listdir(out) if n.endswith(".tmp")]
    assert [_sha(out / n) for n in _shards(out)] == [_sha(ref / n) for n in _shards(ref)]
    assert len(L.LatentSource(str(out), verify=True)) == 10 and len(meta["shards"]) == 3

    committed.clear()  # a finished directory: nothing to do
    _run(folder, vae_dir, out)
    assert committed == []
    with pytest.raises(ValueError, match="image_size"):
        _run(folder, vae_dir, out, "--image_size", "16")


def test_renamed_shard_missing_from_metadata_is_kept(full_run, folder, vae_dir, tmp_path):
    # A crash between the rename and the metadata update: the final-named shard is complete.
    ref, meta = full_run
    out = tmp_path / "lat"
    _run(folder, vae_dir, out, "--max_shards", "1")
    os.link(ref / L.shard_name(1, 3), out / L.shard_name(1, 3))
    meta = _run(folder, vae_dir, out, "--max_shards", "0")
    assert [s["name"] for s in meta["shards"]] == [L.shard_name(0, 3), L.shard_name(1, 3)]


def test_center_crop_follows_adm_recipe():
    # Known image: 256x128 (w x h), blue centre columns [64, 192) between red borders, and a
    # 1-pixel checkerboard in the top rows. Two BOX halvings (128 >= 64, 64 >= 64) -> 64x32,
    # no resize, crop columns [16, 48) = original [64, 192): all blue; the checkerboard averages.
    a = np.zeros((128, 256, 3), np.uint8)
    a[:, :, 0] = 255
    a[:, 64:192] = (0, 0, 255)
    a[:8, 64:192] = ((np.indices((8, 128)).sum(0) % 2) * 255)[..., None]
    out = E.center_crop_arr(Image.fromarray(a), 32)
    assert out.shape == (32, 32, 3) and out.dtype == np.uint8
    np.testing.assert_array_equal(out[2:], np.broadcast_to(np.array([0, 0, 255], np.uint8), (30, 32, 3)))
    assert np.all(np.abs(out[:2].astype(int) - 127.5) <= 1)

    # Generic image, recipe step by step: 100x70 -> BOX to 50x35 -> BICUBIC to 46x32 -> crop x 7.
    img = Image.fromarray(np.random.default_rng(0).integers(0, 256, (70, 100, 3), dtype=np.uint8))
    step = img.resize((50, 35), Image.BOX).resize((46, 32), Image.BICUBIC)
    np.testing.assert_array_equal(E.center_crop_arr(img, 32), np.asarray(step)[:, 7:39])
    tall = Image.fromarray(np.random.default_rng(1).integers(0, 256, (41, 20, 3), dtype=np.uint8))
    want = np.asarray(tall.resize((32, 66), Image.BICUBIC))[17:49]  # upscale: 32/20 * 41 = 65.6 -> 66
    np.testing.assert_array_equal(E.center_crop_arr(tall, 32), want)


def test_sample_and_moments_modes(vae_dir):
    import jax
    from flax import nnx

    vae = V.load_vae(local_path=str(vae_dir))
    g, state = nnx.split(vae)
    x = np.random.default_rng(0).integers(0, 256, (4, 16, 16, 3), dtype=np.uint8)
    idx, key = np.array([5, 9, 2, 7], np.int32), jax.random.key(4)
    enc = E._jitted()
    mom = np.asarray(enc(g, state, x, idx, key, mode="moments", flips=True))
    smp = np.asarray(enc(g, state, x, idx, key, mode="sample", flips=True))
    mean = np.asarray(enc(g, state, x, idx, key, mode="mean", flips=True))
    assert mom.shape == (4, 2, 8, 8, 8) and smp.shape == mean.shape == (4, 2, 8, 8, 4)
    np.testing.assert_allclose(mom[..., :4], mean, atol=1e-6)
    eps = np.stack([[jax.random.normal(jax.random.fold_in(jax.random.fold_in(key, i), v), (8, 8, 4))
                     for v in range(2)] for i in idx])
    np.testing.assert_allclose(smp, mean + np.exp(0.5 * mom[..., 4:]) * eps, atol=1e-4, rtol=1e-4)
    # A sample depends on the example's index, not its position in the batch.
    perm = [2, 0, 3, 1]
    again = np.asarray(enc(g, state, x[perm], idx[perm], key, mode="sample", flips=True))
    np.testing.assert_allclose(again, smp[perm], atol=1e-5)
    rng = np.random.default_rng(0)
    draws = np.stack([L.sample_moments(mom[0, 0], rng) for _ in range(200)])
    std = np.exp(0.5 * mom[0, 0, ..., 4:])
    assert np.abs((draws.mean(0) - mean[0, 0]) / (std / np.sqrt(200))).max() < 5
    assert np.abs(draws.std(0) / std - 1).max() < 0.3


def test_record_roundtrip_and_errors(tmp_path):
    lat = np.random.default_rng(0).standard_normal((2, 3, 3, 4)).astype(np.float16)
    r = L.decode_record(L.encode_record(lat, 7, 123))
    np.testing.assert_array_equal(r["latent"], lat)
    assert r["latent"].dtype == np.float16 and r["label"] == 7 and r["index"] == 123
    with pytest.raises(FileNotFoundError, match="metadata.json"):
        L.LatentSource(str(tmp_path))
    with pytest.raises(ValueError, match="--mode='x'"):
        E.Options(mode="x").check(1)
    with pytest.raises(ValueError, match="--batch_size=6"):
        E.Options(batch_size=6).check(8)


def test_pixels_beside_latents_mirror_with_their_latent(full_run, folder, vae_dir, tmp_path):
    """extract_latents --pixels stores each cropped image; with data.with_pixels the pipeline's
    batch['pixels'] is mirrored exactly when its latent is the mirror's (REPA reads them)."""
    from patch_forcing.data import pipeline

    out = tmp_path / "lat"
    meta = _run(folder, vae_dir, out, "--pixels")
    assert meta["pixels"] is True
    src = L.LatentSource(str(out))
    files = sorted((folder / "ant").glob("*.png")) + sorted((folder / "bee").glob("*.png"))
    for i in range(10):
        crop = E.center_crop_arr(Image.open(files[i]).convert("RGB"), SIZE)
        np.testing.assert_array_equal(src[i]["pixels"], crop)
    ref = L.LatentSource(str(full_run[0]))  # the same latents as without pixels
    np.testing.assert_array_equal(src[3]["latent"], ref[3]["latent"])
    data = dict(name="latents", data_dir=str(out), split_train="train", image_size=(16, 16), channels=4,
                num_classes=2, batch_size=10, hflip=True, with_pixels=True)
    batch = next(pipeline.make_train_iterator(data, seed=3))
    mirrored = []
    for lat, px in zip(batch["image"], batch["pixels"]):
        i = next(j for j in range(10) if np.isclose(src[j]["latent"], lat[None]).all(axis=(1, 2, 3)).any())
        m = bool(np.allclose(src[i]["latent"][1], lat))
        np.testing.assert_array_equal(px, src[i]["pixels"][:, ::-1] if m else src[i]["pixels"])
        mirrored.append(m)
    assert batch["pixels"].dtype == np.uint8 and 0 < sum(mirrored) < 10  # both cases seen
    assert "pixels" not in next(pipeline.make_train_iterator({**data, "with_pixels": False}, seed=3))
    with pytest.raises(ValueError, match="hold no images; extract them with .*--pixels"):
        next(pipeline.make_train_iterator({**data, "data_dir": str(full_run[0])}, seed=3))
    with pytest.raises(ValueError, match="pixels=False, this run has True"):
        _run(folder, vae_dir, full_run[0], "--pixels")
    with pytest.raises(ValueError, match="data.with_pixels=True needs data.name='latents'"):
        pipeline.check_config({**data, "name": "digits"})
