"""Per-example gradients without materialising them: the ghost engines (a
jaxpr plan per model, one rule per layer kind, the exact fallback) and
In-Run Data Shapley attribution built on them.

The public names are re-exported flat by `transforms`."""
