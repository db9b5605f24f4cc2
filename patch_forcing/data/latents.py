"""Pre-encoded VAE latents on disk: ArrayRecord shards plus `metadata.json`, and a grain source.

A latent directory holds `metadata.json` and `latents-<i>-of-<S>.array_record`; shard i holds
examples [i*K, min((i+1)*K, N)) in source order. What a reader must know: a shard is written to
`<name>.tmp`, fsynced, then renamed, and `metadata.json` lists only *finished* shards, so a file
under its final name is always complete and a crash leaves at most a `.tmp` that a resumed run
discards. The formats are in `write_metadata` and `encode_record`.
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import Any, Mapping

import grain
import msgpack
from array_record.python.array_record_module import ArrayRecordReader, ArrayRecordWriter
import numpy as np

FORMAT_VERSION = 1
METADATA = "metadata.json"
MODES = ("mean", "sample", "moments")
DTYPES = ("float32", "float16")
WRITER_OPTIONS = "group_size:1,uncompressed"  # one record per chunk: cheap random access


def shard_name(index: int, num_shards: int) -> str:
    return f"latents-{index:05d}-of-{num_shards:05d}.array_record"


def _pack(a: np.ndarray) -> dict:
    a = np.ascontiguousarray(a)
    a = a.astype(a.dtype.newbyteorder("<"), copy=False)
    return {"dtype": a.dtype.str, "shape": list(a.shape), "data": a.tobytes()}


def _unpack(d: dict) -> np.ndarray:
    return np.frombuffer(d["data"], dtype=np.dtype(d["dtype"])).reshape(d["shape"])


def encode_record(latent: np.ndarray, label: int, index: int, pixels: np.ndarray | None = None) -> bytes:
    """One example -> bytes: a msgpack map {'latent': {'dtype': '<f4' | '<f2', 'shape', 'data'},
    'label', 'index'[, 'pixels': {... '|u1' ...}]} (little-endian, so files are portable). With
    flips `latent` is (2, h, w, c): [0] encodes the image, [1] its horizontal mirror (not the mirror
    of [0]). Latents are already scaled by `scale_factor`; in 'moments' mode the channels are
    [mean, logvar] of the scaled latent's Gaussian posterior (`sample_moments` draws from it).
    `pixels` (extract_latents --pixels): the encoded uint8 image (S, S, 3), unflipped, for
    encoders that read images during training (REPA)."""
    record = {"latent": _pack(latent), "label": int(label), "index": int(index)}
    if pixels is not None:
        record["pixels"] = _pack(np.asarray(pixels, np.uint8))
    return msgpack.packb(record)


def decode_record(data: bytes) -> dict[str, Any]:
    """Bytes -> {'latent': array as stored, 'label': int, 'index': int[, 'pixels': uint8]}."""
    r = msgpack.unpackb(data)
    r["latent"] = _unpack(r["latent"])
    if "pixels" in r:
        r["pixels"] = _unpack(r["pixels"])
    return r


def sample_moments(moments: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A latent sample from stored 'moments' (..., 2c) -> (..., c)."""
    mean, logvar = np.split(np.asarray(moments, np.float32), 2, axis=-1)
    return mean + np.exp(0.5 * logvar) * rng.standard_normal(mean.shape, dtype=np.float32)


# ----------------------------------------------------------------------------- writing


def _fsync_dir(directory: str) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # e.g. platforms without directory fds
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _atomic_write(path: str, data: bytes) -> None:
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(os.path.dirname(os.path.abspath(path)))


def write_metadata(directory: str, meta: Mapping[str, Any]) -> None:
    """Atomically (re)write `metadata.json` (after every finished shard)::

        {"format_version": 1, "num_examples": N, "num_shards": S, "shard_size": K,
         "latent_shape": [h, w, c], "record_shape": [2, h, w, c] (or [h, w, c] without flips;
         2c channels in 'moments' mode), "dtype": "float32" | "float16", "scale_factor": 0.18215,
         "flips": true, "mode": "mean" | "sample" | "moments", "seed": 0, "image_size": 256,
         "pixels": false (true: every record also holds its uint8 image),
         "vae": {...}, "source": {...}, "classes": [...],
         "shards": [{"name": ..., "num_examples": K, "sha256": ...}]}   # finished, index order
    """
    _atomic_write(os.path.join(directory, METADATA), (json.dumps(meta, indent=1) + "\n").encode())


def read_metadata(directory: str) -> dict[str, Any]:
    path = os.path.join(directory, METADATA)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"latent directory {directory!r} has no {METADATA}; "
                                f"make one with `python -m patch_forcing.tools.extract_latents`")
    with open(path) as f:
        meta = json.load(f)
    if meta.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{path}: format_version={meta.get('format_version')!r} is not one of [{FORMAT_VERSION}]")
    return meta


def file_sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


class ShardWriter:
    """Writes one shard under `<name>.tmp`; `commit()` fsyncs and renames it to its final name."""

    def __init__(self, directory: str, name: str):
        self.path = os.path.join(directory, name)
        self.tmp = self.path + ".tmp"
        if os.path.exists(self.tmp):
            os.remove(self.tmp)  # left by a crash: never trusted
        self._writer = ArrayRecordWriter(self.tmp, WRITER_OPTIONS)
        self.num_examples = 0

    def write(self, latent: np.ndarray, label: int, index: int, pixels: np.ndarray | None = None) -> None:
        self._writer.write(encode_record(latent, label, index, pixels))
        self.num_examples += 1

    def commit(self) -> dict[str, Any]:
        """Finish the shard; returns its metadata entry {'name', 'num_examples', 'sha256'}."""
        self._writer.close()
        with open(self.tmp, "rb+") as f:
            os.fsync(f.fileno())
        sha = file_sha256(self.tmp)
        os.replace(self.tmp, self.path)
        _fsync_dir(os.path.dirname(os.path.abspath(self.path)))
        return {"name": os.path.basename(self.path), "num_examples": self.num_examples, "sha256": sha}

    def abort(self) -> None:
        try:
            self._writer.close()
        finally:
            if os.path.exists(self.tmp):
                os.remove(self.tmp)


def count_records(path: str) -> int:
    reader = ArrayRecordReader(path)
    try:
        return reader.num_records()
    finally:
        reader.close()


# ----------------------------------------------------------------------------- reading


class LatentSource:
    """grain random-access source over a finished latent directory.

    `source[i]` -> {'latent': float32 (2, h, w, c) with flips else (h, w, c), 'label': int32
    [, 'pixels': uint8 (S, S, 3) when extracted with --pixels]}.
    `verify=True` also checks each shard's sha256 (reads every byte once).
    """

    def __init__(self, directory: str, verify: bool = False):
        self.directory = directory
        meta = self.metadata = read_metadata(directory)
        n_shards, shards = meta["num_shards"], meta["shards"]
        want = [shard_name(i, n_shards) for i in range(n_shards)]
        have = [s["name"] for s in shards]
        if have != want[: len(have)] or len(have) != n_shards:
            raise ValueError(f"latent directory {directory!r} is incomplete: {len(have)} of {n_shards} shards "
                             f"finished; rerun extract_latents with the same --out to resume")
        paths = [os.path.join(directory, name) for name in want]
        absent = [p for p in paths if not os.path.isfile(p)]
        if absent:
            raise FileNotFoundError(f"latent directory {directory!r} lacks shards listed in {METADATA}: "
                                    f"{[os.path.basename(p) for p in absent]}")
        total = sum(s["num_examples"] for s in shards)
        if total != meta["num_examples"]:
            raise ValueError(f"{METADATA}: shards hold {total} examples, num_examples={meta['num_examples']}")
        if verify:
            for p, s in zip(paths, shards):
                if "sha256" in s and file_sha256(p) != s["sha256"]:
                    raise ValueError(f"latent shard {p!r} does not match its sha256 in {METADATA}")
        self._source = grain.sources.ArrayRecordDataSource(paths)
        if len(self._source) != total:
            raise ValueError(f"latent shards in {directory!r} hold {len(self._source)} records, "
                             f"{METADATA} says {total}")

    @property
    def record_shape(self) -> tuple[int, ...]:
        return tuple(self.metadata["record_shape"])

    def __len__(self) -> int:
        return len(self._source)

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        r = decode_record(self._source[index])
        out = {"latent": r["latent"].astype(np.float32), "label": np.int32(r["label"])}
        if "pixels" in r:
            out["pixels"] = r["pixels"]
        return out

    def __repr__(self) -> str:
        m = self.metadata
        return (f"LatentSource({self.directory!r}, n={m['num_examples']}, record_shape={tuple(m['record_shape'])}, "
                f"mode={m['mode']!r})")
