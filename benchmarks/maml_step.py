"""Time one MAML meta-step (forward + meta-gradient backward) four ways, in one run.

Omniglot-shaped N-way K-shot tasks (defaults: 5-way 1-shot, 1 query image per class as in the
MAML reference code, meta-batch 32, 1 inner step, inner lr 0.4), ``metalearn.models.Conv4(1, 5)``
(stride version; its batch norm is ``BatchStatNorm``: batch statistics, no running ones),
second- and first-order:

  (a) metalearn   -- ``MAML(model, MAML.Config(...)).meta_loss(batch)`` then ``backward()``:
                     the whole meta-batch under ``torch.func.vmap``;
  (b) loop        -- the same model, a Python loop over tasks: ``functional_call`` +
                     ``torch.autograd.grad(create_graph=not first_order)`` per task, the query
                     losses summed, divided by the number of tasks, one ``backward()``;
  (c) learn2learn -- learn2learn 0.2.0's ``MAML(model, lr, first_order).clone()`` /
                     ``adapt(loss)`` per task (the library's own Omniglot example), in a separate
                     interpreter (``--peer-python``; see ``benchmarks/_l2l_step.py``), with the
                     same Conv4 and, as a second row, the same network with nn.BatchNorm2d;
  (d) limit       -- no adaptation at all: one forward + backward of the same
                     tasks * ways * (shots + query) images through one shared set of weights.

Only the meta-step is timed: no sampling (one fixed synthetic batch), no optimizer step;
gradients are reset to None between steps, outside the timed region. The in-process rows are
timed round-robin (one step of each per round); learn2learn runs first, in its own process(es).
Before timing, the meta-gradients of (a), (b) and (c) are computed from the same weights and
batch and compared, so the rows measure the same computation.

    python benchmarks/maml_step.py --iters 20 --peer-python /work/peer-venv/bin/python \
        --json results/maml_step.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call

import metalearn
from metalearn import MAML, TaskBatch
from metalearn.models import Conv4

HERE = Path(__file__).resolve().parent
PEER_SCRIPT = HERE / "_l2l_step.py"
ORDERS = {"second": False, "first": True}  # order name -> first_order flag


# -- inputs -------------------------------------------------------------------------------------

def make_batch(ways: int = 5, shots: int = 1, query: int = 1, tasks: int = 32, image_size: int = 28,
               seed: int = 0) -> TaskBatch:
    """A synthetic Omniglot-shaped batch: images in [0, 1], labels 0..ways-1 grouped by class."""
    g = torch.Generator().manual_seed(seed)
    shape = (1, image_size, image_size)
    support_x = torch.rand(tasks, ways * shots, *shape, generator=g)
    query_x = torch.rand(tasks, ways * query, *shape, generator=g)
    labels = torch.arange(ways)
    support_y = labels.repeat_interleave(shots).expand(tasks, -1).contiguous()
    query_y = labels.repeat_interleave(query).expand(tasks, -1).contiguous()
    return TaskBatch(support_x, support_y, query_x, query_y, ways=ways)


def make_model(ways: int = 5, seed: int = 0) -> Conv4:
    torch.manual_seed(seed)
    return Conv4(1, ways)  # pooling="stride", BatchNorm2d(track_running_stats=False)


# -- the meta-steps (each returns a closure: one forward + backward into .grad) ----------------

def vmapped_step(model: nn.Module, batch: TaskBatch, first_order: bool, inner_lr: float = 0.4,
                 inner_steps: int = 1) -> Callable[[], None]:
    """(a) metalearn's MAML, batched over tasks with vmap."""
    maml = MAML(model, MAML.Config(inner_lr=inner_lr, inner_steps=inner_steps, first_order=first_order))

    def step():
        loss, _ = maml.meta_loss(batch)
        loss.backward()

    return step


def loop_step(model: nn.Module, batch: TaskBatch, first_order: bool, inner_lr: float = 0.4,
              inner_steps: int = 1) -> Callable[[], None]:
    """(b) the usual per-task Python loop: functional_call + autograd.grad, losses summed / T."""
    names = [name for name, _ in model.named_parameters()]
    tasks = batch.num_tasks

    def step():
        params = dict(model.named_parameters())
        total = 0.0
        for t in range(tasks):
            fast = params
            for _ in range(inner_steps):
                support_loss = F.cross_entropy(functional_call(model, fast, (batch.support_x[t],)),
                                               batch.support_y[t])
                grads = torch.autograd.grad(support_loss, [fast[n] for n in names],
                                            create_graph=not first_order)
                fast = {n: fast[n] - inner_lr * g for n, g in zip(names, grads)}
            query_loss = F.cross_entropy(functional_call(model, fast, (batch.query_x[t],)), batch.query_y[t])
            total = total + query_loss
        (total / tasks).backward()

    return step


def limit_step(model: nn.Module, batch: TaskBatch) -> Callable[[], None]:
    """(d) no adaptation: one forward + backward of all the batch's images, shared weights."""
    image_shape = batch.support_x.shape[2:]
    x = torch.cat([batch.support_x.reshape(-1, *image_shape), batch.query_x.reshape(-1, *image_shape)])
    y = torch.cat([batch.support_y.reshape(-1), batch.query_y.reshape(-1)])

    def step():
        F.cross_entropy(model(x), y).backward()

    return step


# -- timing -------------------------------------------------------------------------------------

def time_step(step: Callable[[], None], model: nn.Module, iters: int = 20, warmup: int = 3) -> list[float]:
    """Milliseconds of each of ``iters`` calls of ``step`` after ``warmup`` untimed ones;
    gradients are set to None before every call, outside the timed region."""
    times = []
    for i in range(warmup + iters):
        model.zero_grad(set_to_none=True)
        start = time.perf_counter()
        step()
        elapsed = (time.perf_counter() - start) * 1e3
        if i >= warmup:
            times.append(elapsed)
    model.zero_grad(set_to_none=True)
    return times


def time_steps_interleaved(steps: dict[str, Callable[[], None]], model: nn.Module, iters: int = 20,
                           warmup: int = 3) -> dict[str, list[float]]:
    """Like :func:`time_step` for several steps at once, run round-robin (one call of each per
    round) so that a change in machine load affects them all alike."""
    times = {name: [] for name in steps}
    for i in range(warmup + iters):
        for name, step in steps.items():
            model.zero_grad(set_to_none=True)
            start = time.perf_counter()
            step()
            elapsed = (time.perf_counter() - start) * 1e3
            if i >= warmup:
                times[name].append(elapsed)
    model.zero_grad(set_to_none=True)
    return times


def summarize(implementation: str, order: str, times: list[float], tasks: int, **extra) -> dict:
    median = statistics.median(times)
    return {
        "implementation": implementation,
        "order": order,
        "median_ms": median,
        "mean_ms": statistics.fmean(times),
        "min_ms": min(times),
        "tasks_per_s": tasks / (median / 1e3),
        "iters": len(times),
        "times_ms": times,
        **extra,
    }


def warn_if_loaded(threads: int) -> None:
    """Other busy processes plus ``threads`` > cores make OpenMP threads wait on descheduled
    peers at every parallel region: timings then vary by 10x or more, most of all for the
    per-task loops (many small ops). Seen on a 2-core machine at load 5: 8 tasks of
    second-order vmapped MAML took 100 ms with 1 thread and 3700 ms with 2."""
    try:
        load = os.getloadavg()[0]
    except OSError:
        return
    cpus = os.cpu_count() or 1
    if load > 0.5 and threads > 1 and load + threads > cpus + 0.5:
        print(f"WARNING: load average {load:.2f} on {cpus} cpus with {threads} torch threads: other "
              "processes compete for the cores and multi-threaded timings are unreliable; wait for an "
              "idle machine or use --threads 1.", flush=True)


def time_metalearn_maml(batch: TaskBatch, first_order: bool = False, inner_lr: float = 0.4,
                        inner_steps: int = 1, iters: int = 20, warmup: int = 3, seed: int = 0) -> dict:
    """(a) timed: metalearn's vmapped MAML meta-step on ``batch`` with a fresh Conv4.
    Reused by ``benchmarks/sampling.py``."""
    model = make_model(batch.ways, seed)
    times = time_step(vmapped_step(model, batch, first_order, inner_lr, inner_steps), model, iters, warmup)
    return summarize("metalearn (vmap)", "first" if first_order else "second", times, batch.num_tasks)


def meta_gradient(model: nn.Module, step: Callable[[], None]) -> dict[str, Tensor]:
    model.zero_grad(set_to_none=True)
    step()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    return grads


def relative_difference(a: dict[str, Tensor], b: dict[str, Tensor]) -> float:
    """max |a - b| / max |a| over all parameter tensors."""
    scale = max(float(g.abs().max()) for g in a.values())
    return max(float((a[n] - b[n]).abs().max()) for n in a) / max(scale, 1e-30)


# -- learn2learn in its own interpreter ---------------------------------------------------------

PEER_ROWS = {"metalearn": "learn2learn", "native": "learn2learn, nn.BatchNorm2d"}


def run_peer(peer_python: str, peer_model: str, model: nn.Module, batch: TaskBatch, args, threads: int) -> dict:
    """Run ``_l2l_step.py`` under ``peer_python`` on the same weights and batch, with metalearn's
    Conv4 (``peer_model="metalearn"``) or its copy with nn.BatchNorm2d (``"native"``); returns its
    JSON (timings per order, versions, threads) plus its meta-gradients per order."""
    with tempfile.TemporaryDirectory(prefix="maml_step_") as tmp:
        inputs, grads_path = Path(tmp) / "inputs.pt", Path(tmp) / "grads.pt"
        torch.save({
            "state_dict": {k: v.detach().clone() for k, v in model.state_dict().items()},
            "support_x": batch.support_x, "support_y": batch.support_y,
            "query_x": batch.query_x, "query_y": batch.query_y,
        }, inputs)
        command = [
            peer_python, str(PEER_SCRIPT), "--inputs", str(inputs), "--grads-out", str(grads_path),
            "--ways", str(batch.ways), "--inner-lr", str(args.inner_lr),
            "--inner-steps", str(args.inner_steps), "--iters", str(args.iters),
            "--warmup", str(args.warmup), "--threads", str(threads),
            "--orders", ",".join(args.orders), "--model", peer_model,
            "--metalearn-src", str(Path(metalearn.__file__).resolve().parents[1]),
        ]
        env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
        proc = subprocess.run(command, capture_output=True, text=True, env=env)
        if proc.returncode != 0:
            raise RuntimeError(f"peer benchmark failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
        lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
        if not lines:
            raise RuntimeError(f"peer benchmark printed no JSON:\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")
        result = json.loads(lines[-1])
        result["grads"] = torch.load(grads_path, weights_only=True)
        return result


# -- report -------------------------------------------------------------------------------------

def speedup(reference: dict | None, row: dict) -> str:
    if reference is None:
        return "n/a"
    return f"{reference['median_ms'] / row['median_ms']:.2f}x"


def markdown_table(rows: list[dict]) -> str:
    by_key = {(r["implementation"], r["order"]): r for r in rows}
    lines = [
        "| implementation | order | ms/step (median) | ms/step (mean) | tasks/s | speed-up vs learn2learn | speed-up vs loop |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    orders = [o for o in ORDERS if any(r["order"] == o for r in rows)]
    for row in rows:
        if row["order"] == "none":  # the limit: one measurement, compared with each order
            l2l = " / ".join(f"{speedup(by_key.get(('learn2learn', o)), row)} ({o[:3]})" for o in orders)
            loop = " / ".join(f"{speedup(by_key.get(('loop (autograd.grad)', o)), row)} ({o[:3]})" for o in orders)
        else:
            l2l = speedup(by_key.get(("learn2learn", row["order"])), row)
            loop = speedup(by_key.get(("loop (autograd.grad)", row["order"])), row)
        lines.append(f"| {row['implementation']} | {row['order']} | {row['median_ms']:.1f} | "
                     f"{row['mean_ms']:.1f} | {row['tasks_per_s']:.0f} | {l2l} | {loop} |")
    return "\n".join(lines)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--ways", type=int, default=5)
    p.add_argument("--shots", type=int, default=1)
    p.add_argument("--query", type=int, default=1, help="query images per class")
    p.add_argument("--meta-batch", type=int, default=32, help="tasks per meta-step")
    p.add_argument("--inner-steps", type=int, default=1)
    p.add_argument("--inner-lr", type=float, default=0.4)
    p.add_argument("--iters", type=int, default=20, help="timed meta-steps per implementation")
    p.add_argument("--warmup", type=int, default=3, help="untimed meta-steps first")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own)")
    p.add_argument("--orders", default="second,first", help="comma-separated: second, first")
    p.add_argument("--peer-python", default=None,
                   help="interpreter of a venv with learn2learn 0.2.0, e.g. /work/peer-venv/bin/python")
    p.add_argument("--peer-models", default="metalearn,native",
                   help="learn2learn rows: 'metalearn' = metalearn's Conv4 (BatchStatNorm), the same "
                        "model as the other rows; 'native' = the same network with nn.BatchNorm2d")
    p.add_argument("--json", type=Path, default=None, help="write the results here")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    args.orders = [o.strip() for o in args.orders.split(",") if o.strip()]
    args.peer_models = [m.strip() for m in args.peer_models.split(",") if m.strip()]
    if any(m not in PEER_ROWS for m in args.peer_models):
        p.error(f"--peer-models takes {', '.join(PEER_ROWS)}")
    bad = [o for o in args.orders if o not in ORDERS]
    if bad:
        p.error(f"unknown order(s) {bad}; use second and/or first")
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    threads = torch.get_num_threads()
    batch = make_batch(args.ways, args.shots, args.query, args.meta_batch, seed=args.seed)
    images = batch.num_tasks * (batch.support_x.shape[1] + batch.query_x.shape[1])
    try:
        load = os.getloadavg()
    except OSError:
        load = None
    print(f"torch {torch.__version__}, threads {threads}, python {platform.python_version()}, "
          f"cpus {os.cpu_count()}, load average {load}")
    warn_if_loaded(threads)
    print(f"{args.ways}-way {args.shots}-shot, {args.query} query/class, meta-batch {args.meta_batch}, "
          f"inner steps {args.inner_steps}, inner lr {args.inner_lr}; support {tuple(batch.support_x.shape)}, "
          f"query {tuple(batch.query_x.shape)}; {args.warmup} warm-up + {args.iters} timed steps each")

    model = make_model(args.ways, args.seed)
    initial_state = {k: v.clone() for k, v in model.state_dict().items()}
    impls = {
        "metalearn (vmap)": lambda fo: vmapped_step(model, batch, fo, args.inner_lr, args.inner_steps),
        "loop (autograd.grad)": lambda fo: loop_step(model, batch, fo, args.inner_lr, args.inner_steps),
    }

    peers = {}
    for peer_model in (args.peer_models if args.peer_python else []):
        print(f"running {PEER_ROWS[peer_model]} under {args.peer_python} ...", flush=True)
        peer = peers[peer_model] = run_peer(args.peer_python, peer_model, model, batch, args, threads)
        print(f"  peer: torch {peer['torch']}, learn2learn {peer['learn2learn']}, threads {peer['threads']}, "
              f"python {peer['python']}, model {peer['model_source']}")
        if peer["threads"] != threads:
            print(f"  WARNING: peer ran with {peer['threads']} threads, this process with {threads}")

    # Correctness first: every implementation's meta-gradient from the same weights and batch.
    checks = {}
    for order in args.orders:
        fo = ORDERS[order]
        reference = meta_gradient(model, impls["metalearn (vmap)"](fo))
        checks[f"loop vs metalearn ({order})"] = relative_difference(
            reference, meta_gradient(model, impls["loop (autograd.grad)"](fo)))
        for peer_model, peer in peers.items():
            checks[f"{PEER_ROWS[peer_model]} vs metalearn ({order})"] = relative_difference(
                reference, peer["grads"][order])
    print("meta-gradient agreement, max|diff| / max|grad| (should be ~1e-6 or less):")
    for name, value in checks.items():
        print(f"  {name}: {value:.2e}")
    assert all(v < 1e-4 for v in checks.values()), "implementations disagree on the meta-gradient"
    assert model.state_dict().keys() == initial_state.keys()

    # In-process rows timed round-robin (robust to load drift); learn2learn ran above, alone.
    limit_name = f"limit: plain fwd+bwd of {images} images"
    steps = {(name, order): build(ORDERS[order]) for order in args.orders for name, build in impls.items()}
    steps[(limit_name, "none")] = limit_step(model, batch)
    print(f"timing {len(steps)} in-process variants round-robin ...", flush=True)
    times = time_steps_interleaved(steps, model, args.iters, args.warmup)
    rows = []
    for order in args.orders:
        rows += [summarize(name, order, times[(name, order)], args.meta_batch) for name in impls]
        for peer_model, peer in peers.items():
            rows.append(summarize(PEER_ROWS[peer_model], order, peer["times_ms"][order], args.meta_batch,
                                  torch=peer["torch"], library=f"learn2learn {peer['learn2learn']}",
                                  model=peer["model_source"]))
    rows.append(summarize(limit_name, "none", times[(limit_name, "none")], args.meta_batch))
    for name, param in model.state_dict().items():  # nothing above may have changed the weights
        assert torch.equal(param, initial_state[name]), name

    table = markdown_table(rows)
    print()
    print(table)
    result = {
        "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "torch": torch.__version__, "threads": threads, "cpus": os.cpu_count(), "load_average": load,
        "peers": {m: {k: v for k, v in peer.items() if k not in ("grads", "times_ms")} for m, peer in peers.items()},
        "gradient_checks": checks,
        "rows": rows,
        "table": table,
    }
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2))
        print(f"\nwrote {args.json}")
    return result


if __name__ == "__main__":
    main()
