"""The package version (its own module, so submodules can read it during package import)."""

__version__ = "0.1.0"
