"""The optimised train step (2-D products, split adaLN products in models/layers.py and dit.py)
against the straightforward formulation of the same model, written out here with plain jnp:
gradients and two whole jitted steps agree within float32 tolerance."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from configs import digits
from patch_forcing import config_lib, sharding, train
from patch_forcing.flow import interpolant
from patch_forcing.models import dit, families

pytestmark = pytest.mark.usefixtures("fast_compiles")


def plain_apply(mcfg):
    """apply(params, x, t, y) as the paper writes the PF-DiT: 3-D dots, one adaLN product split in
    six, jax.nn.dot_product_attention on (B, N, heads, head_dim)."""
    d, p, heads = mcfg.hidden_size, mcfg.patch_size, mcfg.num_heads
    pos = jnp.asarray(dit.sincos_pos_embed(d, *mcfg.grid), jnp.float32)

    def lin(w, x):
        return jnp.einsum("...i,io->...o", x, w["kernel"]) + w["bias"]

    def norm(x):
        mean = x.mean(-1, keepdims=True)
        return (x - mean) / jnp.sqrt(((x - mean) ** 2).mean(-1, keepdims=True) + 1e-6)

    def apply(params, x, t, y):
        w = nnx.to_pure_dict(params)
        tok = jnp.einsum("bnk,kd->bnd", interpolant.patchify(x, p),
                         w["x_embedder"]["kernel"].reshape(-1, d)) + w["x_embedder"]["bias"] + pos
        temb = lin(w["t_embedder"]["fc2"], jax.nn.silu(lin(w["t_embedder"]["fc1"], dit.timestep_embedding(t))))
        cond = jax.nn.silu(temb + w["y_embedder"]["embedding"][y][:, None])
        b, n, _ = tok.shape
        for i in range(mcfg.depth):
            blk = w["blocks"][i]
            sa, ca, ga, sm, cm, gm = jnp.split(lin(blk["adaLN_modulation"], cond), 6, axis=-1)
            qkv = lin(blk["attn"]["qkv"], norm(tok) * (1 + ca) + sa).reshape(b, n, 3, heads, d // heads)
            att = jax.nn.dot_product_attention(qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]).reshape(b, n, d)
            tok = tok + ga * lin(blk["attn"]["proj"], att)
            h = jax.nn.gelu(lin(blk["mlp"]["fc1"], norm(tok) * (1 + cm) + sm), approximate=True)
            tok = tok + gm * lin(blk["mlp"]["fc2"], h)
        shift, scale = jnp.split(lin(w["final_layer"]["adaLN_modulation"], cond), 2, axis=-1)
        out = lin(w["final_layer"]["linear"], norm(tok) * (1 + scale) + shift)
        img = interpolant.unpatchify(out, p, *mcfg.image_size)
        return img[..., :mcfg.in_channels], img[..., mcfg.in_channels:]

    return apply


def setup():
    c = digits.get_config("smoke")
    c.model.depth = 2
    c.optim.warmup_steps, c.optim.eps = 0, 1e-3  # a smooth update: no sign(g) for tiny g
    mesh = sharding.make_mesh(c.mesh)
    state, graphdef, rest, shardings = train.init_state(c, mesh)
    rng = np.random.default_rng(0)  # every weight random and non-zero (no adaLN-Zero zeros)
    params = jax.tree.map(lambda v: v + 0.2 * rng.standard_normal(v.shape).astype(np.float32), state["params"])
    state = {**state, "params": params, "ema": jax.tree.map(jnp.copy, params)}  # no aliased buffers: donated
    batch = {"image": rng.standard_normal((16, 8, 8, 1)).astype(np.float32),
             "label": rng.integers(0, 10, 16).astype(np.int32)}
    return c, mesh, state, graphdef, rest, shardings, batch


def test_model_gradients_match_the_plain_formulation():
    c, _, state, graphdef, rest, _, batch = setup()
    mcfg = config_lib.model_config(c)
    rng = np.random.default_rng(1)
    t = jnp.asarray(rng.uniform(size=(16, mcfg.num_patches)).astype(np.float32))
    u = jnp.asarray(rng.standard_normal(batch["image"].shape).astype(np.float32))

    def loss(apply):
        def f(params):
            v, s = apply(params, jnp.asarray(batch["image"]), t, jnp.asarray(batch["label"]))
            return jnp.mean((v - u) ** 2) + 0.1 * jnp.mean(s ** 2)
        return jax.jit(jax.value_and_grad(f))(state["params"])

    (l_fast, g_fast), (l_plain, g_plain) = loss(dit.make_apply(graphdef, rest)), loss(plain_apply(mcfg))
    np.testing.assert_allclose(l_fast, l_plain, rtol=1e-5)
    for a, b in zip(jax.tree.leaves(g_fast), jax.tree.leaves(g_plain)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5 * float(np.abs(b).max()) + 1e-7)


def test_jitted_train_step_matches_the_plain_step(monkeypatch):
    c, mesh, state, graphdef, rest, shardings, batch = setup()
    fast = train.jit_train_step(c, graphdef, rest, shardings, mesh)
    plain_family = families.get("dit")._replace(make_apply=lambda *_, **__: plain_apply(config_lib.model_config(c)))
    monkeypatch.setattr(config_lib, "model_family", lambda _: plain_family)
    plain = jax.jit(train.make_train_step(c, graphdef, rest))
    gbatch = sharding.to_global_batch(batch, mesh)
    s_plain = jax.tree.map(jnp.copy, state)
    s_fast = state
    for _ in range(2):
        s_fast, m_fast = fast(s_fast, gbatch)
        s_plain, m_plain = plain(s_plain, gbatch)
        for k in ("loss", "flow_loss", "nll", "grad_norm"):
            np.testing.assert_allclose(m_fast[k], m_plain[k], rtol=2e-5, err_msg=k)
    for name in ("params", "ema", "opt_state"):
        for a, b in zip(jax.tree.leaves(s_fast[name]), jax.tree.leaves(s_plain[name])):
            np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6, err_msg=name)
