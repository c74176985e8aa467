"""Where a second-order MAML meta-step's convolution work goes, and whether channels-last helps.

The figures behind docs/performance.md's paragraph on the second-order floor:

  1. the convolution work of one meta-step (Omniglot 5-way 1-shot, 1 query, meta-batch 32, 1
     inner step, ``maml_step.py``'s batch and Conv4), as multiply-adds of every convolution and
     convolution gradient seen by a ``TorchDispatchMode`` (grouped per-task convolutions
     included), in units of one forward pass over the 160 support images; for second-order
     MAML, first-order MAML and the "limit" (one forward + backward of the 320 images with
     shared weights);
  2. that layer's input gradient against its forward, default and channels-last layout;
  3. the second-order meta-step as ``MAML.meta_loss`` runs it, and with channels-last inputs and
     weights forced into the same ``vmap``.

    python benchmarks/maml_convolutions.py --threads 1

Other shapes for part 1 (``--count-only`` skips the 5-way timings of parts 2 and 3), e.g. the
20-way settings (meta-batch 16, 5 inner steps, 1 or 5 shots and queries per class)::

    python benchmarks/maml_convolutions.py --count-only --ways 20 --shots 5 --query 5 \
        --tasks 16 --inner-steps 5 --inner-lr 0.1
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F
from torch.func import vmap
from torch.utils._python_dispatch import TorchDispatchMode

import metalearn.runtime
from metalearn import MAML
from metalearn.algorithms.base import task_loss
from maml_step import limit_step, make_batch, make_model

CL = torch.channels_last


class ConvolutionWork(TorchDispatchMode):
    """Multiply-adds of every convolution and convolution gradient: a forward convolution costs
    (output elements) x (input channels per group) x (kernel area), and each gradient a
    ``convolution_backward`` returns (input, weight) the same, counted on its ``grad_output``."""

    def __init__(self):
        super().__init__()
        self.macs = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func is torch.ops.aten.convolution.default:
            self.macs += out.numel() * args[1][0].numel()
        elif func is torch.ops.aten.convolution_backward.default:
            self.macs += args[0].numel() * args[2][0].numel() * sum(args[-1][:2])
        return out


def convolution_work(step) -> int:
    with ConvolutionWork() as counter:
        step()
    return counter.macs


def median_ms(fn, iters: int) -> float:
    for _ in range(2):
        fn()
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1000


def meta_step(maml: MAML, batch, channels_last: bool):
    """Second-order meta-loss + backward; with ``channels_last``, inputs and conv weights are
    given channels-last strides before the ``vmap`` (the rest as ``MAML.meta_loss``)."""
    params = dict(maml.model.named_parameters())
    support_x, query_x = batch.support_x, batch.query_x
    if channels_last:
        # clone, not contiguous: only explicit strides make a 1-channel conv's output channels-last
        params = {n: p.clone(memory_format=CL) if p.dim() == 4 else p for n, p in params.items()}
        support_x = support_x.permute(0, 1, 3, 4, 2).contiguous().permute(0, 1, 4, 2, 3)
        query_x = query_x.permute(0, 1, 3, 4, 2).contiguous().permute(0, 1, 4, 2, 3)

    def one_task(sx, sy, qx, qy):
        adapted = maml.adapt(params, sx, sy, maml.config.inner_steps)[-1]
        return task_loss(maml._forward(adapted, qx), qy)

    def step():
        for p in maml.model.parameters():
            p.grad = None
        vmap(one_task)(support_x, batch.support_y, query_x, batch.query_y).mean().backward()

    return step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--iters", type=int, default=15)
    parser.add_argument("--ways", type=int, default=5)
    parser.add_argument("--shots", type=int, default=1)
    parser.add_argument("--query", type=int, default=1, help="query images per class")
    parser.add_argument("--tasks", type=int, default=32, help="meta-batch size")
    parser.add_argument("--inner-steps", type=int, default=1)
    parser.add_argument("--inner-lr", type=float, default=0.4)
    parser.add_argument("--count-only", action="store_true", help="part 1 only")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    metalearn.runtime.tune_allocator()
    model = make_model(args.ways)
    batch = make_batch(args.ways, args.shots, args.query, args.tasks)

    images = batch.support_x.shape[0] * batch.support_x.shape[1]  # 160 support images
    x = batch.support_x.reshape(images, *batch.support_x.shape[2:])
    with torch.no_grad():
        unit = convolution_work(lambda: model(x))  # one forward pass over 160 images
    queries = batch.query_x.shape[0] * batch.query_x.shape[1]
    print(f"1. convolution work of {args.ways}-way {args.shots}-shot, {args.query} queries per class, "
          f"{args.tasks} tasks, {args.inner_steps} inner steps: in forward passes over the {images} "
          f"support images ({unit / 1e9:.3f} G multiply-adds)")
    for order, first_order in (("second-order MAML", False), ("first-order MAML", True)):
        maml = MAML(model, MAML.Config(inner_lr=args.inner_lr, inner_steps=args.inner_steps, first_order=first_order))
        print(f"   {order}: {convolution_work(lambda: maml.meta_loss(batch)[0].backward()) / unit:.2f}")
    print(f"   limit (forward + backward of all {images + queries} images): "
          f"{convolution_work(limit_step(model, batch)) / unit:.2f}")
    if args.count_only:
        return

    print("2. that layer, 160 images, ms (median)")
    x, w = torch.randn(160, 64, 14, 14), torch.randn(64, 64, 3, 3)
    grad_out = F.conv2d(x, w, stride=2, padding=1)
    for layout in (torch.contiguous_format, CL):
        xl, wl, gl = (t.contiguous(memory_format=layout) for t in (x, w, grad_out))
        forward = median_ms(lambda: F.conv2d(xl, wl, stride=2, padding=1), args.iters)
        input_grad = median_ms(lambda: torch.ops.aten.convolution_backward(
            gl, xl, wl, None, [2, 2], [1, 1], [1, 1], False, [0, 0], 1, [True, False, False]), args.iters)
        print(f"   {'channels-last' if layout == CL else 'default layout'}: forward {forward:.1f}, "
              f"input gradient {input_grad:.1f}")

    print("3. second-order meta-step, ms (median, round-robin)")
    maml = MAML(model, MAML.Config(inner_lr=0.4, inner_steps=1))
    steps = {"as MAML.meta_loss": meta_step(maml, batch, False), "channels-last forced": meta_step(maml, batch, True)}
    times = {name: [] for name in steps}
    for _ in range(2):
        for step in steps.values():
            step()
    for _ in range(args.iters):
        for name, step in steps.items():
            start = time.perf_counter()
            step()
            times[name].append(time.perf_counter() - start)
    for name, values in times.items():
        print(f"   {name}: {statistics.median(values) * 1000:.1f}")


if __name__ == "__main__":
    main()
