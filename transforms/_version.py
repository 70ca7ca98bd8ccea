"""The installed version of the distribution `eqx-models`, which holds both import
packages; checkpoints record it."""

import importlib.metadata


try:
    __version__ = importlib.metadata.version("eqx-models")
except importlib.metadata.PackageNotFoundError:  # a checkout on `sys.path`
    __version__ = "0.0.0"
