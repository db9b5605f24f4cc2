"""Patch Forcing in JAX: per-patch flow matching with a difficulty head and adaptive samplers.

Time convention everywhere: t = 0 is Gaussian noise, t = 1 is data.
"""

__version__ = "0.1.0"


class UserError(ValueError):
    """A bad config field, flag or input file, not a bug: the message is one line naming the
    field or file and what is wrong. `python -m patch_forcing.main` prints just that line and exits
    2 (with --verbose, the traceback too). A ValueError, so callers that catch those still work."""
