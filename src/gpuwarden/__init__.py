"""gpuwarden: a daemon that owns a shared GPU node."""

__all__ = ["__version__"]

__version__ = "0.1.0"
