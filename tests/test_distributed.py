"""torch.distributed (gloo over loopback, 2 CPU processes): the same update as one process."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from checkpoints import assert_same_weights, weights
from launching import env, launch, metalearn
from metalearn import runs
from metalearn.runs import RunDir

SINUSOID = ["maml", "--dataset", "sinusoid", "--meta-batch-size", "5", "--log-every", "1", "--val-every", "3",
            "--val-episodes", "6", "--checkpoint-every", "2", "--eval-episodes", "20", "--no-progress"]


def torchrun(args, tmp_path, nproc=2):
    return launch(["-m", "metalearn", "train", *map(str, args)], nproc)


def test_two_ranks_equal_one_process_and_share_evaluation(tmp_path):
    # meta-batch 5 over 2 ranks: shares of 3 and 2 tasks, weighted exactly; 75 test episodes are
    # two chunks (50 + 25), split 25/25 and 13/12: the scores come back in episode order
    args = SINUSOID + ["--steps", 6, "--eval-episodes", 75]
    single, double = tmp_path / "single", tmp_path / "double"
    metalearn(args + ["--run-dir", single], tmp_path)
    out2 = torchrun(args + ["--run-dir", double], tmp_path)
    assert_same_weights(single, double)
    assert out2.stdout.count("MSE") == 1  # only rank 0 reports
    evaluated = launch(["-m", "metalearn", "eval", str(double), "--no-progress"])
    assert evaluated.stdout.count("MSE") == evaluated.stdout.count("written to") == 1, evaluated.stdout
    e1 = json.loads((single / "eval.json").read_text())
    e2 = json.loads((double / "eval.json").read_text())
    assert e2["episodes"] == e1["episodes"] == 75  # episodes split across ranks, CI over all of them
    torch.testing.assert_close(torch.tensor(e2["scores"]), torch.tensor(e1["scores"]), rtol=1e-5, atol=1e-5)
    m1 = [r for r in RunDir(single).read_metrics() if "loss" in r]
    m2 = [r for r in RunDir(double).read_metrics() if "loss" in r]
    assert [r["step"] for r in m1] == [r["step"] for r in m2]  # rank 0 alone writes metrics
    for a, b in zip(m1, m2):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)


def test_two_ranks_equal_one_process_on_omniglot(tmp_path, omniglot_data_dir):
    # Plain SGD steps: Adam's first steps are lr * sign(gradient), so an entry whose gradient is
    # float32 rounding noise (a few Conv4 weights) would flip with the summation order.
    args = ["maml", "--dataset", "omniglot", "--ways", 3, "--shots", 1, "--meta-batch-size", 4, "--steps", 3,
            "--meta-optimizer", "sgd", "--meta-lr", 0.5,
            "--val-every", 0, "--no-eval", "--no-progress", "--data-dir", omniglot_data_dir]
    metalearn(args + ["--run-dir", tmp_path / "single"], tmp_path)
    torchrun(args + ["--run-dir", tmp_path / "double"], tmp_path)
    assert_same_weights(tmp_path / "single", tmp_path / "double")


def test_two_ranks_gather_maml_plus_plus_running_statistics_like_one_process(tmp_path, omniglot_data_dir):
    # MAML++'s per-step running statistics are averaged over every rank's tasks (shares of 2 and
    # 1 here), so the buffers, like the weights, equal one process's; validation uses them
    args = ["maml", "--dataset", "omniglot", "--ways", 3, "--shots", 1, "--meta-batch-size", 3, "--steps", 2,
            "--model", "conv4", "--inner-steps", 2, "--test-inner-steps", 2, "--learn-inner-lr",
            "--multi-step-loss", "--per-step-bn-weights", "--per-step-bn-statistics", "--no-adapt-norm",
            "--meta-optimizer", "sgd", "--meta-lr", 0.5, "--val-every", 1, "--val-episodes", 2,
            "--no-eval", "--no-progress", "--data-dir", omniglot_data_dir]
    metalearn(args + ["--run-dir", tmp_path / "single"], tmp_path)
    torchrun(args + ["--run-dir", tmp_path / "double"], tmp_path)
    # Tolerance: the rank with one task runs it outside vmap with torch's native batch norm,
    # which rounds its float32 statistics differently (~1e-6 relative on running variances ~1.3)
    assert_same_weights(tmp_path / "single", tmp_path / "double", atol=1e-5)
    statistics = weights(tmp_path / "double")["model.features.0.1.running_var"]
    assert statistics.shape == (2, 64) and not torch.equal(statistics, torch.ones_like(statistics))
    v1 = [r for r in RunDir(tmp_path / "single").read_metrics() if "val_accuracy" in r]
    v2 = [r for r in RunDir(tmp_path / "double").read_metrics() if "val_accuracy" in r]
    assert [r["val_accuracy"] for r in v1] == pytest.approx([r["val_accuracy"] for r in v2])


def test_two_ranks_equal_one_process_for_prototypical_networks(tmp_path, omniglot_data_dir):
    # Tolerance: the ranks embed 2 and 1 tasks where one process embeds 3, and the float32 conv
    # kernels round differently for those batch sizes; through batch norm over few images the
    # gradients then differ by ~1.5e-5 relative (measured), which three steps turn into ~1e-4, against updates of ~0.1.
    args = ["protonet", "--dataset", "omniglot", "--split", "vinyals", "--ways", 5, "--shots", 5, "--query", 5,
            "--meta-batch-size", 3, "--steps", 3, "--meta-optimizer", "sgd", "--meta-lr", 0.05, "--val-every", 0,
            "--no-eval", "--no-progress", "--data-dir", omniglot_data_dir]
    metalearn(args + ["--run-dir", tmp_path / "single"], tmp_path)
    torchrun(args + ["--run-dir", tmp_path / "double"], tmp_path)
    assert_same_weights(tmp_path / "single", tmp_path / "double", atol=5e-4)


def test_two_ranks_carry_reptiles_inner_adam_state_like_one_process(tmp_path):
    """The carried inner Adam state advances by every rank's tasks (``end_step``), so both the
    weights and the state in the checkpoint are those of one process (shares of 3 and 2 tasks)."""
    args = ["reptile", "--dataset", "sinusoid", "--meta-batch-size", 5, "--steps", 3, "--inner-optimizer", "adam",
            "--inner-lr", 0.01, "--inner-adam-state", "carried", "--val-every", 0, "--no-eval", "--no-progress"]
    metalearn(args + ["--run-dir", tmp_path / "single"], tmp_path)
    torchrun(args + ["--run-dir", tmp_path / "double"], tmp_path)
    assert_same_weights(tmp_path / "single", tmp_path / "double")
    state = weights(tmp_path / "double")
    assert int(state["carried_adam.steps"]) == 3 * 5 * 5  # steps x tasks x inner steps, all ranks' tasks


def test_resume_a_two_rank_checkpoint_on_one_rank(tmp_path):
    straight, mixed = tmp_path / "straight", tmp_path / "mixed"
    metalearn(SINUSOID + ["--steps", 8, "--no-eval", "--run-dir", straight], tmp_path)
    torchrun(SINUSOID + ["--steps", 4, "--no-eval", "--run-dir", mixed], tmp_path)
    metalearn(["maml", "--run-dir", mixed, "--resume", "--steps", 8, "--no-eval", "--no-progress"], tmp_path)
    assert_same_weights(straight, mixed)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_ranks(ranks: int, run_dir, args, dist_timeout_s: int = 120) -> list[subprocess.Popen]:
    """``ranks`` training processes of one job, started by hand (not torchrun) so that a test
    can signal or kill one of them."""
    port = free_port()
    procs = []
    for rank in range(ranks):
        rank_env = {**env(dist_timeout_s), "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(ranks),
                    "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
        procs.append(subprocess.Popen(
            [sys.executable, "-m", "metalearn", "train", *SINUSOID, *map(str, args), "--run-dir", str(run_dir)],
            env=rank_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    return procs


def test_a_dead_rank_stops_the_others_with_a_message(tmp_path):
    run_dir = tmp_path / "run"
    procs = start_ranks(2, run_dir, ["--steps", 100000, "--checkpoint-every", 5], dist_timeout_s=20)
    try:
        wait_for_step(run_dir, procs, 10)
        procs[1].send_signal(signal.SIGKILL)
        _, err = procs[0].communicate(timeout=90)
        assert procs[0].returncode == 2, err[-2000:]
        assert "lost contact with the other ranks" in err and "Traceback" not in err
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    state = RunDir(run_dir).read_checkpoint()  # the last good checkpoint survives
    assert state["step"] >= 5 and state["step"] % 5 == 0


def test_device_names_resolve_or_fail_clearly(monkeypatch):
    from metalearn.distributed import resolve_device
    from metalearn.errors import MetalearnError

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto") == torch.device("cpu")  # no GPU: the CPU
    with pytest.raises(MetalearnError, match="sees no GPU"):
        resolve_device("cuda")
    with pytest.raises(MetalearnError, match="^device must be"):
        resolve_device("tpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert resolve_device("cuda", local_rank=1) == torch.device("cuda:1")  # torchrun: the rank's GPU
    assert resolve_device("cuda:0", local_rank=1) == torch.device("cuda:0")
    with pytest.raises(MetalearnError, match="only 2 GPU"):
        resolve_device("cuda:5")


def test_one_gpu_for_every_rank_and_a_bad_timeout_are_refused_before_joining(monkeypatch):
    from metalearn.distributed import init_world
    from metalearn.errors import MetalearnError

    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(MetalearnError, match="^device='cuda:0' under torchrun would put all 2 ranks on one GPU"):
        init_world("cuda:0")
    for text in ("five minutes", "inf", "1e15"):  # inf and beyond a timedelta overflowed inside torch
        monkeypatch.setenv("METALEARN_DIST_TIMEOUT", text)
        with pytest.raises(MetalearnError, match="METALEARN_DIST_TIMEOUT must be a positive number"):
            init_world("cpu")


def test_a_process_group_that_cannot_form_is_one_line_not_a_traceback(tmp_path, monkeypatch):
    """WORLD_SIZE set without torchrun's other variables, or a second rank that never comes."""
    from metalearn.distributed import init_world
    from metalearn.errors import MetalearnError

    for name in ("RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(MetalearnError, match="could not join the process group of WORLD_SIZE=2 .*launch with torchrun"):
        init_world("cpu")
    with socket.socket() as free:
        free.bind(("127.0.0.1", 0))
        port = free.getsockname()[1]
    alone = {**env(dist_timeout_s=2), "WORLD_SIZE": "2", "RANK": "0", "LOCAL_RANK": "0",
             "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
    done = subprocess.run([sys.executable, "-m", "metalearn", "train", *SINUSOID, "--steps", "2",
                           "--run-dir", str(tmp_path / "run")], env=alone, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, done.stderr[-3000:]
    assert done.stderr.startswith("error: could not join the process group of WORLD_SIZE=2"), done.stderr
    assert "Traceback" not in done.stderr and len(done.stderr.strip().splitlines()) == 1, done.stderr
    # a rank whose master never comes: torch's C++ logs each failed try with its native stack
    done = subprocess.run([sys.executable, "-m", "metalearn", "train", *SINUSOID, "--steps", "2",
                           "--run-dir", str(tmp_path / "run1")], env={**alone, "RANK": "1", "LOCAL_RANK": "1"},
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, done.stderr[-3000:]
    assert done.stderr.startswith("error: could not join the process group of WORLD_SIZE=2"), done.stderr
    assert len(done.stderr.strip().splitlines()) == 1, done.stderr


def test_a_rank_waiting_for_its_group_says_so_once_and_a_quick_one_says_nothing(capfd, monkeypatch):
    from metalearn import distributed

    import threading

    monkeypatch.setattr(distributed, "WAITING_NOTE_AFTER_S", 0.2)
    timers = lambda: [t for t in threading.enumerate() if isinstance(t, threading.Timer) and t.is_alive()]
    with distributed._native_stack_dumps_dropped("rank 1 of 2: waiting for the process group at h:1"):
        os.write(2, b"frame #0: c10d stack line\n[c10d] a retry\n")
        deadline = time.monotonic() + 30
        while timers() and time.monotonic() < deadline:  # the note has been written once its timer ends
            time.sleep(0.05)
    assert capfd.readouterr().err == "rank 1 of 2: waiting for the process group at h:1\n[c10d] a retry\n"
    with distributed._native_stack_dumps_dropped("never shown"):
        pass
    time.sleep(0.4)
    assert capfd.readouterr().err == ""


def test_leaving_the_world_closes_the_process_group(tmp_path):
    # A rank that exits with its gloo group open can abort in C++ teardown (seen once in CI):
    # every command leaves its group first. A one-rank group stands in for a torchrun job.
    import torch.distributed as dist
    from metalearn.distributed import leave_world

    leave_world()  # no group: nothing to do
    dist.init_process_group("gloo", store=dist.FileStore(str(tmp_path / "store"), 1), rank=0, world_size=1)
    assert dist.is_initialized()
    leave_world(orderly=True)  # the barrier of one rank returns at once
    assert not dist.is_initialized()
    leave_world()  # and a second leave (the exit hook after the CLI's) is harmless


GATHER_WITH_AN_EMPTY_RANK = """
import sys, torch
from metalearn.distributed import init_world, leave_world
world = init_world("cpu")
# rank 0 scored three episodes over two steps; rank 1 none, so it knows no step count either
mine = torch.arange(6, dtype=torch.float64).view(3, 2) if world.rank == 0 else torch.zeros(0, 0, dtype=torch.float64)
gathered = world.gather(mine).tolist()
none = tuple(world.gather(torch.zeros(0, 0, dtype=torch.float64)).shape)
leave_world(orderly=True)
with open(f"{sys.argv[1]}/rank{world.rank}.txt", "w") as out:  # one file each: ranks' prints interleave
    out.write(f"{gathered} {none}")
"""


def test_gather_takes_a_rank_without_rows(tmp_path):
    run_script(GATHER_WITH_AN_EMPTY_RANK, tmp_path)
    for rank in range(2):  # every rank gets rank 0's rows, and an empty gather stays empty
        assert (tmp_path / f"rank{rank}.txt").read_text() == "[[0.0, 1.0], [2.0, 3.0], [4.0, 5.0]] (0, 0)"


def run_script(text: str, tmp_path) -> None:
    """``text`` as a Python script on two ranks started by torchrun; it gets ``tmp_path`` as its
    argument, to write into."""
    script = tmp_path / "rank.py"
    script.write_text(text)
    launch([str(script), str(tmp_path)])


RANK_THREADS_AFTER_LEAVING = """
import os, sys, torch
from metalearn.distributed import init_world, leave_world
world = init_world("cpu")
optimizer = torch.optim.Adam([torch.nn.Parameter(torch.ones(3))])  # as the Trainer does: imports torch._dynamo
world.sum(torch.ones(3))
leave_world(orderly=True)
names = [open(f"/proc/self/task/{t}/comm").read().strip() for t in os.listdir("/proc/self/task")]
with open(f"{sys.argv[1]}/rank{world.rank}.txt", "w") as out:
    out.write(" ".join(sorted(names)))
"""


@pytest.mark.skipif(not os.path.isdir("/proc/self/task"), reason="lists the threads in /proc (Linux)")
def test_leaving_the_world_ends_the_gloo_threads_even_after_an_optimizer_was_built(tmp_path):
    # The CI failure behind this: a rank's torch.optim imported torch._dynamo after the group
    # existed, which kept the group alive past destroy_process_group; its gloo threads then
    # ran into the interpreter's teardown, which aborted one rank in a few hundred runs.
    run_script(RANK_THREADS_AFTER_LEAVING, tmp_path)
    threads = [(tmp_path / f"rank{rank}.txt").read_text() for rank in range(2)]
    assert all(threads) and not any("gloo" in names for names in threads), threads


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message of a machine without a GPU")
def test_asking_for_a_gpu_without_one_is_a_clear_error(tmp_path):
    done = subprocess.run([sys.executable, "-m", "metalearn", "train", "maml", "--dataset", "sinusoid",
                           "--steps", "1", "--device", "cuda", "--run-dir", str(tmp_path / "run")],
                          env=env(), capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert "sees no GPU" in done.stderr and "Traceback" not in done.stderr


def wait_for_step(run_dir, procs, step: int, timeout_s: float = 120) -> None:
    deadline = time.time() + timeout_s
    while not any(r.get("step", 0) >= step for r in RunDir(run_dir).read_metrics()):
        assert time.time() < deadline, "training did not start"
        for p in procs:
            assert p.poll() is None, p.communicate()[1][-2000:]
        time.sleep(0.2)


@pytest.mark.parametrize("ranks", [1, 2])
def test_a_stop_signal_to_one_process_stops_every_rank_after_a_saved_step(tmp_path, ranks):
    """SIGTERM to one process (rank 1 of 2, or the only one): every rank finishes the same
    step, rank 0 saves it, and all exit with 143 and a message saying how to resume."""
    run_dir = tmp_path / "run"
    procs = start_ranks(ranks, run_dir, ["--steps", 100000, "--checkpoint-every", 1000])
    try:
        wait_for_step(run_dir, procs, 5)
        procs[-1].send_signal(signal.SIGTERM)
        errs = [p.communicate(timeout=90)[1] for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    assert [p.returncode for p in procs] == [143] * ranks, errs
    step = RunDir(run_dir).read_checkpoint()["step"]
    assert step >= 5
    assert f"after step {step} of 100000" in errs[0] and "--resume" in errs[0] and "Traceback" not in errs[0]
    assert "stopped by SIGTERM" in errs[-1]


def test_the_time_limit_stops_every_rank_after_the_same_saved_step(tmp_path):
    """--time-limit under two ranks: whichever rank's clock runs out first, both finish the same
    step, rank 0 saves it, and both exit with 75 naming that step."""
    run_dir = tmp_path / "run"
    procs = start_ranks(2, run_dir, ["--steps", 1000000, "--checkpoint-every", 100000, "--time-limit", 8])
    try:
        errs = [p.communicate(timeout=120)[1] for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    assert [p.returncode for p in procs] == [75, 75], errs
    step = RunDir(run_dir).read_checkpoint()["step"]
    assert all(f"after step {step} of 1000000" in err and "--resume" in err and "Traceback" not in err
               for err in errs), errs


def test_a_torchrun_job_on_a_folder_another_process_trains_in_is_refused_on_every_rank(tmp_path):
    """Rank 0 takes the run folder's lock for the job; when another process holds it, every
    rank stops with one line at once (none waits at a collective for the job's timeout)."""
    run_dir = tmp_path / "run"
    with RunDir(run_dir).lock():  # another writer (this test process) holds the folder
        # a rank left waiting at a collective would end at its timeout with another message than the two below
        done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                               "-m", "metalearn", "train", *SINUSOID, "--steps", "2", "--run-dir", str(run_dir)],
                              env=env(), capture_output=True, text=True, timeout=300)
    assert done.returncode != 0
    assert f"{run_dir} is in use by process {os.getpid()}" in done.stderr, done.stderr[-3000:]
    assert "rank 0 could not take" in done.stderr, done.stderr[-3000:]  # the other rank's line
    # each rank says one line; the only traceback is torchrun's own, of the launcher
    assert sum(line.startswith("error: ") for line in done.stderr.splitlines()) == 2, done.stderr[-3000:]
    package = str(Path(runs.__file__).parent)  # a frame of metalearn's own code, wherever the checkout is
    assert not [line for line in done.stderr.splitlines() if 'File "' in line and package in line], done.stderr[-3000:]
    assert not (run_dir / "config.json").exists()


def test_two_ranks_in_chunks_equal_one_process_with_the_whole_batch(tmp_path):
    # meta-batch 5: ranks of 3 and 2 tasks, each taking its share 2 tasks at a time (2 + 1, 2)
    args = SINUSOID + ["--steps", 3, "--val-every", 0]
    metalearn(args + ["--run-dir", tmp_path / "whole"], tmp_path)
    torchrun(args + ["--run-dir", tmp_path / "chunked", "--task-chunk", 2], tmp_path)
    assert_same_weights(tmp_path / "whole", tmp_path / "chunked")
    assert json.loads((tmp_path / "chunked" / "config.json").read_text())["train"]["task_chunk"] == 2


AUTO_CHUNK_RANKS = """
import os, runpy, sys
import metalearn.training as training
from metalearn.algorithms.maml import MAML

rank = int(os.environ["RANK"])
# seconds per task of each chunk size, per rank: the first argument names the scenario
PER_TASK = {"timings": [{1: 1.0, 2: 2.0, 3: 2.0}, {1: 1.0, 2: 0.5}],  # rank 0 picks 1, rank 1 its share 2
            "rank 0's": [{1: 1.0, 2: 0.5, 3: 2.0}, {1: 0.5, 2: 1.0}],  # rank 0 picks 2, rank 1 picks 1
            "memory": [{1: 1.0, 2: 0.9, 3: 0.5}, {1: 1.0, 2: 0.5}]}[sys.argv[1]]  # rank 0 picks its share 3
sizes = []
meta_loss = MAML.meta_loss
MAML.meta_loss = lambda self, batch: (sizes.append(batch.num_tasks), meta_loss(self, batch))[1]


def scripted(call, device):
    before = len(sizes)
    call()
    tasks = sizes[before]
    return tasks * PER_TASK[rank][tasks]


training.seconds_of = scripted
training.available_memory = lambda device: 2**40
if sys.argv[1] == "memory" and rank == 1:  # a task's step takes more than rank 1's budget: one at a time
    training.peak_memory_of = lambda call, device: (call(), 2**42)[1]
choose = training.Trainer._choose_task_chunk


def reporting(self, batch, bar):
    chunk = choose(self, batch, bar)
    print(f"rank {rank} trains in chunks of {chunk}", flush=True)
    return chunk


training.Trainer._choose_task_chunk = reporting
sys.argv = ["metalearn", "train", *sys.argv[2:]]
runpy.run_module("metalearn", run_name="__main__")
"""


@pytest.mark.parametrize("scenario, chunk", [("timings", 1), ("rank 0's", 2), ("memory", 1)])
def test_task_chunk_auto_under_torchrun_takes_rank_0s_choice(tmp_path, scenario, chunk):
    """Each rank times its own share (3 and 2 of a meta-batch of 5). timings: rank 0's timings
    pick one task at a time, rank 1's its whole share; rank 0's: rank 0's pick two, rank 1's
    one (memory to spare: rank 0's choice, not the smaller); memory: rank 0's pick its whole
    share but rank 1's memory fits one task at a time. Both ranks train in chunks of the
    expected size, and the run equals one process in chunks of that size (and the whole batch,
    to float rounding)."""
    args = SINUSOID + ["--steps", 2, "--val-every", 0]
    metalearn(args + ["--run-dir", tmp_path / "one", "--task-chunk", chunk], tmp_path)
    metalearn(args + ["--run-dir", tmp_path / "whole"], tmp_path)
    script = tmp_path / "auto_chunk.py"
    script.write_text(AUTO_CHUNK_RANKS)
    done = launch([script, scenario, *map(str, args), "--run-dir", tmp_path / "auto", "--task-chunk", "auto"])
    assert (f"rank 0 trains in chunks of {chunk}" in done.stdout
            and f"rank 1 trains in chunks of {chunk}" in done.stdout), done.stdout
    assert_same_weights(tmp_path / "one", tmp_path / "auto")
    assert_same_weights(tmp_path / "whole", tmp_path / "auto")


MAML_RL_TRPO_STEP = """
import sys, torch
from metalearn.algorithms.maml_rl import MAMLRL, MAMLRLConfig, GaussianMLPPolicy
from metalearn.distributed import init_world, leave_world
from metalearn.envs import MDPTasks
from metalearn.envs.nav2d import Nav2D

def step(tasks):  # the TRPO step, as minus the gradient of maml-rl's meta-loss, and its KL
    torch.manual_seed(0)
    learner = MAMLRL(GaussianMLPPolicy(2, 2, 6), MAMLRLConfig(trajectories=3, horizon=8, hidden=6)).double()
    batch = MDPTasks(Nav2D()).sample(5, torch.Generator().manual_seed(1), tasks).to(torch.float64)
    loss, metrics = learner.meta_loss(batch)
    loss.backward()
    return torch.cat([-p.grad.reshape(-1) for p in learner.parameters()]), metrics["kl"]

alone, alone_kl = step(None)  # before joining the group: one process with all 5 tasks
world = init_world("cpu")
shared, shared_kl = step(world.share(5))  # this rank's 3 or 2 tasks
leave_world(orderly=True)
torch.save({"alone": alone, "shared": shared, "kl": (float(alone_kl), float(shared_kl))},
           f"{sys.argv[1]}/rank{world.rank}.pt")
"""


def test_maml_rls_trpo_step_over_two_ranks_is_one_processs_in_float64(tmp_path):
    """The paper's TRPO settings (damping 1e-5) on ranks of 3 and 2 tasks: the step every rank
    takes equals one process's with all 5. In float64: in float32 the conjugate gradient on the
    nearly singular Fisher matrix amplifies summation-order rounding (reordering one process's
    tasks changes its step by several percent), which the next test avoids with more damping."""
    run_script(MAML_RL_TRPO_STEP, tmp_path)
    for rank in range(2):
        out = torch.load(tmp_path / f"rank{rank}.pt")
        assert out["alone"].norm() > 0.01 and out["kl"][0] > 1e-3
        torch.testing.assert_close(out["shared"], out["alone"], rtol=1e-6, atol=1e-9)
        assert out["kl"][1] == pytest.approx(out["kl"][0], rel=1e-6)


# --cg-damping 0.1: a well-conditioned step, so that float32 rounding stays small (see above)
MAML_RL = ["maml-rl", "--env", "nav2d", "--meta-batch-size", 5, "--trajectories", 3, "--test-trajectories", 3,
           "--horizon", 8, "--hidden", 6, "--test-inner-steps", 1, "--cg-damping", 0.1, "--checkpoint-every", 2,
           "--eval-episodes", 4, "--no-progress"]


def test_two_ranks_share_maml_rls_meta_batch_and_take_one_processs_trpo_step(tmp_path):
    """Ranks of 3 and 2 tasks roll out and adapt their own; the TRPO step (gradient, Fisher-vector
    products, line search) is all-reduced over all 5, and each task's rollouts come from its own
    seed: the weights, the logged returns and KL, and the evaluation equal one process's to
    float32 rounding (as amplified by the step's conjugate gradient: the weights' updates are
    ~0.1, reordering one process's tasks moves them by ~1e-4). The two-rank run stops after 2
    steps and resumes for 2 more."""
    single, double = tmp_path / "single", tmp_path / "double"
    metalearn(MAML_RL + ["--steps", 4, "--run-dir", single], tmp_path)
    torchrun(MAML_RL + ["--steps", 2, "--no-eval", "--run-dir", double], tmp_path)
    torchrun(MAML_RL + ["--steps", 4, "--resume", "--run-dir", double], tmp_path)
    assert_same_weights(single, double, atol=5e-4)
    m1 = [r for r in RunDir(single).read_metrics() if "loss" in r]
    m2 = [r for r in RunDir(double).read_metrics() if "loss" in r]
    assert [r["step"] for r in m1] == [r["step"] for r in m2] == [1, 2, 3, 4]
    for a, b in zip(m1, m2):
        for name in ("return", "return_adapted", "kl", "backtracks"):
            assert a[name] == pytest.approx(b[name], rel=1e-4, abs=1e-6), (name, a, b)
    assert all(r["kl"] > 0 for r in m1)  # a step was taken each time
    e1 = json.loads((single / "eval.json").read_text())
    e2 = json.loads((double / "eval.json").read_text())
    torch.testing.assert_close(torch.tensor(e2["scores"]), torch.tensor(e1["scores"]), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("name, value", [("WORLD_SIZE", "abc"), ("LOCAL_RANK", "x"), ("RANK", "-1")])
def test_a_torchrun_variable_that_is_no_count_is_one_line(tmp_path, monkeypatch, capsys, name, value):
    """torchrun sets these; a scheduler script or a stray export that sets them wrong is named,
    not a ValueError from int() inside the library. (RANK counts only with WORLD_SIZE > 1.)"""
    from cli_runner import run

    monkeypatch.setenv(name, value)
    if name == "RANK":
        monkeypatch.setenv("WORLD_SIZE", "2")
    code, _, err = run(["train", "maml", "--dataset", "sinusoid", "--steps", 1, "--run-dir", tmp_path / "r"], capsys)
    assert code == 2 and f"{name}={value!r} in the environment is not a whole number >= 0" in err
    assert "Traceback" not in err and not (tmp_path / "r").exists()


NAN_PLUGIN = '''
from metalearn.datasets import Dataset, get_dataset, register_dataset
from metalearn.tasks import SinusoidTasks


class LastTaskNaN(SinusoidTasks):
    def sample(self, num_tasks, generator, tasks=None):
        batch = super().sample(num_tasks, generator)
        batch.support_y[-1, 0] = float("nan")  # the meta-batch's last task: rank 1's share
        return batch if tasks is None else batch.select(tasks)


sine = get_dataset("sinusoid")
register_dataset(Dataset("nan-sine", False, build=lambda task, shape, part, data_dir, progress: LastTaskNaN(
    shots=shape.shots, query=shape.query), problem=sine.problem, generated=True))
'''


def test_nan_data_on_one_rank_is_named_by_every_rank(tmp_path):
    """The rank whose share holds the NaN names it, with its place in the whole meta-batch; the
    others say another rank's share holds it, not that the learning rate is too large."""
    plugin = tmp_path / "nan_sine.py"
    plugin.write_text(NAN_PLUGIN)
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           "-m", "metalearn", "train", "maml", "--dataset", "nan-sine", "--meta-batch-size", "5",
                           "--steps", "2", "--val-every", "0", "--no-progress", "--run-dir", str(tmp_path / "run")],
                          env={**env(), "METALEARN_PLUGINS": str(plugin)}, capture_output=True, text=True, timeout=300)
    assert done.returncode != 0
    assert "the task source drew NaN or infinite values in support_y (1 task, the first task 4)" in done.stderr, \
        done.stderr[-3000:]
    assert "the task source drew unusable data into another rank's share (whose message names it)" in done.stderr, \
        done.stderr[-3000:]
    assert "inner-lr" not in done.stderr
