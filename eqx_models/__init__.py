"""Equinox-native research models: cloned HMMs, TiDHy, causal and multimodal models."""

from transforms._version import __version__ as __version__
