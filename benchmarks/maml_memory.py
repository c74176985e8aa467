"""Peak memory of one MAML meta-step (forward + meta-gradient backward) on the CPU, per
configuration, each measured in a fresh process: its peak resident set (``ru_maxrss``), and
that peak minus the resident set just before the step (the step's own memory, without the
interpreter, torch and the batch, which differ between torch versions).

Configurations (the papers' Omniglot settings, ``maml_step.py``'s synthetic batch and Conv4):
5-way 1-shot (1 query per class, meta-batch 32, 1 inner step, inner lr 0.4), 20-way 1-shot
(1 query, meta-batch 16, 5 inner steps, inner lr 0.1) and 20-way 5-shot (5 queries, meta-batch
16, 5 inner steps, inner lr 0.1); second and first order. Rows:

  metalearn          -- ``MAML.meta_loss`` of the whole meta-batch + backward (one vmap, or
                        first order the network's task-batched forward, ``Conv4.forward_tasks``);
  metalearn chunk N  -- ``metalearn.training.meta_gradient(learner, batch, task_chunk=N)``: N
                        tasks at a time, gradients accumulated (``--task-chunk N``);
  loop               -- ``maml_step.py``'s per-task loop (functional_call + autograd.grad per
                        task, one backward of the summed losses: every task's graph is held);
  learn2learn        -- learn2learn 0.2.0's ``clone()``/``adapt()`` with backward per task (its
                        Omniglot example), ``nn.BatchNorm2d`` as its users write it, in the peer
                        interpreter (``--peer-python``; skipped without it).

Every process uses one thread and glibc's allocator with ``tune_allocator``'s thresholds (as the
``metalearn`` command runs), set through the environment so that the peer's process has them
too. Peak memory does not depend on the machine's load; the step times printed beside it do,
and are recorded only as "taken under load" when the machine is busy.

    python benchmarks/maml_memory.py --peer-python ~/peer-venv/bin/python \\
        --json benchmarks/results/maml_memory.json --markdown benchmarks/results/maml_memory.md
"""

from __future__ import annotations

import argparse
import ctypes
import ctypes.util
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
SRC = HERE.parent / "src"

CONFIGS = {  # name -> ways, shots, query per class, meta-batch, inner steps, inner lr
    "5w1s": (5, 1, 1, 32, 1, 0.4),
    "20w1s": (20, 1, 1, 16, 5, 0.1),
    "20w5s": (20, 5, 5, 16, 5, 0.1),
}
CHUNKS = (1, 2, 4, 8)


def rss_bytes() -> int:
    text = Path("/proc/self/status").read_text()
    return int(next(line for line in text.splitlines() if line.startswith("VmRSS:")).split()[1]) * 1024


def inputs(ways: int, shots: int, query: int, tasks: int):
    """``maml_step.py``'s Conv4 and synthetic batch (same seeds), importing only torch and
    ``metalearn.models`` so that it also runs in the peer venv (metalearn is not installed there)."""
    import torch

    from types import SimpleNamespace

    from metalearn.models import Conv4

    g = torch.Generator().manual_seed(0)
    support_x = torch.rand(tasks, ways * shots, 1, 28, 28, generator=g)
    query_x = torch.rand(tasks, ways * query, 1, 28, 28, generator=g)
    labels = torch.arange(ways)
    support_y = labels.repeat_interleave(shots).expand(tasks, -1).contiguous()
    query_y = labels.repeat_interleave(query).expand(tasks, -1).contiguous()
    torch.manual_seed(0)
    return Conv4(1, ways), SimpleNamespace(support_x=support_x, support_y=support_y, query_x=query_x,
                                           query_y=query_y, ways=ways, num_tasks=tasks)


# -- the worker: one step in this process ------------------------------------------------------

def worker(args) -> None:
    import torch

    torch.set_num_threads(1)
    sys.path.insert(0, str(HERE))
    sys.path.insert(0, str(SRC))
    ways, shots, query, tasks, inner_steps, inner_lr = CONFIGS[args.config]
    first_order = args.order == "first"
    model, batch = inputs(ways, shots, query, tasks)
    if args.row != "learn2learn":
        from metalearn.tasks.batch import TaskBatch

        batch = TaskBatch(batch.support_x, batch.support_y, batch.query_x, batch.query_y, ways=ways)
    if args.row == "learn2learn":
        import learn2learn as l2l
        from _l2l_step import l2l_step, with_native_batch_norm

        with_native_batch_norm(model)
        step = l2l_step(l2l.algorithms.MAML(model, lr=inner_lr, first_order=first_order), vars(batch), inner_steps)
    elif args.row == "loop":
        from maml_step import loop_step

        step = loop_step(model, batch, first_order, inner_lr, inner_steps)
    else:
        from metalearn import MAML
        from metalearn.training import meta_gradient

        learner = MAML(model, MAML.Config(inner_lr=inner_lr, inner_steps=inner_steps, first_order=first_order))

        def step():
            meta_gradient(learner, batch, args.chunk)

    before = rss_bytes()
    start = time.perf_counter()
    step()
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    grads = [p.grad for p in model.parameters()]
    assert all(g is not None and bool(torch.isfinite(g).all()) for g in grads)
    # The live memory of a second step: every block of 64 KiB or more now gets its own mmap,
    # returned on free, so the rise of the resident set is the largest sum of live tensors (the
    # CPU's counterpart of torch.cuda.max_memory_allocated), not what the heap kept or fragmented.
    from metalearn.memory_budget import peak_memory_of

    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    libc.mallopt(-3, 64 * 1024)  # M_MMAP_THRESHOLD
    libc.mallopt(-1, 0)  # M_TRIM_THRESHOLD
    for p in model.parameters():
        p.grad = None
    live = peak_memory_of(step, torch.device("cpu"))
    print("@@" + json.dumps({"peak_rss": peak, "rss_before_step": before, "step_bytes": peak - before,
                             "live_bytes": live, "step_s": seconds, "torch": torch.__version__}))


# -- the driver ----------------------------------------------------------------------------------

def measure(python: str, config: str, order: str, row: str, chunk: int = 0) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
    env.update(OMP_NUM_THREADS="1", MALLOC_MMAP_THRESHOLD_=str(2**30), MALLOC_TRIM_THRESHOLD_=str(2**31 - 1))
    command = [python, str(Path(__file__).resolve()), "--worker", "--config", config, "--order", order,
               "--row", row, "--chunk", str(chunk)]
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=1800)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed:\n{done.stderr[-3000:]}")
    line = next(line for line in done.stdout.splitlines() if line.startswith("@@"))
    name = row if row != "metalearn" or not chunk else f"metalearn chunk {chunk}"
    return {"config": config, "order": order, "row": name, "chunk": chunk, **json.loads(line[2:])}


def markdown(results: list[dict], meta: dict) -> str:
    def order(row: str) -> tuple[int, int]:  # whole batch, chunks from large to small, loop, learn2learn
        if row.startswith("metalearn chunk"):
            return 1, -int(row.split()[-1])
        return {"metalearn": 0, "loop": 2, "learn2learn": 3}[row], 0

    rows = sorted({r["row"] for r in results}, key=order)
    columns = [(c, o) for c in CONFIGS for o in ("second", "first")]
    head = "| peak RSS, GiB (step's own) | " + " | ".join(f"{c} {o[:3]}." for c, o in columns) + " |"
    lines = [head, "| --- |" + " ---: |" * len(columns)]
    found = {(r["config"], r["order"], r["row"]): r for r in results}
    for row in rows:
        cells = []
        for c, o in columns:
            r = found.get((c, o, row))
            cells.append(f"{r['peak_rss'] / 2**30:.2f} ({r['step_bytes'] / 2**30:.2f})" if r else "-")
        lines.append(f"| {row} | " + " | ".join(cells) + " |")
    if any("live_bytes" in r for r in results):
        lines.append("")
        lines.append("| live tensors at the peak, MiB (second step) | " + " | ".join(f"{c} {o[:3]}." for c, o in columns) + " |")
        lines.append("| --- |" + " ---: |" * len(columns))
        for row in rows:
            cells = []
            for c, o in columns:
                r = found.get((c, o, row))
                cells.append(f"{r['live_bytes'] / 2**20:.0f}" if r and "live_bytes" in r else "-")
            lines.append(f"| {row} | " + " | ".join(cells) + " |")
    lines.append("")
    lines.append("| step time, s (one step, 1 thread, " + meta["load_note"] + ") | "
                 + " | ".join(f"{c} {o[:3]}." for c, o in columns) + " |")
    lines.append("| --- |" + " ---: |" * len(columns))
    for row in rows:
        cells = [f"{found[(c, o, row)]['step_s']:.1f}" if (c, o, row) in found else "-" for c, o in columns]
        lines.append(f"| {row} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--config", choices=list(CONFIGS))
    parser.add_argument("--order", choices=("second", "first"))
    parser.add_argument("--row", choices=("metalearn", "loop", "learn2learn"))
    parser.add_argument("--chunk", type=int, default=0)
    parser.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    parser.add_argument("--chunks", nargs="*", type=int, default=list(CHUNKS))
    parser.add_argument("--orders", nargs="+", default=["second", "first"], choices=("second", "first"))
    parser.add_argument("--no-loop", action="store_true", help="leave out the per-task loop row")
    parser.add_argument("--peer-python", default=None, help="the peer venv's python (learn2learn rows)")
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--markdown", type=Path, default=None)
    parser.add_argument("--table-from", type=Path, nargs="+", default=None,
                        help="the table of results files (or of stopped runs' .partial.json), merged; written "
                             "to --json / --markdown when given")
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return
    if args.table_from:
        results, sources = [], []
        for path in args.table_from:
            data = json.loads(path.read_text())
            results += data["results"] if isinstance(data, dict) else data
            sources.append(data.get("meta", {"partial": str(path.name)}) if isinstance(data, dict)
                           else {"partial": path.name})
        meta = {"merged_from": sources, "load_note": "taken under load: do not compare"}
        if args.json:
            args.json.write_text(json.dumps({"meta": meta, "results": results}, indent=1) + "\n")
        if args.markdown:
            args.markdown.write_text(markdown(results, meta))
        print(markdown(results, meta))
        return

    import torch

    from maml_step import cpu_description

    load_before = os.getloadavg()[0]
    results = []
    for config in args.configs:
        for order in args.orders:
            plan = [(sys.executable, "metalearn", 0), *((sys.executable, "metalearn", c) for c in args.chunks)]
            if not args.no_loop:
                plan.append((sys.executable, "loop", 0))
            if args.peer_python:
                plan.append((args.peer_python, "learn2learn", 0))
            for python, row, chunk in plan:
                result = measure(python, config, order, row, chunk)
                results.append(result)
                print(f"{config} {order:6s} {result['row']:20s} peak {result['peak_rss'] / 2**30:6.2f} GiB, "
                      f"step's own {result['step_bytes'] / 2**30:6.2f} GiB, {result['step_s']:6.1f} s", flush=True)
                if args.json:  # kept as it grows: a long run stopped early keeps what it measured
                    args.json.with_suffix(".partial.json").write_text(json.dumps(results, indent=1) + "\n")
    load_after = os.getloadavg()[0]
    busy = max(load_before, load_after) > 0.5
    meta = {
        "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
        "processor": cpu_description(), "torch": torch.__version__, "python": platform.python_version(),
        "threads_per_process": 1, "allocator": "glibc, mmap threshold 1 GiB, trim threshold 2^31-1",
        "load_average_before_after": [load_before, load_after],
        "load_note": "taken under load: do not compare" if busy else "idle machine",
        "peer_torch": next((r["torch"] for r in results if r["row"] == "learn2learn"), None),
    }
    table = markdown(results, meta)
    print(table)
    if args.json:
        args.json.write_text(json.dumps({"meta": meta, "results": results}, indent=1) + "\n")
    if args.markdown:
        args.markdown.write_text(f"Command: `python benchmarks/{meta['command']}`; {meta['processor']}; torch "
                                 f"{meta['torch']} (learn2learn's peer: torch {meta['peer_torch']}).\n\n" + table)


if __name__ == "__main__":
    main()
