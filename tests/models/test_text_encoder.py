"""The Qwen3 text tower against transformers (Qwen3Model, and the reference's Qwen3VLTextModel
reached through Qwen3VLForConditionalGeneration), padding invariance, the loader's errors, tokens."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from patch_forcing.models import text_encoder as te

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

pytestmark = pytest.mark.usefixtures("fast_compiles")

TINY_TEXT = dict(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, head_dim=8)
PAD = 0
# Rows: right padding (the reference's), an empty prompt (no real token at all), left padding, full.
IDS = np.array([[5, 6, 7, 8, 9, PAD, PAD, PAD, PAD, PAD],
                [PAD] * 10,
                [PAD, PAD, PAD, 5, 6, 7, 8, 9, 10, 11],
                [12, 13, 14, 15, 16, 17, 18, 19, 20, 21]])
MASK = IDS != PAD


def _randomise(model, seed=0):
    """Random weights of a visible size (HF's 0.02 init makes every layer nearly the identity)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3 + (1.0 if p.ndim == 1 else 0.0))
    return model.eval()


def _torch_hidden(model, ids, mask):
    with torch.no_grad():
        out = model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask.astype(np.int64)))
    return out.last_hidden_state.numpy()


@pytest.fixture(scope="module")
def qwen3_dir(tmp_path_factory):
    """A tiny transformers Qwen3Model saved as one model.safetensors (keys without prefix)."""
    cfg = transformers.Qwen3Config(**TINY_TEXT, rope_theta=10000.0)
    model = _randomise(transformers.Qwen3Model._from_config(cfg, attn_implementation="sdpa"))
    path = tmp_path_factory.mktemp("qwen3")
    model.save_pretrained(path)
    return path, model


@pytest.fixture(scope="module")
def qwen3_vl_dir(tmp_path_factory):
    """A tiny Qwen3-VL (vision tower included) saved sharded, keys `model.language_model.*`,
    config with the real checkpoint's old-style `rope_theta` + interleaved M-RoPE `rope_scaling`."""
    text = dict(TINY_TEXT, rope_theta=5e6,
                rope_scaling={"rope_type": "default", "mrope_section": [2, 1, 1], "mrope_interleaved": True})
    vision = dict(depth=1, hidden_size=16, intermediate_size=32, num_heads=2, out_hidden_size=32,
                  patch_size=2, spatial_merge_size=2, temporal_patch_size=2,
                  num_position_embeddings=16, deepstack_visual_indexes=[0])
    cfg = transformers.Qwen3VLConfig(text_config=text, vision_config=vision)
    full = transformers.Qwen3VLForConditionalGeneration._from_config(cfg, attn_implementation="sdpa")
    full = _randomise(full, seed=1)
    path = tmp_path_factory.mktemp("qwen3_vl")
    full.save_pretrained(path, max_shard_size="20KB")
    assert (path / "model.safetensors.index.json").exists()
    return path, full.model.language_model  # exactly what the reference keeps


def _ours(path, dtype="float32"):
    model = te.load_qwen3(str(path), dtype=dtype)
    return np.asarray(model(jnp.asarray(IDS), jnp.asarray(MASK)))


@pytest.mark.parametrize("fixture", ["qwen3_dir", "qwen3_vl_dir"])
def test_parity_with_transformers_at_every_position(fixture, request):
    """All rows and positions (padding rows too: the reference's DiT reads all of them)."""
    path, torch_model = request.getfixturevalue(fixture)
    ref = _torch_hidden(torch_model, IDS, MASK)
    ours = _ours(path)
    assert ours.shape == (4, 10, 32) and ours.dtype == np.float32
    assert np.abs(ours - ref).max() <= 1e-4
    # and without any padding (mask all True)
    full = _torch_hidden(torch_model, IDS[3:], np.ones_like(MASK[3:]))
    model = te.load_qwen3(str(path), dtype="float32")
    assert np.abs(np.asarray(model(jnp.asarray(IDS[3:]), jnp.ones((1, 10), bool))) - full).max() <= 1e-4


def test_vl_config_matches_qwen3_vl_2b_defaults():
    """The real Qwen3-VL-2B text_config (old-style rope keys) gives the preset defaults."""
    real = {"model_type": "qwen3_vl", "text_config": {
        "attention_bias": False, "head_dim": 128, "hidden_act": "silu", "hidden_size": 2048,
        "intermediate_size": 6144, "max_position_embeddings": 262144, "model_type": "qwen3_vl_text",
        "num_attention_heads": 16, "num_hidden_layers": 28, "num_key_value_heads": 8,
        "rms_norm_eps": 1e-06, "rope_scaling": {"mrope_interleaved": True, "mrope_section": [24, 20, 20],
                                                "rope_type": "default"},
        "rope_theta": 5000000, "tie_word_embeddings": True, "vocab_size": 151936}}
    assert te.Qwen3Config.from_hf(real) == te.Qwen3Config()
    assert te.Qwen3Config.from_dict(te.Qwen3Config().to_dict()) == te.Qwen3Config()


def test_padding_never_changes_real_tokens():
    enc = te.random_text_encoder(te.tiny_config(), seed=3)
    prompt = np.array([5, 9, 2, 33, 7])

    def run(length, pad_id, left=False):
        pad = np.full(length - len(prompt), pad_id)
        ids = np.concatenate([pad, prompt] if left else [prompt, pad])[None]
        mask = np.concatenate([pad * 0, prompt * 0 + 1] if left else [prompt * 0 + 1, pad * 0])[None] > 0
        out = np.asarray(enc.encode(jnp.asarray(ids), jnp.asarray(mask)))[0]
        return out[length - len(prompt):] if left else out[:len(prompt)]

    base = run(5, 0)
    for length, pad_id in [(8, 0), (16, 11), (16, 63)]:
        np.testing.assert_allclose(run(length, pad_id), base, atol=1e-6)
        np.testing.assert_allclose(run(length, pad_id, left=True), base, atol=1e-5)  # RoPE is relative


def test_bf16_compute_runs_and_tracks_float32(qwen3_vl_dir):
    path, _ = qwen3_vl_dir
    f32, bf16 = _ours(path), _ours(path, dtype="bfloat16")
    assert np.isfinite(bf16).all()  # bf16 rounding only (measured: 1.8% mean, 4% of max |out|)
    assert np.abs(bf16 - f32).mean() <= 0.05 * np.abs(f32).mean()
    assert np.abs(bf16 - f32).max() <= 0.1 * np.abs(f32).max()


def test_loader_errors(tmp_path, qwen3_dir):
    with pytest.raises(FileNotFoundError, match="Qwen/Qwen3-VL-Embedding-2B"):
        te.load_qwen3(str(tmp_path / "nowhere"))
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match="neither model.safetensors"):
        te.load_qwen3(str(tmp_path))
    path, _ = qwen3_dir
    cfg = json.loads((path / "config.json").read_text())
    model = te.Qwen3TextModel(te.Qwen3Config.from_hf(cfg))
    from safetensors.numpy import load_file

    tensors = load_file(path / "model.safetensors")
    bad = dict(tensors, **{"layers.1.mlp.up_proj.weight": np.zeros((48, 31), np.float32)})
    with pytest.raises(ValueError, match=r"'layers.1.mlp.up_proj.weight' has shape \(48, 31\), expected \(48, 32\)"):
        te.convert_tensors(model, bad)
    del tensors["norm.weight"]
    with pytest.raises(ValueError, match="lack tensor 'norm.weight'"):
        te.convert_tensors(model, tensors)
    for change, match in [({"model_type": "llama"}, "model_type='llama'"),
                          ({"rope_parameters": {"rope_type": "yarn", "rope_theta": 1.0}}, "rope_type='yarn'")]:
        with pytest.raises(ValueError, match=match):
            te.Qwen3Config.from_hf({**cfg, **change})


@pytest.fixture
def tokenizer_dir(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"<|endoftext|>": 0, "[UNK]": 1, "a": 2, "red": 3, "cube": 4, "on": 5, "table": 6}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(tmp_path / "tokenizer.json"))
    config = {"pad_token": "<|endoftext|>", "tokenizer_class": "PreTrainedTokenizerFast"}
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    return tmp_path


def test_tokenize_matches_transformers_and_embeds(tokenizer_dir):
    prompts = ["a red cube", "", b"a red cube on a table a red"]
    ids, mask = te.tokenize(te.load_tokenizer(str(tokenizer_dir)), prompts, max_length=6)
    np.testing.assert_array_equal(ids, [[2, 3, 4, 0, 0, 0], [0] * 6, [2, 3, 4, 5, 2, 6]])
    np.testing.assert_array_equal(mask, ids != 0)
    hf = transformers.AutoTokenizer.from_pretrained(str(tokenizer_dir), local_files_only=True)
    ids_hf, mask_hf = te.tokenize(hf, prompts, max_length=6)  # the reference's exact call
    np.testing.assert_array_equal(ids_hf, ids)
    np.testing.assert_array_equal(mask_hf, mask)
    assert ids.dtype == np.int32 and mask.dtype == bool

    enc = te.random_text_encoder(te.tiny_config(hidden_size=16, num_heads=2, num_kv_heads=1))
    emb, m = te.embed_prompts(enc, hf, prompts, max_length=6)
    assert emb.shape == (3, 6, 16) and enc.dim == 16 and emb.dtype == jnp.float32
    np.testing.assert_array_equal(m, mask)
    # the empty prompt sees no real token: no attention anywhere, so all its rows are equal
    np.testing.assert_allclose(emb[1], jnp.broadcast_to(emb[1, :1], emb[1].shape), atol=1e-6)
