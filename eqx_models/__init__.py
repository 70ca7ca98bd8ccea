"""Equinox-native research models: cloned HMMs, TiDHy, causal and multimodal models."""

import importlib.metadata


try:
    __version__ = importlib.metadata.version("eqx-models")
except importlib.metadata.PackageNotFoundError:  # a checkout on `sys.path`
    __version__ = "0.0.0"
