"""Differentially private training: per-example clipping on the ghost engine, the
DP-SGD step, Poisson and shuffled sampling of batches, and privacy accounting.

A room of its own because it joins three others under one guarantee: the ghost
engine (`_grad`) gives the clipped sum of per-example gradients, the training room
(`_train`) the compiled step and the loop, and the accountant (the optional
`dp-accounting` package) turns the noise, the sampling and the number of steps into
`(ε, δ)`. Each file holds one of those concepts.
"""
