"""lazyfs: seekable container image layers, mounted lazily."""

__version__ = "0.1.0"
