"""Embed captions with a frozen text encoder into shards beside the latents (`data.text_embeddings`).

    python -m patch_forcing.tools.extract_text --captions=/data/captions.txt --out=/data/texts/train \
        --encoder=/ckpt/Qwen3-VL-Embedding-2B --max_length=256

Captions: a .txt file with one caption per line, or a .jsonl file with one object per line
(field --caption_key); line i is example i of the latent directory the texts go beside
(`config.data.text_dir`, split sub-folders like the latents'). The encoder is a local Qwen3(-VL)
folder (its tokenizer too, unless --tokenizer names another), or `random` with `--tokenizer=words`
for the captioned-digits task. Also writes `null.npz`, the empty prompt's embedding (caption
dropout and CFG). Resumable like extract_latents: shard i holds captions [i*K, (i+1)*K), finished
shards are skipped, a half-written `.tmp` is discarded, and reruns write identical bytes.

Whether to pre-extract: `benchmarks/results/t2i_text_cost.md` (the 2B encoder's forward costs
~37% of a 1.2B DiT train step; stored embeddings cost 1 MiB per caption at 256 x 2048 x fp16).
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
import sys
from typing import Any, Sequence

import jax
import numpy as np
from absl import flags
from tqdm import tqdm

from patch_forcing.data import captioned, latents
from patch_forcing.data import text_embeddings as te
from patch_forcing.models import text_encoder
from patch_forcing.tools import cli


def read_captions(path: str, key: str = "caption") -> list[str]:
    """Captions of a .txt (one per line) or .jsonl (field `key`) file."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"--captions={path!r} does not exist")
    with open(path, encoding="utf-8") as f:
        lines = f.read().splitlines()
    if path.endswith(".jsonl"):
        try:
            return [json.loads(ln)[key] for ln in lines if ln.strip()]
        except (KeyError, json.JSONDecodeError) as e:
            raise ValueError(f"--captions={path!r}: every line must be a JSON object with field {key!r} "
                             f"({e})") from None
    return lines


@dataclasses.dataclass(frozen=True)
class Options:
    max_length: int = text_encoder.MAX_LENGTH
    shard_size: int = 10_000
    batch_size: int = 64
    dtype: str = "float16"
    trim: bool = False  # store only real rows (for models that take the text mask)
    max_shards: int | None = None  # stop after this many shards (partial runs, tests)
    progress: bool = True

    def check(self) -> None:
        if self.dtype not in te.DTYPES:
            raise ValueError(f"--dtype={self.dtype!r} is not one of {list(te.DTYPES)}")
        for name in ("max_length", "shard_size", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name}={getattr(self, name)} must be >= 1")


_SETTINGS = ("max_length", "shard_size", "dtype", "trim", "num_examples", "num_shards", "dim", "captions", "encoder",
             "tokenizer")


def _plan(captions: Sequence[str], encoder, names: dict, opt: Options) -> dict[str, Any]:
    digest = hashlib.sha256("\n".join(captions).encode()).hexdigest()
    n = len(captions)
    return {"format_version": te.FORMAT_VERSION, "kind": "text", "num_examples": n,
            "num_shards": max(1, -(-n // opt.shard_size)), "shard_size": opt.shard_size,
            "max_length": opt.max_length, "dim": int(encoder.dim), "dtype": opt.dtype, "trim": opt.trim,
            "encoder": names["encoder"], "tokenizer": names["tokenizer"],
            "captions": {"count": n, "sha256": digest}, "null": te.NULL_FILE, "shards": []}


@functools.cache
def _jitted(apply):
    return jax.jit(apply)


def _finished(out: str, meta: dict) -> dict[int, dict]:
    listed = {s["name"]: s for s in meta["shards"]}
    done = {}
    for i in range(meta["num_shards"]):
        name = te.shard_name(i, meta["num_shards"])
        path = os.path.join(out, name)
        want = min(meta["shard_size"], meta["num_examples"] - i * meta["shard_size"])
        if name in listed and os.path.isfile(path):
            done[i] = listed[name]
        elif os.path.isfile(path) and latents.count_records(path) == want:  # renamed before the metadata update
            done[i] = {"name": name, "num_examples": want, "sha256": latents.file_sha256(path)}
    return done


def extract(captions: Sequence[str], out: str, encoder: text_encoder.TextEncoder, tokenizer,
            names: dict | None = None, options: Options = Options()) -> dict[str, Any]:
    """Embed `captions` into `out` (resuming a previous run); returns the metadata."""
    options.check()
    names = names or {"encoder": "", "tokenizer": ""}
    os.makedirs(out, exist_ok=True)
    meta = _plan(captions, encoder, names, options)
    if os.path.isfile(os.path.join(out, te.METADATA)):
        old = te.read_metadata(out)
        for k in _SETTINGS:
            if old.get(k) != meta[k]:
                raise ValueError(f"--out={out!r} holds text embeddings with {k}={old.get(k)!r}, this run has "
                                 f"{meta[k]!r}; use the same settings to resume, or a fresh --out")
        meta["shards"] = old["shards"]
    for name in os.listdir(out):
        if name.endswith(".array_record.tmp"):
            os.remove(os.path.join(out, name))
    done = _finished(out, meta)
    meta["shards"] = [done[i] for i in sorted(done)]
    te.write_metadata(out, meta)
    encode = _jitted(encoder.apply)
    bs, k, n = options.batch_size, meta["shard_size"], meta["num_examples"]

    def embed(batch: Sequence[str]):
        ids, mask = text_encoder.tokenize(tokenizer, list(batch) + [""] * (bs - len(batch)), options.max_length)
        emb = np.asarray(encode(encoder.params, ids, mask))[:len(batch)]
        return emb.astype(options.dtype), mask[:len(batch)]

    if not os.path.isfile(os.path.join(out, te.NULL_FILE)):
        emb, mask = embed([""])
        te.write_null(out, emb[0].astype(np.float32), mask[0])
    todo = [i for i in range(meta["num_shards"]) if i not in done][: options.max_shards]
    bar = tqdm(total=n, initial=sum(s["num_examples"] for s in done.values()), unit="caption",
               disable=not options.progress, desc="text")
    for i in todo:
        writer = te.ShardWriter(out, te.shard_name(i, meta["num_shards"]), options.trim)
        try:
            for lo in range(i * k, min((i + 1) * k, n), bs):
                batch = captions[lo:min(lo + bs, (i + 1) * k, n)]
                emb, mask = embed(batch)
                for j in range(len(batch)):
                    writer.write(emb[j], mask[j], lo + j)
                bar.update(len(batch))
            done[i] = writer.commit()
        except BaseException:
            writer.abort()
            raise
        meta["shards"] = [done[j] for j in sorted(done)]
        te.write_metadata(out, meta)
    bar.close()
    return meta


def load_encoder(encoder: str, tokenizer: str, dtype: str, width: int = 32, layers: int = 2, seed: int = 0):
    """(TextEncoder, tokenizer) for the CLI: a local Qwen3(-VL) folder, or 'random' with 'words'."""
    tok = captioned.WordTokenizer() if tokenizer == "words" else text_encoder.load_tokenizer(tokenizer or encoder)
    if encoder == "random":
        vocab = len(tok.vocab) if tokenizer == "words" else tok.get_vocab_size()
        cfg = text_encoder.tiny_config(vocab_size=vocab, hidden_size=width, num_layers=layers, dtype=dtype)
        return text_encoder.random_text_encoder(cfg, seed=seed), tok
    return text_encoder.load_text_encoder(encoder, dtype=dtype), tok


# ----------------------------------------------------------------------------- CLI
FLAGS = flags.FlagValues()
_D = Options()
flags.DEFINE_string("captions", None, "Captions: .txt (one per line) or .jsonl.", flag_values=FLAGS)
flags.DEFINE_string("caption_key", "caption", "The caption field of .jsonl lines.", flag_values=FLAGS)
flags.DEFINE_string("out", None, "Output text directory (resumed if it exists).", flag_values=FLAGS)
flags.DEFINE_string("encoder", None, "A local Qwen3(-VL) folder, or 'random' (a frozen random tiny Qwen3).",
                    flag_values=FLAGS)
flags.DEFINE_string("tokenizer", "", "A folder with tokenizer.json, or 'words' (captioned digits); default: "
                    "the encoder's folder.", flag_values=FLAGS)
flags.DEFINE_enum("encoder_dtype", "bfloat16", list(text_encoder.DTYPES), "Encoder compute dtype.", flag_values=FLAGS)
flags.DEFINE_integer("width", 32, "Random encoder: width (= the model's txt_in_dim).", flag_values=FLAGS)
flags.DEFINE_integer("seed", 0, "Random encoder: seed.", flag_values=FLAGS)
flags.DEFINE_integer("max_length", _D.max_length, "Tokens per caption (padded / truncated).", flag_values=FLAGS)
flags.DEFINE_integer("shard_size", _D.shard_size, "Captions per shard.", flag_values=FLAGS)
flags.DEFINE_integer("batch_size", _D.batch_size, "Captions per encoder call.", flag_values=FLAGS)
flags.DEFINE_enum("dtype", _D.dtype, list(te.DTYPES), "Stored dtype.", flag_values=FLAGS)
flags.DEFINE_bool("trim", _D.trim, "Store only the real tokens' rows (models that take the text mask).",
                  flag_values=FLAGS)
flags.DEFINE_integer("max_shards", None, "Write at most this many shards, then stop.", flag_values=FLAGS)
flags.DEFINE_bool("progress", True, "Show a progress bar.", flag_values=FLAGS)
flags.mark_flags_as_required(["captions", "out", "encoder"], flag_values=FLAGS)


def main(argv) -> dict[str, Any]:
    cli.parse(FLAGS, argv, __doc__)
    f = FLAGS
    captions = read_captions(f.captions, f.caption_key)
    encoder, tok = load_encoder(f.encoder, f.tokenizer, f.encoder_dtype, f.width, seed=f.seed)
    opt = Options(max_length=f.max_length, shard_size=f.shard_size, batch_size=f.batch_size, dtype=f.dtype,
                  trim=f.trim, max_shards=f.max_shards, progress=f.progress)
    names = {"encoder": f.encoder if f.encoder == "random" else os.path.abspath(f.encoder),
             "tokenizer": f.tokenizer or f.encoder}
    meta = extract(captions, f.out, encoder, tok, names, opt)
    print(f"{len(meta['shards'])}/{meta['num_shards']} shards in {f.out}", file=sys.stderr)
    return meta


if __name__ == "__main__":
    cli.run(main)
