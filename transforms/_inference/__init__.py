"""Scanned inner optimisation: iterative inference inside a model
(TiDHy's latent inference) as one compiled loop.

The public names are re-exported flat by `transforms`."""
