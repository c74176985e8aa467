"""The convolution floor of a MAML meta-step: how long its convolutions alone take.

For each implementation of one meta-step (``maml_step.py``'s rows: metalearn's whole batch,
metalearn ``--task-chunk 1``, the per-task ``autograd.grad`` loop, and learn2learn in its peer
interpreter), this records every convolution and convolution gradient the step runs, at the
level of the kernels (``_conv_calls.py``: after vmap's batching rules, so metalearn's tasks show
up as the grouped convolutions they become), replays exactly those calls on their own, and
times step and replay round-robin with the same clock. The replay is the step's convolution
kernels with nothing around them; the rest of the step (elementwise work, copies, Python,
autograd's engine) is the step minus its replay.

This answers a question a step's time alone cannot: how fast could the step become if
everything but the convolutions cost nothing? Every implementation computes the same
meta-gradient, so it needs the same convolution arithmetic (the multiply-adds printed beside
each row agree); what differs is how the calls are shaped (one grouped call for 16 tasks, or 16
calls) and how fast the kernels run them. So, with torch's convolution kernels, metalearn
cannot beat learn2learn by more than learn2learn's step divided by the faster of the two
replays (its own layout's, or a per-task layout's):

    python benchmarks/maml_floor.py --configs 20w1s,20w5s --threads 1 --iters 3 --tuned-allocator \\
        --peer-on-project-torch ~/peer-venv/lib/python3.11/site-packages

Times are CPU time of the process (``time.process_time``; learn2learn's measured in its own
process), one torch thread by default, so that the ratios depend little on other load.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
from pathlib import Path

import torch

from _conv_calls import record, replayer, summary
from maml_step import (CHUNK1_ROW, CONFIGS, CUSTOM, ORDERS, PEER_ROWS, Peer, chunked_step, cpu_description,
                       loop_step, make_batch, make_model, metalearn_step, save_json, time_steps_interleaved)

METALEARN_ROW = "metalearn (whole batch)"
LOOP_ROW = "loop (autograd.grad)"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--configs", default="20w1s", help=f"comma-separated: {', '.join(CONFIGS)}")
    p.add_argument("--orders", default="second,first", help="comma-separated: second, first")
    p.add_argument("--iters", type=int, default=3, help="timed rounds (one step and one replay of each row per round)")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--peer-on-project-torch", default=None, metavar="PEER_SITE_PACKAGES",
                   help="learn2learn from this site-packages folder of the peer venv, on this interpreter's torch")
    p.add_argument("--peer-python", default=None, help="or: the peer venv's own interpreter (its own torch)")
    p.add_argument("--tuned-allocator", action="store_true",
                   help="raise glibc's mmap/trim thresholds here and in the peer, as the metalearn command does")
    p.add_argument("--json", type=Path, default=None, help="write the results here")
    args = p.parse_args(argv)
    names = [c.strip() for c in args.configs.split(",") if c.strip()]
    if not names or any(c not in CONFIGS for c in names):
        p.error(f"--configs takes {', '.join(CONFIGS)}, got {args.configs!r}")
    args.configs = names
    args.orders = [o.strip() for o in args.orders.split(",") if o.strip()]
    if not args.orders or any(o not in ORDERS for o in args.orders):
        p.error("--orders takes second and/or first")
    if args.peer_on_project_torch:
        args.peer_python = args.peer_python or sys.executable
    return args


def run_config(name: str, args) -> dict:
    config = {**CUSTOM, "mamlpp": False, **CONFIGS[name]}
    if config["mamlpp"]:
        raise SystemExit(f"{name}: MAML++ rows are not part of this benchmark")
    batch = make_batch(config["ways"], config["shots"], config["query"], config["meta_batch"])
    model = make_model(config["ways"], 0, config["network"])
    lr, steps_inner = config["inner_lr"], config["inner_steps"]
    print(f"\n== {name}: {config['ways']}-way {config['shots']}-shot, {config['query']} query/class, "
          f"meta-batch {config['meta_batch']}, {steps_inner} inner steps ==", flush=True)
    rows = []
    with tempfile.TemporaryDirectory(prefix="maml_floor_") as workdir:
        peer = None
        if args.peer_python:
            peer_args = argparse.Namespace(peer_on_project_torch=args.peer_on_project_torch, inner_lr=lr,
                                           inner_steps=steps_inner, network=config["network"],
                                           tuned_allocator=args.tuned_allocator,
                                           device="cpu", gpu_kernels="reproducible")  # CPU only; the GPU setting is unused
            peer = Peer(args.peer_python, "native", model, batch, peer_args, torch.get_num_threads(), Path(workdir))
            print(f"  learn2learn {peer.info['learn2learn']} on torch {peer.info['torch']}, "
                  f"threads {peer.info['threads']}", flush=True)
        try:
            for order in args.orders:
                first_order = ORDERS[order]
                steps = {
                    METALEARN_ROW: metalearn_step(model, batch, first_order, lr, steps_inner),
                    CHUNK1_ROW: chunked_step(model, batch, first_order, lr, steps_inner, 1),
                    LOOP_ROW: loop_step(model, batch, first_order, lr, steps_inner),
                }
                calls = {}
                for row, step in steps.items():
                    model.zero_grad(set_to_none=True)
                    calls[row] = record(step)
                model.zero_grad(set_to_none=True)
                timed = dict(steps)
                if peer is not None:
                    row = PEER_ROWS["native"]
                    calls[row] = peer.convolution_calls(order)
                    timed[row] = peer.step(order, "cpu")
                for row, row_calls in calls.items():
                    timed[f"{row} / replay"] = replayer(row_calls)
                times = time_steps_interleaved(timed, model, args.iters, args.warmup, "cpu")
                for row, row_calls in calls.items():
                    step_ms = statistics.median(times[row])
                    replay_ms = statistics.median(times[f"{row} / replay"])
                    info = summary(row_calls)
                    rows.append({"config": name, "order": order, "implementation": row, "step_ms": step_ms,
                                 "convolutions_ms": replay_ms, "rest_ms": step_ms - replay_ms,
                                 "calls": info["calls"], "macs": info["macs"],
                                 "step_times_ms": times[row], "replay_times_ms": times[f"{row} / replay"]})
                    print(f"  {order:6s} {row:32s} step {step_ms:8.1f} ms, convolutions alone {replay_ms:8.1f} ms "
                          f"({100 * replay_ms / step_ms:4.1f}%), {sum(info['calls'].values()):5d} calls, "
                          f"{info['macs'] / 1e9:6.2f} G MACs", flush=True)
        finally:
            if peer is not None:
                peer.close()
    return {"config": config, "rows": rows}


def verdicts(rows: list[dict]) -> list[str]:
    """Per configuration and order: the best speed-up over learn2learn that the convolutions allow."""
    lines = []
    groups = {}
    for row in rows:
        groups.setdefault((row["config"], row["order"]), {})[row["implementation"]] = row
    for (config, order), by_row in groups.items():
        peer = by_row.get(PEER_ROWS["native"])
        if peer is None:
            continue
        ours = by_row[METALEARN_ROW]
        floor = min(r["convolutions_ms"] for r in by_row.values())
        lines.append(
            f"{config} {order} order: learn2learn {peer['step_ms']:.0f} ms, metalearn {ours['step_ms']:.0f} ms "
            f"({peer['step_ms'] / ours['step_ms']:.2f}x); 1.5x needs <= {peer['step_ms'] / 1.5:.0f} ms; "
            f"metalearn's convolutions alone {ours['convolutions_ms']:.0f} ms (bound "
            f"{peer['step_ms'] / ours['convolutions_ms']:.2f}x), the fastest replay {floor:.0f} ms (bound "
            f"{peer['step_ms'] / floor:.2f}x)")
    return lines


def markdown(rows: list[dict]) -> str:
    out = ["| configuration | order | implementation | step, ms | convolutions alone, ms | rest, ms | conv calls | G MACs |",
           "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: |"]
    for r in rows:
        out.append(f"| {r['config']} | {r['order']} | {r['implementation']} | {r['step_ms']:.0f} | "
                   f"{r['convolutions_ms']:.0f} | {r['rest_ms']:.0f} | {sum(r['calls'].values())} | {r['macs'] / 1e9:.2f} |")
    return "\n".join(out)


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.tuned_allocator:
        from metalearn.runtime import tune_allocator

        print(f"allocator tuned: {tune_allocator()}")
    torch.set_num_threads(args.threads)
    try:
        load = os.getloadavg()
    except OSError:
        load = None
    print(f"torch {torch.__version__}, {args.threads} thread(s), {cpu_description()}, load average {load}; "
          f"CPU time, median of {args.iters} rounds after {args.warmup}")
    rows = []
    for name in args.configs:
        rows += run_config(name, args)["rows"]
    table, lines = markdown(rows), verdicts(rows)
    print("\n" + table + ("\n\n" + "\n".join(lines) if lines else ""))
    result = {"torch": torch.__version__, "threads": args.threads, "tuned_allocator": args.tuned_allocator,
              "cpu": cpu_description(), "load_average": load,
              "iters": args.iters, "warmup": args.warmup, "rows": rows, "table": table, "verdicts": lines}
    if args.json:
        save_json(args.json, result)
    return result


if __name__ == "__main__":
    main()
