"""Captioned digits: canvases match their captions, captions parse back, the source is exact and
goes through the pipeline with its tokens; pre-extracted text joins latents by index."""

import numpy as np
import pytest
from ml_collections import ConfigDict

from patch_forcing.data import captioned as C
from patch_forcing.data import pipeline


def test_caption_round_trip_and_canvas_content():
    for i in range(40):
        image, attrs, right_first = C.draw("train", i)
        text = C.caption(attrs, right_first)
        np.testing.assert_array_equal(C.parse(text), attrs)
        assert image.shape == (16, 32, 3) and image.dtype == np.uint8
        for side, (digit, colour, size) in enumerate(attrs):
            half = image[:, side * 16:(side + 1) * 16].astype(np.float32)
            assert np.argmax(half.reshape(-1, 3).sum(0)) == np.argmax(C.COLOUR_RGB[colour])  # its colour
            rows, cols = np.nonzero(half.max(-1) > 40)
            extent = max(rows.max() - rows.min(), cols.max() - cols.min()) + 1
            assert (extent > 8) == bool(size), (i, side, extent)  # large digits span more than 8 px
    assert C.parse("a large blue 7 right of a small red 3").tolist() == [[3, 0, 0], [7, 2, 1]]
    with pytest.raises(ValueError, match="is not of the form"):
        C.parse("a red 3 left of a blue 7")
    np.testing.assert_array_equal(C.region_attrs(C.region_class(np.array([[9, 2, 1], [0, 0, 0]]))),
                                  [[9, 2, 1], [0, 0, 0]])


def test_tokenizer_pads_right_and_rejects_unknown_words():
    tok = C.WordTokenizer()
    out = tok(["a small red 3 left of a large blue 7", ""], max_length=12)
    assert out["input_ids"].shape == (2, 12) and out["attention_mask"].sum(1).tolist() == [10, 0]
    assert out["input_ids"][0, :3].tolist() == [C.VOCAB.index(w) for w in ("a", "small", "red")]
    with pytest.raises(ValueError, match="'purple' is not in the vocabulary"):
        tok(["a small purple 3"])


def test_source_is_exact_and_the_pipeline_keeps_the_conditioning():
    cfg = ConfigDict(dict(name="captioned_digits", split_train="train", split_eval="test[:40]", image_size=(16, 32),
                          channels=3, num_classes=10, batch_size=8, pad=0, hflip=False, num_workers=0))
    src, meta = pipeline.make_source(cfg, "test[10:20]")
    assert len(src) == 10 and meta["image_shape"] == (16, 32, 3)
    np.testing.assert_array_equal(src[0]["image"], C.draw("test", 10)[0])
    batch = next(iter(pipeline.make_eval_batches(cfg, "test[:40]")))
    assert sorted(batch) == ["attrs", "image", "token_mask", "tokens"]
    assert batch["image"].shape == (8, 16, 32, 3) and -1.0 <= batch["image"].min() < batch["image"].max() <= 1.0
    assert batch["tokens"].shape == (8, C.MAX_TOKENS) and batch["token_mask"].dtype == bool
    it = pipeline.make_train_iterator(cfg, seed=0)
    first = next(it)
    again = next(pipeline.make_train_iterator(cfg, seed=0))
    for k in first:
        np.testing.assert_array_equal(first[k], again[k])
    with pytest.raises(ValueError, match="base must be one of"):
        pipeline.make_source(cfg, "val")
