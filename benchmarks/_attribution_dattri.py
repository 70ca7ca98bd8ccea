"""The peer of `benchmarks/attribution.py`: dattri's TracIn on the benchmark's GPT
in PyTorch, in a process of its own.

Usage (started by `attribution.py`, which writes the files): `python
benchmarks/_attribution_dattri.py --weights W.npz --tokens X.npy --heads H
--proj-dim D --batch B [--device cpu|cuda] [--repeats N]`. `W.npz` holds the
weights under the names of `_ghost_torch.GPT.state_dict()`, `X.npy` the `(N, T + 1)`
token sequences. The worker times `TracInAttributor.self_attribute` over the
sequences (per-example gradients by `torch.func`, then dattri's random projection
to `D` dimensions: the work of building a store of projected gradients; dattri
keeps them in memory rather than on disk) and prints one JSON line: `times` (each
call ended by `torch.cuda.synchronize` on a GPU) and a `note`; or `skipped` (dattri
is missing) or `error` instead.

Written against dattri 0.3.0 (`self_attribute(loader)`; `random_project`'s
`proj_type="normal"`, the dense Gaussian projection, the one its CPU and CUDA
projectors share). Its `TracInAttributor` builds a projector for every batch, which
draws and holds a dense `parameters × D` matrix: for GPT-2 small (124 M parameters)
that is 127 GB at `D = 256`, beyond one GPU, and the row records the out-of-memory
error. dattri's sparse `"sjlt"` projection would fit, but needs the compiled `sjlt`
package.
"""

import argparse
import json
import time

import numpy as np


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--weights", required=True)
    parser.add_argument("--tokens", required=True)
    parser.add_argument("--heads", type=int, required=True)
    parser.add_argument("--proj-dim", type=int, required=True)
    parser.add_argument("--batch", type=int, required=True)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    try:
        import torch
        import torch.nn.functional as F
        from _ghost_torch import from_state
        from dattri.algorithm.tracin import (  # pyright: ignore[reportMissingImports]
            TracInAttributor,
        )
        from dattri.task import AttributionTask  # pyright: ignore[reportMissingImports]
    except ImportError as error:
        print(json.dumps({"skipped": f"{error} (pip install dattri)"}))
        return
    state = dict(np.load(args.weights))
    model = from_state(state, args.heads).to(args.device).eval()
    tokens = torch.from_numpy(np.load(args.tokens)).long()

    def loss_func(params, data):
        (sequence,) = data
        logits = torch.func.functional_call(model, params, (sequence[:-1],))
        return F.cross_entropy(logits, sequence[1:])

    task = AttributionTask(
        loss_func=loss_func, model=model, checkpoints=model.state_dict()
    )
    attributor = TracInAttributor(
        task=task,
        weight_list=torch.ones(1),
        normalized_grad=False,
        projector_kwargs={
            "device": args.device,
            "proj_dim": args.proj_dim,
            "proj_max_batch_size": args.batch,
            "proj_type": "normal",
        },
        device=args.device,
    )
    loader = torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(tokens), batch_size=args.batch, shuffle=False
    )

    def sync():
        if args.device == "cuda":
            torch.cuda.synchronize()

    try:
        attributor.self_attribute(loader)
        sync()
        times = []
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            attributor.self_attribute(loader)
            sync()
            times.append(time.perf_counter() - t0)
    except Exception as error:  # the peer's failure is a row, not a crash
        first = (str(error).strip().splitlines() or [""])[0]
        print(json.dumps({"error": f"{type(error).__name__}: {first}"[:300]}))
        return
    print(
        json.dumps(
            {
                "times": times,
                "note": "TracIn self-attribution: vmap(grad) per batch, then "
                f"dattri's random projection to {args.proj_dim}, in memory",
            }
        )
    )


if __name__ == "__main__":
    main()
