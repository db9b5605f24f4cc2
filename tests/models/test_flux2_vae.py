"""The NNX FLUX.2 VAE against diffusers' AutoencoderKLFlux2 and the Flux2 pipeline's latent
normalisation; the fold order of the authors' ae_flux2.py; the converter's errors."""

import inspect
import json

import jax
import numpy as np
import pytest

from patch_forcing.models import flux2_vae as F

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

pytestmark = pytest.mark.usefixtures("fast_compiles")


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """A tiny diffusers AutoencoderKLFlux2 (4 latent channels, 2x down), saved and loaded."""
    torch.manual_seed(0)
    m = diffusers.AutoencoderKLFlux2(
        block_out_channels=(8, 16), down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2, layers_per_block=1, latent_channels=4,
        norm_num_groups=4).eval()
    with torch.no_grad():  # non-trivial norms and statistics, so swaps would show
        for k, p in m.named_parameters():
            if "norm" in k:
                p.add_(0.2 * torch.randn_like(p))
        m.bn.running_mean.normal_()
        m.bn.running_var.uniform_(0.5, 2.0)
    path = tmp_path_factory.mktemp("flux2_vae")
    m.save_pretrained(path)
    return m, F.load_flux2_vae(str(path)), path


def _nchw(a):
    return torch.from_numpy(np.ascontiguousarray(a)).permute(0, 3, 1, 2)


def _nhwc(t):
    return t.permute(0, 2, 3, 1).numpy()


def test_encode_and_decode_match_diffusers(pair):
    from diffusers.pipelines.flux2.pipeline_flux2 import Flux2Pipeline

    tm, ours, _ = pair
    x = np.random.default_rng(0).uniform(-1, 1, (2, 16, 16, 3)).astype(np.float32)
    mean_ = tm.bn.running_mean.view(1, -1, 1, 1)
    std = torch.sqrt(tm.bn.running_var.view(1, -1, 1, 1) + tm.config.batch_norm_eps)
    with torch.no_grad():
        raw = tm.encode(_nchw(x)).latent_dist.mean
        folded = (Flux2Pipeline._patchify_latents(raw) - mean_) / std  # the pipeline's own code
        ref_z = _nhwc(Flux2Pipeline._unpatchify_latents(folded))
    z = np.asarray(ours.encode(x))
    assert z.shape == (2, 8, 8, 4) and z.dtype == np.float32
    assert np.abs(np.asarray(ours.posterior_mean(x)) - _nhwc(raw)).max() <= 1e-4
    assert np.abs(z - ref_z).max() <= 1e-4

    z = np.random.default_rng(1).standard_normal((2, 8, 8, 4)).astype(np.float32)
    with torch.no_grad():
        back = Flux2Pipeline._patchify_latents(_nchw(z)) * std + mean_
        ref_img = _nhwc(tm.decode(Flux2Pipeline._unpatchify_latents(back)).sample)
    img = np.asarray(ours.decode(z))
    assert img.shape == (2, 16, 16, 3)
    assert np.abs(img - ref_img).max() <= 1e-4

    encode, decode, params = F.vae_functions(ours)  # the pure, jitted form gives the same
    np.testing.assert_allclose(jax.jit(decode)(params, z), img, atol=1e-5)
    np.testing.assert_allclose(jax.jit(encode)(params, x), ours.encode(x), atol=1e-5)


def test_fold_is_the_reference_einops_pattern_and_normalisation_round_trips(pair):
    import einops

    _, ours, _ = pair
    rng = np.random.default_rng(2)
    z = rng.standard_normal((2, 6, 4, 3)).astype(np.float32)
    # ae_flux2.py: rearrange(mean, "... c (i pi) (j pj) -> ... (c pi pj) i j", pi=2, pj=2), NCHW
    ref = einops.rearrange(z.transpose(0, 3, 1, 2), "b c (i pi) (j pj) -> b (c pi pj) i j", pi=2, pj=2)
    np.testing.assert_array_equal(np.asarray(F.fold(z, 2)), ref.transpose(0, 2, 3, 1))
    np.testing.assert_array_equal(np.asarray(F.unfold(F.fold(z, 2), 2)), z)

    x = rng.uniform(-1, 1, (1, 16, 16, 3)).astype(np.float32)
    raw = np.asarray(ours.posterior_mean(x))
    back = F.denormalize(ours.encode(x), *ours._stats())
    np.testing.assert_allclose(back, raw, atol=1e-5)


def test_config_and_bf16(pair):
    tm, _, path = pair
    cfg = F.Flux2VAEConfig.from_diffusers(dict(tm.config))
    assert cfg.block_out_channels == (8, 16) and cfg.latent_channels == 4 and cfg.patch_size == 2
    assert F.Flux2VAEConfig.from_dict(cfg.to_dict()) == cfg
    params = inspect.signature(diffusers.AutoencoderKLFlux2.__init__).parameters
    default = F.Flux2VAEConfig.from_diffusers({k: v.default for k, v in params.items() if k != "self"})
    assert default == F.Flux2VAEConfig() and default.downsample_factor == 8  # the library's defaults
    with pytest.raises(ValueError, match="use_quant_conv=False"):
        F.Flux2VAEConfig.from_diffusers({"use_quant_conv": False})
    ours16 = F.load_flux2_vae(str(path), dtype="bfloat16")
    x = np.random.default_rng(3).uniform(-1, 1, (1, 16, 16, 3)).astype(np.float32)
    assert np.isfinite(np.asarray(ours16.decode(ours16.encode(x)))).all()


def test_converter_errors(pair, tmp_path):
    tm, loaded, _ = pair
    ours = F.Flux2AutoencoderKL(loaded.config)  # a fresh target: failed conversions may half-write
    with pytest.raises(FileNotFoundError, match="black-forest-labs/FLUX.2-dev"):
        F.load_flux2_vae(str(tmp_path / "nowhere"))
    with pytest.raises(FileNotFoundError, match="holds no diffusion_pytorch_model.safetensors"):
        F.load_flux2_vae(str(tmp_path))
    sd = {k: v.numpy() for k, v in tm.state_dict().items()}
    with pytest.raises(ValueError, match=r"'bn.running_var' has shape \(15,\), expected \(16,\)"):
        F.convert_state_dict(dict(sd, **{"bn.running_var": np.ones(15, np.float32)}), ours)
    with pytest.raises(ValueError, match="lacks tensor 'bn.running_mean'"):
        F.convert_state_dict({k: v for k, v in sd.items() if k != "bn.running_mean"}, ours)
    with pytest.raises(ValueError, match="'encoder.conv_in.weight' has shape"):
        F.convert_state_dict(dict(sd, **{"encoder.conv_in.weight": np.zeros((8, 3, 5, 5), np.float32)}), ours)
    json.dumps(ours.config.to_dict())  # JSON-able
