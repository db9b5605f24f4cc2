"""Patch Forcing in JAX: per-patch flow matching with a difficulty head and adaptive samplers.

Time convention everywhere: t = 0 is Gaussian noise, t = 1 is data.
"""

__version__ = "0.1.0"
