"""Input pipeline on grain: random-access sources, the training iterator, eval batches.

Batches are dicts of numpy arrays: `image` float32 (B_local, H, W, C) NHWC, in [-1, 1] for pixel
data (latents as stored, already scaled), `label` int32 (B_local,) where the data has classes, and
any other field of the records as is (the conditioning: captioned digits' `tokens`/`token_mask`,
pre-extracted `text`/`text_mask`); latents with `data.with_pixels` also carry `pixels` uint8
(B_local, S, S, 3), the encoded images flipped with their latents (REPA's encoder reads them).
Sources (`data.name`): 'digits' (sklearn's bundled 8x8 digits), 'mnist' (IDX files or tfds),
'tfds', 'latents' (`data.latents.LatentSource`; a stored flip pair is the hflip augmentation; split
'x' reads <data_dir>/x/, and 'train' may also be data_dir itself; with `data.text_dir` joined with
pre-extracted text embeddings, `data.text_embeddings`), 'arrays' (.npz) and 'captioned_digits'
(`data.captioned`). Paths may be gs://.
Splits are tfds-style strings: 'test', 'test[:8000]', 'train[10%:]', 'test[-2000:]'.

What a reader must know: the training stream is shuffle(seed) -> repeat -> per-example randomness
seeded by (seed, global index) -> batches of B/P -> host p takes batches p, p+P, ..., so host p's
k-th batch is rows [p*B/P, (p+1)*B/P) of the k-th global batch of a 1-host run, in order: the
global batch that `sharding.to_global_batch` assembles from the hosts is that batch exactly, and the
iterator's state (`get_state`/`set_state`, checkpointed by `checkpoint.py`) resumes it exactly.
"""

from __future__ import annotations

import dataclasses
import gzip
import os
import re
import zipfile
import zlib
from typing import Any

import grain
import numpy as np
from absl import flags
from sklearn.datasets import load_digits

from patch_forcing import UserError, paths
from patch_forcing.data import captioned, latents, text_embeddings

__all__ = [
    "NAMES",
    "ArraySource",
    "check_config",
    "parse_split",
    "load_digits_arrays",
    "read_idx",
    "make_source",
    "make_train_iterator",
    "make_eval_batches",
]

NAMES = ("digits", "mnist", "tfds", "latents", "arrays", "captioned_digits")
MNIST_SOURCES = ("auto", "tfds", "idx")
DIGITS_TRAIN = 1500  # digits 'train' = first 1500 images, 'test' = the remaining 297
_REQUIRED = object()
_SPLIT_RE = re.compile(r"^([A-Za-z0-9_\-]*)(?:\[(-?\d+%?)?:(-?\d+%?)?\])?$")
_IDX_DTYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
_MNIST_FILES = {"train": "train-{}-idx{}-ubyte", "test": "t10k-{}-idx{}-ubyte"}


# ----------------------------------------------------------------------------- config


def _get(cfg, field: str, default: Any = _REQUIRED):
    value = cfg.get(field, None) if hasattr(cfg, "get") else getattr(cfg, field, None)
    if value is None:
        if default is _REQUIRED:
            raise ValueError(f"data.{field} is required")
        return default
    return value


def _is_int(x) -> bool:
    return isinstance(x, (int, np.integer)) and not isinstance(x, (bool, np.bool_))


def _image_size(cfg) -> tuple[int, int] | None:
    size = _get(cfg, "image_size", None)
    if size is None:
        return None
    size = (size, size) if _is_int(size) else tuple(size)
    if len(size) != 2 or not all(_is_int(s) and s > 0 for s in size):
        raise ValueError(f"data.image_size={size!r} must be an int or (H, W) of positive ints")
    return int(size[0]), int(size[1])


def check_config(data_cfg, process_count: int = 1) -> None:
    """Validates the `data` config block (cheap; raises a one-line ValueError per field)."""
    name = _get(data_cfg, "name")
    if name not in NAMES:
        raise ValueError(f"data.name={name!r} is not one of {list(NAMES)}")
    source = _get(data_cfg, "source", "auto")
    if source not in MNIST_SOURCES:
        raise ValueError(f"data.source={source!r} is not one of {list(MNIST_SOURCES)}")
    if name == "tfds":
        _get(data_cfg, "tfds_name")
    for field in ("split_train", "split_eval"):
        split = _get(data_cfg, field, None)
        if split is not None and not isinstance(split, str):
            raise ValueError(f"data.{field}={split!r} must be a split string like 'test[:8000]'")
        if split is not None and name != "tfds" and not _SPLIT_RE.match(split):
            raise ValueError(f"data.{field}={split!r} must look like 'name', 'name[a:b]' or "
                             "'name[a%:b%]'")
    _image_size(data_cfg)
    pad = _get(data_cfg, "pad", 0)
    if not _is_int(pad) or pad < 0:
        raise ValueError(f"data.pad={pad!r} must be an int >= 0")
    if name == "latents" and pad:
        raise ValueError(f"data.pad={pad!r} must be 0 for data.name='latents'")
    for field in ("hflip", "with_pixels"):
        value = _get(data_cfg, field, False)
        if not isinstance(value, (bool, np.bool_)):
            raise ValueError(f"data.{field}={value!r} must be True or False")
    if _get(data_cfg, "with_pixels", False) and name != "latents":
        raise ValueError(f"data.with_pixels=True needs data.name='latents' (data.name={name!r} are the images)")
    text_dir = _get(data_cfg, "text_dir", "")
    if text_dir and (not isinstance(text_dir, str) or name != "latents"):
        raise ValueError(f"data.text_dir={text_dir!r} must be a text-embedding directory, for data.name='latents'")
    batch = _get(data_cfg, "batch_size")
    if not _is_int(batch) or batch <= 0 or batch % process_count:
        raise ValueError(f"data.batch_size={batch!r} must be a positive int divisible by the "
                         f"process count {process_count}")
    for field, low in (("num_classes", 1), ("channels", 1), ("num_workers", 0)):
        value = _get(data_cfg, field, low)
        if not _is_int(value) or value < low:
            raise ValueError(f"data.{field}={value!r} must be an int >= {low}")


def parse_split(split: str) -> tuple[str, str | None, str | None]:
    """'test[:8000]' -> ('test', None, '8000'); bounds may be negative or percentages."""
    m = _SPLIT_RE.match(split)
    if not m:
        raise ValueError(f"split={split!r} must look like 'name', 'name[a:b]' or 'name[a%:b%]'")
    return m.group(1), m.group(2), m.group(3)


def _resolve_bound(bound: str | None, n: int, default: int) -> int:
    if bound is None:
        return default
    k = int(round(float(bound[:-1]) * n / 100)) if bound.endswith("%") else int(bound)
    return min(max(k + n if k < 0 else k, 0), n)


def _slice(split: str, n: int) -> slice:
    _, a, b = parse_split(split)
    return slice(_resolve_bound(a, n, 0), _resolve_bound(b, n, n))


# ----------------------------------------------------------------------------- raw data


def load_digits_arrays() -> tuple[np.ndarray, np.ndarray]:
    """sklearn's bundled digits: images uint8 (1797, 8, 8, 1) in 0..16, labels int32 (1797,)."""
    d = load_digits()
    return d.images.astype(np.uint8)[..., None], d.target.astype(np.int32)


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Reads an IDX file (gzip or raw), e.g. MNIST images (N, 28, 28) uint8 or labels (N,);
    a truncated or damaged file is a one-line UserError naming it."""
    raw = paths.path(path).read_bytes()
    if raw[:2] == b"\x1f\x8b":
        try:
            raw = gzip.decompress(raw)
        except (EOFError, OSError, zlib.error) as e:
            raise UserError(f"{path}: truncated or damaged gzip ({e}); download it again") from None
    if len(raw) < 4 or raw[:2] != b"\0\0" or raw[2] not in _IDX_DTYPES or raw[3] == 0:
        raise UserError(f"{path}: not an IDX file (bad magic number {raw[:4].hex()!r}; expected "
                        "00 00 <dtype code> <ndim>, e.g. 00000803 for MNIST images)")
    ndim, dtype = raw[3], np.dtype(_IDX_DTYPES[raw[2]])
    header = 4 + 4 * ndim
    dims = tuple(int(d) for d in np.frombuffer(raw, ">u4", count=ndim, offset=4))
    if len(raw) != header + int(np.prod(dims)) * dtype.itemsize:
        raise UserError(f"{path}: IDX header says shape {dims} of {dtype} but the file holds "
                        f"{len(raw) - header} data bytes (truncated?)")
    array = np.frombuffer(raw, dtype, offset=header).reshape(dims).astype(dtype.newbyteorder("="))
    _check_finite(array, path)
    return array


def _check_finite(images: np.ndarray, where) -> None:
    """UserError naming `where` and the first example with NaN/inf (float data only)."""
    if images.dtype.kind == "f" and not np.isfinite(images).all():
        bad = int(np.argmin(np.isfinite(images).reshape(len(images), -1).all(axis=1)))
        raise UserError(f"{where}: the data holds NaN/inf (first in example {bad})")


def _idx_file(directory: str, base: str, kind: str, ndim: int) -> str | None:
    stem = paths.path(directory) / _MNIST_FILES[base].format(kind, ndim)
    for path in (f"{stem}.gz", str(stem)):
        if paths.path(path).exists():
            return path
    return None


# ----------------------------------------------------------------------------- sources


class ArraySource:
    """Random-access source over in-memory arrays: record i = {'image': x[i], 'label': y[i]}."""

    def __init__(self, images: np.ndarray, labels: np.ndarray):
        if len(images) != len(labels):
            raise ValueError(f"images ({len(images)}) and labels ({len(labels)}) differ in length")
        self.images, self.labels = images, labels

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i):
        return {"image": self.images[i], "label": self.labels[i]}

    def __repr__(self) -> str:
        return f"ArraySource(images={self.images.shape}, labels={self.labels.shape})"


class _View:
    """Contiguous sub-range of another source, its `key` field renamed to 'image' (a stored
    'pixels' field only with `pixels`)."""

    def __init__(self, source, rng: slice, key: str = "image", pixels: bool = False):
        self.source, self.start, self.key, self.pixels = source, rng.start, key, pixels
        self.length = max(rng.stop - rng.start, 0)

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, i):
        record = dict(self.source[self.start + int(i)])
        if not self.pixels:
            record.pop("pixels", None)
        return {"image": record.pop(self.key), **record}

    def __repr__(self) -> str:
        return f"_View({self.source!r}, start={self.start}, length={self.length})"


@dataclasses.dataclass(frozen=True)
class _Raw:
    source: Any  # random access, records {'image', 'label'}
    shape: tuple  # (h, w, c) as stored (latents: one element of a flip pair)
    pixel_max: float | None  # 16 / 255 scale to [-1, 1]; None = use as stored
    num_classes: int | None
    name: str
    moments: bool = False  # latents stored as [mean, logvar] channels: sample (train) / mean (eval)
    where: str = ""  # the file or directory read, for error messages


def _tfds_source(name: str, split: str, data_dir: str | None, raise_missing: bool = True):
    import tensorflow_datasets as tfds  # optional: only for tfds sources (absent on the GPU image)

    try:
        builder = tfds.builder(name, data_dir=data_dir or None)
    except Exception as e:  # DatasetNotFoundError lists every tfds dataset: keep one line
        raise ValueError(f"tfds dataset {name!r} is unknown to tensorflow_datasets "
                         f"({type(e).__name__})") from None
    if not builder.is_prepared():
        if not raise_missing:
            return None
        raise FileNotFoundError(
            f"tfds dataset {name!r} is not prepared in data_dir={builder.data_dir!r}; prepare it "
            f"on a machine with network (tfds.builder({name!r}, file_format='array_record')"
            ".download_and_prepare()) and point data.data_dir at it")
    try:
        src = tfds.data_source(name, split=split, data_dir=data_dir or None, download=False)
    except NotImplementedError as e:
        raise FileNotFoundError(f"tfds dataset {name!r} is prepared without random access "
                                f"(needs array_record or parquet): {str(e).splitlines()[0]}") from None
    feats = builder.info.features
    img = feats["image"]
    if img.shape is None or None in tuple(img.shape):
        raise ValueError(f"tfds dataset {name!r} has variable image shape {img.shape}; "
                         "data.name='tfds' needs fixed-size images")
    num_classes = getattr(feats["label"], "num_classes", None) if "label" in feats else None
    pixel_max = 255.0 if np.dtype(img.np_dtype) == np.uint8 else None
    shape = tuple(img.shape) + (1,) * (3 - len(img.shape))
    return _Raw(src, shape, pixel_max, num_classes, name)


def _mnist_source(cfg, split: str) -> _Raw:
    base, data_dir, mode = parse_split(split)[0], _get(cfg, "data_dir", ""), _get(cfg, "source", "auto")
    if mode == "tfds":
        return _tfds_source("mnist", split, data_dir)
    if mode == "auto":
        try:  # tfds when prepared (with random access), else the IDX files below
            raw = _tfds_source("mnist", split, data_dir, raise_missing=False)
        except FileNotFoundError:
            raw = None
        if raw is not None:
            return raw
    if base not in _MNIST_FILES:
        raise ValueError(f"data split {split!r}: MNIST split must be one of {list(_MNIST_FILES)}")
    images_path = _idx_file(data_dir, base, "images", 3) if data_dir else None
    labels_path = _idx_file(data_dir, base, "labels", 1) if data_dir else None
    if images_path is None or labels_path is None:
        raise FileNotFoundError(
            f"MNIST {base!r} not found: no prepared tfds 'mnist' (data.source='tfds') and no IDX "
            f"files {_MNIST_FILES[base].format('images', 3)}[.gz] + labels in data.data_dir="
            f"{data_dir!r} (data.source='idx'); getting either needs network")
    images, labels = read_idx(images_path), read_idx(labels_path).astype(np.int32)
    s = _slice(split, len(images))
    return _Raw(ArraySource(images[s, ..., None], labels[s]), (*images.shape[1:], 1), 255.0, 10,
                "mnist", where=images_path)


def _arrays_source(cfg, split: str) -> _Raw:
    path, base = _get(cfg, "data_dir"), parse_split(split)[0]
    images, labels = _read_npz(path, base)
    _check_finite(images, path)
    images = images[..., None] if images.ndim == 3 else images
    s = _slice(split, len(images))
    n_cls = int(labels.max()) + 1 if len(labels) else None
    pixel_max = 255.0 if images.dtype == np.uint8 else None
    return _Raw(ArraySource(images[s], labels[s]), images.shape[1:], pixel_max, n_cls, "arrays", where=path)


def _read_npz(path: str, base: str) -> tuple[np.ndarray, np.ndarray]:
    """(images, labels int32) of an .npz; a truncated or damaged file is a UserError naming it."""
    if not paths.path(path).is_file():
        raise FileNotFoundError(f"data.data_dir={path!r}: no such .npz file")
    try:
        with paths.reading(path) as fo, np.load(fo) as f:
            prefix = f"{base}_" if f"{base}_images" in f.files else ""
            if f"{prefix}images" not in f.files or f"{prefix}labels" not in f.files:
                raise UserError(f"data.data_dir={path!r} must be an .npz with 'images' and 'labels' "
                                f"(or '{base}_images', '{base}_labels')")
            return f[f"{prefix}images"], f[f"{prefix}labels"].astype(np.int32)
    except (OSError, EOFError, zipfile.BadZipFile, zlib.error, ValueError) as e:
        if isinstance(e, UserError):
            raise
        raise UserError(f"{path}: not a readable .npz, truncated or damaged ({type(e).__name__}: {e})") from None


def _split_dir(directory: str, base: str) -> str:
    sub = os.path.join(directory, base) if base else directory
    return sub if os.path.isdir(sub) else directory


def _split_dir(directory: str, base: str, field: str):
    """<directory>/<base>/; the 'train' split may also be `directory` itself, other splits never."""
    sub = paths.path(directory) / base if base else paths.path(directory)
    if base and not sub.is_dir():
        if base != "train":
            raise FileNotFoundError(
                f"data split {base!r}: no {'text' if field == 'text_dir' else 'latent'} directory {sub} "
                f"(data.{field}={directory!r}); extract that split there: python -m patch_forcing.tools."
                f"{'extract_text' if field == 'text_dir' else 'extract_latents'} --split={base} --out={sub} ...")
        sub = paths.path(directory)
    return sub


def _latent_source(cfg, split: str) -> _Raw:
    data_dir, base = _get(cfg, "data_dir"), parse_split(split)[0]
    src = latents.LatentSource(str(_split_dir(data_dir, base, "data_dir")))
    text_dir = _get(cfg, "text_dir", "")
    if text_dir:
        src = text_embeddings.WithText(src, text_embeddings.TextSource(str(_split_dir(text_dir, base, "text_dir"))))
    meta = getattr(src, "metadata", {})
    moments = meta.get("mode") == "moments"
    h, w, c = tuple(np.shape(src[0]["latent"]))[-3:]
    n_cls = len(meta["classes"]) if meta.get("classes") else None
    pixels = bool(_get(cfg, "with_pixels", False))
    if pixels and not meta.get("pixels"):
        raise UserError(f"data.with_pixels=True but the latents in {src.directory!r} hold no images; "
                        "extract them with `python -m patch_forcing.tools.extract_latents --pixels`")
    return _Raw(_View(src, _slice(split, len(src)), key="latent", pixels=pixels),
                (h, w, c // 2 if moments else c), None, n_cls, "latents", moments, where=src.directory)


def _raw_source(cfg, split: str) -> _Raw:
    name = _get(cfg, "name")
    if name == "digits":
        images, labels = load_digits_arrays()
        base = parse_split(split)[0]
        parts = {"train": slice(0, DIGITS_TRAIN), "test": slice(DIGITS_TRAIN, None),
                 "all": slice(None), "": slice(None)}
        if base not in parts:
            raise ValueError(f"digits split {split!r}: base must be one of ['train', 'test', 'all']")
        images, labels = images[parts[base]], labels[parts[base]]
        s = _slice(split, len(images))
        return _Raw(ArraySource(images[s], labels[s]), (8, 8, 1), 16.0, 10, "digits")
    if name == "mnist":
        return _mnist_source(cfg, split)
    if name == "tfds":
        return _tfds_source(_get(cfg, "tfds_name"), split, _get(cfg, "data_dir", ""))
    if name == "latents":
        return _latent_source(cfg, split)
    if name == "captioned_digits":
        base = parse_split(split)[0]
        if base not in captioned.SPLITS:
            raise ValueError(f"captioned_digits split {split!r}: base must be one of {list(captioned.SPLITS)}")
        rows = _slice(split, captioned.SPLITS[base][1])
        return _Raw(captioned.CaptionedDigits(base, rows), (*captioned.CANVAS, 3), 255.0, None, name)
    return _arrays_source(cfg, split)


def _checked_raw(cfg, split: str) -> tuple[_Raw, dict]:
    raw = _raw_source(cfg, split)
    pad = _get(cfg, "pad", 0)
    shape = (raw.shape[0] + 2 * pad, raw.shape[1] + 2 * pad, raw.shape[2])
    want = _image_size(cfg)
    what = f"{raw.name!r} ({raw.where})" if raw.where else repr(raw.name)
    if want is not None and want != shape[:2]:
        raise UserError(f"data.image_size={want} must equal the stored size {raw.shape[:2]} of {what} "
                        f"plus 2*data.pad={2 * pad}, i.e. {shape[:2]}")
    channels = _get(cfg, "channels", None)
    if channels is not None and channels != shape[2]:
        raise UserError(f"data.channels={channels} but {what} has {shape[2]} channels")
    num_classes = _get(cfg, "num_classes", None)
    if num_classes is not None and raw.num_classes is not None and raw.num_classes > num_classes:
        raise UserError(f"data.num_classes={num_classes} but {what} has {raw.num_classes}")
    meta = dict(image_shape=shape, num_classes=raw.num_classes or num_classes,
                num_examples=len(raw.source), name=raw.name)
    return raw, meta


def make_source(data_cfg, split: str):
    """Returns (random-access source of raw records {'image', 'label'}, meta).

    meta = dict(image_shape=(H, W, C) after padding, num_classes, num_examples, name).
    """
    check_config(data_cfg)
    raw, meta = _checked_raw(data_cfg, split)
    return raw.source, meta


# ----------------------------------------------------------------------------- pipelines


@dataclasses.dataclass(frozen=True)
class _Preprocess:
    """Record -> {'image': float32 (H, W, C), 'label': int32 (if any), 'pixels': uint8 (S, S, 3)
    flipped with the latent (if any), other fields as arrays}; picklable for grain workers."""

    pixel_max: float | None
    pad: int
    hflip: bool
    moments: bool = False

    def __call__(self, record, rng: np.random.Generator | None = None):
        x = np.asarray(record["image"])
        flip = rng is not None and self.hflip and rng.random() < 0.5
        out = {}
        if "pixels" in record:  # the image the latent encodes: mirrored when its latent is
            px = np.asarray(record["pixels"])
            out["pixels"] = np.ascontiguousarray(px[:, ::-1] if flip else px)
        if x.ndim == 4:  # latent flip pair (2, h, w, c): element 1 is the flipped image's latent
            x, flip = x[int(flip)], False
        x = x.astype(np.float32)
        if self.moments:  # [mean, logvar]: a posterior sample when training, the mean for eval
            mean, logvar = np.split(x, 2, axis=-1)
            eps = rng.standard_normal(mean.shape, dtype=np.float32) if rng is not None else 0.0
            x = mean + np.exp(0.5 * logvar) * eps
        if self.pixel_max is not None:
            x = x * np.float32(2.0 / self.pixel_max) - np.float32(1.0)
        if flip:
            x = x[:, ::-1]
        if self.pad:
            x = np.pad(x, ((self.pad, self.pad), (self.pad, self.pad), (0, 0)), constant_values=-1.0)
        out["image"] = np.ascontiguousarray(x)
        out.update({k: np.asarray(v) for k, v in record.items() if k not in ("image", "label", "pixels")})
        if "label" in record:
            out["label"] = np.int32(record["label"])
        return out


def make_train_iterator(data_cfg, seed: int, process_index: int = 0, process_count: int = 1):
    """Infinite, deterministic grain iterator of host-local batches (B_local = B // P).

    Supports `get_state()` / `set_state()`; see the module docstring for orbax.
    """
    check_config(data_cfg, process_count)
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index={process_index} must be in [0, {process_count})")
    raw, _ = _checked_raw(data_cfg, _get(data_cfg, "split_train"))
    if len(raw.source) < process_count:
        raise ValueError(f"data.split_train has {len(raw.source)} examples, fewer than the "
                         f"{process_count} processes")
    pre = _Preprocess(raw.pixel_max, _get(data_cfg, "pad", 0), bool(_get(data_cfg, "hflip", False)),
                      raw.moments)
    ds = grain.MapDataset.source(raw.source).shuffle(seed=seed).repeat()
    ds = ds.random_map(pre, seed=seed).batch(_get(data_cfg, "batch_size") // process_count, drop_remainder=True)
    ds = ds[process_index::process_count]  # host p: rows [p*B/P, (p+1)*B/P) of every global batch
    it = ds.to_iter_dataset(grain.ReadOptions(num_threads=2, prefetch_buffer_size=4))
    workers = _get(data_cfg, "num_workers", 0)
    if workers > 0:
        if not flags.FLAGS.is_parsed():  # grain <= 0.2.x reads absl flags (google/grain#1355)
            flags.FLAGS.mark_as_parsed()
        it = it.mp_prefetch(grain.MultiprocessingOptions(num_workers=workers))
    return iter(it)


def make_eval_batches(data_cfg, split: str, num_examples: int | None = None,
                      batch_size: int | None = None, process_index: int = 0,
                      process_count: int = 1):
    """Deterministic finite batches of a split (no shuffle, no flip), re-iterable.

    The first `num_examples` (default all) examples in stored order, `batch_size` (default
    data.batch_size) global, each process taking positions process_index::process_count.
    The last batch is partial when batch_size does not divide num_examples.
    """
    check_config(data_cfg, process_count)
    raw, meta = _checked_raw(data_cfg, split)
    n = meta["num_examples"] if num_examples is None else num_examples
    if not _is_int(n) or not 0 < n <= meta["num_examples"]:
        raise ValueError(f"num_examples={n!r} must be in [1, {meta['num_examples']}] for "
                         f"split {split!r}")
    batch_size = _get(data_cfg, "batch_size") if batch_size is None else batch_size
    if not _is_int(batch_size) or batch_size <= 0 or batch_size % process_count:
        raise ValueError(f"batch_size={batch_size!r} must be a positive int divisible by "
                         f"{process_count}")
    pre = _Preprocess(raw.pixel_max, _get(data_cfg, "pad", 0), False, raw.moments)
    ds = grain.MapDataset.source(raw.source)[:n].map(pre)[process_index::process_count]
    return ds.batch(batch_size // process_count)
