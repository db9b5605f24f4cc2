"""The NNX SD-VAE equals diffusers' AutoencoderKL on random weights; the converter and loader."""

import json

import numpy as np
import pytest

from patch_forcing.models import vae as V


def _torch_vae(cfg: V.VAEConfig, seed=0):
    import torch
    from diffusers import AutoencoderKL

    torch.set_num_threads(1)
    torch.manual_seed(seed)
    n = len(cfg.block_out_channels)
    m = AutoencoderKL(in_channels=cfg.in_channels, out_channels=cfg.out_channels,
                      down_block_types=("DownEncoderBlock2D",) * n, up_block_types=("UpDecoderBlock2D",) * n,
                      block_out_channels=cfg.block_out_channels, layers_per_block=cfg.layers_per_block,
                      latent_channels=cfg.latent_channels, norm_num_groups=cfg.norm_num_groups,
                      scaling_factor=cfg.scale_factor).eval()
    with torch.no_grad():  # non-trivial norm affine params, so a swapped scale/bias would show
        for k, p in m.named_parameters():
            if "norm" in k:
                p.add_(0.2 * torch.randn_like(p))
    return m


def _state_dict_np(m):
    return {k: v.detach().numpy() for k, v in m.state_dict().items()}


@pytest.fixture(scope="module")
def pair():
    cfg = V.tiny_config()
    tm = _torch_vae(cfg)
    ours = V.convert_state_dict(_state_dict_np(tm), V.AutoencoderKL(cfg))
    return cfg, tm, ours


def test_encoder_and_decoder_match_diffusers(pair):
    import torch

    cfg, tm, ours = pair
    rng = np.random.default_rng(0)
    x = rng.uniform(-1, 1, (2, 32, 32, 3)).astype(np.float32)
    with torch.no_grad():
        post = tm.encode(torch.from_numpy(x).permute(0, 3, 1, 2)).latent_dist
        t_mean = post.mean.permute(0, 2, 3, 1).numpy()
        t_logvar = post.logvar.permute(0, 2, 3, 1).numpy()
    mean, logvar = ours.moments(x)
    assert mean.shape == (2, 16, 16, 4)
    np.testing.assert_allclose(mean, t_mean, atol=2e-4, rtol=1e-4)
    np.testing.assert_allclose(logvar, t_logvar, atol=2e-4, rtol=1e-4)
    np.testing.assert_allclose(ours.encode(x), t_mean * cfg.scale_factor, atol=1e-4, rtol=1e-4)

    z = rng.standard_normal((2, 8, 8, 4)).astype(np.float32)
    with torch.no_grad():
        t_img = tm.decode(torch.from_numpy(z).permute(0, 3, 1, 2)).sample.permute(0, 2, 3, 1).numpy()
    img = ours.decode(z * cfg.scale_factor)  # ours takes scaled latents
    assert img.shape == (2, 16, 16, 3)
    np.testing.assert_allclose(img, t_img, atol=2e-4, rtol=1e-4)


def test_encode_sample_uses_posterior_std(pair):
    import jax

    cfg, _, ours = pair
    x = np.random.default_rng(1).uniform(-1, 1, (1, 16, 16, 3)).astype(np.float32)
    mean, logvar = ours.moments(x)
    key = jax.random.key(3)
    z = ours.encode(x, key=key, sample=True)
    eps = jax.random.normal(key, mean.shape)
    np.testing.assert_allclose(z, cfg.scale_factor * (mean + np.exp(0.5 * logvar) * eps), atol=1e-5)
    with pytest.raises(ValueError, match="key"):
        ours.encode(x, sample=True)


def test_converter_covers_every_key_and_names_missing_ones(pair):
    cfg, tm, ours = pair
    sd = _state_dict_np(tm)
    assert set(V.to_state_dict(ours)) == set(sd)  # round trip: every diffusers key is one of our params
    for k, v in V.to_state_dict(ours).items():
        np.testing.assert_array_equal(v, sd[k])

    dropped = dict(sd)
    del dropped["encoder.mid_block.attentions.0.to_q.weight"]
    dropped["decoder.extra.weight"] = np.zeros(3, np.float32)
    with pytest.raises(ValueError, match=r"encoder\.mid_block\.attentions\.0\.to_q\.weight.*decoder\.extra\.weight"):
        V.convert_state_dict(dropped, V.AutoencoderKL(cfg))

    bad = dict(sd)
    bad["decoder.conv_in.weight"] = np.zeros((1, 2, 3, 3), np.float32)
    with pytest.raises(ValueError, match="decoder.conv_in.weight"):
        V.convert_state_dict(bad, V.AutoencoderKL(cfg))


def test_converter_accepts_legacy_attention_names(pair):
    cfg, tm, ours = pair
    legacy = {}
    for k, v in _state_dict_np(tm).items():
        for new, old in (("to_q", "query"), ("to_k", "key"), ("to_v", "value"), ("to_out.0", "proj_attn")):
            if ".attentions.0." + new + "." in k:
                k = k.replace(new, old)
                if v.ndim == 2 and old != "value":  # legacy LDM checkpoints may hold 1x1 convs
                    v = v[:, :, None, None]
        legacy[k] = v
    assert any("proj_attn" in k for k in legacy)
    x = np.random.default_rng(2).uniform(-1, 1, (1, 16, 16, 3)).astype(np.float32)
    other = V.convert_state_dict(legacy, V.AutoencoderKL(cfg, rngs=__import__("flax").nnx.Rngs(5)))
    np.testing.assert_array_equal(other.encode(x), ours.encode(x))


def test_load_vae_from_local_file_with_config(pair, tmp_path, monkeypatch):
    from safetensors.numpy import save_file

    cfg, tm, ours = pair
    monkeypatch.delenv(V.ENV_WEIGHTS, raising=False)
    save_file(_state_dict_np(tm), str(tmp_path / V.WEIGHTS_FILE))
    tm.save_config(str(tmp_path))  # diffusers config.json -> our VAEConfig
    assert json.loads((tmp_path / "config.json").read_text())["block_out_channels"] == [32, 64]
    x = np.random.default_rng(3).uniform(-1, 1, (1, 16, 16, 3)).astype(np.float32)
    for loaded in (V.load_vae(local_path=str(tmp_path)), V.load_vae(str(tmp_path / V.WEIGHTS_FILE))):
        assert loaded.config == cfg
        np.testing.assert_array_equal(loaded.encode(x), ours.encode(x))
    monkeypatch.setenv(V.ENV_WEIGHTS, str(tmp_path / V.WEIGHTS_FILE))
    np.testing.assert_array_equal(V.load_vae().encode(x), ours.encode(x))
    saved = V.save_vae(ours, str(tmp_path / "ours"))  # our writer round-trips through our loader
    again = V.load_vae(local_path=saved)
    assert again.config == cfg
    np.testing.assert_array_equal(again.encode(x), ours.encode(x))
    assert V.VAEConfig.from_diffusers(cfg.to_diffusers()) == cfg


def test_load_vae_offline_names_repo_and_flag(monkeypatch):
    import huggingface_hub

    def offline(*a, **k):
        raise huggingface_hub.errors.LocalEntryNotFoundError("no network")

    monkeypatch.delenv(V.ENV_WEIGHTS, raising=False)
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", offline)
    with pytest.raises(FileNotFoundError) as e:
        V.load_vae()
    msg = str(e.value)
    assert "stabilityai/sd-vae-ft-ema" in msg and "--vae_path" in msg and V.ENV_WEIGHTS in msg
    assert "\n" not in msg
    with pytest.raises(FileNotFoundError, match="does not exist"):
        V.load_vae(local_path="/nonexistent/vae.safetensors")


def test_default_config_is_sd_kl_f8():
    import jax
    from flax import nnx

    abstract = nnx.eval_shape(lambda: V.AutoencoderKL())
    n = sum(np.prod(v.shape) for _, v in nnx.to_flat_state(nnx.state(abstract, nnx.Param)))
    assert n == 83_653_863  # sd-vae-ft-ema's parameter count
    z = jax.eval_shape(lambda x: V.AutoencoderKL().encode(x), jax.ShapeDtypeStruct((1, 256, 256, 3), np.float32))
    assert z.shape == (1, 32, 32, 4)
