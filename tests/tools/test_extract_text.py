"""extract_text: shards beside latents, exact resume, trim, the null embedding, the join with
latents in the pipeline; extract_latents with the FLUX.2 VAE."""


import jax
import numpy as np
import pytest
from flax import nnx
from ml_collections import ConfigDict
from PIL import Image

from patch_forcing.data import captioned, latents, pipeline
from patch_forcing.data import text_embeddings as TE
from patch_forcing.models import flux2_vae, text_encoder
from patch_forcing.tools import extract_latents as EL
from patch_forcing.tools import extract_text as ET

CAPTIONS = [captioned.CaptionedDigits("test").caption(i) for i in range(7)] + ["", "a 3"]


@pytest.fixture(scope="module")
def encoder():
    return ET.load_encoder("random", "words", "float32")


def _extract(out, encoder, **kw):
    opt = ET.Options(max_length=12, shard_size=4, batch_size=3, progress=False, **kw)
    return ET.extract(CAPTIONS, str(out), *encoder, {"encoder": "random", "tokenizer": "words"}, opt)


def test_shards_resume_and_read_back(tmp_path, encoder):
    enc, tok = encoder
    full = _extract(tmp_path / "full", encoder, dtype="float32")
    part = _extract(tmp_path / "part", encoder, dtype="float32", max_shards=1)
    assert len(part["shards"]) == 1 and len(full["shards"]) == 3
    (tmp_path / "part" / (TE.shard_name(1, 3) + ".tmp")).write_bytes(b"half written")
    resumed = _extract(tmp_path / "part", encoder, dtype="float32")
    assert resumed["shards"] == full["shards"]  # same bytes (sha256) as the uninterrupted run
    src = TE.TextSource(str(tmp_path / "full"))
    ids, mask = text_encoder.tokenize(tok, CAPTIONS, 12)
    want = np.asarray(enc.apply(enc.params, ids, mask))
    for i in range(len(CAPTIONS)):
        np.testing.assert_allclose(src[i]["text"], want[i], rtol=1e-5, atol=1e-6)
        np.testing.assert_array_equal(src[i]["text_mask"], mask[i])
    null = TE.read_null(str(tmp_path / "full"))
    np.testing.assert_allclose(null["text"], want[7], rtol=1e-5, atol=1e-6)  # the empty caption
    assert not null["text_mask"].any()
    with pytest.raises(ValueError, match="max_length=12.*16"):
        ET.extract(CAPTIONS, str(tmp_path / "full"), enc, tok, {"encoder": "random", "tokenizer": "words"},
                   ET.Options(max_length=16, shard_size=4, dtype="float32", progress=False))


def test_trim_keeps_real_rows_and_the_pipeline_joins_latents(tmp_path, encoder):
    _extract(tmp_path / "texts", encoder, trim=True)  # float16, real rows only
    full = _extract(tmp_path / "ref", encoder)
    trimmed, ref = TE.TextSource(str(tmp_path / "texts")), TE.TextSource(str(tmp_path / "ref"))
    assert full["dtype"] == "float16"
    for i in range(len(CAPTIONS)):
        m = ref[i]["text_mask"]
        np.testing.assert_array_equal(trimmed[i]["text"][m], ref[i]["text"][m])
        assert not trimmed[i]["text"][~m].any()
    lat = tmp_path / "lat"
    lat.mkdir()
    writer = latents.ShardWriter(str(lat), latents.shard_name(0, 1))
    for i in range(len(CAPTIONS)):
        writer.write(np.full((4, 4, 2), i, np.float32), 0, i)
    meta = {"format_version": 1, "num_examples": len(CAPTIONS), "num_shards": 1, "shard_size": 16,
            "latent_shape": [4, 4, 2], "record_shape": [4, 4, 2], "mode": "mean", "shards": [writer.commit()]}
    latents.write_metadata(str(lat), meta)
    cfg = ConfigDict(dict(name="latents", data_dir=str(lat), text_dir=str(tmp_path / "texts"), split_train="train",
                          split_eval="train[2:6]", image_size=(4, 4), channels=2, num_classes=1, batch_size=4))
    batch = next(iter(pipeline.make_eval_batches(cfg, "train[2:6]")))
    assert sorted(batch) == ["image", "label", "text", "text_mask"]
    np.testing.assert_array_equal(batch["image"][:, 0, 0, 0], [2, 3, 4, 5])
    np.testing.assert_array_equal(batch["text"], np.stack([trimmed[i]["text"] for i in range(2, 6)]))


def test_extract_latents_with_the_flux2_vae(tmp_path):
    folder = tmp_path / "images" / "cls"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(3):
        Image.fromarray(rng.integers(0, 256, (20 + i, 18, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    cfg = flux2_vae.Flux2VAEConfig(block_out_channels=(8, 16), layers_per_block=1, latent_channels=4, norm_num_groups=4)
    vae = flux2_vae.Flux2AutoencoderKL(cfg, rngs=nnx.Rngs(0))
    vae.bn.running_mean.value = jax.random.normal(jax.random.key(1), (16,))
    source = EL.ImageFolder(str(tmp_path / "images"))
    opt = EL.Options(image_size=16, shard_size=8, batch_size=8, flips=False, workers=1, progress=False)
    meta = EL.extract(source, str(tmp_path / "lat"), vae, "tiny-flux2", opt)
    assert meta["latent_shape"] == [8, 8, 4] and meta["scale_factor"] == 1.0
    got = latents.LatentSource(str(tmp_path / "lat"))
    crops = np.stack([EL.center_crop_arr(source.open(p), 16) for p, _ in source.items])
    want = np.asarray(vae.encode(crops.astype(np.float32) / 127.5 - 1.0))
    np.testing.assert_allclose(np.stack([got[i]["latent"] for i in range(3)]), want, rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="--mode='sample' with --vae=flux2"):
        EL.extract(source, str(tmp_path / "lat2"), vae, "tiny-flux2", EL.Options(image_size=16, mode="sample"))
