"""SIGKILL at any moment, also in the middle of a checkpoint write, then --resume: the same
weights, optimiser state, random state and metrics as a run never interrupted. Real training
processes, killed for real (scripts/kill-resume.py kills more, at random moments)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import training_process as child
from metalearn.cli import main
from metalearn.runs import RunDir

TRAIN = ["train", "maml", "--dataset", "sinusoid", "--steps", 6, "--meta-batch-size", 2, "--checkpoint-every", 1,
         "--log-every", 1, "--val-every", 3, "--val-episodes", 4, "--no-progress", "--no-eval"]
TIMING = {"tasks_per_s", "elapsed_s"}


@pytest.fixture
def uninterrupted(tmp_path, one_thread) -> Path:
    """The run never interrupted, trained in this process (one thread, as the children)."""
    path = tmp_path / "uninterrupted"
    main([*map(str, TRAIN), "--run-dir", str(path)])
    return path


def assert_same_state(a: Path, b: Path) -> None:
    """Bit for bit: every tensor of the checkpoints (learner, optimiser, scheduler, RNG) and
    every metrics record but its timings."""
    sa, sb = RunDir(a).read_checkpoint(), RunDir(b).read_checkpoint()
    assert sa["step"] == sb["step"]

    def same(x, y, where):
        if isinstance(x, torch.Tensor):
            assert isinstance(y, torch.Tensor) and x.dtype == y.dtype and torch.equal(x, y), where
        elif isinstance(x, dict):
            assert x.keys() == y.keys(), where
            for key in x:
                same(x[key], y[key], f"{where}.{key}")
        elif isinstance(x, (list, tuple)):
            assert len(x) == len(y), where
            for i, (u, v) in enumerate(zip(x, y)):
                same(u, v, f"{where}[{i}]")
        else:
            assert x == y, where

    for entry in ("learner", "optimizer", "scheduler", "torch_rng", "config"):
        same(sa[entry], sb[entry], entry)
    strip = lambda run: [{k: v for k, v in r.items() if k not in TIMING} for r in RunDir(run).read_metrics()]
    assert strip(a) == strip(b)


def checkpoint_step(run: Path) -> int:
    return int(RunDir(run).read_checkpoint("step")["step"])


def test_killed_in_and_between_checkpoint_writes_resumes_bit_identically(uninterrupted, tmp_path):
    run = tmp_path / "run"
    # killed inside the very first checkpoint write: config.json is there, no checkpoint yet,
    # a half-written temporary file and the lock file of the dead process are left behind
    process = child.start([*TRAIN, "--run-dir", run], HOLD_WRITE="1")
    child.wait_for(process, "WRITING 1")
    child.kill(process)
    assert RunDir(run).never_started()
    assert [p.name for p in run.glob("checkpoint.pt.tmp*")] == [f"checkpoint.pt.tmp{process.pid}"]
    assert (run / ".lock").is_file()
    # the run never started: --resume starts it (as would a plain start); killed inside the
    # write of its fourth checkpoint (step 3), the checkpoint of step 2 stays
    process = child.start([*TRAIN, "--run-dir", run, "--resume"], HOLD_WRITE="4")
    child.wait_for(process, "WRITING 4")
    child.kill(process)
    assert checkpoint_step(run) == 2
    # killed just after a checkpoint is in place, somewhere in the next step
    process = child.start([*TRAIN, "--run-dir", run, "--resume"])
    child.wait_for(process, "SAVED 2")
    child.kill(process)
    assert checkpoint_step(run) >= 4
    code, _, err = child.finish(child.start([*TRAIN, "--run-dir", run, "--resume"]))
    assert code == 0, err
    assert_same_state(uninterrupted, run)
    # the killed writers' temporary files and lock file are gone
    assert sorted(p.name for p in run.iterdir()) == ["checkpoint.pt", "config.json", "metrics.jsonl"]
