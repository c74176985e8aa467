"""Where a MAML meta-step's CPU time goes, as shares of the step (shares survive machine load
better than absolute times): ``torch.profiler`` self CPU time of every aten op, grouped into

  convolution   -- forward convolutions and their gradients (aten::convolution*, mkldnn, slow_conv);
  elementwise   -- pointwise ops and reductions: the batch-norm decomposition (BatchStatNorm's mean,
                   var, subtract, scale), ReLU, the inner SGD step, the losses, and their gradients;
  copies        -- ops that move data without arithmetic: copy_, clone, cat, stack, index, _to_copy,
                   contiguous layouts that vmap's batching rules ask for;
  other ops     -- everything else the profiler names;
  outside ops   -- the step's wall time minus the ops' self times: Python, the dispatcher, vmap's
                   batching-rule bookkeeping and autograd's engine between ops.

Also: how many aten::convolution calls a step makes (a per-task fallback would show tasks x
layers x passes calls; vmap's rule for conv2d folds the task axis into the channel groups).

    python benchmarks/maml_profile.py --ways 20 --shots 1 --query 1 --tasks 16 --inner-steps 5 \\
        --inner-lr 0.1 --threads 1
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import sys
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parent))
import metalearn.runtime  # noqa: E402
from maml_step import cpu_description, loop_step, make_batch, make_model, metalearn_step  # noqa: E402

CONVOLUTION = ("conv", "mkldnn")
COPIES = ("copy_", "clone", "cat", "stack", "index", "_to_copy", "contiguous", "gather", "scatter",
          "repeat", "expand_copy", "_unsafe_view", "narrow_copy", "select_backward", "slice_backward",
          "new_zeros", "zeros", "fill_", "zero_", "empty_strided")
ELEMENTWISE = ("add", "sub", "mul", "div", "mean", "var", "sum", "rsqrt", "sqrt", "pow", "relu", "threshold",
               "where", "neg", "exp", "log", "softmax", "nll", "batch_norm", "max", "min", "sign", "square",
               "reciprocal", "lerp", "addcmul", "addcdiv", "std")


def category(name: str) -> str:
    op = name.removeprefix("aten::")
    if any(word in op for word in CONVOLUTION):
        return "convolution"
    if any(op == word or op.startswith(word) for word in COPIES):
        return "copies"
    if any(word in op for word in ELEMENTWISE):
        return "elementwise"
    return "other ops"


def profile_step(step, model, iters: int) -> dict:
    for _ in range(2):  # warm-up: allocator, kernel selection
        model.zero_grad(set_to_none=True)
        step()
    shares = collections.Counter()
    ops = collections.Counter()
    calls = collections.Counter()
    wall = 0.0
    for _ in range(iters):
        model.zero_grad(set_to_none=True)
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            start = time.perf_counter()
            step()
            wall += time.perf_counter() - start
        for event in prof.key_averages():
            if not event.key.startswith("aten::"):
                continue  # autograd:: and profiler wrappers: their time is their children's
            shares[category(event.key)] += event.self_cpu_time_total / 1e6
            ops[event.key] += event.self_cpu_time_total / 1e6
            calls[event.key] += event.count
    inside = sum(shares.values())
    shares["outside ops"] = max(wall - inside, 0.0)
    return {
        "wall_s_per_step": wall / iters,
        "shares": {k: v / wall for k, v in shares.most_common()},
        "top_ops": [(k, v / wall, calls[k] // iters) for k, v in ops.most_common(15)],
        "convolution_calls_per_step": sum(c for k, c in calls.items() if k == "aten::convolution") // iters,
        "ops_per_step": sum(calls.values()) // iters,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ways", type=int, default=20)
    parser.add_argument("--shots", type=int, default=1)
    parser.add_argument("--query", type=int, default=1)
    parser.add_argument("--tasks", type=int, default=16)
    parser.add_argument("--inner-steps", type=int, default=5)
    parser.add_argument("--inner-lr", type=float, default=0.1)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--iters", type=int, default=2)
    parser.add_argument("--loop", action="store_true", help="also profile the per-task loop")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    metalearn.runtime.tune_allocator()
    batch = make_batch(args.ways, args.shots, args.query, args.tasks)
    results = {"command": " ".join(["maml_profile.py", *sys.argv[1:]]), "processor": cpu_description(),
               "torch": torch.__version__, "threads": torch.get_num_threads(), "load_average": os.getloadavg()[0], "rows": {}}
    rows = [("metalearn", metalearn_step)] + ([("loop", loop_step)] if args.loop else [])
    for order, first_order in (("second", False), ("first", True)):
        for name, make_step in rows:
            model = make_model(args.ways)
            step = make_step(model, batch, first_order, args.inner_lr, args.inner_steps)
            result = profile_step(step, model, args.iters)
            results["rows"][f"{name} {order}"] = result
            print(f"{name}, {order} order: {result['wall_s_per_step']:.2f} s per step (under load "
                  f"{results['load_average']:.1f}), {result['ops_per_step']} aten ops, "
                  f"{result['convolution_calls_per_step']} aten::convolution calls")
            for cat, share in result["shares"].items():
                print(f"   {cat:12s} {100 * share:5.1f}%")
            for op, share, count in result["top_ops"][:10]:
                print(f"      {op:40s} {100 * share:5.1f}%  {count} calls")
    if args.json:
        args.json.write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
