"""Is the MAML meta-step on a GPU launch-bound? One profiled step of each configuration: the
kernels it launches, the time the GPU spends in them, and the step's wall time. When the
kernels' total is a small share of the wall time, the step is bound by launching them (Python,
the dispatcher, vmap's and autograd's bookkeeping), not by the GPU's arithmetic, and fewer,
larger kernels or a CUDA graph (``maml_step.py --extra-rows graph``) would pay.

    python benchmarks/maml_gpu_profile.py --device cuda --configs 5w1s,20w1s --json OUT.json

Each configuration as ``maml_step.py``'s ``CONFIGS`` (its synthetic batch, the strided Conv4,
metalearn's whole-batch step, row (a)), at each order: 5 warm-up steps, the median wall time of
10 more, then one step under ``torch.profiler`` (CPU and CUDA activities). Reported per step:
``kernels`` (the profiler's CUDA device events: kernels, memory copies and sets),
``kernel_ms`` (their summed device time), ``wall_ms``,
``gpu_busy`` (kernel_ms / wall_ms, an upper bound on the share of the step the GPU works:
kernels may overlap), the 12 kernels with the most device time. On the CPU (``--device cpu``)
only the wall time and the operator count are measured: a dry run of the script. The JSON also
records the torch version, the GPU's name, the host processor, its cores and torch's threads.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parent))
from maml_step import (CONFIGS, ORDERS, checked_device, cpu_description, make_batch, make_model,  # noqa: E402
                       metalearn_step, select_gpu_kernels, synchronize, time_step)


def profile_step(step, model, device: torch.device) -> dict:
    walls = time_step(step, model, iters=10, warmup=5)  # ms, each from an idle device to its last kernel
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    model.zero_grad(set_to_none=True)
    synchronize(device)
    with profile(activities=activities) as prof:
        step()
        synchronize(device)
    events = prof.events()
    result = {"wall_ms": statistics.median(walls), "wall_ms_all": walls,
              "operators": sum(1 for e in events if e.device_type.name == "CPU" and e.name.startswith("aten::"))}
    if device.type == "cuda":
        kernels = [e for e in events if e.device_type.name == "CUDA"]
        kernel_ms = sum(e.device_time_total for e in kernels) / 1e3  # microseconds -> ms
        totals = {}
        for e in kernels:
            count, ms = totals.get(e.name, (0, 0.0))
            totals[e.name] = (count + 1, ms + e.device_time_total / 1e3)
        result.update(kernels=len(kernels), kernel_ms=kernel_ms, gpu_busy=kernel_ms / result["wall_ms"],
                      top_kernels=[{"name": name[:120], "calls": c, "ms": round(ms, 3)} for name, (c, ms) in
                                   sorted(totals.items(), key=lambda item: -item[1][1])[:12]])
    return result


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda")
    p.add_argument("--configs", default="5w1s,20w1s")
    p.add_argument("--orders", default="second,first")
    p.add_argument("--gpu-kernels", choices=("reproducible", "fast"), default="reproducible")
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)
    names = [c.strip() for c in args.configs.split(",") if c.strip()]
    if not names or any(c not in CONFIGS for c in names):
        p.error(f"--configs takes {', '.join(CONFIGS)} (comma-separated), got {args.configs!r}")
    orders = [o.strip() for o in args.orders.split(",") if o.strip()]
    if not orders or any(o not in ORDERS for o in orders):
        p.error(f"--orders takes second and/or first (comma-separated), got {args.orders!r}")
    device = checked_device(p, args.device)
    select_gpu_kernels(device, args.gpu_kernels)
    results = {"torch": torch.__version__, "device": torch.cuda.get_device_name(device) if device.type == "cuda"
               else "cpu", "gpu_kernels": args.gpu_kernels, "cpu": cpu_description(), "cpus": os.cpu_count(),
               "threads": torch.get_num_threads(), "configs_run": names, "orders": orders, "configs": {}}
    for name in names:
        config = CONFIGS[name]
        batch = make_batch(config["ways"], config["shots"], config["query"], config["meta_batch"]).to(device)
        model = make_model(config["ways"], network=config.get("network", "conv4")).to(device)
        for order in orders:
            step = metalearn_step(model, batch, ORDERS[order], config["inner_lr"], config["inner_steps"])
            row = results["configs"][f"{name} {order}"] = profile_step(step, model, device)
            busy = f", {row['kernels']} kernels, {row['kernel_ms']:.1f} ms in them, GPU busy {row['gpu_busy']:.0%}" \
                if "kernels" in row else ""
            print(f"{name} {order} order: {row['wall_ms']:.1f} ms a step, {row['operators']} aten ops{busy}",
                  flush=True)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    return results


if __name__ == "__main__":
    main()
