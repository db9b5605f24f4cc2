"""Captioned digits: the small text-to-image task (no download), its captions and tokenizer.

A canvas is 16 x 32 RGB, black, with one digit in each 16 x 16 half, taken from scikit-learn's
bundled 8x8 digits ('train' canvases use its first 1500 digits, 'test' the other 297), drawn in a
colour (red, green, blue) at a size (small: 8 x 8 at a random place in its half; large: 16 x 16,
bilinear). The caption names both, left to right or right to left, at random:
"a small red 3 left of a large blue 7" or "a large blue 7 right of a small red 3". Everything
about canvas i comes from the key (split, i), so the source is random access and exact.

`attrs` (2, 3) int32 is the truth: rows (left, right), columns (digit, colour, size); `parse`
reads it back from any caption of the grammar, so generated images can be scored against prompts
(`evaluation.prompt_accuracy`). `WordTokenizer` maps the words to ids (0 = padding).
"""

from __future__ import annotations

import functools
from typing import Sequence

import numpy as np
from PIL import Image
from sklearn.datasets import load_digits

COLOURS = ("red", "green", "blue")
COLOUR_RGB = np.array([[255, 30, 30], [30, 230, 30], [40, 90, 255]], np.float32)
SIZES = ("small", "large")
RELATIONS = ("left", "right")
VOCAB = ("<pad>", "a", "of", *SIZES, *COLOURS, *RELATIONS, *(str(d) for d in range(10)))
CANVAS = (16, 32)  # (H, W); the halves are the two 16 x 16 regions
REGION = 16
MAX_TOKENS = 12  # the longest caption has 10 words
NUM_REGION_CLASSES = 10 * len(COLOURS) * len(SIZES)  # digit, colour, size jointly
SPLITS = {"train": (slice(0, 1500), 60_000, 1), "test": (slice(1500, None), 5_000, 2)}  # digits, canvases, seed


# ----------------------------------------------------------------------------- captions


def caption(attrs: np.ndarray, right_first: bool = False) -> str:
    """attrs (2, 3) [left, right] x [digit, colour, size] -> the caption."""
    words = [f"a {SIZES[s]} {COLOURS[c]} {d}" for d, c, s in np.asarray(attrs)]
    return f"{words[1]} right of {words[0]}" if right_first else f"{words[0]} left of {words[1]}"


def parse(text: str) -> np.ndarray:
    """A caption of the grammar -> attrs (2, 3) int32; one-line ValueError otherwise."""
    w = text.split()
    ok = len(w) == 10 and w[0] == w[6] == "a" and w[5] == "of" and w[4] in RELATIONS
    ok = ok and all(w[i] in SIZES and w[i + 1] in COLOURS and w[i + 2].isdigit() for i in (1, 7))
    if not ok:
        raise ValueError(f"prompt {text!r} is not of the form 'a <size> <colour> <digit> left|right of "
                         f"a <size> <colour> <digit>' (sizes {SIZES}, colours {COLOURS})")
    first, second = ([int(w[i + 2]), COLOURS.index(w[i + 1]), SIZES.index(w[i])] for i in (1, 7))
    pair = [first, second] if w[4] == "left" else [second, first]
    return np.asarray(pair, np.int32)


class WordTokenizer:
    """Whitespace words -> ids in VOCAB (0 = padding, right side), called like a transformers
    tokenizer, so `models.text_encoder.tokenize` takes it: tok(prompts, padding='max_length',
    max_length=L, truncation=True, return_tensors='np') -> {'input_ids', 'attention_mask'}."""

    def __init__(self, vocab: Sequence[str] = VOCAB):
        self.vocab = tuple(vocab)
        self.ids = {w: i for i, w in enumerate(self.vocab)}

    def encode(self, text: str) -> list[int]:
        unknown = [w for w in text.split() if w not in self.ids]
        if unknown:
            raise ValueError(f"prompt word {unknown[0]!r} is not in the vocabulary {list(self.vocab[1:])}")
        return [self.ids[w] for w in text.split()]

    def __call__(self, prompts, padding="max_length", max_length=MAX_TOKENS, truncation=True, return_tensors="np"):
        del padding, truncation, return_tensors  # always padded to max_length and truncated
        ids = np.zeros((len(prompts), max_length), np.int32)
        for i, p in enumerate(prompts):
            row = self.encode(p)[:max_length]
            ids[i, :len(row)] = row
        return {"input_ids": ids, "attention_mask": ids > 0}


# ----------------------------------------------------------------------------- canvases


@functools.cache
def _digits() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """sklearn digits as intensities in [0, 1]: small (N, 8, 8), large (N, 16, 16), labels (N,)."""
    d = load_digits()
    small = (d.images / 16.0).astype(np.float32)
    large = np.stack([np.asarray(Image.fromarray(im, "F").resize((REGION, REGION), Image.BILINEAR))
                      for im in small]).clip(0.0, 1.0)
    return small, large, d.target.astype(np.int32)


def draw(split: str, index: int) -> tuple[np.ndarray, np.ndarray, bool]:
    """Canvas `index` of `split`: (uint8 (16, 32, 3), attrs (2, 3), right_first)."""
    rows, _, seed = SPLITS[split]
    small, large, labels = (a[rows] for a in _digits())
    rng = np.random.default_rng([seed, index])
    which = rng.integers(0, len(labels), 2)
    colour, size = rng.integers(0, len(COLOURS), 2), rng.integers(0, len(SIZES), 2)
    offset = rng.integers(0, REGION - 8 + 1, (2, 2))
    right_first = bool(rng.integers(0, 2))
    canvas = np.zeros((*CANVAS, 3), np.float32)
    for side in range(2):
        region = np.zeros((REGION, REGION), np.float32)
        if size[side]:
            region = large[which[side]]
        else:
            (y, x) = offset[side]
            region[y:y + 8, x:x + 8] = small[which[side]]
        canvas[:, side * REGION:(side + 1) * REGION] = region[..., None] * COLOUR_RGB[colour[side]]
    attrs = np.stack([labels[which], colour, size], axis=1).astype(np.int32)
    return np.round(canvas).astype(np.uint8), attrs, right_first


class CaptionedDigits:
    """grain random-access source of `split` canvases [start, stop): records {'image' uint8
    (16, 32, 3), 'tokens' (MAX_TOKENS,) int32, 'token_mask' bool, 'attrs' (2, 3) int32}."""

    def __init__(self, split: str, rows: slice = slice(None)):
        if split not in SPLITS:
            raise ValueError(f"captioned_digits split {split!r} is not one of {list(SPLITS)}")
        self.split, self.tokenizer = split, WordTokenizer()
        self.start, stop, _ = rows.indices(SPLITS[split][1])
        self.length = max(stop - self.start, 0)

    def __len__(self) -> int:
        return self.length

    def caption(self, i: int) -> str:
        _, attrs, right_first = draw(self.split, self.start + int(i))
        return caption(attrs, right_first)

    def __getitem__(self, i):
        image, attrs, right_first = draw(self.split, self.start + int(i))
        tok = self.tokenizer([caption(attrs, right_first)])
        return {"image": image, "tokens": tok["input_ids"][0], "token_mask": tok["attention_mask"][0],
                "attrs": attrs}

    def __repr__(self) -> str:
        return f"CaptionedDigits({self.split!r}, start={self.start}, length={self.length})"


def regions(images: np.ndarray) -> np.ndarray:
    """(B, 16, 32, C) canvases -> (B, 2, 16, 16, C) [left, right] halves."""
    images = np.asarray(images)
    return np.stack([images[:, :, :REGION], images[:, :, REGION:2 * REGION]], axis=1)


def region_class(attrs: np.ndarray) -> np.ndarray:
    """(..., 3) [digit, colour, size] -> (...,) the joint class digit * 6 + colour * 2 + size."""
    attrs = np.asarray(attrs)
    return (attrs[..., 0] * len(COLOURS) + attrs[..., 1]) * len(SIZES) + attrs[..., 2]


def region_attrs(cls: np.ndarray) -> np.ndarray:
    """The inverse of `region_class`: (...,) -> (..., 3)."""
    cls = np.asarray(cls)
    return np.stack([cls // (len(COLOURS) * len(SIZES)), cls // len(SIZES) % len(COLOURS), cls % len(SIZES)], -1)
