"""Pluggable conditioning: label dropout as before, text CFG equal to label CFG for every sampler,
padding that never changes a text model's output, and family-aware inference checkpoints."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from configs import t2i as t2i_configs
from patch_forcing import checkpoint, config_lib
from patch_forcing import conditioning as C
from patch_forcing.data import captioned
from patch_forcing.flow import samplers as S
from patch_forcing.models import dit, t2i
from tests.flow import test_samplers as T

pytestmark = pytest.mark.usefixtures("fast_compiles")


def test_label_dropout_is_the_previous_formula():
    key, y = jax.random.key(3), jnp.arange(64, dtype=jnp.int32) % 10
    cond = C.labels(10, 0.3)
    old = jnp.where(jax.random.uniform(key, (64,)) < 0.3, 10, y)  # train.py before conditioning
    new = C.drop(key, cond.from_batch({"label": np.asarray(y)}), cond.null, cond.dropout)
    np.testing.assert_array_equal(new, old)
    assert new.dtype == jnp.int32 and 0 < int((new == 10).sum()) < 64


def test_caption_dropout_swaps_the_whole_text_for_the_null():
    b, length, d = 32, 5, 3
    cond = {"text": jnp.ones((b, length, d)), "text_mask": jnp.ones((b, length), bool)}
    null = {"text": jnp.full((length, d), -2.0), "text_mask": jnp.zeros((length,), bool)}
    out = C.drop(jax.random.key(0), cond, null, 0.5)
    dropped = np.asarray(out["text"][:, 0, 0] == -2.0)
    assert 0 < dropped.sum() < b
    np.testing.assert_array_equal(np.asarray(out["text_mask"]).any(-1), ~dropped)
    np.testing.assert_array_equal(np.asarray(out["text"]).reshape(b, -1).min(-1) == -2.0, dropped)


def _as_text(labels):
    """Labels as text: one-hot rows (L = 2, the second a distractor that the model ignores)."""
    onehot = jax.nn.one_hot(labels, T.NUM_CLASSES + 1)
    return {"text": jnp.stack([onehot, jnp.ones_like(onehot)], axis=-2),
            "text_mask": jnp.ones(labels.shape + (2,), bool)}


def _text_model(x, t, cond):
    return T.TOY(x, t, jnp.argmax(cond["text"][:, 0], -1).astype(jnp.int32))


@pytest.mark.parametrize("name", ["euler", "euler_pf", "dual_loop", "look_ahead", "random_order"])
def test_text_cfg_equals_label_cfg_for_every_sampler(name):
    """A text model that reads the label from its text: guided sampling with the null text equals
    guided sampling with the null class (the reference-parity path), step for step."""
    cfg = T.cfg_of(name, steps=5, cfg_scale=2.5, q=0.4, n_inner=2)
    want, info_l = T.run(cfg, traj=True)
    null = jax.tree.map(lambda a: a[0], _as_text(jnp.array([T.NULL])))
    text_cfg = S.as_sampler_config(cfg, null_class=None, null=null)
    got, info_t = T.run(text_cfg, model=_text_model, labels=_as_text(T.LABELS), traj=True)
    np.testing.assert_array_equal(got, want)
    assert int(info_t["nfe_doubled"]) == int(info_l["nfe_doubled"]) > 0
    with pytest.raises(ValueError, match="sampler.null_class"):
        S.validate_sampler_config(S.as_sampler_config(cfg, null_class=None))


def _digits_model(max_lengths=(12,)):
    """The digits,smoke T2I model with perturbed weights, and a conditioning per text length."""
    c = t2i_configs.get_config("digits,smoke")
    mcfg = config_lib.model_config(c)
    graphdef, params, rest = t2i.init(mcfg, jax.random.key(0))
    params = jax.tree.map(lambda p: p + 0.05 * jax.random.normal(jax.random.key(1), p.shape), params)
    conds = []
    for length in max_lengths:
        c.text.max_length = length
        conds.append(config_lib.conditioning(c))
    return t2i.make_apply(graphdef, rest), params, conds, mcfg


def test_padding_never_changes_the_output():
    """Prompts padded to 12 or 20 tokens (and the empty prompt) give the same v and s."""
    prompts = ["a small red 3 left of a large blue 7", "a large green 0 right of a small green 1", ""]
    apply, params, conds, mcfg = _digits_model((12, 20))
    apply = jax.jit(apply)
    x = jax.random.normal(jax.random.key(2), (3, 16, 32, 3))
    t = jax.random.uniform(jax.random.key(3), (3, mcfg.num_patches))
    outs = []
    for length, cond in zip((12, 20), conds):
        y = cond.encode_prompts(prompts)
        assert y["text"].shape == (3, length, 32) and int(y["text_mask"][2].sum()) == 0
        np.testing.assert_allclose(cond.null["text"], y["text"][2], rtol=1e-5, atol=1e-6)  # null = ""
        outs.append(apply(params, x, t, y))
    for a, b in zip(*outs):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    assert float(jnp.abs(outs[0][0][0] - outs[0][0][1]).max()) > 1e-3  # the text matters


def test_token_and_embedding_batches_give_the_same_conditioning():
    _, _, (cond,), _ = _digits_model()
    src = captioned.CaptionedDigits("test")
    batch = {k: np.stack([src[i][k] for i in range(4)]) for k in ("tokens", "token_mask")}
    from_tokens = cond.from_batch(batch)
    from_text = cond.from_batch({"text": np.asarray(from_tokens["text"])[:, :10],
                                 "text_mask": batch["token_mask"][:, :10]})
    np.testing.assert_array_equal(from_text["text_mask"], from_tokens["text_mask"])
    real = np.asarray(from_tokens["text_mask"])
    np.testing.assert_array_equal(np.asarray(from_text["text"])[real], np.asarray(from_tokens["text"])[real])


def test_inference_checkpoints_record_their_family(tmp_path):
    _, params, _, mcfg = _digits_model(())
    checkpoint.save_inference(tmp_path / "t2i", mcfg.to_dict(), nnx.to_pure_dict(params), family="t2i")
    got_cfg, apply, got_params, meta = checkpoint.load_model(tmp_path / "t2i")
    assert meta["family"] == "t2i" and got_cfg == mcfg
    x = jnp.zeros((1, 16, 32, 3))
    v, s = apply(got_params, x, jnp.zeros((1, mcfg.num_patches)),
                 {"text": jnp.zeros((1, 4, 32)), "text_mask": jnp.ones((1, 4), bool)})
    assert v.shape == x.shape and s.shape == (1, 16, 32, 1)
    dcfg = dit.preset("PF-Tiny/2", image_size=8, in_channels=1, num_classes=10, hidden_size=32, depth=1, num_heads=2)
    _, dparams, _ = dit.init(dcfg, jax.random.key(0))
    checkpoint.save_inference(tmp_path / "dit", dcfg.to_dict(), nnx.to_pure_dict(dparams))
    meta_file = tmp_path / "dit" / "config.json"
    meta_file.write_text(meta_file.read_text().replace('"family": "dit",', ""))  # written before families
    got_cfg, _, _, meta = checkpoint.load_model(tmp_path / "dit")
    assert got_cfg == dcfg and "family" not in meta


def test_t2i_configs_validate_and_the_paper_model_builds_abstractly():
    for arg in ("digits", "digits,global", "digits,smoke", "pft_1p2b"):
        config_lib.validate(t2i_configs.get_config(arg), "train")
    c = t2i_configs.get_config("pft_1p2b")
    mcfg = config_lib.model_config(c)
    _, params, _ = nnx.eval_shape(lambda: config_lib.model_family(c).init(mcfg, jax.random.key(0)))
    # 1,239,969,176 at in_dim 4 (the reference module), + 28 * 4 * 1536 * 2 for FLUX.2's 32 channels
    assert sum(x.size for x in jax.tree.leaves(params)) == 1_239_969_176 + 2 * 28 * 4 * 1536
    assert (mcfg.in_dim, mcfg.dtype, c.text.max_length, c.text.width, c.text.use_mask) == \
        (32, "bfloat16", 256, 2048, False)
    assert (c.flow.timesteps, c.flow.ltg.std, c.flow.ltg.loc, c.flow.ltg.scale) == ("ltg", 0.6, 0.5, 1.0)
    recipe = (c.optim.lr, c.optim.warmup_steps, c.ema.decay, c.text.dropout, c.loss.nll_weight)
    assert recipe == (1e-4, 1000, 0.9999, 0.1, 0.01)
    scfg = config_lib.sampler_config(c, mcfg)  # checked; the null text comes with the encoder
    assert scfg.cfg_scale == 5.0 and scfg.null is None and scfg.null_class is None


@pytest.mark.parametrize("key,value,needle", [
    ("text.width", 16, "config.text.width=16 must equal config.model.txt_in_dim=32"),
    ("text.max_length", 8, "config.text.max_length=8 must be >= 12"),
    ("text.dropout", 1.0, "config.text.dropout must be in [0, 1)"),
    ("eval.fid_every_steps", 100, "config.eval.fid_every_steps must be 0 for text models"),
    ("model.family", "unet", "config.model.family='unet' is not one of"),
    ("repa.encoder_depth", 2, "REPA's projector exists on the class-conditional DiT only"),
])
def test_bad_t2i_config_names_the_field(key, value, needle):
    c = t2i_configs.get_config("digits")
    section, field = key.split(".")
    c[section][field] = value
    with pytest.raises(ValueError) as err:
        config_lib.validate(c, "train")
    assert needle in str(err.value) and "\n" not in str(err.value)
