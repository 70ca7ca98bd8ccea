"""The LM trained with its parameters split over a mesh (FSDP, and FSDP with tensor
parallelism) against the same training on one device, on eight fake CPU devices."""

import textwrap

import jax
import pytest
from jax.sharding import PartitionSpec as P

from eqx_models.multimodal import TensorParallelRule

from ..helpers import run_script


_SCRIPT = textwrap.dedent(
    """
    import jax
    jax.config.update("jax_num_cpu_devices", 8)
    import equinox as eqx, jax.random as jr, numpy as np
    from transforms import ParameterSharding
    from eqx_models import multimodal as mm
    from tests.multimodal.helpers import (
        LENGTH, make_codebooks, make_model, make_sequences
    )

    pool = make_sequences(3, 24, missing=0.0)
    loss = mm.MultimodalLoss(make_codebooks(), scalar_loss="hl_gauss")
    config = mm.MultimodalTrainConfig(n_steps=3, learning_rate=1e-2, warmup_steps=1)
    data = lambda i: mm.pad_batch(pool[8 * i : 8 * i + 8], length=LENGTH)
    d = 16
    model = make_model(d_model=d, n_heads=2)

    def run(**options):
        return mm.train(
            model, loss, data, config, key=jr.key(0), progress=False, **options
        )

    def leaves(m):
        # The key bias is left out: attention is invariant to it, so its true
        # gradient is 0 and Adam turns float noise (which the split reductions
        # change) into steps of order lr.
        m = eqx.tree_at(
            lambda m: m.blocks.qkv_bias, m, m.blocks.qkv_bias.at[:, d : 2 * d].set(0)
        )
        return jax.tree.leaves(eqx.filter(m, eqx.is_array))

    one = run()
    fsdp = ParameterSharding(fsdp_axis="data", min_size=16)
    both = ParameterSharding(
        fsdp_axis="data", tensor_parallel=mm.TensorParallelRule("model"), min_size=16
    )
    # (Data parallelism alone is test_train.py's eight-device test.)
    layouts = {
        "fsdp": (jax.make_mesh((8,), ("data",)), fsdp),
        "fsdp + tensor parallel": (jax.make_mesh((4, 2), ("data", "model")), both),
    }
    for name, (mesh, layout) in layouts.items():
        split = run(mesh=mesh, parameter_sharding=layout)
        np.testing.assert_allclose(
            [r["loss"] for r in split.history], [r["loss"] for r in one.history],
            rtol=1e-6, err_msg=name,
        )
        for a, b in zip(leaves(one.model), leaves(split.model)):
            np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6, err_msg=name)
        print(name, "ok")

    # The layouts: each block matrix split by the model axis (2) as Megatron's,
    # then the largest dimension left that 4 divides over the data axis (the
    # stacked layers' axis, 2, is never it).
    blocks = split.model.blocks
    shard = lambda x: x.sharding.shard_shape(x.shape)
    assert shard(blocks.qkv_weight) == (2, 4, 24), shard(blocks.qkv_weight)  # 2x16x48
    assert shard(blocks.out_weight) == (2, 8, 4), shard(blocks.out_weight)  # 2x16x16
    assert shard(blocks.fc_weight) == (2, 4, 32), shard(blocks.fc_weight)  # 2x16x64
    assert shard(blocks.proj_weight) == (2, 32, 4), shard(blocks.proj_weight)  # 2x64x16
    assert shard(blocks.ln1_weight) == (2, 4), shard(blocks.ln1_weight)  # 2x16
    print("OK")
    """
)


@pytest.mark.slow
def test_sharded_training_equals_one_device():
    run_script(_SCRIPT)


# The training step compiled (not run) for each layout on eight fake devices, as
# `train` runs it (donating its state, with a key). XLA's figures for these shapes
# and shardings are deterministic for a given jaxlib.
_MEMORY_SCRIPT = textwrap.dedent(
    """
    import math
    import re
    import jax
    jax.config.update("jax_num_cpu_devices", 8)
    import equinox as eqx, jax.random as jr
    from transforms import make_train_step, ParameterSharding, shard_batch
    from transforms._train._train_step import _compiled
    from eqx_models import multimodal as mm

    data = mm.make_synthetic_data(jr.key(0), 8, fit_on=8)
    d, length, batch_size = 128, 128, 32  # 4 rows per device
    model = mm.CausalTransformerLM(
        data.layout, d_model=d, n_layers=2, n_heads=4, max_len=length,
        dropout=0.0, init="gpt", key=jr.key(1),
    )
    loss = mm.MultimodalLoss(data.codebooks)
    optimizer = mm.make_optimizer(mm.MultimodalTrainConfig(n_steps=10))
    batch = mm.pad_batch((data.sequences * batch_size)[:batch_size], length=length)

    def compiled(mesh, layout):
        step = make_train_step(
            loss, optimizer, has_aux=True, mesh=mesh, parameter_sharding=layout
        )
        opt_state = optimizer.init(eqx.filter(model, eqx.is_inexact_array))
        state = step.place(model, opt_state)
        inputs = (step, shard_batch(batch, step.mesh), jr.key(2))
        return _compiled[True, False].lower(inputs, *state).compile().compiled

    def largest_gather(compiled):
        # Elements of the largest array an all-gather (or all-to-all) produces.
        sizes = [0]
        for line in compiled.as_text().splitlines():
            found = re.search(r"= \\w+\\[([\\d,]*)\\][^ ]* all-(gather|to-all)", line)
            if found:
                dims = [int(n) for n in found.group(1).split(",") if n]
                sizes.append(math.prod(dims))
        return max(sizes)

    data_mesh = jax.make_mesh((8,), ("data",))
    fsdp = ParameterSharding(fsdp_axis="data")
    both = ParameterSharding(
        fsdp_axis="data", tensor_parallel=mm.TensorParallelRule("model")
    )
    replicated = compiled(data_mesh, None).memory_analysis()
    split = compiled(data_mesh, fsdp)
    memory = split.memory_analysis()
    print("temporaries", replicated.temp_size_in_bytes, memory.temp_size_in_bytes)
    # The state shrinks about 8-fold, and the temporaries do not grow.
    assert memory.argument_size_in_bytes < replicated.argument_size_in_bytes / 6
    assert memory.temp_size_in_bytes <= replicated.temp_size_in_bytes
    # The cause, checked directly: XLA gathers parameters (and sampled rows), never
    # the activations of the whole batch.
    whole_batch = batch_size * length * d
    assert largest_gather(split) < whole_batch, largest_gather(split)
    mesh_2d = jax.make_mesh((4, 2), ("data", "model"))
    assert largest_gather(compiled(mesh_2d, both)) < whole_batch
    print("OK")
    """
)


@pytest.mark.slow
def test_fsdp_keeps_activations_split_by_the_batch():
    run_script(_MEMORY_SCRIPT)


def test_tensor_parallel_rule_splits_the_block_matrices_only():
    rule = TensorParallelRule("model")
    key = jax.tree_util.GetAttrKey
    leaf = jax.ShapeDtypeStruct((2, 16, 48), "float32")
    assert rule((key("blocks"), key("qkv_weight")), leaf) == P(None, None, "model")
    assert rule((key("blocks"), key("out_weight")), leaf) == P(None, "model", None)
    assert rule((key("blocks"), key("ln1_weight")), leaf) is None
    assert rule((key("head_weight"),), leaf) is None
    with pytest.raises(TypeError, match="axis"):
        TensorParallelRule(3)
