"""Pre-encoded VAE latents on disk: ArrayRecord shards plus `metadata.json`, and a grain source.

A latent directory holds `metadata.json` and `latents-<i>-of-<S>.array_record`; shard i holds
examples [i*K, min((i+1)*K, N)) in source order. What a reader must know: a shard is written to
`<name>.tmp`, fsynced, then renamed, and `metadata.json` lists only *finished* shards, so a file
under its final name is always complete and a crash leaves at most a `.tmp` that a resumed run
discards (on gs:// a shard is uploaded whole under its final name: objects appear only once
complete). Directories may be local or remote (`patch_forcing.paths`). The formats are in
`write_metadata` and `encode_record`.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from typing import Any, Mapping

import grain
import msgpack
from array_record.python.array_record_module import ArrayRecordReader, ArrayRecordWriter
import numpy as np

from patch_forcing import UserError, paths

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
    paths.atomic_write(paths.path(directory) / METADATA, (json.dumps(meta, indent=1) + "\n").encode())


def read_metadata(directory: str) -> dict[str, Any]:
    path = paths.path(directory) / METADATA
    if not path.is_file():
        raise FileNotFoundError(f"latent directory {str(directory)!r} has no {METADATA}; "
                                f"make one with `python -m patch_forcing.tools.extract_latents`")
    meta = json.loads(path.read_text())
    if meta.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{path}: format_version={meta.get('format_version')!r} is not one of [{FORMAT_VERSION}]")
    return meta


def file_sha256(path: str) -> str:
    h = hashlib.sha256()
    with paths.path(path).open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


class ShardWriter:
    """Writes one shard into a local file (`<name>.tmp` beside it, or a temporary file for a remote
    directory); `commit()` fsyncs and renames it to its final name, or uploads it."""

    def __init__(self, directory: str, name: str):
        self.path = paths.path(directory) / name
        if paths.is_remote(self.path):
            self._tmp_dir = tempfile.mkdtemp(prefix="pf-latents-")
            self.tmp = os.path.join(self._tmp_dir, name)
        else:
            self._tmp_dir, self.tmp = None, os.fspath(self.path) + ".tmp"
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
        sha = file_sha256(self.tmp)
        if self._tmp_dir is not None:
            paths.path(self.tmp).copy(self.path, overwrite=True)  # the object appears complete
            shutil.rmtree(self._tmp_dir, ignore_errors=True)
        else:
            with open(self.tmp, "rb+") as f:
                os.fsync(f.fileno())
            os.replace(self.tmp, self.path)
            paths.fsync_dir(os.path.dirname(os.path.abspath(self.path)))
        return {"name": self.path.name, "num_examples": self.num_examples, "sha256": sha}

    def abort(self) -> None:
        try:
            self._writer.close()
        finally:
            if os.path.exists(self.tmp):
                os.remove(self.tmp)
            if self._tmp_dir is not None:
                shutil.rmtree(self._tmp_dir, ignore_errors=True)


def count_records(path: str) -> int:
    reader = ArrayRecordReader(paths.native(path))
    try:
        return reader.num_records()
    finally:
        reader.close()


# ----------------------------------------------------------------------------- reading


class LatentSource:
    """grain random-access source over a finished latent directory.

    `source[i]` -> {'latent': float32 (2, h, w, c) with flips else (h, w, c), 'label': int32
    [, 'pixels': uint8 (S, S, 3) when extracted with --pixels]}.
    `verify=True` also checks each shard's sha256 (reads every byte once). A truncated shard fails
    here, a damaged record, one of another shape or with NaN/inf when read: a UserError naming
    the shard and the record.
    """

    def __init__(self, directory: str, verify: bool = False):
        self.directory = directory = str(directory)
        meta = self.metadata = read_metadata(directory)
        n_shards, shards = meta["num_shards"], meta["shards"]
        want = [shard_name(i, n_shards) for i in range(n_shards)]
        have = [s["name"] for s in shards]
        if have != want[: len(have)] or len(have) != n_shards:
            raise ValueError(f"latent directory {directory!r} is incomplete: {len(have)} of {n_shards} shards "
                             f"finished; rerun extract_latents with the same --out to resume")
        files = [paths.path(directory) / name for name in want]
        absent = [p.name for p in files if not p.is_file()]
        if absent:
            raise FileNotFoundError(f"latent directory {str(directory)!r} lacks shards listed in {METADATA}: "
                                    f"{absent}")
        total = sum(s["num_examples"] for s in shards)
        if total != meta["num_examples"]:
            raise ValueError(f"{METADATA}: shards hold {total} examples, num_examples={meta['num_examples']}")
        if verify:
            for p, s in zip(files, shards):
                if "sha256" in s and file_sha256(p) != s["sha256"]:
                    raise ValueError(f"latent shard {str(p)!r} does not match its sha256 in {METADATA}")
        self.paths, self.shard_size = files, meta["shard_size"]
        try:
            self._source = grain.sources.ArrayRecordDataSource([paths.native(p) for p in files])
        except Exception:  # noqa: BLE001 - array_record raises RuntimeError/ValueError for a bad file
            for p in files:  # name the shard (opening one reads its footer: cheap)
                try:
                    count_records(p)
                except Exception as e:  # noqa: BLE001 - as above
                    raise UserError(f"latent shard {p} is truncated or damaged ({type(e).__name__}: "
                                    f"{str(e).strip() or 'unreadable'}); extract it again or restore it "
                                    f"(its sha256 is in {METADATA})") from None
            raise
        if len(self._source) != total:
            raise ValueError(f"latent shards in {directory!r} hold {len(self._source)} records, "
                             f"{METADATA} says {total}")

    @property
    def record_shape(self) -> tuple[int, ...]:
        return tuple(self.metadata["record_shape"])

    def __len__(self) -> int:
        return len(self._source)

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        try:
            r = decode_record(self._source[index])
        except Exception as e:  # noqa: BLE001 - array_record and msgpack raise many types
            raise UserError(f"{self.where(index)} cannot be read ({type(e).__name__}: {e})") from None
        latent = r["latent"].astype(np.float32)
        if latent.shape != self.record_shape:
            raise UserError(f"{self.where(index)} has shape {latent.shape}, {METADATA} says {self.record_shape}")
        if not np.isfinite(latent).all():
            raise UserError(f"{self.where(index)} holds NaN/inf")
        out = {"latent": latent, "label": np.int32(r["label"])}
        if "pixels" in r:
            out["pixels"] = r["pixels"]
        return out

    def where(self, index: int) -> str:
        """'latent shard <path> record <j> (example <index>)'."""
        shard, record = divmod(int(index), self.shard_size)
        return f"latent shard {self.paths[shard]} record {record} (example {index})"

    def __repr__(self) -> str:
        m = self.metadata
        return (f"LatentSource({self.directory!r}, n={m['num_examples']}, record_shape={tuple(m['record_shape'])}, "
                f"mode={m['mode']!r})")
