"""inferplane: an inference execution plane."""

__version__ = "0.1.0"
