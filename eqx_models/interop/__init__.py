"""Optional adapters between the models and other frameworks; each submodule imports
its framework (`eqx_models.interop.torch` needs torch)."""
