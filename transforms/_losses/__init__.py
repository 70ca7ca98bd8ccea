"""Losses and reductions that never form what they need not: chunked
cross-entropy, expected-value and distributional losses, divergences,
masked means and position sampling.

The public names are re-exported flat by `transforms`."""
