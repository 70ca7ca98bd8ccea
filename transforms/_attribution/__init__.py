"""Whole-dataset data attribution: an on-disk store of projected per-example
gradients (`_store.py`) and the queries against it (`_queries.py`).

The public names are re-exported flat by `transforms`."""
