"""dit-lens' version, for provenance: the installed distribution's, or ``0.0.0+source`` in a source tree that
was not installed. At the ground floor, so every layer records it without importing the package's face."""

from importlib.metadata import PackageNotFoundError, version

__all__ = ["__version__"]

try:
    __version__ = version("dit-lens")
except PackageNotFoundError:  # running from a source tree that was not installed
    __version__ = "0.0.0+source"
