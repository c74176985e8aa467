"""The learn2learn side of ``benchmarks/maml_step.py``; runs in the peer virtualenv.

Not meant to be run by hand: ``maml_step.py --peer-python DIR/bin/python`` calls it with a file
holding the Conv4 weights and the task batch (so both sides use identical inputs), and it
prints one JSON line with its timings and writes its meta-gradients for the agreement check.

The network is metalearn's own ``Conv4`` when ``--metalearn-src`` names the ``src`` folder
(metalearn is not installed in the peer venv, but it only needs torch and imports cleanly under
the peer's torch); without it, or if that import fails, an identical copy declared below is used
(the JSON says which). Either way the weights are loaded with ``strict=True`` from the
benchmark's ``Conv4.state_dict()``, and ``maml_step.py`` compares the meta-gradients. The meta-step is learn2learn's own Omniglot example
(``examples/vision/maml_omniglot.py``): per task ``learner = maml.clone()``,
``learner.adapt(support loss)`` per inner step, then the query loss's ``backward()`` per task
(scaled by 1 / tasks here instead of dividing the gradients afterwards: the same gradient).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time

import learn2learn as l2l
import torch
import torch.nn.functional as F
from torch import nn


def conv_block(in_channels: int, out_channels: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, 3, stride=2, padding=1),
        nn.BatchNorm2d(out_channels, track_running_stats=False),
        nn.ReLU(),
    )


class InlineConv4(nn.Module):
    """metalearn.models.Conv4(1, ways), pooling="stride": same layers, same parameter names."""

    def __init__(self, in_channels: int = 1, out_features: int = 5, hidden: int = 64):
        super().__init__()
        self.features = nn.Sequential(
            conv_block(in_channels, hidden), conv_block(hidden, hidden),
            conv_block(hidden, hidden), conv_block(hidden, hidden),
        )
        self.head = nn.Linear(hidden, out_features)

    def forward(self, x):
        return self.head(self.features(x).mean(dim=(-2, -1)))


def l2l_step(maml, data, inner_steps: int):
    sx, sy, qx, qy = data["support_x"], data["support_y"], data["query_x"], data["query_y"]
    tasks = sx.shape[0]

    def step():
        for t in range(tasks):
            learner = maml.clone()
            for _ in range(inner_steps):
                learner.adapt(F.cross_entropy(learner(sx[t]), sy[t]))
            (F.cross_entropy(learner(qx[t]), qy[t]) / tasks).backward()

    return step


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--inputs", required=True)
    p.add_argument("--grads-out", required=True)
    p.add_argument("--ways", type=int, default=5)
    p.add_argument("--inner-lr", type=float, default=0.4)
    p.add_argument("--inner-steps", type=int, default=1)
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--threads", type=int, required=True)
    p.add_argument("--orders", default="second,first")
    p.add_argument("--metalearn-src", default=None, help="metalearn's src folder, to use its Conv4")
    args = p.parse_args()
    torch.set_num_threads(args.threads)

    data = torch.load(args.inputs, weights_only=True)
    Conv4, source = InlineConv4, "inline copy in _l2l_step.py"
    if args.metalearn_src:
        sys.path.insert(0, args.metalearn_src)
        try:
            from metalearn.models import Conv4
            source = f"metalearn.models.Conv4 from {args.metalearn_src}"
        except Exception as err:  # noqa: BLE001 - fall back, and say so in the JSON
            source += f" (importing metalearn failed: {type(err).__name__}: {err})"
    model = Conv4(1, args.ways)
    model.load_state_dict(data.pop("state_dict"), strict=True)
    initial = {k: v.clone() for k, v in model.state_dict().items()}

    times, grads = {}, {}
    for order in args.orders.split(","):
        maml = l2l.algorithms.MAML(model, lr=args.inner_lr, first_order=(order == "first"))
        step = l2l_step(maml, data, args.inner_steps)
        maml.zero_grad(set_to_none=True)
        step()  # the meta-gradient, for the agreement check (also the first warm-up step)
        grads[order] = {n: q.grad.detach().clone() for n, q in model.named_parameters()}
        measured = []
        for i in range(args.warmup + args.iters):
            maml.zero_grad(set_to_none=True)
            start = time.perf_counter()
            step()
            elapsed = (time.perf_counter() - start) * 1e3
            if i >= args.warmup:
                measured.append(elapsed)
        times[order] = measured
    for name, value in model.state_dict().items():
        assert torch.equal(value, initial[name]), name

    torch.save(grads, args.grads_out)
    print(json.dumps({
        "torch": torch.__version__,
        "learn2learn": l2l.__version__,
        "python": platform.python_version(),
        "threads": torch.get_num_threads(),
        "model": source,
        "times_ms": times,
        "median_ms": {o: statistics.median(t) for o, t in times.items()},
    }))


if __name__ == "__main__":
    main()
