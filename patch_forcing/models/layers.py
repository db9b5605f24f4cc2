"""Building blocks shared by the model zoo's transformers (DiT, DINOv2, the T2I model).

What a reader must know: parameters are created float32 through a `Factory`, which attaches
logical sharding names ('embed' = model width, 'mlp' = fan-out, 'vocab' = table rows) so
`sharding.logical_axis_rules` can shard them, and every weight is read through `use`, which casts
it to the compute dtype (and all-gathers it under an Explicit-axes mesh, FSDP-style).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from flax.core import meta, spmd

from patch_forcing.flow.interpolant import patchify
from patch_forcing.sharding import explicit_mesh, reshape_batch

LOGICAL_AXES = ("embed", "mlp", "vocab")


class FixedEmbedding(nnx.Variable):
    """A constant, non-trainable array stored with the model (not an nnx.Param)."""


def use(w: jnp.ndarray, dtype) -> jnp.ndarray:
    """A weight cast to the compute dtype; under an Explicit-axes mesh also all-gathered
    (replicated) first, FSDP-style. Under Auto axes XLA's sharding propagation does this."""
    w = w.astype(dtype)
    return jax.sharding.reshard(w, jax.P()) if explicit_mesh() else w


def layer_norm(x: jnp.ndarray, eps: float = 1e-6) -> jnp.ndarray:
    """LayerNorm without affine, computed in float32, returned in x's dtype."""
    x32 = x.astype(jnp.float32)
    mean = jnp.mean(x32, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)
    return ((x32 - mean) * jax.lax.rsqrt(var + eps)).astype(x.dtype)


class Factory:
    """Holds the compute dtype, the rngs and whether annotations shard eagerly (under a mesh)."""

    def __init__(self, dtype, rngs: nnx.Rngs, model: str = "the model", logical_axes=LOGICAL_AXES):
        self.rngs = rngs
        self.dtype = jnp.dtype(dtype)
        self.eager = nnx.using_eager_sharding() and meta.global_mesh_defined()
        if self.eager:
            names = {name for name, _ in spmd.get_logical_axis_rules()}
            if not set(logical_axes) <= names:
                raise ValueError(
                    f"building {model} under a mesh needs logical axis rules for {list(logical_axes)}: "
                    "wrap it in nnx.logical_axis_rules(sharding.logical_axis_rules(fsdp))")

    def param(self, init, shape, names):
        init = nnx.with_partitioning(init, names, eager_sharding=self.eager)
        return nnx.Param(init(self.rngs.params(), shape, jnp.float32))

    def linear(self, d_in, d_out, names, kernel_init=None, bias: bool = True):
        return Dense(self, d_in, d_out, names, kernel_init or nnx.initializers.xavier_uniform(), bias)


class Dense(nnx.Module):
    """y = x @ kernel (+ bias); kernel (d_in, d_out) float32, computed in the model dtype."""

    def __init__(self, f: Factory, d_in, d_out, names, kernel_init, bias: bool = True):
        self.dtype = f.dtype
        self.kernel = f.param(kernel_init, (d_in, d_out), names)
        self.bias = f.param(nnx.initializers.zeros_init(), (d_out,), names[1:]) if bias else None

    def __call__(self, x):
        # As one 2-D product over all leading axes: the weight gradient is then a single-contraction
        # dot, which XLA:CPU runs without transposing the (tokens, d_out) cotangent first.
        lead = x.shape[:-1]
        x2 = reshape_batch(x.astype(self.dtype), (math.prod(lead), x.shape[-1])) if len(lead) > 1 else x
        y = jnp.dot(x2.astype(self.dtype), use(self.kernel[...], self.dtype))
        y = y if self.bias is None else y + use(self.bias[...], self.dtype)
        return reshape_batch(y, (*lead, y.shape[-1])) if len(lead) > 1 else y

    def chunks(self, x, n: int) -> list:
        """`jnp.split(self(x), n, -1)` as n products with the kernel's column blocks: XLA:CPU runs
        n narrow GEMMs faster than one wide one (and the gradient needs no wide concatenation)."""
        lead, d_in = x.shape[:-1], x.shape[-1]
        x2 = reshape_batch(x.astype(self.dtype), (math.prod(lead), d_in))
        kernel = use(self.kernel[...], self.dtype)
        bias = None if self.bias is None else use(self.bias[...], self.dtype)
        width = kernel.shape[-1] // n
        out = []
        for i in range(n):
            y = jnp.dot(x2, kernel[:, i * width:(i + 1) * width])
            y = y if bias is None else y + bias[i * width:(i + 1) * width]
            out.append(reshape_batch(y, (*lead, width)))
        return out


class PatchEmbed(nnx.Module):
    """A p x p, stride-p convolution as a linear map on (p, p, C)-ordered patches: kernel
    (p, p, C, D), initialised like a linear on the flattened kernel (xavier, fan p*p*C -> D)."""

    def __init__(self, f: Factory, p: int, c: int, d: int):
        self.p, self.dtype = p, f.dtype
        init = nnx.initializers.xavier_uniform(in_axis=(0, 1, 2), out_axis=-1)
        self.kernel = f.param(init, (p, p, c, d), (None, None, None, "embed"))
        self.bias = f.param(nnx.initializers.zeros_init(), (d,), ("embed",))

    def __call__(self, x):  # (B, H, W, C) -> (B, N, D)
        tokens = patchify(x.astype(self.dtype), self.p)  # (B, N, p*p*C)
        b, n, k = tokens.shape
        kernel = use(self.kernel[...], self.dtype).reshape(k, -1)
        out = jnp.dot(reshape_batch(tokens, (b * n, k)), kernel) + use(self.bias[...], self.dtype)
        return reshape_batch(out, (b, n, kernel.shape[-1]))  # 2-D product: see Dense


class Attention(nnx.Module):
    """Multi-head self-attention with a fused qkv projection (timm / DiT layout)."""

    def __init__(self, f: Factory, d: int, num_heads: int, impl: str | None):
        self.num_heads, self.impl = num_heads, impl
        self.qkv = f.linear(d, 3 * d, ("embed", "mlp"))
        self.proj = f.linear(d, d, (None, "embed"))

    def __call__(self, x):  # (B, N, D)
        b, n, d = x.shape
        qkv = reshape_batch(self.qkv(x), (b, n, 3, self.num_heads, d // self.num_heads))
        out = jax.nn.dot_product_attention(
            qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2], implementation=self.impl
        )  # (B, N, heads, head_dim)
        return self.proj(reshape_batch(out, (b, n, d)))


def flat_shapes(tree: dict, prefix: str = "") -> dict[str, tuple]:
    """{'a/b/kernel': shape} of a nested dict of arrays."""
    out = {}
    for k, v in tree.items():
        path = f"{prefix}{k}"
        out.update(flat_shapes(v, path + "/") if isinstance(v, dict) else {path: tuple(np.shape(v))})
    return out


def load_params(model: nnx.Module, params: dict, what=nnx.Param) -> nnx.Module:
    """Write a pure nested dict of arrays (as `nnx.to_pure_dict(nnx.state(model, what))`, indices
    int or str; `what=...` for every variable) into the model in place, keeping each variable's
    dtype and placement (e.g. FSDP shards). The model may be abstract (`nnx.eval_shape`): then no
    random init is materialised and, under `jax.set_mesh`, arrays are placed by their logical
    annotations. One-line ValueError naming the first misfit."""
    state = nnx.state(model, what)
    want, got = flat_shapes(nnx.to_pure_dict(state)), flat_shapes(params)
    if want != got:
        missing, extra = sorted(set(want) - set(got)), sorted(set(got) - set(want))
        bad = [k for k in want if k in got and want[k] != got[k]][:1]
        detail = f"; {bad[0]}: {got[bad[0]]} != {want[bad[0]]}" if bad else ""
        raise ValueError(f"params do not fit the model: missing {missing[:3]}, unexpected {extra[:3]}{detail}")

    def place(new, prev):
        sharding = prev.sharding
        if isinstance(sharding, jax.sharding.NamedSharding) and isinstance(sharding.mesh, jax.sharding.AbstractMesh):
            sharding = sharding.spec  # an abstract model's: placed on the mesh of jax.set_mesh
        return jax.device_put(jnp.asarray(new, prev.dtype), sharding)

    old = nnx.to_pure_dict(state)
    nnx.replace_by_pure_dict(state, params)  # accepts int or str indices; then place like the old values
    nnx.replace_by_pure_dict(state, jax.tree.map(place, nnx.to_pure_dict(state), old))
    nnx.update(model, state)
    return model

