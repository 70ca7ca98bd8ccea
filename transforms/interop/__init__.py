"""Optional adapters to other frameworks; each submodule imports its framework."""
