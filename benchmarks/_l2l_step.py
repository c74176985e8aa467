"""The learn2learn side of ``benchmarks/maml_step.py``; runs in the peer virtualenv.

Not meant to be run by hand: ``maml_step.py --peer-python DIR/bin/python`` starts it with a file
holding the Conv4 weights and the task batch (so both sides use identical inputs) and then
drives it over stdin/stdout, one JSON object per line, so that its steps are timed round-robin
with the in-process ones:

  <- {"ready": true, "torch": ..., "learn2learn": ..., "threads": ..., ...}  once, at start
  -> {"cmd": "grads", "order": "second", "dtype": "float64", "path": FILE}
                                                        <- {"ok": true}   meta-gradient to FILE
  -> {"cmd": "step", "order": "first"}                  <- {"ms": 123.4}  one timed meta-step
     (with "clock": "cpu" the process's CPU time instead of the elapsed time)
  -> {"cmd": "convs", "order": "second", "path": FILE}  <- {"ok": true}   the step's convolution
     calls, recorded by ``_conv_calls.record``, to FILE as JSON (``maml_floor.py`` replays them)
  EOF: check the weights are unchanged, exit.

Replies are prefixed with ``@@`` (learn2learn's imports print warnings).

The network is metalearn's own ``Conv4``, imported from ``--metalearn-src`` (metalearn is not
installed in the peer venv, but it only needs torch and imports cleanly under the peer's torch),
so it follows any change to the architecture. With ``--model native`` its ``BatchStatNorm``
layers (batch mean/var written out) are swapped for torch's ``nn.BatchNorm2d(track_running_stats
=False)``, what a learn2learn user would write (correct here: the native layer's wrong second
derivative is a vmap-only problem, and learn2learn loops over tasks). The weights are loaded
with ``strict=True`` from the benchmark's ``Conv4.state_dict()``, and ``maml_step.py`` compares
the meta-gradients.

The meta-step is learn2learn's own Omniglot example
(``examples/vision/maml_omniglot.py``): per task ``learner = maml.clone()``,
``learner.adapt(support loss)`` per inner step, then the query loss's ``backward()`` per task
(scaled by 1 / tasks here instead of dividing the gradients afterwards: the same gradient).
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import sys
import time

import learn2learn as l2l
import torch
import torch.nn.functional as F
from torch import nn


def with_native_batch_norm(model: nn.Module) -> int:
    """Replace every metalearn ``BatchStatNorm`` in ``model`` by ``nn.BatchNorm2d`` without
    running statistics (same parameters, same function); returns how many were replaced."""
    from metalearn.models.norm import BatchStatNorm

    replaced = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, BatchStatNorm):
                setattr(parent, name, nn.BatchNorm2d(child.num_features, eps=child.eps, track_running_stats=False))
                replaced += 1
    return replaced


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
    p.add_argument("--ways", type=int, default=5)
    p.add_argument("--inner-lr", type=float, default=0.4)
    p.add_argument("--inner-steps", type=int, default=1)
    p.add_argument("--threads", type=int, required=True)
    p.add_argument("--model", choices=("metalearn", "native"), default="metalearn")
    p.add_argument("--metalearn-src", required=True, help="metalearn's src folder (for its Conv4)")
    p.add_argument("--network", choices=("conv4", "conv4-mamlpp"), default="conv4",
                   help="metalearn's network by name (conv4-mamlpp: MAML++'s max-pooling Conv4)")
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    p.add_argument("--gpu-kernels", choices=("reproducible", "fast"), default="reproducible",
                   help="as maml_step.py's: reproducible sets what metalearn runs on a GPU")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)

    data = torch.load(args.inputs, weights_only=True)
    sys.path.insert(0, args.metalearn_src)
    from metalearn.models import build_model

    if device.type == "cuda" and args.gpu_kernels == "reproducible":
        from metalearn.runtime import configure_gpu_kernels

        configure_gpu_kernels()

    model = build_model(args.network, (1, 28, 28), args.ways)
    source = f"metalearn.models.build_model({args.network!r}) from {args.metalearn_src}"
    if args.model == "native":
        source += f", {with_native_batch_norm(model)} BatchStatNorm replaced by nn.BatchNorm2d"
    model.load_state_dict(data.pop("state_dict"), strict=True)
    model.to(device)
    data = {k: v.to(device) for k, v in data.items()}
    initial = {k: v.clone() for k, v in model.state_dict().items()}
    # float32 (timed) and a float64 copy (for the exact agreement check), same weights and tasks
    model64 = copy.deepcopy(model).double()
    data64 = {k: v.double() if v.is_floating_point() else v for k, v in data.items()}
    synchronize = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    steps = {(order, dtype): l2l_step(l2l.algorithms.MAML(net, lr=args.inner_lr, first_order=(order == "first")),
                                      tensors, args.inner_steps)
             for order in ("second", "first")
             for dtype, net, tensors in (("float32", model, data), ("float64", model64, data64))}

    def reply(obj):
        sys.stdout.write("@@" + json.dumps(obj) + "\n")
        sys.stdout.flush()

    reply({"ready": True, "torch": torch.__version__, "learn2learn": l2l.__version__,
           "python": platform.python_version(), "threads": torch.get_num_threads(),
           "model": args.model, "model_source": source})
    for line in sys.stdin:
        request = json.loads(line)
        dtype = request.get("dtype", "float32")
        step, net = steps[(request["order"], dtype)], model64 if dtype == "float64" else model
        net.zero_grad(set_to_none=True)
        if request["cmd"] == "grads":
            step()
            torch.save({n: q.grad.detach().cpu() for n, q in net.named_parameters()}, request["path"])
            reply({"ok": True})
        elif request["cmd"] == "convs":
            from _conv_calls import record  # beside this script, on sys.path[0]

            with open(request["path"], "w") as f:
                json.dump(record(step), f)
            net.zero_grad(set_to_none=True)
            reply({"ok": True})
        elif request["cmd"] == "step":
            clock = time.process_time if request.get("clock") == "cpu" else time.perf_counter
            synchronize()  # on a GPU: from an idle device to the step's last kernel, as maml_step.py
            start = clock()
            step()
            synchronize()
            reply({"ms": (clock() - start) * 1e3})
        else:
            raise ValueError(f"unknown command {request!r}")
    for name, value in model.state_dict().items():
        assert torch.equal(value, initial[name]), name


if __name__ == "__main__":
    main()
