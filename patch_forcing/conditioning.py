"""What a model is conditioned on, one object for class labels and for text, so the train loop,
the samplers (CFG) and --mode=sample need no fork.

`from_batch(batch)` (jittable) reads a batch's conditioning into the pytree the model's apply
takes: labels (B,) int32 from 'label', or {'text': (B, L, D), 'text_mask': (B, L) bool} from
pre-extracted 'text'/'text_mask' or from 'tokens'/'token_mask' run through the frozen encoder.
`null` is the unconditional conditioning without a batch axis (the null class; the empty
prompt's embedding): `drop` swaps it in during training (label / caption dropout) and CFG pairs
with it when sampling (`SamplerConfig.null`). `encode_prompts` (text) embeds prompts for sampling.
`config_lib.conditioning(config)` builds one from a config.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from patch_forcing.models import text_encoder

KINDS = ("label", "text")


class Conditioning(NamedTuple):
    kind: str  # 'label' | 'text'
    null: Any  # unbatched: int32 null class, or {'text': (L, D), 'text_mask': (L,)}
    dropout: float  # training probability of the null conditioning
    from_batch: Callable[[dict], Any]  # jittable
    encode_prompts: Callable[[Sequence[str]], Any] | None  # host: prompts -> batched conditioning
    meta: dict  # JSON-able description, recorded in inference checkpoints


def drop(key, cond, null, p: float):
    """Each example's conditioning replaced by `null` with probability p (one draw per example)."""
    b = jax.tree.leaves(cond)[0].shape[0]
    dropped = jax.random.uniform(key, (b,)) < p
    return jax.tree.map(lambda n, c: jnp.where(dropped.reshape((b,) + (1,) * (c.ndim - 1)), n, c), null, cond)


def labels(num_classes: int, dropout: float) -> Conditioning:
    """Class labels 0..num_classes-1; the null class is num_classes."""
    return Conditioning("label", jnp.int32(num_classes), float(dropout),
                        lambda batch: batch["label"].astype(jnp.int32), None,
                        {"kind": "label", "num_classes": int(num_classes)})


def _fit(a, length: int, fill):
    """(B, L', ...) -> (B, length, ...): cut, or padded on the right with `fill`."""
    if a.shape[1] >= length:
        return a[:, :length]
    pad = [(0, 0), (0, length - a.shape[1])] + [(0, 0)] * (a.ndim - 2)
    return jnp.pad(a, pad, constant_values=fill)


def text(encoder: text_encoder.TextEncoder | None, tokenizer, max_length: int, use_mask: bool, dropout: float,
         null: dict | None = None, meta: dict | None = None) -> Conditioning:
    """Text through a frozen `encoder` (any `TextEncoder`; None when batches carry pre-extracted
    embeddings and `null` is given). Token batches shorter than max_length are padded on the right
    (id 0, mask False). `use_mask=False` drops the mask: every row is attended, as the reference."""

    def pack(emb, mask):
        return {"text": emb.astype(jnp.float32), "text_mask": mask.astype(bool)} if use_mask else \
            {"text": emb.astype(jnp.float32)}

    def from_tokens(ids, mask):
        ids, mask = _fit(jnp.asarray(ids, jnp.int32), max_length, 0), _fit(jnp.asarray(mask, bool), max_length, False)
        return pack(encoder.apply(encoder.params, ids, mask), mask)

    def from_batch(batch):
        if "text" in batch:
            return pack(_fit(batch["text"], max_length, 0.0), _fit(batch["text_mask"], max_length, False))
        if encoder is None:
            raise ValueError("batch has 'tokens' but no text encoder is configured (config.text.encoder)")
        return from_tokens(batch["tokens"], batch["token_mask"])

    def encode_prompts(prompts):
        if encoder is None or tokenizer is None:
            raise ValueError("prompts need config.text.encoder and config.text.tokenizer")
        ids, mask = text_encoder.tokenize(tokenizer, list(prompts), max_length)
        return jax.jit(from_tokens)(ids, mask)

    if null is None:
        null = jax.tree.map(lambda a: a[0], encode_prompts([""]))
    else:
        null = pack(_fit(jnp.asarray(null["text"])[None], max_length, 0.0)[0],
                    _fit(jnp.asarray(null["text_mask"])[None], max_length, False)[0])
    return Conditioning("text", null, float(dropout), from_batch, encode_prompts,
                        {"kind": "text", **(meta or {})})


def grid_conditioning(cond: Conditioning, num: int, num_classes: int = 0, batches=()) -> Any:
    """`num` conditionings for the periodic sample grids: classes 0, 1, ... cycled, or the first
    `num` examples of `batches` (eval batches, cycled if fewer)."""
    if cond.kind == "label":
        return jnp.arange(num, dtype=jnp.int32) % num_classes
    keys = [k for k in ("text", "text_mask", "tokens", "token_mask") if k in batches[0]]
    rows = {k: np.concatenate([np.asarray(b[k]) for b in batches]) for k in keys}
    rows = {k: np.resize(v, (num,) + v.shape[1:]) for k, v in rows.items()}
    return jax.jit(cond.from_batch)(rows)
