"""Time one MAML meta-step (forward + meta-gradient backward) several ways, in one run.

Omniglot-shaped N-way K-shot tasks in named configurations (``--configs``, default all of
``CONFIGS``: 5-way 1-shot with 1 query image per class, meta-batch 32, 1 inner step at lr 0.4;
20-way 1-shot and 20-way 5-shot (5 queries), meta-batch 16, 5 inner steps at lr 0.1; and
MAML++'s preset at 20-way 1-shot), ``metalearn.models.Conv4(1, ways)`` (stride version; its batch
norm is ``BatchStatNorm``: batch statistics, no running ones) or ``conv4-mamlpp``, second- and
first-order; ``--ways`` etc. time one configuration of your own. Rows:

  (a) metalearn   -- ``MAML(model, MAML.Config(...)).meta_loss(batch)`` then ``backward()``:
                     the whole meta-batch at once, through the network's task-batched forward
                     (``Conv4.forward_tasks``: tasks folded into grouped convolutions), else
                     under ``torch.func.vmap``;
  (b) loop        -- the same model, a Python loop over tasks: ``functional_call`` +
                     ``torch.autograd.grad(create_graph=not first_order)`` per task, the query
                     losses summed, divided by the number of tasks, one ``backward()``;
  (c) learn2learn -- learn2learn 0.2.0's ``MAML(model, lr, first_order).clone()`` /
                     ``adapt(loss)`` per task (the library's own Omniglot example), in a separate
                     interpreter (``--peer-python``; see ``benchmarks/_l2l_step.py``), with the
                     same Conv4 and, as a second row, the same network with nn.BatchNorm2d;
  (d) limit       -- no adaptation at all: one forward + backward of the same
                     tasks * ways * (shots + query) images through one shared set of weights.

  (f) metalearn --task-chunk 1 -- the Trainer's chunk loop (``meta_gradient(..., task_chunk=1)``):
                     each task on its own, a backward per task (``--extra-rows chunk1``, default).
  (g) metalearn, vmap path -- (a) forced onto ``vmap``, the path of a network without a
                     task-batched forward (``--extra-rows vmap``, default): what
                     ``Conv4.forward_tasks`` saves.
  (h) metalearn, task-batched path -- (a) forced onto ``Conv4.forward_tasks`` also at second
                     order over several tasks, where MAML keeps vmap (``--extra-rows batched``).
  (i) metalearn, CUDA graph -- (a) captured once in a CUDA graph and replayed: what removing
                     the launches saves (``--extra-rows graph``, GPU only; a capture that fails
                     is reported and the row left out).

``--clock cpu`` times each step's CPU time (``time.process_time``, in the peer too) instead of
the elapsed time: less sensitive to other processes on a shared machine (with ``--threads 1``).

What is differentiated only once ((a) and (b) first order, (d)) runs its batch norm with torch's
native kernel (``first_order_batch_norm``), as metalearn does.

Only the meta-step is timed: no sampling (one fixed synthetic batch), no optimizer step;
gradients are reset to None between steps, outside the timed region. The in-process rows are
timed round-robin with learn2learn's (one step of each per round, in a new shuffled order every
round), so load changes hit all alike. Speed-ups are against the faster learn2learn row.
Before timing, the meta-gradients of (a), (b) and (c) are computed in float64 from the same
weights and batch and must agree to ~1e-12, so the rows measure the same computation; each
one's float32 error against that is printed too.

    python benchmarks/maml_step.py --iters 20 --peer-python ~/peer-venv/bin/python \
        --json benchmarks/results/maml_step_2threads.json

``--device cuda`` times the rows on a GPU, learn2learn's on the same device, each step from an
idle device to its last finished kernel. Where learn2learn cannot be installed (a GPU machine
without internet), ``--peer-on-project-torch DIR`` runs it from its bare source in DIR
(``scripts/gpu-vs-learn2learn.sh``).

``--mamlpp`` adds a row (e), timed in the same rounds: metalearn's MAML with every MAML++ part
that changes a meta-step (learned per-step step sizes, the multi-step loss, per-step batch-norm
scales and offsets and running statistics, with their update; batch-norm sets meta-learned
only, as in the preset) on a copy of the same Conv4 with the same inner steps, so that its
difference from row (a) is the cost of those parts. (The preset's own network, max-pooling
conv4-mamlpp, costs more than the strided Conv4 on its own.) It is a different computation, so
it is left out of the gradient check; learn2learn has no row for it (its MetaBatchNorm is
per-step, but its MAML has no multi-step loss or running-statistics update to run it the same).

    python benchmarks/maml_step.py --ways 20 --meta-batch 8 --inner-steps 5 --inner-lr 0.1 --mamlpp

``--mamlpp-parts`` adds, beside row (e), MAML++ without each of its parts (LSLR, MSL, BNWB,
BNRS): a part's cost is its row's saving against (e) (docs/performance.md, "What each part
costs").
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import os
import platform
import random
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
import metalearn.runtime
from metalearn import MAML, TaskBatch
from metalearn.models import Conv4, build_model
from metalearn.models.norm import first_order_batch_norm

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


def make_model(ways: int = 5, seed: int = 0, network: str = "conv4") -> Conv4:
    """``network``: "conv4" (MAML's strided Conv4) or "conv4-mamlpp" (MAML++'s max-pooling one);
    batch norm on batch statistics (BatchStatNorm)."""
    torch.manual_seed(seed)
    return build_model(network, (1, 28, 28), ways)


# Named configurations: the papers' Omniglot settings. "maml++20w1s" is the preset's (``metalearn
# train maml --preset maml++ --ways 20 --shots 1``: its network, meta-batch 8, 5 inner steps) with
# row (e), MAML++, beside plain MAML on the same network.
CONFIGS = {
    "5w1s": {"ways": 5, "shots": 1, "query": 1, "meta_batch": 32, "inner_steps": 1, "inner_lr": 0.4},
    "20w1s": {"ways": 20, "shots": 1, "query": 1, "meta_batch": 16, "inner_steps": 5, "inner_lr": 0.1},
    "20w5s": {"ways": 20, "shots": 5, "query": 5, "meta_batch": 16, "inner_steps": 5, "inner_lr": 0.1},
    "maml++20w1s": {"ways": 20, "shots": 1, "query": 1, "meta_batch": 8, "inner_steps": 5, "inner_lr": 0.1,
                    "network": "conv4-mamlpp", "mamlpp": True},
}
CUSTOM = {"ways": 5, "shots": 1, "query": 1, "meta_batch": 32, "inner_steps": 1, "inner_lr": 0.4,
          "network": "conv4"}  # the defaults of --ways etc. (which select the "custom" configuration)


# -- the meta-steps (each returns a closure: one forward + backward into .grad) ----------------

def metalearn_step(model: nn.Module, batch: TaskBatch, first_order: bool, inner_lr: float = 0.4,
                   inner_steps: int = 1, vmap_path: bool = False, batched_path: bool = False) -> Callable[[], None]:
    """(a) metalearn's MAML on the whole meta-batch: through the network's task-batched forward
    (``Conv4.forward_tasks``), or with ``vmap_path`` (row (g)) through ``vmap``, the path of a
    network without one, or with ``batched_path`` (row (h)) through the task-batched path at
    either order."""
    maml = MAML(model, MAML.Config(inner_lr=inner_lr, inner_steps=inner_steps, first_order=first_order))
    if vmap_path:
        maml._tasks_batched_by_model = lambda: False
    if batched_path:  # also where meta_loss leaves it to vmap (second order over several tasks)
        def step():
            loss, _ = maml._meta_loss_tasks_batched(batch, maml.step_weights())
            loss.backward()

        return step

    def step():
        loss, _ = maml.meta_loss(batch)
        loss.backward()

    return step


# MAML++'s parts that change a meta-step, as MAML.Config fields; ``--mamlpp-parts`` times the
# full configuration without each one (BNRS is the running statistics and their update)
MAMLPP_PARTS = {"LSLR": "learn_inner_lr", "MSL": "multi_step_loss", "BNWB": "per_step_bn_weights",
                "BNRS": "per_step_bn_statistics"}
MAMLPP_ROW = "metalearn MAML++ (vmap)"


def mamlpp_step(model: nn.Module, batch: TaskBatch, first_order: bool, inner_lr: float = 0.4,
                inner_steps: int = 1, without: str | None = None) -> Callable[[], None]:
    """(e) MAML++'s meta-step: a copy of ``model`` made per-step, every part on (but ``without``,
    a key of :data:`MAMLPP_PARTS`), the running statistics' update included (one process:
    ``World()``)."""
    from metalearn.distributed import World

    parts = {field: field != MAMLPP_PARTS.get(without) for field in MAMLPP_PARTS.values()}
    maml = MAML(copy.deepcopy(model), MAML.Config(
        inner_lr=inner_lr, inner_steps=inner_steps, first_order=first_order, adapt_norm=False, **parts))

    def step():
        maml.zero_grad(set_to_none=True)
        loss, _ = maml.meta_loss(batch)
        loss.backward()
        maml.end_step(World())

    return step


CHUNK1_ROW = "metalearn --task-chunk 1"
VMAP_ROW = "metalearn, vmap path"
BATCHED_ROW = "metalearn, task-batched path"


def chunked_step(model: nn.Module, batch: TaskBatch, first_order: bool, inner_lr: float = 0.4,
                 inner_steps: int = 1, chunk: int = 1) -> Callable[[], None]:
    """(f) metalearn's MAML in chunks of ``chunk`` tasks, a backward per chunk, as the Trainer runs
    ``--task-chunk``; a chunk of one task runs without vmap (native batch norm at both orders)."""
    from metalearn.training import meta_gradient

    maml = MAML(model, MAML.Config(inner_lr=inner_lr, inner_steps=inner_steps, first_order=first_order))

    def step():
        meta_gradient(maml, batch, chunk)

    return step


def loop_step(model: nn.Module, batch: TaskBatch, first_order: bool, inner_lr: float = 0.4,
              inner_steps: int = 1) -> Callable[[], None]:
    """(b) the usual per-task Python loop: functional_call + autograd.grad, losses summed / T."""
    names = [name for name, _ in model.named_parameters()]
    tasks = batch.num_tasks

    def step():
        # differentiated once when first order: the native batch norm, as metalearn uses it
        with first_order_batch_norm() if first_order else contextlib.nullcontext():
            loop_body()

    def loop_body():
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


GRAPH_ROW = "metalearn (whole batch), CUDA graph"
EXTRA_ROWS = ("chunk1", "vmap", "batched", "graph")  # --extra-rows: rows (f), (g), (h) and the CUDA graph


def graphed_step(step: Callable[[], None], model: nn.Module, warmup: int = 3) -> Callable[[], None]:
    """(i) ``step`` (row (a)) captured once in a CUDA graph, then replayed: the same kernels
    without Python, the dispatcher and the kernel launches between them, which is what the
    step would gain if it is launch-bound (``--extra-rows graph``, GPU only). The batch is fixed,
    so the captured step is the whole computation. Warm-up runs on a side stream before the
    capture, as ``torch.cuda.graph`` asks. The gradients are the graph's own tensors: each
    replay rewrites them and sets them as the parameters' ``.grad`` again (the timing loop sets
    ``.grad`` to None between steps). Raises what the capture raises, e.g. for an operation
    that waits for the host."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(warmup):
            model.zero_grad(set_to_none=True)
            step()
    torch.cuda.current_stream().wait_stream(side)
    model.zero_grad(set_to_none=True)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    grads = {name: p.grad for name, p in model.named_parameters()}

    def replay():
        graph.replay()
        for name, p in model.named_parameters():
            p.grad = grads[name]

    return replay


def limit_step(model: nn.Module, batch: TaskBatch) -> Callable[[], None]:
    """(d) no adaptation: one forward + backward of all the batch's images, shared weights."""
    image_shape = batch.support_x.shape[2:]
    x = torch.cat([batch.support_x.reshape(-1, *image_shape), batch.query_x.reshape(-1, *image_shape)])
    y = torch.cat([batch.support_y.reshape(-1), batch.query_y.reshape(-1)])

    def step():
        with first_order_batch_norm():  # one derivative: the fast native batch norm
            F.cross_entropy(model(x), y).backward()

    return step


# -- timing -------------------------------------------------------------------------------------

def time_step(step: Callable[[], None], model: nn.Module, iters: int = 20, warmup: int = 3) -> list[float]:
    """Milliseconds of each of ``iters`` calls of ``step`` after ``warmup`` untimed ones;
    gradients are set to None before every call, outside the timed region."""
    return time_steps_interleaved({"step": step}, model, iters, warmup)["step"]


def checked_device(parser: argparse.ArgumentParser, text: str) -> torch.device:
    """``--device``'s value as a device this torch can use, or the parser's one-line error (a CUDA
    device on a build or machine without one, an index past the last GPU, a name torch does not
    know). Called after parsing, so that a documented GPU command still parses on a CPU."""
    try:
        device = torch.device(text)
    except RuntimeError as err:
        parser.error(f"--device {text}: {str(err).splitlines()[0]}")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            parser.error(f"--device {text}: this torch ({torch.__version__}) sees no CUDA GPU")
        if device.index is not None and device.index >= torch.cuda.device_count():
            parser.error(f"--device {text}: only {torch.cuda.device_count()} CUDA GPU(s) here")
    elif device.type != "cpu":
        parser.error(f"--device {text}: takes cpu, cuda or cuda:N")
    return device


def select_gpu_kernels(device: torch.device, kernels: str) -> None:
    """``--gpu-kernels``: "reproducible" (what metalearn runs on a GPU: full float32, deterministic
    cuDNN) or "fast" (torch's defaults); nothing to choose on the CPU."""
    if device.type == "cuda" and kernels == "reproducible":
        metalearn.runtime.configure_gpu_kernels()


def synchronize(device: torch.device) -> None:
    """Wait for the GPU's queued work, so a step's time includes its kernels, not only their launch."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}  # --clock


def time_steps_interleaved(steps: dict, model: nn.Module, iters: int = 20, warmup: int = 3,
                           clock: str = "wall") -> dict:
    """Like :func:`time_step` for several steps at once, run round-robin (one call of each per
    round, in a shuffled order) so that a change in machine load affects them all alike. A step
    that returns a number (the learn2learn peer) reports its own milliseconds, measured in its
    process. On a GPU each step is timed from an idle device until its last kernel has finished."""
    device = next(model.parameters()).device
    times = {name: [] for name in steps}
    order = random.Random(0)  # a new order every round: no row always runs after the same one
    for i in range(warmup + iters):
        names = list(steps)
        order.shuffle(names)
        for name in names:
            step = steps[name]
            model.zero_grad(set_to_none=True)
            synchronize(device)
            start = CLOCKS[clock]()
            reported = step()
            synchronize(device)
            elapsed = (CLOCKS[clock]() - start) * 1e3
            if i >= warmup:
                times[name].append(float(reported) if reported is not None else elapsed)
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


def cpu_description() -> str:
    """The processor and the vector instructions torch's kernels use on it, e.g. "AMD EPYC
    (torch kernels: AVX2)". Recorded with every timing: the machines a session gets differ
    (docs/performance.md: the same step on two of them)."""
    name = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{name} (torch kernels: {torch.backends.cpu.get_cpu_capability()})"


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
    times = time_step(metalearn_step(model, batch, first_order, inner_lr, inner_steps), model, iters, warmup)
    return summarize("metalearn (whole batch)", "first" if first_order else "second", times, batch.num_tasks)


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


class Peer:
    """learn2learn's meta-step in the peer interpreter (``_l2l_step.py``), driven over its
    stdin/stdout so its steps can be timed round-robin with the in-process ones. Uses the same
    weights and batch, with metalearn's Conv4 (``peer_model="metalearn"``) or the same network
    with nn.BatchNorm2d (``"native"``). ``info``: its torch/learn2learn versions and threads."""

    def __init__(self, peer_python: str, peer_model: str, model: nn.Module, batch: TaskBatch, args,
                 threads: int, workdir: Path):
        self.workdir, self.name = workdir, peer_model
        inputs = workdir / f"inputs-{peer_model}.pt"
        torch.save({  # on the CPU: the peer moves them to --device itself
            "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
            "support_x": batch.support_x.cpu(), "support_y": batch.support_y.cpu(),
            "query_x": batch.query_x.cpu(), "query_y": batch.query_y.cpu(),
        }, inputs)
        launcher = [peer_python] if not args.peer_on_project_torch else [
            sys.executable, str(HERE / "_peer_on_project_torch.py"), args.peer_on_project_torch]
        command = [
            *launcher, str(PEER_SCRIPT), "--inputs", str(inputs), "--ways", str(batch.ways),
            "--inner-lr", str(args.inner_lr), "--inner-steps", str(args.inner_steps),
            "--threads", str(threads), "--model", peer_model, "--network", args.network,
            "--metalearn-src", str(Path(metalearn.__file__).resolve().parents[1]),
            "--device", args.device, "--gpu-kernels", args.gpu_kernels,
        ]
        env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
        if args.tuned_allocator:  # glibc reads these at start-up: the same setting as tune_allocator()
            env.update(MALLOC_MMAP_THRESHOLD_=str(2**30), MALLOC_TRIM_THRESHOLD_=str(2**31 - 1))
        self.stderr = open(workdir / f"peer-{peer_model}.err", "w+")
        self.proc = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=self.stderr, text=True, env=env)
        self.info = self._read()

    def _read(self) -> dict:
        for line in self.proc.stdout:
            if line.startswith("@@"):
                return json.loads(line[2:])
        self.proc.wait()
        self.stderr.seek(0)
        raise RuntimeError(f"learn2learn peer ({self.name}) exited with {self.proc.returncode}:\n"
                           f"{self.stderr.read()[-4000:]}")

    def _ask(self, **request) -> dict:
        self.proc.stdin.write(json.dumps(request) + "\n")
        self.proc.stdin.flush()
        return self._read()

    def meta_gradient(self, order: str, dtype: str = "float32") -> dict[str, Tensor]:
        path = self.workdir / f"grads-{self.name}-{order}-{dtype}.pt"
        self._ask(cmd="grads", order=order, dtype=dtype, path=str(path))
        return torch.load(path, weights_only=True)

    def convolution_calls(self, order: str) -> list[dict]:
        """The convolution calls of one of the peer's meta-steps (``_conv_calls.record``)."""
        path = self.workdir / f"convs-{self.name}-{order}.json"
        self._ask(cmd="convs", order=order, path=str(path))
        return json.loads(path.read_text())

    def step(self, order: str, clock: str = "wall") -> Callable[[], float]:
        """One meta-step in the peer; returns the milliseconds the peer measured around it."""
        return lambda: self._ask(cmd="step", order=order, clock=clock)["ms"]

    def close(self) -> None:
        """End the peer; it checks its weights were never changed, so a failure raises here."""
        self.proc.stdin.close()
        self.proc.stdout.read()
        code = self.proc.wait()
        self.stderr.seek(0)
        errors = self.stderr.read()
        self.stderr.close()
        if code != 0:
            raise RuntimeError(f"learn2learn peer ({self.name}) exited with {code}:\n{errors[-4000:]}")


def check_gradients(model: nn.Module, batch: TaskBatch, impls: dict, peers: dict, args) -> tuple[dict, dict]:
    """Correctness before timing. In float64 every implementation's meta-gradient, from the same
    weights and batch, must equal metalearn's to ~1e-12 (asserted): they compute the same thing.
    Also returned, for information: each one's float32 meta-gradient against that float64 one.
    (float32 errors can reach 1e-3 or more: with batch norm on 5 images a task can be
    ill-conditioned, and the first conv's weight gradient then depends on the summation order
    of the kernel that computes it, which differs between the batched and per-task code.)"""
    model64 = copy.deepcopy(model).double()
    batch64 = TaskBatch(batch.support_x.double(), batch.support_y, batch.query_x.double(), batch.query_y,
                        ways=batch.ways)
    builders64 = {
        "metalearn (whole batch)": lambda fo: metalearn_step(model64, batch64, fo, args.inner_lr, args.inner_steps),
        "loop (autograd.grad)": lambda fo: loop_step(model64, batch64, fo, args.inner_lr, args.inner_steps),
    }
    checks, errors = {}, {}
    for order in args.orders:
        fo = ORDERS[order]
        reference = meta_gradient(model64, builders64["metalearn (whole batch)"](fo))
        grads64 = {"loop (autograd.grad)": meta_gradient(model64, builders64["loop (autograd.grad)"](fo))}
        grads32 = {name: meta_gradient(model, build(fo)) for name, build in impls.items()}
        device = next(model.parameters()).device  # the peer's come back on the CPU
        for peer_model, peer in peers.items():
            grads64[PEER_ROWS[peer_model]] = {k: v.to(device) for k, v in peer.meta_gradient(order, "float64").items()}
            grads32[PEER_ROWS[peer_model]] = {k: v.to(device) for k, v in peer.meta_gradient(order, "float32").items()}
        for name, grads in grads64.items():
            checks[f"{name} vs metalearn, {order} order"] = relative_difference(reference, grads)
        for name, grads in grads32.items():
            errors[f"{name}, {order} order"] = relative_difference(
                reference, {k: v.double() for k, v in grads.items()})
    print("meta-gradients in float64, max|diff| / max|grad| against metalearn's (must be ~1e-12):")
    for name, value in checks.items():
        print(f"  {name}: {value:.1e}")
    print("float32 meta-gradients against the float64 one (rounding; information only):")
    for name, value in errors.items():
        print(f"  {name}: {value:.1e}")
    assert all(v < 1e-9 for v in checks.values()), "implementations disagree on the meta-gradient"
    return checks, errors


# -- report -------------------------------------------------------------------------------------

def speedup(reference: dict | None, row: dict) -> str:
    if reference is None:
        return "n/a"
    return f"{reference['median_ms'] / row['median_ms']:.2f}x"


def fastest_peer(rows: list[dict], order: str) -> dict | None:
    """The faster learn2learn row of ``order`` (the network as metalearn builds it, or with
    ``nn.BatchNorm2d`` as a learn2learn user writes it): speed-ups are quoted against the
    best that learn2learn does."""
    peers = [r for r in rows if r["order"] == order and r["implementation"] in PEER_ROWS.values()]
    return min(peers, key=lambda r: r["median_ms"]) if peers else None


def markdown_table(rows: list[dict]) -> str:
    by_key = {(r["implementation"], r["order"]): r for r in rows}
    lines = [
        "| implementation | order | ms/step (median) | ms/step (mean) | tasks/s | speed-up vs faster learn2learn row "
        "| speed-up vs loop |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    orders = [o for o in ORDERS if any(r["order"] == o for r in rows)]
    for row in rows:
        if row["order"] == "none":  # the limit: one measurement, compared with each order
            l2l = " / ".join(f"{speedup(fastest_peer(rows, o), row)} ({o[:3]})" for o in orders)
            loop = " / ".join(f"{speedup(by_key.get(('loop (autograd.grad)', o)), row)} ({o[:3]})" for o in orders)
        else:
            l2l = speedup(fastest_peer(rows, row["order"]), row)
            loop = speedup(by_key.get(("loop (autograd.grad)", row["order"])), row)
        lines.append(f"| {row['implementation']} | {row['order']} | {row['median_ms']:.1f} | "
                     f"{row['mean_ms']:.1f} | {row['tasks_per_s']:.0f} | {l2l} | {loop} |")
    return "\n".join(lines)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--configs", default=",".join(CONFIGS),
                   help=f"comma-separated named configurations, timed one after another: "
                        f"{', '.join(CONFIGS)} (see CONFIGS); any of --ways ... --network instead times that one "
                        f"configuration (the others' defaults: {CUSTOM})")
    p.add_argument("--ways", type=int, default=None)
    p.add_argument("--shots", type=int, default=None)
    p.add_argument("--query", type=int, default=None, help="query images per class")
    p.add_argument("--meta-batch", type=int, default=None, help="tasks per meta-step")
    p.add_argument("--inner-steps", type=int, default=None)
    p.add_argument("--inner-lr", type=float, default=None)
    p.add_argument("--network", default=None, choices=("conv4", "conv4-mamlpp"))
    p.add_argument("--iters", type=int, default=20, help="timed meta-steps per implementation")
    p.add_argument("--warmup", type=int, default=3, help="untimed meta-steps first")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own)")
    p.add_argument("--orders", default="second,first", help="comma-separated: second, first")
    p.add_argument("--peer-python", default=None,
                   help="interpreter of a venv with learn2learn 0.2.0, e.g. ~/peer-venv/bin/python")
    p.add_argument("--peer-on-project-torch", default=None, metavar="PEER_SITE_PACKAGES",
                   help="run learn2learn from this site-packages folder of the peer venv on this "
                        "interpreter's torch (the same build as the other rows) instead of --peer-python's")
    p.add_argument("--peer-models", default="metalearn,native",
                   help="learn2learn rows: 'metalearn' = metalearn's Conv4 (BatchStatNorm), the same "
                        "model as the other rows; 'native' = the same network with nn.BatchNorm2d")
    p.add_argument("--mamlpp", action="store_true",
                   help="add row (e): MAML++ (every part that changes a meta-step) on the same network, in every "
                        "configuration (maml++20w1s always has it)")
    p.add_argument("--mamlpp-parts", action="store_true",
                   help="with row (e), rows of MAML++ without each of its parts (LSLR, MSL, BNWB, BNRS): "
                        "what each part costs is its row's saving against (e)")
    p.add_argument("--extra-rows", default="chunk1,vmap",
                   help="comma-separated: chunk1 = row (f), metalearn with --task-chunk 1; vmap = row (g), "
                        "metalearn forced onto the vmap path; batched = row (h), forced onto the "
                        "task-batched path; graph = row (a) captured in a CUDA graph (--device cuda only) "
                        "(empty: none)")
    p.add_argument("--no-check", dest="check", action="store_false",
                   help="skip the float64 agreement check before timing (it costs about a dozen steps)")
    p.add_argument("--clock", choices=tuple(CLOCKS), default="wall",
                   help="wall: elapsed time; cpu: the process's CPU time (time.process_time, also in the peer), "
                        "less sensitive to other processes on the machine (use with --threads 1)")
    p.add_argument("--json", type=Path, default=None, help="write the results here")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (the learn2learn rows too)")
    p.add_argument("--gpu-kernels", choices=("reproducible", "fast"), default="reproducible",
                   help="reproducible: what metalearn runs (full float32, deterministic cuDNN); fast: torch's "
                        "defaults (TF32 convolutions, any cuDNN method)")
    p.add_argument("--tuned-allocator", action="store_true",
                   help="raise glibc's mmap/trim thresholds in every interpreter (what the metalearn command does)")
    args = p.parse_args(argv)
    args.mamlpp = args.mamlpp or args.mamlpp_parts
    given = {key: getattr(args, key) for key in CUSTOM if getattr(args, key) is not None}
    if given:
        args.configs = {"custom": {**CUSTOM, **given, "mamlpp": args.mamlpp}}
    else:
        names = [c.strip() for c in args.configs.split(",") if c.strip()]
        unknown = [c for c in names if c not in CONFIGS]
        if unknown or not names:
            p.error(f"--configs takes {', '.join(CONFIGS)}, got {args.configs!r}")
        args.configs = {name: {**CUSTOM, **{"mamlpp": args.mamlpp}, **CONFIGS[name]} for name in names}
    args.orders = [o.strip() for o in args.orders.split(",") if o.strip()]
    args.extra_rows = [r.strip() for r in args.extra_rows.split(",") if r.strip()]
    unknown_rows = [r for r in args.extra_rows if r not in EXTRA_ROWS]
    if unknown_rows:
        p.error(f"--extra-rows takes {', '.join(EXTRA_ROWS)} (comma-separated, or empty), got {', '.join(unknown_rows)}")
    args.peer_models = [m.strip() for m in args.peer_models.split(",") if m.strip()]
    if any(m not in PEER_ROWS for m in args.peer_models):
        p.error(f"--peer-models takes {', '.join(PEER_ROWS)}")
    bad = [o for o in args.orders if o not in ORDERS]
    if bad:
        p.error(f"unknown order(s) {bad}; use second and/or first")
    if args.iters < 1 or args.warmup < 0:
        p.error(f"--iters takes 1 or more and --warmup 0 or more, got {args.iters} and {args.warmup}")
    checked_device(p, args.device)
    if args.peer_on_project_torch:
        args.peer_python = args.peer_python or sys.executable  # rows and messages name the peer by it
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.tuned_allocator:
        from metalearn.runtime import tune_allocator

        print(f"allocator tuned: {tune_allocator()}")
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    results = {}
    for name, config in args.configs.items():
        print(f"\n== {name} ==")
        results[name] = run_config(argparse.Namespace(**{**vars(args), **config}))
    tables = "\n\n".join(f"{name}:\n\n{result['table']}" for name, result in results.items())
    print("\n" + tables)
    result = results[next(iter(results))] if len(results) == 1 else {
        "configs": results, "tables": tables, "torch": torch.__version__, "cpu": cpu_description()}
    if args.json:
        save_json(args.json, result)
    return result


def run_config(args) -> dict:
    """Time every row of one configuration (``args``: the options with the configuration's values)."""
    threads = torch.get_num_threads()
    device = torch.device(args.device)
    select_gpu_kernels(device, args.gpu_kernels)
    batch = make_batch(args.ways, args.shots, args.query, args.meta_batch, seed=args.seed).to(device)
    images = batch.num_tasks * (batch.support_x.shape[1] + batch.query_x.shape[1])
    try:
        load = os.getloadavg()
    except OSError:
        load = None
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else None
    print(f"torch {torch.__version__}, threads {threads}, python {platform.python_version()}, "
          f"cpus {os.cpu_count()} ({cpu_description()}), load average {load}, device {device}"
          + (f" ({gpu}, {args.gpu_kernels} kernels: TF32 convolutions "
             f"{'on' if torch.backends.cudnn.allow_tf32 else 'off'})" if gpu else ""))
    warn_if_loaded(threads)
    print(f"{args.ways}-way {args.shots}-shot, {args.query} query/class, meta-batch {args.meta_batch}, "
          f"inner steps {args.inner_steps}, inner lr {args.inner_lr}, network {args.network}; support "
          f"{tuple(batch.support_x.shape)}, query {tuple(batch.query_x.shape)}; {args.warmup} warm-up + "
          f"{args.iters} timed steps each")

    model = make_model(args.ways, args.seed, args.network).to(device)
    initial_state = {k: v.clone() for k, v in model.state_dict().items()}
    impls = {
        "metalearn (whole batch)": lambda fo: metalearn_step(model, batch, fo, args.inner_lr, args.inner_steps),
        "loop (autograd.grad)": lambda fo: loop_step(model, batch, fo, args.inner_lr, args.inner_steps),
    }

    with tempfile.TemporaryDirectory(prefix="maml_step_") as workdir:
        peers = {}
        try:
            for peer_model in (args.peer_models if args.peer_python else []):
                print(f"starting {PEER_ROWS[peer_model]} under {args.peer_python} ...", flush=True)
                peer = peers[peer_model] = Peer(args.peer_python, peer_model, model, batch, args, threads,
                                                Path(workdir))
                info = peer.info
                print(f"  peer: torch {info['torch']}, learn2learn {info['learn2learn']}, threads "
                      f"{info['threads']}, python {info['python']}, model {info['model_source']}")
                if info["threads"] != threads:
                    print(f"  WARNING: peer runs with {info['threads']} threads, this process with {threads}")

            checks, float32_errors = check_gradients(model, batch, impls, peers, args) if args.check else ({}, {})

            # All rows timed round-robin, one step of each per round (robust to load drift).
            limit_name = f"limit: plain fwd+bwd of {images} images"
            steps = {}
            for order in args.orders:
                for name, build in impls.items():
                    steps[(name, order)] = build(ORDERS[order])
                if "batched" in args.extra_rows:
                    steps[(BATCHED_ROW, order)] = metalearn_step(model, batch, ORDERS[order], args.inner_lr,
                                                                 args.inner_steps, batched_path=True)
                if "vmap" in args.extra_rows:
                    steps[(VMAP_ROW, order)] = metalearn_step(model, batch, ORDERS[order], args.inner_lr,
                                                              args.inner_steps, vmap_path=True)
                if "graph" in args.extra_rows and device.type != "cuda":
                    print(f"--extra-rows graph: no CUDA graph on {device}, row left out")
                if "graph" in args.extra_rows and device.type == "cuda":
                    try:
                        replay = graphed_step(impls["metalearn (whole batch)"](ORDERS[order]), model)
                        eager = meta_gradient(model, impls["metalearn (whole batch)"](ORDERS[order]))
                        difference = relative_difference(eager, meta_gradient(model, replay))
                        print(f"CUDA graph of row (a), {order} order: meta-gradient against the eager "
                              f"step's, max|diff| / max|grad| {difference:.1e}")
                        steps[(GRAPH_ROW, order)] = replay
                    except Exception as err:  # reported, not fatal: the other rows are still timed
                        print(f"CUDA graph of row (a), {order} order: capture failed: "
                              f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}")
                if "chunk1" in args.extra_rows:
                    steps[(CHUNK1_ROW, order)] = chunked_step(model, batch, ORDERS[order], args.inner_lr,
                                                              args.inner_steps, 1)
                if args.mamlpp:
                    steps[(MAMLPP_ROW, order)] = mamlpp_step(model, batch, ORDERS[order], args.inner_lr,
                                                             args.inner_steps)
                for part in MAMLPP_PARTS if args.mamlpp_parts else ():
                    steps[(f"{MAMLPP_ROW} without {part}", order)] = mamlpp_step(
                        model, batch, ORDERS[order], args.inner_lr, args.inner_steps, without=part)
                for peer_model, peer in peers.items():
                    steps[(PEER_ROWS[peer_model], order)] = peer.step(order, args.clock)
            steps[(limit_name, "none")] = limit_step(model, batch)
            print(f"timing {len(steps)} variants round-robin, {args.warmup} + {args.iters} rounds ...", flush=True)
            times = time_steps_interleaved(steps, model, args.iters, args.warmup, args.clock)
        finally:
            for peer in peers.values():
                peer.close()
    rows = []
    for (name, order), measured in times.items():
        extra = {}
        for peer_model, peer in peers.items():
            if name == PEER_ROWS[peer_model]:
                extra = {"torch": peer.info["torch"], "library": f"learn2learn {peer.info['learn2learn']}",
                         "model": peer.info["model_source"]}
        rows.append(summarize(name, order, measured, args.meta_batch, **extra))
    for name, param in model.state_dict().items():  # nothing above may have changed the weights
        assert torch.equal(param, initial_state[name]), name

    table = markdown_table(rows)
    try:
        load_after = os.getloadavg()  # includes this script's own threads
    except OSError:
        load_after = None
    result = {
        "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if k != "configs"},
        "torch": torch.__version__, "threads": threads, "cpus": os.cpu_count(), "cpu": cpu_description(),
        "load_average": load, "load_average_after": load_after,
        "device": str(device), "gpu": gpu, "gpu_kernels": args.gpu_kernels if gpu else None,
        "peers": {m: peer.info for m, peer in peers.items()},
        "gradient_checks_float64": checks,
        "float32_error_vs_float64": float32_errors,
        "rows": rows,
        "table": table,
    }
    return result


def save_json(path: Path, result: dict) -> None:
    """Write a benchmark's result as JSON, so a documented figure can name the file it came from."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2))
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
