"""inferplane: an inference execution plane."""

from inferplane import compiled as _compiled

__version__ = "0.1.0"

# The placement hot path compiled with mypyc where a current build exists (inferplane.compiled)
_compiled.install()
