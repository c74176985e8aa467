"""The run directory: metrics that survive a kill mid-line, what counts as a run, and files
written whole or not at all."""

from __future__ import annotations

import json

import pytest
import torch

from metalearn.errors import MetalearnError
from metalearn.runs import RunDir, atomic_write, atomic_write_bytes


def test_a_metrics_line_cut_short_by_a_kill_is_dropped_and_resume_writes_on_cleanly(tmp_path):
    run = RunDir(tmp_path)
    for step in range(1, 8):
        run.append_metrics({"step": step, "loss": 1.0 / step})
    run.append_metrics({"step": 6, "val_mse": 0.5})  # validation records share the steps
    with open(run.metrics_path, "a") as f:
        f.write('{"step": 7, "lo')  # the kill came in the middle of a write: no closing brace, no newline
    records = run.read_metrics()
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5, 6, 7, 6]
    assert records[2] == {"step": 3, "loss": 1 / 3} and records[-1] == {"step": 6, "val_mse": 0.5}
    # resuming from the checkpoint of step 5 drops the later records and the broken line, so the
    # next record starts a line of its own instead of being glued to the cut one (and lost)
    run.truncate_metrics(5)
    run.append_metrics({"step": 6, "loss": 0.25})
    assert run.read_metrics() == [*records[:5], {"step": 6, "loss": 0.25}]
    assert run.metrics_path.read_text().endswith('{"step": 6, "loss": 0.25}\n')


def test_no_metrics_file_reads_as_no_records(tmp_path):
    assert RunDir(tmp_path / "fresh").read_metrics() == []


@pytest.mark.parametrize("trace", ["config.json", "checkpoint.pt", "metrics.jsonl"])
def test_any_trace_of_a_run_holds_the_folder(tmp_path, trace):
    """A new run must not start over a folder holding any of them (e.g. a run whose config was
    lost still has its checkpoint): each alone is enough."""
    run = RunDir(tmp_path)
    assert not run.holds_run()
    (tmp_path / "notes.txt").write_text("a folder of the user's own")
    (tmp_path / "plots").mkdir()
    assert not run.holds_run()
    (tmp_path / trace).write_text("{}")
    assert run.holds_run()
    assert run.exists() == (trace == "config.json")  # a run to resume needs its config


def test_a_write_that_fails_midway_leaves_the_old_file_and_no_temporary_one(tmp_path):
    path = tmp_path / "eval.json"
    atomic_write_bytes(path, b'{"mean": 1.0}\n')

    class Full(OSError):
        pass

    def failing_write(f):
        f.write(b'{"mean": 2.')
        raise Full("no space left on device")

    with pytest.raises(Full):
        atomic_write(path, failing_write)
    assert path.read_bytes() == b'{"mean": 1.0}\n'
    assert sorted(p.name for p in tmp_path.iterdir()) == ["eval.json"]  # the .tmpPID file is gone
    atomic_write_bytes(path, b'{"mean": 2.0}\n')  # and the next write replaces it whole
    assert json.loads(path.read_text()) == {"mean": 2.0}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["eval.json"]


def test_checkpoint_round_trip_and_a_damaged_one_is_a_clear_error(tmp_path):
    run = RunDir(tmp_path)
    run.write_checkpoint({"step": 3, "weights": torch.arange(4.0)})
    state = run.read_checkpoint()
    assert state["step"] == 3 and torch.equal(state["weights"], torch.arange(4.0))
    run.checkpoint_path.write_bytes(run.checkpoint_path.read_bytes()[:40])  # cut short outside atomic_write
    with pytest.raises(MetalearnError, match="checkpoint.pt is unreadable"):
        run.read_checkpoint()
