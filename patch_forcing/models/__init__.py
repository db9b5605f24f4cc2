"""The model zoo: the PF-DiT (dit), the SD-VAE (vae), Inception-v3 (inception) and the small
digit classifier (classifier). Each module holds a config dataclass, the NNX module and, where
weights come from elsewhere, its converter. Import the module you need (this file imports none).
"""
