"""Pre-extracted text embeddings on disk, beside latents: ArrayRecord shards, `metadata.json` and
the empty prompt's embedding `null.npz` (caption dropout and CFG need it, so training never loads
the encoder).

A text directory mirrors a latent directory example for example: record i holds the embedding of
example i's caption. Shards are written and committed exactly like latent shards (`data.latents`:
`.tmp`, fsync, rename; `metadata.json` lists only finished shards), named
`texts-<i>-of-<S>.array_record`. A record is msgpack {'text': {'dtype', 'shape', 'data'}, 'mask':
bytes (L,), 'index'}; with `trim` only the real rows are stored and reading pads with zeros (use
it with a model that takes the text mask; the reference attends all rows, whose padding rows
differ per prompt, so it stores them all).
"""

from __future__ import annotations

import io
import json
from typing import Any, Mapping

import grain
import msgpack
import numpy as np

from patch_forcing import paths
from patch_forcing.data import latents

FORMAT_VERSION = 1
METADATA = "metadata.json"
NULL_FILE = "null.npz"
DTYPES = ("float32", "float16")


def shard_name(index: int, num_shards: int) -> str:
    return f"texts-{index:05d}-of-{num_shards:05d}.array_record"


def encode_record(text: np.ndarray, mask: np.ndarray, index: int, trim: bool) -> bytes:
    """One caption's (L, D) embedding and (L,) bool mask -> bytes (little-endian)."""
    mask = np.asarray(mask, bool)
    a = np.ascontiguousarray(text[mask] if trim else text)
    a = a.astype(a.dtype.newbyteorder("<"), copy=False)
    return msgpack.packb({"text": {"dtype": a.dtype.str, "shape": list(a.shape), "data": a.tobytes()},
                          "mask": mask.astype(np.uint8).tobytes(), "index": int(index)})


def decode_record(data: bytes) -> dict[str, Any]:
    """Bytes -> {'text': float32 (L, D), 'text_mask': bool (L,), 'index'}; trimmed rows re-padded."""
    r = msgpack.unpackb(data)
    t = r["text"]
    text = np.frombuffer(t["data"], np.dtype(t["dtype"])).reshape(t["shape"]).astype(np.float32)
    mask = np.frombuffer(r["mask"], np.uint8).astype(bool)
    if len(text) != len(mask):  # trimmed: scatter the real rows back
        full = np.zeros((len(mask), text.shape[1]), np.float32)
        full[mask] = text
        text = full
    return {"text": text, "text_mask": mask, "index": r["index"]}


class ShardWriter(latents.ShardWriter):
    """latents.ShardWriter (tmp, fsync, rename) writing text records."""

    def __init__(self, directory: str, name: str, trim: bool):
        super().__init__(directory, name)
        self.trim = trim

    def write(self, text: np.ndarray, mask: np.ndarray, index: int) -> None:
        self._writer.write(encode_record(text, mask, index, self.trim))
        self.num_examples += 1


def write_metadata(directory: str, meta: Mapping[str, Any]) -> None:
    """Atomically (re)write `metadata.json`::

        {"format_version": 1, "kind": "text", "num_examples": N, "num_shards": S, "shard_size": K,
         "max_length": L, "dim": D, "dtype": "float16", "trim": false, "encoder": ..., "tokenizer": ...,
         "captions": {...}, "null": "null.npz", "shards": [{"name", "num_examples", "sha256"}]}
    """
    paths.atomic_write(paths.path(directory) / METADATA, (json.dumps(meta, indent=1) + "\n").encode())


def read_metadata(directory: str) -> dict[str, Any]:
    path = paths.path(directory) / METADATA
    if not path.is_file():
        raise FileNotFoundError(f"text directory {str(directory)!r} has no {METADATA}; "
                                "make one with `python -m patch_forcing.tools.extract_text`")
    meta = json.loads(path.read_text())
    if meta.get("format_version") != FORMAT_VERSION or meta.get("kind") != "text":
        raise ValueError(f"{path}: not a text-embedding directory of format_version {FORMAT_VERSION}")
    return meta


def write_null(directory: str, text: np.ndarray, mask: np.ndarray) -> None:
    buf = io.BytesIO()
    np.savez(buf, text=np.asarray(text, np.float32), text_mask=np.asarray(mask, bool))
    paths.atomic_write(paths.path(directory) / NULL_FILE, buf.getvalue())


def read_null(directory: str) -> dict[str, np.ndarray]:
    """The empty prompt's {'text': (L, D) float32, 'text_mask': (L,) bool}."""
    path = paths.path(directory) / NULL_FILE
    if not path.is_file():
        raise FileNotFoundError(f"text directory {directory!r} has no {NULL_FILE} (the empty prompt's embedding); "
                                "rerun `python -m patch_forcing.tools.extract_text` with the same --out")
    with np.load(io.BytesIO(path.read_bytes())) as f:
        return {"text": f["text"], "text_mask": f["text_mask"]}


class TextSource:
    """grain random-access source over a finished text directory: source[i] -> {'text', 'text_mask'}."""

    def __init__(self, directory: str):
        meta = self.metadata = read_metadata(directory)
        n = meta["num_shards"]
        names = [s["name"] for s in meta["shards"]]
        if names != [shard_name(i, n) for i in range(n)]:
            raise ValueError(f"text directory {directory!r} is incomplete: {len(names)} of {n} shards finished; "
                             "rerun extract_text with the same --out to resume")
        self._source = grain.sources.ArrayRecordDataSource([paths.native(paths.path(directory) / s) for s in names])
        if len(self._source) != meta["num_examples"]:
            raise ValueError(f"text shards in {directory!r} hold {len(self._source)} records, {METADATA} says "
                             f"{meta['num_examples']}")

    def __len__(self) -> int:
        return len(self._source)

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        r = decode_record(self._source[index])
        return {"text": r["text"], "text_mask": r["text_mask"]}


class WithText:
    """Records of `source` (e.g. a LatentSource) joined with the text records of the same index."""

    def __init__(self, source, text: TextSource):
        if len(source) != len(text):
            raise ValueError(f"the text directory holds {len(text)} examples, the data {len(source)}; "
                             "extract the text of exactly the latents' examples, in their order")
        self.source, self.text = source, text
        self.metadata = getattr(source, "metadata", {})
        self.directory = getattr(source, "directory", "")

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        return {**self.source[index], **self.text[index]}
