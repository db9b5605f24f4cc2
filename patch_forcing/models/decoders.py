"""Latent decoders by name, for sample pictures: 'flux2:<folder>' (the FLUX.2 VAE of the T2I
model), anything else the SD-VAE of `models.vae` (a local file/folder or a hub repo id), and ''
for pixel models (the identity)."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from patch_forcing.models import flux2_vae, vae

FLUX2 = "flux2:"


def make_decoder(spec: str):
    """jit(latents -> pixels in [-1, 1]) for `spec`; the identity for an empty spec."""
    if not spec.startswith(FLUX2):
        return vae.make_decoder(spec)
    _, decode, params = flux2_vae.vae_functions(flux2_vae.load_flux2_vae(spec[len(FLUX2):]))
    return jax.jit(lambda z: jnp.clip(decode(params, z), -1.0, 1.0))
