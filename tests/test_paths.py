"""Every path a user names may be gs://: latents written and read, data, workdir, checkpoints,
reference statistics and weights, on a fake bucket (tests/fake_gcs.py) with nothing written
under the working directory (the old `extract_latents --out=gs://b/x` made `./gs:/b/x`)."""

import json

import ml_collections
import numpy as np
import pytest
from PIL import Image

from configs import common, digits
from patch_forcing import paths
from tests.fake_gcs import fake_gcs

pytestmark = pytest.mark.usefixtures("fast_compiles")


@pytest.fixture
def bucket(tmp_path, monkeypatch):
    """A fake gs:// store under tmp_path/store; the test runs in tmp_path/cwd, which must stay empty."""
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    with fake_gcs(tmp_path / "store") as root:
        yield root
    assert not list(cwd.iterdir()), f"local files for gs:// paths: {list(cwd.rglob('*'))}"


def test_atomic_write_and_local_file_upload(bucket):
    paths.atomic_write("gs://b/dir/meta.json", b"{}")
    with paths.local_file("gs://b/dir/blob.bin") as local:
        assert not local.startswith("gs:")
        with open(local, "wb") as f:
            f.write(b"abc")
    assert (bucket / "b/dir/meta.json").read_bytes() == b"{}"
    assert (bucket / "b/dir/blob.bin").read_bytes() == b"abc"
    assert paths.is_remote("gs://b/x") and not paths.is_remote("/tmp/x")


@pytest.mark.slow
def test_latents_extracted_to_and_trained_from_a_bucket(bucket):
    """extract_latents --images/--vae_path/--out on gs://, then a latent model trains with data,
    workdir, checkpoints and the grid-decoding VAE all on gs://."""
    from flax import nnx

    from patch_forcing import train
    from patch_forcing.data import latents
    from patch_forcing.models import vae as vae_lib
    from patch_forcing.tools import extract_latents

    rng = np.random.default_rng(0)
    for i in range(8):
        folder = bucket / "b" / "images" / ("cat" if i < 4 else "dog")
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (20, 17 + i, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    vae_lib.save_vae(vae_lib.AutoencoderKL(vae_lib.tiny_config(), rngs=nnx.Rngs(0)), str(bucket / "b" / "vae"))

    meta = extract_latents.main(["extract_latents", "--images=gs://b/images", "--out=gs://b/lat",
                                 "--vae_path=gs://b/vae", "--image_size=16", "--shard_size=4", "--batch_size=8",
                                 "--noprogress", "--workers=1"])
    assert [s["name"] for s in meta["shards"]] == [latents.shard_name(i, 2) for i in range(2)]
    assert sorted(p.name for p in (bucket / "b" / "lat").iterdir()) == [
        "latents-00000-of-00002.array_record", "latents-00001-of-00002.array_record", "metadata.json"]
    assert len(latents.LatentSource("gs://b/lat", verify=True)) == 8

    c = digits.get_config("smoke")
    c.data.update(name="latents", data_dir="gs://b/lat", split_train="train", split_eval="train[:8]",
                  image_size=(8, 8), channels=4, num_classes=2, hflip=True, batch_size=8)
    c.model = common.model_block("PF-Tiny/2", image_size=8, in_channels=4, num_classes=2, hidden_size=32,
                                 depth=1, num_heads=2)
    c.train.num_steps, c.checkpoint.every_steps = 2, 2
    c.log.every_steps = c.log.eval_every_steps = c.log.sample_every_steps = 2
    c.log.num_eval_examples, c.sample.vae = 8, "gs://b/vae"
    c.eval.reference = "gs://b/VIRTUAL_imagenet256_labeled.npz"  # latent data: a reference file, not 'data'
    train.train_and_evaluate(c, "gs://b/run")
    run = bucket / "b" / "run"
    assert (run / "checkpoints" / "2").is_dir() and (run / "inference" / "config.json").is_file()
    assert [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()] == [2, 2]
    assert list((run / "samples").glob("*.png")) and list(run.glob("events.out.tfevents.*"))
    assert json.loads((run / "config.json").read_text())["data"]["data_dir"] == "gs://b/lat"


def test_data_reference_statistics_and_weights_from_a_bucket(bucket):
    from patch_forcing.data import pipeline
    from patch_forcing.evaluation import metrics
    from patch_forcing.models import classifier, inception

    store = bucket / "b"
    store.mkdir()
    images = np.arange(6 * 4 * 4, dtype=np.uint8).reshape(6, 4, 4)
    np.savez(store / "arrays.npz", images=images, labels=np.arange(6) % 2)
    c = ml_collections.ConfigDict(dict(name="arrays", data_dir="gs://b/arrays.npz", split_train="train",
                                       split_eval="train", image_size=(4, 4), pad=0, hflip=False, batch_size=6,
                                       num_classes=2, channels=1, num_workers=0, source="auto"))
    (batch,) = pipeline.make_eval_batches(c, "train")
    np.testing.assert_allclose(batch["image"][..., 0], images / 127.5 - 1, atol=1e-6)

    idx = np.arange(2 * 28 * 28, dtype=np.uint8).reshape(2, 28, 28)  # MNIST IDX files in a bucket
    (store / "mnist").mkdir()
    (store / "mnist" / "t10k-images-idx3-ubyte").write_bytes(b"\0\0\x08\x03" + np.array(
        [2, 28, 28], ">u4").tobytes() + idx.tobytes())
    np.testing.assert_array_equal(pipeline.read_idx("gs://b/mnist/t10k-images-idx3-ubyte"), idx)

    stats = dict(mu=np.ones(3), sigma=np.eye(3))
    metrics.save_reference_stats(store / "ref.npz", stats, images=np.zeros((5, 4, 4, 3), np.uint8))
    loaded = metrics.load_reference_stats("gs://b/ref.npz")
    np.testing.assert_array_equal(loaded["sigma"], np.eye(3))
    assert [b.shape for b in metrics.iter_npz_batches("gs://b/ref.npz", 2)] == [(2, 4, 4, 3)] * 2 + [(1, 4, 4, 3)]

    cfg = classifier.ClassifierConfig(image_size=(8, 8), channels=1, num_classes=10)
    _, params, _ = classifier.init(cfg, 0)
    from flax import nnx

    classifier.save("gs://b/clf", {"format": classifier.FORMAT, "config": cfg.to_dict()},
                    nnx.to_pure_dict(params))
    assert classifier.exists("gs://b/clf") and classifier.load("gs://b/clf")[0]["config"] == cfg.to_dict()
    with pytest.raises(FileNotFoundError, match="gs://b/pt_inception.pth"):
        inception.load_inception("gs://b/pt_inception.pth")
