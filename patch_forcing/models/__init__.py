"""The model zoo. Class-conditional: the PF-DiT (dit) and its layers; autoencoders: SD-VAE (vae),
FLUX.2 (flux2_vae); text-to-image: the PFT transformer (t2i, hdit_layers) and the Qwen3 text tower
(text_encoder); evaluation and REPA: Inception-v3 (inception), the small digit classifier
(classifier), DINOv2 (dinov2). Each module holds a config dataclass, the NNX module and, where
weights come from elsewhere, its converter. Import the module you need (this file imports none).
"""
