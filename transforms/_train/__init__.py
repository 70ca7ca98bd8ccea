"""Training: the compiled step and its contract, the loop, checkpoints,
determinism and data-parallel placement.

The public names are re-exported flat by `transforms`."""
