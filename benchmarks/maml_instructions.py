"""Instructions executed by one MAML meta-step (forward + meta-gradient backward), counted by
valgrind's callgrind on one thread: a measure of work that, unlike a wall-clock time, does not
depend on what else the machine runs.

Each row runs in a fresh process under ``valgrind --tool=callgrind --collect-atstart=no``: it
builds the step, takes one untimed warm-up step (one-time initialisation: oneDNN primitives,
vmap's and autograd's caches), then counts the instructions of the next step alone
(``torch._C._valgrind_toggle`` around it). Rows, on ``maml_step.py``'s synthetic batch and Conv4:

  metalearn          -- ``MAML.meta_loss`` of the whole meta-batch (one vmap) + backward;
  metalearn chunk N  -- ``metalearn.training.meta_gradient(..., task_chunk=N)``;
  learn2learn        -- learn2learn 0.2.0's ``clone()``/``adapt()`` with backward per task (its
                        Omniglot example), ``nn.BatchNorm2d`` as its users write it, on this
                        interpreter's torch (learn2learn's pure-Python package from the peer
                        venv's site-packages, ``--peer-site-packages``; as
                        ``maml_step.py --peer-on-project-torch`` runs it), so both sides count
                        the same torch build's kernels;
  metalearn MAML++   -- row (e) of ``maml_step.py``: every MAML++ part that changes a meta-step
                        (configuration ``maml++20w1s``: the preset's network and meta-batch).

Instruction counts are not times: a vector instruction does 8 float multiply-adds, a scalar
one 1, and memory traffic is not in the count. They compare implementations that run the same
kernels (both sides' convolutions are oneDNN's) and show where extra work goes
(``--annotate``: the functions with the most instructions, from ``callgrind_annotate``).

    python benchmarks/maml_instructions.py --configs 20w1s --peer-site-packages \\
        ~/peer-venv/lib/python3.11/site-packages --json benchmarks/results/maml_instructions.json
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
SRC = HERE.parent / "src"
CONFIGS = {  # name -> ways, shots, query per class, meta-batch, inner steps, inner lr, network (maml_step.py's)
    "5w1s": (5, 1, 1, 32, 1, 0.4, "conv4"),
    "20w1s": (20, 1, 1, 16, 5, 0.1, "conv4"),
    "20w5s": (20, 5, 5, 16, 5, 0.1, "conv4"),
    "maml++20w1s": (20, 1, 1, 8, 5, 0.1, "conv4-mamlpp"),
}


def build_step(row: str, config: str, order: str, chunk: int, tasks: int | None):
    """The step closure of ``row`` (see the module docstring) on ``maml_step.py``'s inputs."""
    import torch

    sys.path.insert(0, str(HERE))
    from maml_step import make_batch, make_model, mamlpp_step

    ways, shots, query, meta_batch, inner_steps, inner_lr, network = CONFIGS[config]
    meta_batch = tasks or meta_batch
    first_order = order == "first"
    batch = make_batch(ways, shots, query, meta_batch)
    model = make_model(ways, network=network)
    if row == "learn2learn":
        import learn2learn as l2l
        from _l2l_step import l2l_step, with_native_batch_norm

        with_native_batch_norm(model)
        step = l2l_step(l2l.algorithms.MAML(model, lr=inner_lr, first_order=first_order), vars(batch), inner_steps)
    elif row == "mamlpp":
        step = mamlpp_step(model, batch, first_order, inner_lr, inner_steps)
    else:
        from metalearn import MAML
        from metalearn.training import meta_gradient

        learner = MAML(model, MAML.Config(inner_lr=inner_lr, inner_steps=inner_steps, first_order=first_order))

        def step():
            meta_gradient(learner, batch, chunk)

    def reset():
        for p in model.parameters():
            p.grad = None

    return step, reset, torch


CLIENT_REQUESTS = r"""
#include <valgrind/callgrind.h>
void start(void) { CALLGRIND_ZERO_STATS; CALLGRIND_START_INSTRUMENTATION; CALLGRIND_TOGGLE_COLLECT; }
void stop(void) { CALLGRIND_TOGGLE_COLLECT; CALLGRIND_STOP_INSTRUMENTATION; }
"""


def client_requests(workdir: Path):
    """callgrind's start/stop-instrumentation requests as a tiny C library (valgrind's header and a
    C compiler), so that imports and the warm-up step run uninstrumented (several times faster
    under valgrind); None where it cannot be built (then torch's collection toggle is used, and
    everything runs instrumented)."""
    source, library = workdir / "client.c", workdir / "client.so"
    source.write_text(CLIENT_REQUESTS)
    built = subprocess.run(["cc", "-O1", "-shared", "-fPIC", "-o", str(library), str(source)], capture_output=True)
    return library if built.returncode == 0 else None


def worker(args) -> None:
    import ctypes

    import torch

    torch.set_num_threads(1)
    step, reset, _ = build_step(args.row, args.config, args.order, args.chunk, args.tasks)
    step()  # warm-up, not counted
    reset()
    if args.client:
        client = ctypes.CDLL(args.client)
        client.start()
        step()
        client.stop()
    else:
        torch._C._valgrind_toggle()
        step()
        torch._C._valgrind_toggle()
    print("@@done", flush=True)


def row_name(row: str, chunk: int) -> str:
    if row == "metalearn" and chunk:
        return f"metalearn chunk {chunk}"
    return {"mamlpp": "metalearn MAML++"}.get(row, row)


def count(config: str, order: str, row: str, chunk: int, tasks: int | None, peer_site_packages: str | None,
          annotate: int, workdir: Path, client: Path | None) -> dict:
    out = workdir / f"callgrind.{config}.{order}.{row}.{chunk}.out"
    command = ["valgrind", "--tool=callgrind", "--collect-atstart=no", f"--callgrind-out-file={out}",
               *(["--instr-atstart=no"] if client else []), sys.executable]
    script = [str(Path(__file__).resolve()), "--worker", "--config", config, "--order", order, "--row", row,
              "--chunk", str(chunk)] + (["--tasks", str(tasks)] if tasks else []) + \
        (["--client", str(client)] if client else [])
    if row == "learn2learn":
        if not peer_site_packages:
            raise SystemExit("the learn2learn row needs --peer-site-packages")
        script = [str(HERE / "_peer_on_project_torch.py"), peer_site_packages, *script]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(SRC)}
    done = subprocess.run(command + script, capture_output=True, text=True, env=env)
    if done.returncode != 0 or "@@done" not in done.stdout:
        raise RuntimeError(f"{' '.join(command + script)} failed:\n{done.stderr[-3000:]}")
    text = out.read_text(errors="replace")
    # "totals:" (what was collected; "summary:" is 0 when collection was toggled on and off)
    total = int(re.search(r"^totals:\s*(\d+)", text, re.MULTILINE).group(1))
    result = {"config": config, "order": order, "row": row_name(row, chunk), "chunk": chunk,
              "tasks": tasks or CONFIGS[config][3], "instructions": total}
    if annotate:
        listing = subprocess.run(["callgrind_annotate", "--inclusive=no", str(out)], capture_output=True,
                                 text=True).stdout
        top = []
        for line in listing.splitlines():
            found = re.match(r"^\s*([\d,]+)\s+\(\s*([\d.]+)%\)\s+(.*)$", line)
            if found and len(top) < annotate:
                top.append({"instructions": int(found.group(1).replace(",", "")), "share": float(found.group(2)),
                             "function": found.group(3)[:200]})
        result["top_functions"] = top
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--config", choices=list(CONFIGS))
    parser.add_argument("--order", choices=("second", "first"))
    parser.add_argument("--row", choices=("metalearn", "learn2learn", "mamlpp"))
    parser.add_argument("--chunk", type=int, default=0)
    parser.add_argument("--tasks", type=int, default=None, help="meta-batch size instead of the configuration's")
    parser.add_argument("--client", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--configs", nargs="+", default=["20w1s"], choices=list(CONFIGS))
    parser.add_argument("--orders", nargs="+", default=["second", "first"], choices=("second", "first"))
    parser.add_argument("--rows", nargs="+", default=["metalearn", "learn2learn"],
                        help="metalearn, metalearn:N (chunks of N), learn2learn, mamlpp")
    parser.add_argument("--peer-site-packages", default=None,
                        help="the peer venv's site-packages (learn2learn), e.g. ~/peer-venv/lib/python3.11/site-packages")
    parser.add_argument("--annotate", type=int, default=0, help="record this many top functions per row")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return
    results = []
    with tempfile.TemporaryDirectory(prefix="maml_instructions_") as workdir:
        client = client_requests(Path(workdir))
        for config in args.configs:
            for order in args.orders:
                for spec in args.rows:
                    row, _, chunk = spec.partition(":")
                    result = count(config, order, row, int(chunk or 0), args.tasks, args.peer_site_packages,
                                   args.annotate, Path(workdir), client)
                    results.append(result)
                    print(f"{config} {order:6s} {result['row']:18s} {result['tasks']:3d} tasks "
                          f"{result['instructions'] / 1e9:9.2f} G instructions", flush=True)
                    if args.json:
                        args.json.with_suffix(".partial.json").write_text(json.dumps(results, indent=1) + "\n")
    import platform

    sys.path.insert(0, str(HERE))
    import torch
    from maml_step import cpu_description

    meta = {"command": " ".join(["maml_instructions.py", *sys.argv[1:]]), "processor": cpu_description(),
            "torch": torch.__version__, "python": platform.python_version(), "threads": 1,
            "valgrind": subprocess.run(["valgrind", "--version"], capture_output=True, text=True).stdout.strip()}
    if args.json:
        args.json.write_text(json.dumps({"meta": meta, "results": results}, indent=1) + "\n")
        args.json.with_suffix(".partial.json").unlink(missing_ok=True)
    print(json.dumps(meta))


if __name__ == "__main__":
    main()
