"""Frozen text encoders for text-to-image: the Qwen3 language tower in flax NNX, and `TextEncoder`.

The reference (patch_flow/text_encoder.py, `Qwen3VLEmbedder2B`) loads `Qwen/Qwen3-VL-Embedding-2B`
with `Qwen3VLForConditionalGeneration`, keeps `model.language_model` (a `Qwen3VLTextModel`), and
calls it with the tokenizer's `input_ids` and `attention_mask` (`padding="max_length"`,
`max_length=256`, `truncation=True`, the tokenizer's own padding side: right for Qwen tokenizers,
whose configs set none, pad id 151643 `<|endoftext|>`, no BOS/EOS added). It takes the last hidden state (B, 256, 2048),
after the final RMSNorm, in bf16, and the DiT consumes all 256 rows, padding rows included.

What this module reproduces exactly (tested against transformers' sdpa attention, its default):
  * positions 0..L-1 in every row, whatever the padding (transformers' default `position_ids`);
  * attention: causal AND key-is-real (`mask`); a query row with no visible real key (a padding
    row before any real token, or every row of an empty prompt) gets a zero attention output;
  * RoPE: Qwen3-VL's text tower uses interleaved M-RoPE (mrope_section [24, 20, 20]). For text
    only, the temporal, height and width position ids are all equal, so every frequency sees the
    same position and it is exactly the plain 1-D RoPE (rotate-half layout) of Qwen3 with the
    config's `rope_theta` (5e6): one implementation serves both `Qwen3Model` and `Qwen3VLTextModel`.
Padding never changes the outputs at real positions (causal mask; RoPE is relative).

    tok = load_tokenizer('/path/Qwen3-VL-Embedding-2B')        # local folder, no download
    enc = load_text_encoder('/path/Qwen3-VL-Embedding-2B', dtype='bfloat16')
    emb, mask = embed_prompts(enc, tok, ['a red cube'])        # (1, 256, 2048) float32, (1, 256)
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from flax.core import meta
from safetensors import safe_open  # its flax backend reads bf16 (numpy has no bfloat16)

HF_REPO = "Qwen/Qwen3-VL-Embedding-2B"
MAX_LENGTH = 256  # the reference's max_length
DTYPES = ("float32", "bfloat16")
_MODEL_TYPES = ("qwen3", "qwen3_vl_text")
_ROPE_TYPES = (None, "default", "mrope")
_GET_WEIGHTS = f"get them with `huggingface-cli download {HF_REPO} --local-dir DIR`"


# ----------------------------------------------------------------------------- config


@dataclasses.dataclass(frozen=True)
class Qwen3Config:
    """A Qwen3 decoder stack; the defaults are the text tower of Qwen3-VL(-Embedding)-2B."""

    vocab_size: int = 151936
    hidden_size: int = 2048
    intermediate_size: int = 6144
    num_layers: int = 28
    num_heads: int = 16
    num_kv_heads: int = 8
    head_dim: int = 128
    rope_theta: float = 5_000_000.0
    rms_norm_eps: float = 1e-6
    attention_bias: bool = False
    dtype: str = "float32"  # compute dtype; params are always float32

    def __post_init__(self):
        sizes = ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads",
                 "num_kv_heads", "head_dim")
        for k in sizes:
            if getattr(self, k) < 1:
                raise ValueError(f"Qwen3Config.{k} must be >= 1, got {getattr(self, k)}")
        if self.dtype not in DTYPES:
            raise ValueError(f"Qwen3Config.dtype={self.dtype!r} is not one of {list(DTYPES)}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"Qwen3Config.num_heads={self.num_heads} must be a multiple of "
                             f"num_kv_heads={self.num_kv_heads}")
        if self.head_dim % 2:
            raise ValueError(f"Qwen3Config.head_dim must be even (RoPE), got {self.head_dim}")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "Qwen3Config":
        names = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(d) - set(names))
        if unknown:
            raise ValueError(f"unknown Qwen3Config fields {unknown}; allowed: {names}")
        return cls(**d)

    @classmethod
    def from_hf(cls, d: dict, dtype: str = "float32") -> "Qwen3Config":
        """From a transformers `config.json` dict: a `Qwen3Config` (model_type 'qwen3'), a
        `Qwen3VLTextConfig`, or a Qwen3-VL config whose `text_config` is one."""
        t = d.get("text_config", d)
        if t.get("model_type") not in _MODEL_TYPES:
            raise ValueError(f"config model_type={t.get('model_type')!r} (text tower) is not one of "
                             f"{list(_MODEL_TYPES)}")
        if t.get("hidden_act", "silu") != "silu":
            raise ValueError(f"config hidden_act={t['hidden_act']!r} is not one of ['silu']")
        if t.get("use_sliding_window"):
            raise ValueError("config use_sliding_window=True is not supported; allowed: [False]")
        rope = t.get("rope_parameters") or t.get("rope_scaling") or {}
        kind = rope.get("rope_type", rope.get("type"))
        if kind not in _ROPE_TYPES:
            raise ValueError(f"config rope_type={kind!r} is not one of {list(_ROPE_TYPES)}")
        theta = rope.get("rope_theta", t.get("rope_theta"))
        if theta is None:
            raise ValueError("config has no rope_theta (neither top level nor in rope_parameters)")
        heads = t["num_attention_heads"]
        return cls(
            vocab_size=t["vocab_size"], hidden_size=t["hidden_size"],
            intermediate_size=t["intermediate_size"], num_layers=t["num_hidden_layers"],
            num_heads=heads, num_kv_heads=t.get("num_key_value_heads") or heads,
            head_dim=t.get("head_dim") or t["hidden_size"] // heads, rope_theta=float(theta),
            rms_norm_eps=t.get("rms_norm_eps", 1e-6), attention_bias=t.get("attention_bias", False),
            dtype=dtype,
        )


def tiny_config(**overrides) -> Qwen3Config:
    """A few-kB Qwen3 (2 layers, width 32, GQA 4/2 heads) for tests and small-data runs."""
    fields = dict(vocab_size=64, hidden_size=32, intermediate_size=48, num_layers=2, num_heads=4,
                  num_kv_heads=2, head_dim=8)
    return Qwen3Config(**{**fields, **overrides})


# ----------------------------------------------------------------------------- layers


class _Factory:
    """Compute dtype, rngs, and whether sharding annotations apply eagerly (under a mesh)."""

    def __init__(self, cfg: Qwen3Config, rngs: nnx.Rngs):
        self.rngs, self.dtype = rngs, jnp.dtype(cfg.dtype)
        self.eager = nnx.using_eager_sharding() and meta.global_mesh_defined()

    def param(self, init, shape, names):
        init = nnx.with_partitioning(init, names, eager_sharding=self.eager)
        return nnx.Param(init(self.rngs.params(), shape, jnp.float32))


class Linear(nnx.Module):
    """y = x @ kernel (+ bias); kernel (d_in, d_out), HF init N(0, 0.02)."""

    def __init__(self, f: _Factory, d_in, d_out, names, bias=False):
        self.dtype = f.dtype
        self.kernel = f.param(nnx.initializers.normal(0.02), (d_in, d_out), names)
        self.bias = f.param(nnx.initializers.zeros_init(), (d_out,), names[1:]) if bias else None

    def __call__(self, x):
        y = jnp.dot(x.astype(self.dtype), self.kernel[...].astype(self.dtype))
        return y if self.bias is None else y + self.bias[...].astype(self.dtype)


class RMSNorm(nnx.Module):
    """x / rms(x) in float32, cast back to the compute dtype, times `scale` (as transformers)."""

    def __init__(self, f: _Factory, d, eps, names):
        self.dtype, self.eps = f.dtype, eps
        self.scale = f.param(nnx.initializers.ones_init(), (d,), names)

    def __call__(self, x):
        x32 = x.astype(jnp.float32)
        x32 = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + self.eps)
        return self.scale[...].astype(self.dtype) * x32.astype(self.dtype)


def rope_tables(length: int, head_dim: int, theta: float) -> tuple[jnp.ndarray, jnp.ndarray]:
    """cos, sin (L, head_dim) float32 for positions 0..L-1, halves repeated (rotate-half layout)."""
    inv_freq = 1.0 / theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim)
    freqs = jnp.arange(length, dtype=jnp.float32)[:, None] * inv_freq  # (L, hd/2)
    emb = jnp.concatenate([freqs, freqs], axis=-1)
    return jnp.cos(emb), jnp.sin(emb)


def apply_rope(x, cos, sin):
    """x (B, L, H, hd); cos, sin (L, hd)."""
    x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
    rotated = jnp.concatenate([-x2, x1], axis=-1)
    return (x * cos[:, None] + rotated * sin[:, None]).astype(x.dtype)


def attention_mask(mask: jnp.ndarray) -> jnp.ndarray:
    """(B, L) bool real-token mask -> (B, L, L) bool: query q sees key k iff k <= q and k is real."""
    length = mask.shape[1]
    causal = jnp.tril(jnp.ones((length, length), bool))
    return causal[None] & mask[:, None, :].astype(bool)


class Attention(nnx.Module):
    """Grouped-query attention with per-head q/k RMSNorm and RoPE."""

    def __init__(self, f: _Factory, cfg: Qwen3Config):
        d, hd, bias = cfg.hidden_size, cfg.head_dim, cfg.attention_bias
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_heads, cfg.num_kv_heads, hd
        self.q_proj = Linear(f, d, cfg.num_heads * hd, ("embed", "mlp"), bias)
        self.k_proj = Linear(f, d, cfg.num_kv_heads * hd, ("embed", "mlp"), bias)
        self.v_proj = Linear(f, d, cfg.num_kv_heads * hd, ("embed", "mlp"), bias)
        self.o_proj = Linear(f, cfg.num_heads * hd, d, ("mlp", "embed"), bias)
        self.q_norm = RMSNorm(f, hd, cfg.rms_norm_eps, (None,))
        self.k_norm = RMSNorm(f, hd, cfg.rms_norm_eps, (None,))

    def __call__(self, x, allowed, cos, sin):  # x (B, L, D), allowed (B, L, L)
        b, n, _ = x.shape
        kv, hd = self.num_kv_heads, self.head_dim
        q = apply_rope(self.q_norm(self.q_proj(x).reshape(b, n, self.num_heads, hd)), cos, sin)
        k = apply_rope(self.k_norm(self.k_proj(x).reshape(b, n, kv, hd)), cos, sin)
        v = self.v_proj(x).reshape(b, n, kv, hd)
        q = q.reshape(b, n, kv, self.num_heads // kv, hd)  # query head h = kv head h // groups
        logits = jnp.einsum("bqkgd,bskd->bkgqs", q, k, preferred_element_type=jnp.float32)
        logits = jnp.where(allowed[:, None, None], logits * hd**-0.5, jnp.finfo(jnp.float32).min)
        probs = jax.nn.softmax(logits, axis=-1)
        probs = jnp.where(allowed.any(-1)[:, None, None, :, None], probs, 0.0)  # no key -> 0
        out = jnp.einsum("bkgqs,bskd->bqkgd", probs.astype(v.dtype), v)
        return self.o_proj(out.reshape(b, n, self.num_heads * hd))


class Mlp(nnx.Module):
    """SwiGLU: down(silu(gate(x)) * up(x))."""

    def __init__(self, f: _Factory, cfg: Qwen3Config):
        d, h = cfg.hidden_size, cfg.intermediate_size
        self.gate_proj = Linear(f, d, h, ("embed", "mlp"))
        self.up_proj = Linear(f, d, h, ("embed", "mlp"))
        self.down_proj = Linear(f, h, d, ("mlp", "embed"))

    def __call__(self, x):
        return self.down_proj(jax.nn.silu(self.gate_proj(x)) * self.up_proj(x))


class Embedding(nnx.Module):
    def __init__(self, f: _Factory, vocab: int, d: int):
        self.dtype = f.dtype
        self.embedding = f.param(nnx.initializers.normal(0.02), (vocab, d), ("vocab", "embed"))

    def __call__(self, token_ids):  # (B, L) -> (B, L, D)
        return self.embedding[...][token_ids.astype(jnp.int32)].astype(self.dtype)


class DecoderLayer(nnx.Module):
    def __init__(self, f: _Factory, cfg: Qwen3Config):
        self.input_layernorm = RMSNorm(f, cfg.hidden_size, cfg.rms_norm_eps, ("embed",))
        self.self_attn = Attention(f, cfg)
        self.post_attention_layernorm = RMSNorm(f, cfg.hidden_size, cfg.rms_norm_eps, ("embed",))
        self.mlp = Mlp(f, cfg)

    def __call__(self, x, allowed, cos, sin):
        x = x + self.self_attn(self.input_layernorm(x), allowed, cos, sin)
        return x + self.mlp(self.post_attention_layernorm(x))


class Qwen3TextModel(nnx.Module):
    """The decoder stack; attribute names mirror transformers' `Qwen3Model` / `Qwen3VLTextModel`.
    The residual stream is kept in the compute dtype, as in the reference's bf16 model."""

    def __init__(self, config: Qwen3Config, *, rngs: nnx.Rngs | None = None):
        self.config = cfg = config
        f = _Factory(cfg, rngs if rngs is not None else nnx.Rngs(0))
        self.embed_tokens = Embedding(f, cfg.vocab_size, cfg.hidden_size)
        self.layers = nnx.List([DecoderLayer(f, cfg) for _ in range(cfg.num_layers)])
        self.norm = RMSNorm(f, cfg.hidden_size, cfg.rms_norm_eps, ("embed",))

    def __call__(self, token_ids, mask):
        """token_ids (B, L) int, mask (B, L) bool (True = real token) -> (B, L, D) float32."""
        cfg = self.config
        if token_ids.ndim != 2 or mask.shape != token_ids.shape:
            raise ValueError(f"token_ids and mask must both be (B, L), got {token_ids.shape} "
                             f"and {mask.shape}")
        x = self.embed_tokens(token_ids)  # (B, L, D)
        cos, sin = rope_tables(token_ids.shape[1], cfg.head_dim, cfg.rope_theta)
        allowed = attention_mask(mask)  # (B, L, L)
        for layer in self.layers:
            x = layer(x, allowed, cos, sin)
        return self.norm(x).astype(jnp.float32)


# ----------------------------------------------------------------------------- the interface


class TextEncoder(NamedTuple):
    """Any frozen text encoder. `apply(params, token_ids (B, L) int32, mask (B, L) bool)`
    -> (B, L, dim) float32 must be pure and jittable; `params` is what it reads."""

    apply: Callable[[Any, jnp.ndarray, jnp.ndarray], jnp.ndarray]
    params: Any
    dim: int

    def encode(self, token_ids, mask):
        return self.apply(self.params, token_ids, mask)


def as_text_encoder(model: Qwen3TextModel) -> TextEncoder:
    """The model as a `TextEncoder` (its nnx state is the params)."""
    graphdef, params = nnx.split(model)
    return TextEncoder(lambda p, ids, m: nnx.merge(graphdef, p)(ids, m), params, model.config.hidden_size)


def random_text_encoder(config: Qwen3Config | None = None, seed: int = 0) -> TextEncoder:
    """A frozen, randomly initialised Qwen3 (default `tiny_config()`), for small-data runs."""
    return as_text_encoder(Qwen3TextModel(config or tiny_config(), rngs=nnx.Rngs(seed)))


# ----------------------------------------------------------------------------- weights


def _resolve(path: str) -> tuple[str, list[str]]:
    """A local folder, `model.safetensors` or `model.safetensors.index.json` -> (config.json,
    [safetensors files])."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"text encoder path {path!r} does not exist; {_GET_WEIGHTS}")
    folder = path if os.path.isdir(path) else os.path.dirname(path)
    config = os.path.join(folder, "config.json")
    if not os.path.isfile(config):
        raise FileNotFoundError(f"no config.json in {folder!r} (the model's transformers config); {_GET_WEIGHTS}")
    if os.path.isdir(path):
        cands = [os.path.join(path, n) for n in ("model.safetensors", "model.safetensors.index.json")]
        found = [c for c in cands if os.path.isfile(c)]
        if not found:
            raise FileNotFoundError(f"{path!r} holds neither model.safetensors nor "
                                    f"model.safetensors.index.json; {_GET_WEIGHTS}")
        path = found[0]
    if path.endswith(".index.json"):
        with open(path) as f:
            shards = sorted(set(json.load(f)["weight_map"].values()))
        files = [os.path.join(folder, s) for s in shards]
        absent = [f for f in files if not os.path.isfile(f)]
        if absent:
            raise FileNotFoundError(f"shard {absent[0]!r} named in {path!r} is missing; {_GET_WEIGHTS}")
        return config, files
    return config, [path]


def _hf_names(model: Qwen3TextModel) -> dict[str, tuple]:
    """transformers tensor name (without prefix) -> our parameter path."""
    out = {}
    for path, _ in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        *mods, leaf = (str(p) for p in path)
        out[".".join(mods + ["bias" if leaf == "bias" else "weight"])] = tuple(path)
    return out


def convert_tensors(model: Qwen3TextModel, tensors: dict[str, np.ndarray]) -> Qwen3TextModel:
    """Fill `model` (may be abstract, from nnx.eval_shape) in place from transformers tensors.

    The prefix before `embed_tokens.weight` ('', 'model.', 'model.language_model.') is found
    and stripped; other tensors (vision tower, lm_head) are ignored."""
    prefixes = sorted({k[: -len("embed_tokens.weight")] for k in tensors if k.endswith("embed_tokens.weight")})
    prefixes = [p for p in prefixes if "visual" not in p]
    if len(prefixes) != 1:
        raise ValueError(f"expected one text tower `*embed_tokens.weight` tensor, found prefixes {prefixes}")
    names = _hf_names(model)
    missing = [prefixes[0] + n for n in names if prefixes[0] + n not in tensors]
    if missing:
        raise ValueError(f"text encoder weights lack tensor {missing[0]!r} ({len(missing)} missing in all)")
    flat = dict(nnx.to_flat_state(nnx.state(model, nnx.Param)))
    for name, path in names.items():
        v = np.asarray(tensors[prefixes[0] + name], np.float32)
        kernel = path[-1] == "kernel"  # nn.Linear (out, in) -> kernel (in, out)
        want = tuple(flat[path].value.shape)[:: -1 if kernel else 1]
        if v.shape != want:
            raise ValueError(f"text encoder tensor {prefixes[0] + name!r} has shape {v.shape}, "
                             f"expected {want} for this config")
        flat[path].value = jnp.asarray(v.T if kernel else v)
    nnx.update(model, nnx.from_flat_state(flat))
    return model


def _read_tensors(files: Sequence[str], keep: Callable[[str], bool]) -> dict[str, np.ndarray]:

    out = {}
    with jax.default_device(jax.devices("cpu")[0]):
        for file in files:
            with safe_open(file, framework="flax") as f:
                for k in f.keys():
                    if keep(k):
                        out[k] = np.asarray(f.get_tensor(k).astype(jnp.float32))
    return out


def load_qwen3(path: str, dtype: str = "bfloat16") -> Qwen3TextModel:
    """The text tower from a local transformers folder (config.json + model.safetensors or a
    sharded index), a safetensors file or an index file. Nothing is downloaded."""
    config_file, files = _resolve(path)
    with open(config_file) as f:
        cfg = Qwen3Config.from_hf(json.load(f), dtype=dtype)
    model = nnx.eval_shape(lambda: Qwen3TextModel(cfg, rngs=nnx.Rngs(0)))
    tensors = _read_tensors(files, lambda k: "visual" not in k and not k.startswith("lm_head"))
    return convert_tensors(model, tensors)


def load_text_encoder(path: str, dtype: str = "bfloat16") -> TextEncoder:
    return as_text_encoder(load_qwen3(path, dtype))


# ----------------------------------------------------------------------------- tokens


def load_tokenizer(folder: str, padding_side: str = "right"):
    """A `tokenizers.Tokenizer` from `folder/tokenizer.json`, set to pad (side `padding_side`) with
    the pad token of `folder/tokenizer_config.json` (Qwen: `<|endoftext|>`). A transformers
    tokenizer (`AutoTokenizer.from_pretrained(folder, local_files_only=True)`, the reference's own
    path) works with `tokenize` and `embed_prompts` as well."""
    from tokenizers import Tokenizer  # optional: only to tokenize prompts (comes with transformers)

    file = os.path.join(folder, "tokenizer.json")
    if not os.path.isfile(file):
        raise FileNotFoundError(f"no tokenizer.json in {folder!r}; {_GET_WEIGHTS}")
    if padding_side not in ("right", "left"):
        raise ValueError(f"padding_side={padding_side!r} is not one of ['right', 'left']")
    tok = Tokenizer.from_file(file)
    pad = "<|endoftext|>"
    config_file = os.path.join(folder, "tokenizer_config.json")
    if os.path.isfile(config_file):
        with open(config_file) as f:
            pad = json.load(f).get("pad_token") or pad
        pad = pad["content"] if isinstance(pad, dict) else pad
    pad_id = tok.token_to_id(pad)
    if pad_id is None:
        raise ValueError(f"pad token {pad!r} of {folder!r} is not in its vocabulary")
    tok.enable_padding(direction=padding_side, pad_id=pad_id, pad_token=pad)
    return tok


def tokenize(tokenizer, prompts: Sequence[str], max_length: int = MAX_LENGTH):
    """Prompts -> token_ids (B, max_length) int32, mask (B, max_length) bool, padded to
    max_length and truncated as the reference does. `tokenizer` is a `tokenizers.Tokenizer`
    (from `load_tokenizer`; this sets its padding length and truncation) or a transformers
    tokenizer (its own padding side applies)."""
    prompts = [p.decode() if isinstance(p, bytes) else p for p in prompts]
    if hasattr(tokenizer, "encode_batch"):  # tokenizers.Tokenizer
        pad = tokenizer.padding or {}
        tokenizer.enable_padding(**{**pad, "length": max_length})
        tokenizer.enable_truncation(max_length)
        enc = tokenizer.encode_batch(prompts)
        ids, mask = [e.ids for e in enc], [e.attention_mask for e in enc]
    else:
        out = tokenizer(list(prompts), padding="max_length", max_length=max_length,
                        truncation=True, return_tensors="np")
        ids, mask = out["input_ids"], out["attention_mask"]
    return np.asarray(ids, np.int32), np.asarray(mask, bool)


def embed_prompts(encoder: TextEncoder, tokenizer, prompts: Sequence[str], max_length: int = MAX_LENGTH):
    """(B, max_length, dim) float32 embeddings and the (B, max_length) bool mask of real tokens."""
    ids, mask = tokenize(tokenizer, prompts, max_length)
    return jax.jit(encoder.apply)(encoder.params, ids, mask), mask
