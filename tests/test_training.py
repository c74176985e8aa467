"""The trainer: exact resume, atomic checkpoints, NaN handling, configuration checks."""

from __future__ import annotations

import dataclasses
import datetime
import json
import math
import os
import re
import signal
import warnings

import pytest
import torch
from torch import nn

from metalearn.algorithms import build_learner
from metalearn.api import evaluate_run, resolve_config
from metalearn.errors import MetalearnError, MetalearnWarning, TrainingInterrupted, TrainingStopped
from metalearn.runs import RunDir
from metalearn.tasks import problem_of
from metalearn.checkpoints import all_finite, initialise_from_run, load_trained
from metalearn.training import StopRequests, build_trainer
from configs import sinusoid_config


def parameters_of(learner):
    return {k: v.detach().clone() for k, v in learner.state_dict().items()}


def test_resume_continues_exactly(tmp_path):
    straight = build_trainer(sinusoid_config(10), tmp_path / "straight")
    straight.fit(progress=False)

    first = build_trainer(sinusoid_config(5), tmp_path / "split")
    first.fit(progress=False)
    resumed = build_trainer(sinusoid_config(10), tmp_path / "split", resume=True)
    assert resumed.step == 5
    resumed.fit(progress=False)

    a, b = parameters_of(straight.learner), parameters_of(resumed.learner)
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name
    # The optimiser state continues too, and the metrics log has no duplicated steps.
    assert straight.optimizer.state_dict()["state"][0]["step"] == resumed.optimizer.state_dict()["state"][0]["step"]
    steps = [r["step"] for r in RunDir(tmp_path / "split").read_metrics() if "loss" in r]
    assert steps == sorted(set(steps)) == [2, 4, 5, 6, 8, 10]  # 5: the end of the first part


def test_training_leaves_the_caller_s_random_state_and_draws_the_same_whatever_it_is(tmp_path):
    """A notebook's own draws are the same with or without a training between them; the training
    draws what it would in a process of its own, whatever the caller's state."""
    weights = []
    for seed in (1, 2):
        torch.manual_seed(seed)
        expected = torch.randn(3)
        torch.manual_seed(seed)
        trainer = build_trainer(sinusoid_config(4), tmp_path / f"run{seed}")
        trainer.fit(progress=False)
        resumed = build_trainer(sinusoid_config(6), tmp_path / f"run{seed}", resume=True)
        resumed.fit(progress=False)
        assert torch.equal(torch.randn(3), expected)
        weights.append(parameters_of(resumed.learner))
    assert all(torch.equal(weights[0][name], weights[1][name]) for name in weights[0])


def test_a_retry_after_a_failed_fit_draws_what_an_uninterrupted_run_would(tmp_path):
    """A method that draws from torch's generator as a step starts (before the step's own seed):
    the retry goes back to the last checkpoint's random state too, inside training's own."""
    def noisy(trainer, fail_at=None):
        loss_of, start = trainer.learner.meta_loss, trainer.learner.start_step
        state = {"failed": False, "factor": 1.0}

        def start_step(step):
            state["factor"] = 1 + float(torch.rand(()))
            return start(step)

        def meta_loss(batch):
            loss, metrics = loss_of(batch)
            if trainer.step == fail_at and not state["failed"]:
                state["failed"] = True
                raise RuntimeError("a transient failure")
            return loss * state["factor"], metrics

        trainer.learner.start_step, trainer.learner.meta_loss = start_step, meta_loss
        return trainer

    straight = noisy(build_trainer(sinusoid_config(8, val_every=0), tmp_path / "straight"))
    straight.fit(progress=False)
    retried = noisy(build_trainer(sinusoid_config(8, val_every=0), tmp_path / "retried"), fail_at=5)
    with pytest.raises(RuntimeError, match="transient"):
        retried.fit(progress=False)
    retried.fit(progress=False)
    a, b = parameters_of(straight.learner), parameters_of(retried.learner)
    assert all(torch.equal(a[name], b[name]) for name in a)


def test_a_torchrun_worker_whose_launcher_is_gone_stops_after_the_step_with_a_checkpoint(tmp_path, monkeypatch):
    """torch starts its workers in sessions of their own: a SIGKILL of torchrun alone reaches none
    of them. A worker re-parented (its launcher gone) stops as for a SIGTERM, not training on
    unseen to the run's end while it holds the run folder."""
    import metalearn.training as training

    launcher, calls = os.getppid(), []

    def parent() -> int:
        calls.append(1)
        return launcher if len(calls) <= 3 else 1  # the launcher dies during the third step

    monkeypatch.setattr(training, "launched_by_torchrun", lambda: True)
    monkeypatch.setattr(os, "getppid", parent)
    trainer = build_trainer(sinusoid_config(20, checkpoint_every=100, val_every=0), tmp_path / "run")
    with pytest.raises(TrainingInterrupted) as stopped:
        trainer.fit(progress=False)
    assert stopped.value.exit_code == 143
    assert str(stopped.value).startswith("stopped: torchrun, which launched this process, is gone after step 3 of 20")
    assert RunDir(tmp_path / "run").read_checkpoint("step")["step"] == 3
    # killed while the worker prepared its data: the launcher the process found at its start is gone
    monkeypatch.setattr(training, "LAUNCHER", launcher)
    monkeypatch.setattr(os, "getppid", lambda: 1)
    trainer = build_trainer(sinusoid_config(20, checkpoint_every=100, val_every=0), tmp_path / "early")
    with pytest.raises(TrainingInterrupted,
                       match="^stopped: torchrun, which launched this process, is gone after step 1 "):
        trainer.fit(progress=False)


def test_the_checkpoint_records_the_machine_of_each_stretch_of_training(tmp_path, monkeypatch):
    from metalearn.runtime import machine

    first = build_trainer(sinusoid_config(4), tmp_path / "run")
    first.fit(progress=False)
    (record,) = RunDir(tmp_path / "run").read_checkpoint()["machines"]
    assert record == {"from_step": 0, **machine()} and record["torch_threads"] == torch.get_num_threads()
    assert record["processor"] and record["processes"] == 1 and record["cores"] >= record["usable_cores"] >= 1
    # a resume on the same machine and threads continues the stretch ...
    again = build_trainer(sinusoid_config(6), tmp_path / "run", resume=True)
    with pytest.raises(TrainingStopped):
        again.fit(progress=False, stop_at=5)
    assert RunDir(tmp_path / "run").read_checkpoint()["machines"] == [record]
    # ... one with another processor (or other threads) starts one at the step it resumes from
    monkeypatch.setattr("metalearn.runtime.processor_name", lambda: "Another CPU")
    elsewhere = build_trainer(sinusoid_config(6), tmp_path / "run", resume=True)
    elsewhere.fit(progress=False)
    machines = RunDir(tmp_path / "run").read_checkpoint()["machines"]
    assert machines == [record, {**record, "from_step": 5, "processor": "Another CPU"}]
    # a checkpoint from before the records were kept: the record starts where the resume does
    state = RunDir(tmp_path / "run").read_checkpoint()
    del state["machines"]
    RunDir(tmp_path / "run").write_checkpoint(state)
    older = build_trainer(sinusoid_config(8), tmp_path / "run", resume=True)
    older.fit(progress=False)
    assert [m["from_step"] for m in RunDir(tmp_path / "run").read_checkpoint()["machines"]] == [6]
    # a stretch that kept no step (killed before its next checkpoint) is replaced by the next one
    monkeypatch.setattr("metalearn.runtime.processor_name", lambda: "A third CPU")
    third = build_trainer(sinusoid_config(8), tmp_path / "run", resume=True)
    third.step, third.machines = 6, [dict(m) for m in third.machines]
    third._note_machine()
    assert [(m["from_step"], m["processor"]) for m in third.machines] == [(6, "A third CPU")]
    # ... and where the machine is the one before it again, that one's stretch goes on
    third.machines = [{**record, "from_step": 0}, {**record, "from_step": 6, "processor": "Another CPU"}]
    monkeypatch.setattr("metalearn.runtime.processor_name", lambda: record["processor"])
    third._note_machine()
    assert third.machines == [{**record, "from_step": 0}]
    third.release()
    # a complete run resumed (nothing to train) adds none
    done = build_trainer(sinusoid_config(8), tmp_path / "run", resume=True)
    before = [dict(m) for m in done.machines]
    done._note_machine()
    assert done.step == 8 and done.machines == before
    done.release()


def test_a_run_killed_before_its_first_periodic_checkpoint_resumes_with_one_record_per_step(tmp_path, monkeypatch):
    # Its only checkpoint is the one of step 0: the resume must drop everything the killed run
    # logged and kept (metrics, best checkpoints) after it, as it does after any other step.
    config = lambda: sinusoid_config(6, checkpoint_every=100, keep_best=2)
    straight = build_trainer(config(), tmp_path / "straight")
    straight.fit(progress=False)

    killed = build_trainer(config(), tmp_path / "killed")
    real_save = type(killed).save
    monkeypatch.setattr(type(killed), "save", lambda self: real_save(self) if self.step == 0 else None)
    killed.fit(progress=False)
    monkeypatch.undo()
    assert RunDir(tmp_path / "killed").read_checkpoint()["step"] == 0
    assert (tmp_path / "killed" / "best" / "step-6.pt").is_file()  # kept by the killed run
    resumed = build_trainer(config(), tmp_path / "killed", resume=True)
    assert resumed.step == 0
    # before any step, the folder already holds nothing from after step 0
    resumed._begin()
    assert [r["step"] for r in RunDir(tmp_path / "killed").read_metrics()] == []
    assert not (tmp_path / "killed" / "best" / "step-6.pt").exists()
    resumed.fit(progress=False)
    timing = ("elapsed_s", "tasks_per_s", "validation_s")  # the only fields two runs may differ in
    untimed = lambda run: [{k: v for k, v in r.items() if k not in timing} for r in RunDir(run).read_metrics()]
    assert untimed(tmp_path / "killed") == untimed(tmp_path / "straight")
    assert (json.loads((tmp_path / "killed" / "best" / "index.json").read_text())
            == json.loads((tmp_path / "straight" / "best" / "index.json").read_text()))


def test_resume_exact_on_omniglot_conv4(tmp_path, omniglot_data_dir):
    def config(steps):
        return resolve_config("maml", task={"dataset": "omniglot", "ways": 3, "shots": 1},
                              method_config={"inner_lr": 0.4},
                              train={"steps": steps, "meta_batch_size": 2, "val_every": 0,
                                     "checkpoint_every": 2, "log_every": 1})

    straight = build_trainer(config(4), tmp_path / "a", data_dir=omniglot_data_dir)
    straight.fit(progress=False)
    build_trainer(config(2), tmp_path / "b", data_dir=omniglot_data_dir).fit(progress=False)
    resumed = build_trainer(config(4), tmp_path / "b", data_dir=omniglot_data_dir, resume=True)
    resumed.fit(progress=False)
    for name, value in parameters_of(straight.learner).items():
        assert torch.equal(value, parameters_of(resumed.learner)[name]), name


def test_resume_with_other_configuration_is_refused(tmp_path):
    build_trainer(sinusoid_config(2), tmp_path).fit(progress=False)
    other = resolve_config("maml", task={"dataset": "sinusoid", "shots": 10},
                           train={"steps": 4, "meta_batch_size": 4})
    with pytest.raises(MetalearnError, match=r"task.shots: 5 there, 10 requested"):
        build_trainer(other, tmp_path, resume=True)


def test_starting_over_an_existing_run_is_refused(tmp_path):
    build_trainer(sinusoid_config(2), tmp_path).fit(progress=False)
    with pytest.raises(MetalearnError, match=r"continue it \(resume=True\) or choose another run_dir$"):
        build_trainer(sinusoid_config(2), tmp_path)
    # without its checkpoint the folder still holds a run (config, metrics): neither resumed
    # from step 0 nor started over on top of the old metrics
    # (either way, the message says that neither works, and why)
    (tmp_path / "checkpoint.pt").rename(tmp_path / "kept.pt")
    with pytest.raises(MetalearnError, match="has no checkpoint.pt .*start afresh in another run_dir$"):
        build_trainer(sinusoid_config(2), tmp_path, resume=True)
    with pytest.raises(MetalearnError, match="already holds a run, which cannot be resumed either: it has no "
                                             "checkpoint.pt"):
        build_trainer(sinusoid_config(2), tmp_path)
    (tmp_path / "kept.pt").rename(tmp_path / "checkpoint.pt")
    (tmp_path / "config.json").rename(tmp_path / "kept.json")
    for resume, start in ((True, "cannot resume: "), (False, "")):
        with pytest.raises(MetalearnError, match=f"{start}.*has a checkpoint.pt but no config.json .*put the run's "
                                                 "config.json back"):
            build_trainer(sinusoid_config(2), tmp_path, resume=resume)
    (tmp_path / "checkpoint.pt").unlink()
    with pytest.raises(MetalearnError, match="already holds a run, which cannot be resumed either: it has a "
                                             "metrics.jsonl but no config.json"):
        build_trainer(sinusoid_config(2), tmp_path)  # metrics.jsonl alone


def test_checkpoint_holds_everything_and_loads(tmp_path):
    trainer = build_trainer(sinusoid_config(4), tmp_path)
    trainer.fit(progress=False)
    state = RunDir(tmp_path).read_checkpoint()
    assert {"step", "config", "learner", "optimizer", "torch_rng"} <= set(state)
    config, learner, step = load_trained(tmp_path)
    assert step == 4 and config == sinusoid_config(4)
    for name, value in parameters_of(trainer.learner).items():
        assert torch.equal(value, learner.state_dict()[name])
    assert json.loads((tmp_path / "config.json").read_text())["method"] == "maml"


def test_interrupted_checkpoint_write_keeps_the_last_good_one(tmp_path, monkeypatch):
    trainer = build_trainer(sinusoid_config(2), tmp_path)
    trainer.fit(progress=False)
    before = (tmp_path / "checkpoint.pt").read_bytes()

    def dying_save(obj, f, *args, **kwargs):
        f.write(b"half a checkpoint")
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", dying_save)
    with pytest.raises(KeyboardInterrupt):
        RunDir(tmp_path).write_checkpoint(trainer.state())
    assert (tmp_path / "checkpoint.pt").read_bytes() == before
    monkeypatch.undo()
    assert load_trained(tmp_path)[2] == 2


def signal_during_step(trainer, step: int, *signals) -> None:
    """Send ``signals`` to this process during meta-step ``step`` (counted from 1)."""
    real_meta_loss = trainer.learner.meta_loss

    def signalled(batch):
        if trainer.step == step - 1:
            for sig in signals:
                os.kill(os.getpid(), sig)
        return real_meta_loss(batch)

    trainer.learner.meta_loss = signalled


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT] + [getattr(signal, name) for name in
                                                                   ("SIGUSR1", "SIGUSR2") if hasattr(signal, name)])
def test_a_stop_signal_saves_the_step_and_resume_stays_exact(tmp_path, sig, capsys):
    """SIGTERM, Ctrl-C or a scheduler's warning (Slurm's --signal=USR1@120, submitit's SIGUSR2)
    mid-step: the step finishes (said at once), is checkpointed (3 is not a periodic checkpoint
    here), training stops with the signal's exit code, and resuming gives the same parameters
    as an uninterrupted run."""
    straight = build_trainer(sinusoid_config(6), tmp_path / "straight")
    straight.fit(progress=False)

    trainer = build_trainer(sinusoid_config(6), tmp_path / "stopped")
    signal_during_step(trainer, 3, sig)
    handlers = [signal.getsignal(each) for each in StopRequests.SIGNALS]
    with pytest.raises(TrainingInterrupted, match=f"stopped by {sig.name} after step 3 of 6.*resume=True") as stopped:
        trainer.fit(progress=False)
    assert stopped.value.exit_code == 128 + sig
    # a BaseException, as KeyboardInterrupt: a sweep's `except Exception` does not swallow the stop
    assert not isinstance(stopped.value, Exception)
    again = "Ctrl-C" if sig == signal.SIGINT else sig.name
    assert capsys.readouterr().err == (f"{sig.name} received: finishing this step, then saving it ({again} again "
                                       "stops at once, without saving it)\n")
    assert [signal.getsignal(each) for each in StopRequests.SIGNALS] == handlers
    assert load_trained(tmp_path / "stopped")[2] == 3

    resumed = build_trainer(sinusoid_config(6), tmp_path / "stopped", resume=True)
    resumed.fit(progress=False)
    a, b = parameters_of(straight.learner), parameters_of(resumed.learner)
    for name in a:
        assert torch.equal(a[name], b[name]), name


def test_the_time_limit_stops_before_an_iteration_that_would_end_past_it_and_resume_stays_exact(tmp_path, monkeypatch):
    """A clock that steps 10 s per meta-step and a 35 s limit: after step 3 (30 s) another
    iteration as long as the longest so far would end at 40 s, so training stops there with
    step 3 saved (not a periodic checkpoint), exit code 75, and resuming without a limit gives
    the parameters of an uninterrupted run."""
    import metalearn.training as training

    straight = build_trainer(sinusoid_config(6, val_every=0), tmp_path / "straight")
    straight.fit(progress=False)

    clock = {"t": 0.0}
    monkeypatch.setattr(training, "now", lambda: clock["t"])
    trainer = build_trainer(sinusoid_config(6, val_every=0), tmp_path / "limited")
    real_meta_loss = trainer.learner.meta_loss

    def ten_seconds(batch):
        clock["t"] += 10.0
        return real_meta_loss(batch)

    trainer.learner.meta_loss = ten_seconds
    with pytest.raises(TrainingStopped, match="stopped at its time limit after step 3 of 6.*resume=True") as stopped:
        trainer.fit(progress=False, time_limit_s=35.0)
    assert stopped.value.exit_code == 75
    assert load_trained(tmp_path / "limited")[2] == 3

    resumed = build_trainer(sinusoid_config(6, val_every=0), tmp_path / "limited", resume=True)
    resumed.fit(progress=False)
    a, b = parameters_of(straight.learner), parameters_of(resumed.learner)
    for name in a:
        assert torch.equal(a[name], b[name]), name


def test_stop_at_pauses_after_that_step_of_the_schedule_and_resume_stays_exact(tmp_path):
    """``stop_at=2`` of a 6-step run under cosine annealing (the schedule of all 6 steps, not
    one cut to 2): step 2 is saved (not a periodic checkpoint), training stops with exit code 0,
    and two resumes, the first to step 4, give the parameters and learning rate of an
    uninterrupted run."""
    config = sinusoid_config(6, val_every=0, lr_anneal="cosine", min_meta_lr=1e-5, checkpoint_every=100)
    straight = build_trainer(config, tmp_path / "straight")
    straight.fit(progress=False)

    trainer = build_trainer(config, tmp_path / "paused")
    with pytest.raises(TrainingStopped,
                       match=r"stopped as asked \(stop_at\) after step 2 of 6.*resume=True") as stopped:
        trainer.fit(progress=False, stop_at=2)
    assert stopped.value.exit_code == 0
    assert load_trained(tmp_path / "paused")[2] == 2
    # the rate after 2 of 6 cosine steps, not the minimum a 2-step schedule would have reached
    assert trainer.optimizer.param_groups[0]["lr"] == pytest.approx(1e-5 + (1e-3 - 1e-5) * 0.75)

    resumed = build_trainer(config, tmp_path / "paused", resume=True)
    with pytest.raises(TrainingStopped, match="after step 4 of 6"):
        resumed.fit(progress=False, stop_at=4)
    resumed = build_trainer(config, tmp_path / "paused", resume=True)
    for bad, message in ((3, "already at step 4"), (6, "not before the run's last step"),
                         (0, "a positive integer"), (2.5, "a positive integer"), (True, "a positive integer")):
        with pytest.raises(MetalearnError, match=message) as refused:
            resumed.fit(progress=False, stop_at=bad)
        assert not isinstance(refused.value, TrainingStopped)
    # the same pause asked for again: nothing trained, exit code 0, so a script can repeat itself
    with pytest.raises(TrainingStopped, match="at step 4 of 6 already") as again:
        resumed.fit(progress=False, stop_at=4)
    assert again.value.exit_code == 0 and resumed.step == 4
    resumed.fit(progress=False)
    assert resumed.step == 6
    assert resumed.optimizer.param_groups[0]["lr"] == straight.optimizer.param_groups[0]["lr"]
    a, b = parameters_of(straight.learner), parameters_of(resumed.learner)
    for name in a:
        assert torch.equal(a[name], b[name]), name


def test_a_signal_or_the_time_limit_in_the_stop_at_step_still_reports_the_pause(tmp_path, monkeypatch):
    """SIGTERM during step 3, or a time limit that runs out after it, with ``stop_at=3``: the
    checkpoint is the step asked for, so the pause is what is reported (exit code 0), and the
    same call again stops at once with 0 rather than refusing a step the run has reached."""
    import metalearn.training as training

    clock = {"t": 0.0}
    monkeypatch.setattr(training, "now", lambda: clock["t"])
    for case in ("signal", "time"):
        trainer = build_trainer(sinusoid_config(6, val_every=0), tmp_path / case)
        real_meta_loss = trainer.learner.meta_loss

        def step(batch, trainer=trainer, case=case):
            clock["t"] += 10.0
            if case == "signal" and trainer.step == 2:
                os.kill(os.getpid(), signal.SIGTERM)
            return real_meta_loss(batch)

        trainer.learner.meta_loss = step
        with pytest.raises(TrainingStopped, match=r"stopped as asked \(stop_at\) after step 3 of 6") as stopped:
            trainer.fit(progress=False, stop_at=3, time_limit_s=35.0 if case == "time" else None)
        assert stopped.value.exit_code == 0 and load_trained(tmp_path / case)[2] == 3
        again = build_trainer(sinusoid_config(6, val_every=0), tmp_path / case, resume=True)
        with pytest.raises(TrainingStopped, match="already") as repeated:
            again.fit(progress=False, stop_at=3)
        assert repeated.value.exit_code == 0 and load_trained(tmp_path / case)[2] == 3


def test_train_refusing_stop_at_lets_go_of_the_run_folder(tmp_path):
    """``api.train`` with a ``stop_at`` the resumed run has passed: refused, and the folder's
    one-writer lock is released (a notebook keeps the exception and with it the trainer), so the
    next call on the folder trains."""
    from metalearn.api import train

    config = sinusoid_config(6, val_every=0)
    run_dir = tmp_path / "run"
    with pytest.raises(TrainingStopped):
        train(config, run_dir, progress=False, stop_at=3, announce=lambda _: None)
    with pytest.raises(MetalearnError, match="already at step 3") as refused:
        train(config, run_dir, resume=True, progress=False, stop_at=2, announce=lambda _: None)
    assert refused.traceback  # held here, with the trainer in its frames, as a REPL holds the last error
    with pytest.raises(TrainingStopped, match="after step 4 of 6"):
        train(config, run_dir, resume=True, progress=False, stop_at=4, announce=lambda _: None)


@pytest.mark.skipif(not hasattr(signal, "SIGCONT"), reason="no SIGCONT on this platform")
def test_a_stopped_and_continued_iteration_is_not_taken_for_a_long_one(tmp_path, monkeypatch):
    """10 s a step and a 100 s limit, but step 2 includes a 50 s stop (its clock jumps, and a
    SIGCONT arrives as after Ctrl-Z and fg): the next iterations are still budgeted at 10 s, so
    training stops after step 5, at 100 s, not after step 2 as a 60 s iteration would make it;
    the time the stop took still counts (without it, step 9 would end at 100 s)."""
    import metalearn.training as training

    clock = {"t": 0.0}
    monkeypatch.setattr(training, "now", lambda: clock["t"])
    trainer = build_trainer(sinusoid_config(20, val_every=0), tmp_path)
    real_meta_loss = trainer.learner.meta_loss

    def stopped_in_step_2(batch):
        clock["t"] += 10.0
        if trainer.step == 1:
            clock["t"] += 50.0
            os.kill(os.getpid(), signal.SIGCONT)
        return real_meta_loss(batch)

    trainer.learner.meta_loss = stopped_in_step_2
    before = signal.getsignal(signal.SIGCONT)
    with pytest.raises(TrainingStopped, match="stopped at its time limit after step 5 of 20"):
        trainer.fit(progress=False, time_limit_s=100.0)
    assert signal.getsignal(signal.SIGCONT) == before


def test_a_signal_during_a_validation_gives_it_up_saves_the_step_and_the_resume_validates_first(tmp_path):
    """A validation longer than a scheduler's grace: a SIGTERM while the validation episodes of
    step 3 are scored gives the validation up after its chunk (50 episodes), saves step 3 (not
    a periodic checkpoint) with its validation pending and stops; the resumed run validates
    step 3 first, and its metrics and weights equal an uninterrupted run's."""
    config = sinusoid_config(6, val_episodes=120, checkpoint_every=100)
    straight = build_trainer(config, tmp_path / "straight")
    straight.fit(progress=False)

    trainer = build_trainer(config, tmp_path / "stopped")
    drawn = []
    real_sample = trainer.val_tasks.sample

    def sample(*args, **kwargs):  # the first chunk of step 3's validation brings the signal
        drawn.append(trainer.step)
        if trainer.step == 3 and drawn.count(3) == 1:
            os.kill(os.getpid(), signal.SIGTERM)
        return real_sample(*args, **kwargs)

    object.__setattr__(trainer.val_tasks, "sample", sample)  # a frozen dataclass
    with pytest.raises(TrainingInterrupted, match="stopped by SIGTERM after step 3 of 6"):
        trainer.fit(progress=False)
    assert drawn == [3]  # one chunk of three: the others were not scored
    stopped = RunDir(tmp_path / "stopped")
    assert stopped.read_checkpoint()["step"] == 3 and stopped.read_checkpoint()["validation_pending"] is True
    assert not any("val_loss" in r or "val_mse" in r for r in stopped.read_metrics())

    resumed = build_trainer(config, tmp_path / "stopped", resume=True)
    resumed.fit(progress=False)
    assert "validation_pending" not in stopped.read_checkpoint()
    assert_resumed_as_straight(straight, resumed, tmp_path)


def test_an_overridden_validate_is_never_given_up_by_a_signal(tmp_path):
    """A Trainer whose validate() reads its result (a subclass's, as a user writes one) is never
    handed None: a signal during its validation lets it finish, then the step is saved and the
    run stops."""
    from metalearn.training import Trainer

    class Logged(Trainer):
        def validate(self, abandon=None):
            result = super().validate(abandon)
            scores.append(result["mean"])
            return result

    scores = []
    trainer = build_trainer(sinusoid_config(6, val_episodes=120, checkpoint_every=100), tmp_path / "run")
    trainer.__class__ = Logged
    real_sample = trainer.val_tasks.sample

    sent = []

    def sample(*args, **kwargs):  # one signal (a second would stop at once), in the first chunk of step 3's
        if trainer.step == 3 and not sent:
            sent.append(os.kill(os.getpid(), signal.SIGTERM))
        return real_sample(*args, **kwargs)

    object.__setattr__(trainer.val_tasks, "sample", sample)  # a frozen dataclass
    with pytest.raises(TrainingInterrupted, match="stopped by SIGTERM after step 3 of 6"):
        trainer.fit(progress=False)
    assert len(scores) == 1 and RunDir(tmp_path / "run").read_checkpoint()["step"] == 3


def test_a_signal_in_a_step_before_a_validation_stops_before_it_and_the_resume_validates_first(tmp_path):
    """A scheduler's grace after SIGTERM can be shorter than a validation: a signal in step 3
    (validation every 3 steps) saves step 3 and stops without validating; the resumed run
    validates step 3 first, and its metrics and weights equal an uninterrupted run's."""
    straight = build_trainer(sinusoid_config(6), tmp_path / "straight")
    straight.fit(progress=False)

    trainer = build_trainer(sinusoid_config(6), tmp_path / "stopped")
    signal_during_step(trainer, 3, signal.SIGTERM)
    validated = []
    real_validate = trainer.validate
    trainer.validate = lambda: validated.append(trainer.step) or real_validate()
    with pytest.raises(TrainingInterrupted, match="stopped by SIGTERM after step 3 of 6"):
        trainer.fit(progress=False)
    assert validated == []
    stopped = RunDir(tmp_path / "stopped")
    assert stopped.read_checkpoint()["validation_pending"] is True
    assert not any("val_loss" in r or "val_mse" in r for r in stopped.read_metrics())

    resumed = build_trainer(sinusoid_config(6), tmp_path / "stopped", resume=True)
    resumed.fit(progress=False)
    assert "validation_pending" not in stopped.read_checkpoint()
    assert_resumed_as_straight(straight, resumed, tmp_path)


def assert_resumed_as_straight(straight, resumed, tmp_path) -> None:
    """The run in tmp_path/stopped, resumed after a stop at step 3 with its validation pending,
    logged what the uninterrupted run in tmp_path/straight did (validations at 3 and 6, timings
    aside) and holds its weights."""
    timing = {"elapsed_s", "validation_s", "tasks_per_s"}
    records = [[{k: v for k, v in r.items() if k not in timing} for r in RunDir(run).read_metrics()]
               for run in (tmp_path / "straight", tmp_path / "stopped")]
    assert [r["step"] for r in records[0] if len(r) == 3] == [3, 6]  # step, val score, its CI
    assert records[0] == records[1]
    a, b = parameters_of(straight.learner), parameters_of(resumed.learner)
    for name in a:
        assert torch.equal(a[name], b[name]), name


def test_under_torchrun_a_repeated_signal_is_only_noted(tmp_path, monkeypatch):
    """torchrun passes a signal on to its workers, so a scheduler that signals the whole job
    reaches each worker twice: the second SIGTERM must not kill it before its checkpoint, nor
    after training, before it has reported and left the group."""
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "test")
    trainer = build_trainer(sinusoid_config(6), tmp_path)
    signal_during_step(trainer, 3, signal.SIGTERM, signal.SIGTERM)
    before = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    try:
        with pytest.raises(TrainingInterrupted, match="stopped by SIGTERM after step 3 of 6"):
            trainer.fit(progress=False)
        assert load_trained(tmp_path)[2] == 3
        os.kill(os.getpid(), signal.SIGTERM)  # a late one, after training: noted, not fatal
    finally:
        signal.signal(signal.SIGINT, before[0])
        signal.signal(signal.SIGTERM, before[1])


def test_a_second_ctrl_c_stops_at_once(tmp_path):
    trainer = build_trainer(sinusoid_config(6), tmp_path)
    signal_during_step(trainer, 3, signal.SIGINT, signal.SIGINT)
    with pytest.raises(KeyboardInterrupt):
        trainer.fit(progress=False)
    assert load_trained(tmp_path)[2] == 2  # the periodic checkpoint before the interrupt


def test_nan_loss_stops_with_a_message_and_keeps_the_checkpoint(tmp_path):
    trainer = build_trainer(sinusoid_config(10, checkpoint_every=2), tmp_path)
    real_meta_loss = trainer.learner.meta_loss

    def diverging(batch):  # finite for five steps, then NaN
        loss, metrics = real_meta_loss(batch)
        return (loss * float("nan") if trainer.step >= 5 else loss), metrics

    trainer.learner.meta_loss = diverging
    with pytest.raises(MetalearnError, match=r"meta-loss became nan at step 6.*Try a smaller inner_lr or meta_lr, or "
                                             r"fewer inner_steps, in a new run_dir \(a resume repeats this "
                                             r"step\)\.$"):
        trainer.fit(progress=False)
    _, learner, step = load_trained(tmp_path)
    assert step == 4  # the last checkpoint written before the failure
    assert all(torch.isfinite(p).all() for p in learner.parameters())
    # status says so, rather than offering a resume that would repeat the step
    from metalearn.api import run_status
    from metalearn.cli import format_status
    status = run_status(tmp_path)
    assert status["state"] == "diverged" and status["diverged"] == {"step": 6, "what": "the meta-loss became nan"}
    assert "diverged at step 6 (the meta-loss became nan), which a resume repeats: train anew in another --run-dir" \
        in format_status(status)
    assert status["seconds_left"] is None  # no steps to go: no time to estimate
    # a resume that gets past the step (here: the loss no longer made NaN) drops the record with the steps it retrains
    build_trainer(sinusoid_config(10, checkpoint_every=2), tmp_path, resume=True).fit(progress=False)
    status = run_status(tmp_path)
    assert status["state"] == "complete" and status["diverged"] is None
    assert not any("diverged" in record for record in RunDir(tmp_path).read_metrics())


def test_diverging_inner_loop_is_reported(tmp_path):
    config = resolve_config("maml", task={"dataset": "sinusoid"}, method_config={"inner_lr": 1e30},
                            train={"steps": 5, "meta_batch_size": 4, "val_every": 0})
    with pytest.raises(MetalearnError, match=r"meta-loss became (nan|inf) at step 1"):
        build_trainer(config, tmp_path).fit(progress=False)
    assert RunDir(tmp_path).read_checkpoint("step")["step"] == 0  # the initial checkpoint survives
    with pytest.raises(MetalearnError, match="holds no trained step"):  # and holds no model to score
        load_trained(tmp_path)
    from metalearn.api import run_status
    from metalearn.cli import format_status
    assert run_status(tmp_path)["diverged"] == {"step": 1, "what": "the meta-loss became nan"} \
        or run_status(tmp_path)["diverged"]["what"] == "the meta-loss became inf"
    assert "which a resume repeats: train again into this folder with other options" in format_status(
        run_status(tmp_path))  # nothing was trained: --init-from would refuse it
    # nothing was trained: a new run starts over the attempt, its record of the divergence gone
    again = resolve_config("maml", task={"dataset": "sinusoid"}, train={"steps": 2, "meta_batch_size": 4, "val_every": 0})
    build_trainer(again, tmp_path).fit(progress=False)
    assert [record["step"] for record in RunDir(tmp_path).read_metrics() if "diverged" in record] == []
    assert run_status(tmp_path)["state"] == "complete"


def test_checkpoint_from_another_configuration_is_refused(tmp_path):
    build_trainer(sinusoid_config(2), tmp_path / "a").fit(progress=False)
    other = resolve_config("maml", task={"dataset": "sinusoid"}, method_config={"inner_lr": 0.5},
                           train={"steps": 2, "meta_batch_size": 4})
    build_trainer(other, tmp_path / "b").fit(progress=False)
    (tmp_path / "a" / "checkpoint.pt").write_bytes((tmp_path / "b" / "checkpoint.pt").read_bytes())
    with pytest.raises(MetalearnError, match="another configuration"):
        load_trained(tmp_path / "a")
    # a resume with another option: Python names the field, the command line the flag and --init-from
    with pytest.raises(MetalearnError) as refused:
        build_trainer(dataclasses.replace(other, method_config={**other.method_config, "inner_lr": 0.25}),
                      tmp_path / "b", resume=True)
    assert str(refused.value).endswith("configuration (method_config.inner_lr: 0.5 there, 0.25 requested). Resume "
                                       "with the same options, or start a new run directory.")
    assert refused.value.with_flags().endswith("configuration (--inner-lr: 0.5 there, 0.25 requested). Resume with "
                                               "the same options, or start a new --run-dir (--init-from RUN keeps "
                                               "its weights).")


def test_evaluation_reports_mean_and_interval(tmp_path):
    build_trainer(sinusoid_config(2), tmp_path).fit(progress=False)
    result = evaluate_run(tmp_path, episodes=30, progress=False)
    scores = torch.tensor(result["scores"])
    assert result["episodes"] == 30 and len(result["per_step"]) == 3
    assert result["mean"] == pytest.approx(float(scores.mean()), rel=1e-6)
    assert result["ci95"] == pytest.approx(1.96 * float(scores.std()) / 30**0.5, rel=1e-6)
    assert result["per_step_ci95"][-1] == pytest.approx(result["ci95"], rel=1e-6)  # the final step's, as ci95
    assert json.loads((tmp_path / "eval-episodes=30.json").read_text())["mean"] == result["mean"]
    assert result["per_step"][-1] == pytest.approx(result["mean"], rel=1e-6)
    again = evaluate_run(tmp_path, episodes=30, progress=False)
    assert again["scores"] == result["scores"]  # same seed, same episodes
    # the scores, computed independently: the same 30 test tasks, adapted, squared error per task
    from metalearn.tasks import build_task_source
    from metalearn.training import TEST_SEED_OFFSET

    config, learner, _ = load_trained(tmp_path)
    batch = build_task_source(config.task, "test").sample(30, torch.Generator().manual_seed(TEST_SEED_OFFSET))
    expected = (learner.eval().predict(batch) - batch.query_y).square().mean(dim=(1, 2))
    assert torch.allclose(scores.double(), expected.double(), rtol=1e-5)


def test_learning_rate_schedules():
    from metalearn.config import TrainConfig
    from metalearn.training import lr_factor

    halving = TrainConfig(steps=10000, lr_halve_every=2000)
    assert [lr_factor(halving, s) for s in (0, 1999, 2000, 4000, 9999)] == [1, 1, 0.5, 0.25, 0.0625]
    linear = TrainConfig(steps=100, lr_anneal="linear")
    assert [lr_factor(linear, s) for s in (0, 50, 100)] == [1, 0.5, 0]
    # MAML++'s cosine anneal from meta_lr 1e-3 to 1e-5: half a cosine between the two
    cosine = TrainConfig(steps=100, meta_lr=1e-3, lr_anneal="cosine", min_meta_lr=1e-5)
    assert [lr_factor(cosine, s) * 1e-3 for s in (0, 50, 100, 150)] == pytest.approx([1e-3, 5.05e-4, 1e-5, 1e-5])
    assert lr_factor(cosine, 25) * 1e-3 == pytest.approx(1e-5 + (1e-3 - 1e-5) * (1 + 2**-0.5) / 2)
    with pytest.raises(MetalearnError, match="TrainConfig.min_meta_lr applies only with TrainConfig.lr_anneal cosine"):
        TrainConfig(min_meta_lr=1e-5)
    with pytest.raises(MetalearnError, match="TrainConfig.min_meta_lr must be at most TrainConfig.meta_lr"):
        TrainConfig(lr_anneal="cosine", meta_lr=1e-3, min_meta_lr=1e-2)
    with pytest.raises(MetalearnError, match="TrainConfig.meta_optimizer"):
        TrainConfig(meta_optimizer="rmsprop")


def record_learning_rates(trainer) -> list[float]:
    """The meta-optimiser's learning rate as each meta-step computes its loss (the rate its
    update then uses), appended as training runs."""
    rates = []
    real_meta_loss = trainer.learner.meta_loss

    def meta_loss(batch):
        rates.append(trainer.optimizer.param_groups[0]["lr"])
        return real_meta_loss(batch)

    trainer.learner.meta_loss = meta_loss
    return rates


def test_derivative_order_annealing_and_the_cosine_anneal_resume_exactly_across_the_switch(tmp_path):
    """MAML++'s schedules are functions of the step: a run resumed before and after the switch
    to second order (step 3 of 6) ends with the uninterrupted run's weights, rate included."""
    def config(steps):
        return resolve_config("maml", task={"dataset": "sinusoid", "shots": 5},
                              method_config={"first_order_steps": 3, "test_inner_steps": 1},
                              train={"steps": steps, "meta_batch_size": 4, "log_every": 1, "val_every": 0,
                                     "checkpoint_every": 1, "eval_episodes": 4, "meta_lr": 0.01,
                                     "lr_anneal": "cosine", "min_meta_lr": 0.001})

    straight = build_trainer(config(6), tmp_path / "straight")
    straight.fit(progress=False)
    # the schedules depend on --steps, so the first part runs with --steps 6 and is cut short
    for stop in (2, 4):
        run_dir = tmp_path / f"cut{stop}"
        trainer = build_trainer(config(6), run_dir)
        real_step = trainer.learner.start_step

        def start_step(step, real_step=real_step, stop=stop):
            if step == stop:
                raise KeyboardInterrupt
            real_step(step)

        trainer.learner.start_step = start_step
        with pytest.raises(KeyboardInterrupt):
            trainer.fit(progress=False)
        resumed = build_trainer(config(6), run_dir, resume=True)
        assert resumed.step == stop
        resumed.fit(progress=False)
        a, b = parameters_of(straight.learner), parameters_of(resumed.learner)
        assert all(torch.equal(a[name], b[name]) for name in a), stop


def test_training_follows_the_learning_rate_schedule_also_after_a_resume(tmp_path):
    """The scheduler is stepped once per meta-step and restored with the checkpoint: halvings
    every 2 steps and the linear anneal together give a different rate at every step."""
    from metalearn.training import lr_factor

    both = sinusoid_config(6, meta_lr=0.01, lr_halve_every=2, lr_anneal="linear", val_every=0)
    trainer = build_trainer(both, tmp_path / "both")
    rates = record_learning_rates(trainer)
    trainer.fit(progress=False)
    assert rates == pytest.approx([0.01 * lr_factor(both.train, step) for step in range(6)], rel=1e-12)
    assert rates == pytest.approx([0.01 * h * (1 - step / 6) for step, h in enumerate([1, 1, .5, .5, .25, .25])],
                                  rel=1e-12)

    # 3 steps, then resumed to 6: the halvings go on from the checkpoint's step (a scheduler
    # started afresh would restart at the full rate)
    halving = dict(meta_lr=0.01, lr_halve_every=2, val_every=0)
    first = build_trainer(sinusoid_config(3, **halving), tmp_path / "split")
    before = record_learning_rates(first)
    first.fit(progress=False)
    resumed = build_trainer(sinusoid_config(6, **halving), tmp_path / "split", resume=True)
    after = record_learning_rates(resumed)
    resumed.fit(progress=False)
    assert before + after == pytest.approx([0.01, 0.01, 0.005, 0.005, 0.0025, 0.0025], rel=1e-12)


def test_extending_a_linearly_annealed_run_is_refused(tmp_path):
    build_trainer(sinusoid_config(2, lr_anneal="linear"), tmp_path).fit(progress=False)
    with pytest.raises(MetalearnError, match="train.steps: 2 there, 4 requested"):
        build_trainer(sinusoid_config(4, lr_anneal="linear"), tmp_path, resume=True)


def test_diverging_episodes_are_counted_and_warned_of_at_the_user_s_call(tmp_path):
    """evaluate_run, the test after train and compare_learners warn (MetalearnWarning) of what
    the command line says of a diverged score, naming the advice as Python spells it; the
    score's lines hold no warning, so the command line shows the warning once."""
    from metalearn.api import train
    from metalearn.evaluation import format_result, result_warnings
    from metalearn.uncertainty import compare_learners

    build_trainer(sinusoid_config(2), tmp_path).fit(progress=False)
    with pytest.warns(MetalearnWarning, match=re.escape(
            "10 of 10 episodes diverged (non-finite score); try fewer test-time steps, e.g. "
            "overrides={'test_inner_steps': 1}")) as caught:
        result = evaluate_run(tmp_path, episodes=10, progress=False, overrides={"inner_lr": 1e30})
    assert [w.filename for w in caught] == [__file__]  # the user's line, not the library's
    assert result["diverged"] == 10 and "diverged" not in format_result(result)
    assert [w.with_flags() for w in result_warnings(result)] == [
        "10 of 10 episodes diverged (non-finite score); try fewer test-time steps, e.g. --set test_inner_steps=1"]
    # the option is named only for a method that has it
    assert [str(w) for w in result_warnings({**result, "method": "protonet"})] == [
        "10 of 10 episodes diverged (non-finite score); try fewer test-time steps"]
    with warnings.catch_warnings():
        warnings.simplefilter("error", MetalearnWarning)  # a clean score: no warning
        assert evaluate_run(tmp_path, episodes=10, progress=False)["diverged"] == 0
    with pytest.warns(MetalearnWarning, match=re.escape(
            "4 of 4 episodes of a diverged (non-finite predictions), which makes its measures NaN; try fewer "
            "test-time steps, e.g. overrides={'test_inner_steps': 1}")) as caught:
        compared = compare_learners({"a": tmp_path}, episodes=4, overrides={"inner_lr": 1e30})
    assert compared["a"]["diverged"] == 4 and [w.filename for w in caught] == [__file__]
    # the initial weights of a run that trains none, tested with a learning rate that diverges
    config = resolve_config("maml", task={"dataset": "sinusoid"}, method_config={"inner_lr": 1e30},
                            train={"steps": 0, "eval_episodes": 4})
    with pytest.warns(MetalearnWarning, match="^4 of 4 episodes diverged") as caught:
        _, tested = train(config, tmp_path / "untrained", progress=False, announce=None)
    assert tested["diverged"] == 4 and [w.filename for w in caught] == [__file__]


def test_some_diverged_episodes_make_the_mean_nan_and_the_others_are_reported():
    from metalearn.evaluation import evaluate, result_warnings
    from metalearn.tasks import SinusoidTasks

    class EveryOtherDiverges(nn.Module):
        """Predicts 0 (MSE = the targets' mean square); every other task's prediction is NaN."""

        def __init__(self):
            super().__init__()
            self.unused = nn.Parameter(torch.zeros(1))

        def predict_per_step(self, batch):
            predictions = torch.zeros_like(batch.query_y).unsqueeze(0)
            predictions[:, ::2] = float("nan")
            return predictions

    source = SinusoidTasks(shots=5, query=10)
    result = evaluate(EveryOtherDiverges(), source, episodes=6, seed=3, chunk=6)
    targets = source.sample(6, torch.Generator().manual_seed(3)).query_y
    assert result["diverged"] == 3 and math.isnan(result["mean"])
    assert result["mean_of_finite"] == pytest.approx(float(targets[1::2].square().mean()), rel=1e-6)
    assert str(result_warnings(result)[0]).startswith(
        f"3 of 6 episodes diverged (non-finite score); the other 3 score {result['mean_of_finite']:.4f} on average")


def test_a_few_far_off_mse_episodes_are_named_and_a_huge_mean_is_printed_in_powers_of_ten():
    from metalearn.evaluation import evaluate, format_result, outliers, result_warnings
    from metalearn.tasks import SinusoidTasks

    class OneFarOff(nn.Module):
        """Predicts 0, except 1000 on task 4 (a finite adaptation gone far off)."""

        def __init__(self):
            super().__init__()
            self.unused = nn.Parameter(torch.zeros(1))

        def predict_per_step(self, batch):
            predictions = torch.zeros_like(batch.query_y).unsqueeze(0)
            predictions[:, 4] = 1000.0
            return predictions

    source = SinusoidTasks(shots=5, query=10)
    # scored at once: its prediction depends on a task's place in the batch, which the memory
    # measurement's call on one task does not have
    result = evaluate(OneFarOff(), source, episodes=20, seed=3, chunk=20, memory_budget=None)
    scores = torch.tensor(result["scores"])
    others = torch.cat([scores[:4], scores[5:]])
    assert result["outliers"] == 1 and result["outlier_max"] == pytest.approx(float(scores[4]))
    assert result["mean_without_outliers"] == pytest.approx(float(others.mean()))
    assert result["median"] == pytest.approx(float(scores.median())) and result["mean"] > 1000 * result["median"]
    [warning] = result_warnings(result)
    assert str(warning).startswith("1 of 20 tasks scores an MSE over 100 times the median task's")
    assert str(warning).endswith(f"the other 19 score {result['mean_without_outliers']:.4f} on average (per-task "
                                 "scores: the result's `scores`, also in the evaluation file)")
    assert warning.with_flags().endswith("(per-task scores: `scores` in the evaluation file)")
    # none where the scores are alike, where many are far off (that is the score), or for accuracy
    assert outliers(torch.tensor([1.0, 2.0, 3.0, 50.0]), "mse") == {}
    assert outliers(torch.tensor([1.0] * 8 + [500.0] * 2), "mse") == {}
    assert outliers(torch.tensor([1.0] * 19 + [500.0]), "accuracy") == {}
    assert outliers(torch.tensor([1.0] * 19 + [500.0]), "mse")["outliers"] == 1
    # many small far-off scores that do not carry the mean are not named
    assert outliers(torch.tensor([1.0] * 19 + [101.0]), "mse")["outliers"] == 1  # mean 6.0, the rest 1.0
    assert outliers(torch.tensor([0.0] * 10 + [1.0] * 9 + [101.0]), "mse") == {}  # median 0: no scale
    huge = {"metric": "mse", "mean": float("nan"), "ci95": float("nan"), "per_step": [1.0, 4.5e33], "episodes": 30,
            "diverged": 1, "mean_of_finite": 7.5e30, "outliers": 2, "outlier_max": 1e32, "median": 0.5,
            "mean_without_outliers": 0.75}
    diverged, far_off = (str(warning) for warning in result_warnings(huge))
    assert "after 0..1 adaptation steps: 1.000 4.5e+33" in format_result(huge)
    assert "the other 29 score 7.5e+30 on average" in diverged
    assert "the mean of the finite scores rests on them; the other 27 score 0.7500 on average" in far_off


def test_diverged_classification_episodes_score_nan_not_chance():
    """NaN logits have an argmax (class 0): without a check they would score like guesses."""
    from metalearn.evaluation import episode_scores
    from batches import image_batch

    batch = image_batch(tasks=4, ways=3, shots=1, query=2, dtype=torch.float32)

    class Diverging:
        def predict_per_step(self, batch):
            logits = torch.zeros(2, batch.num_tasks, batch.query_y.shape[1], batch.ways)
            logits[1, 1:3] = float("nan")  # tasks 1 and 2 diverge in the last step
            return logits

    scores = episode_scores(Diverging(), batch)
    assert torch.equal(scores[0], (batch.query_y == 0).float().mean(-1))  # all-zero logits: class 0
    assert torch.isnan(scores[1, 1:3]).all() and torch.isfinite(scores[1, [0, 3]]).all()


def test_result_text_lists_per_step_scores_only_when_there_are_several():
    from metalearn.evaluation import format_result

    result = {"metric": "accuracy", "mean": 91.2, "ci95": 0.23, "episodes": 1000, "diverged": 0}
    stepped = format_result({**result, "per_step": [5.0, 86.0, 91.2]})
    assert stepped == ("accuracy 91.20% +/- 0.23% (95% CI, 1000 episodes)\n"
                       "after 0..2 adaptation steps: 5.0 86.0 91.2")
    # a metric-based method, or Reptile without transduction (only final predictions are made):
    # no "after 0..0 adaptation steps" line that would misstate how many steps were taken
    assert format_result({**result, "per_step": [91.2]}) == "accuracy 91.20% +/- 0.23% (95% CI, 1000 episodes)"


def test_init_from_starts_with_another_runs_network(tmp_path, monkeypatch):
    """PLATIPUS's prior mean from a trained MAML run; its own parameters start afresh; a run
    with another network is refused with a clear message."""
    maml = build_trainer(sinusoid_config(3), tmp_path / "maml")
    maml.fit(progress=False)
    config = resolve_config("platipus", task={"dataset": "sinusoid", "shots": 5},
                            train={"steps": 0, "init_from": str(tmp_path / "maml")})
    platipus = build_trainer(config, tmp_path / "platipus").learner
    trained = maml.learner.model.state_dict()
    for name, value in platipus.model.state_dict().items():
        torch.testing.assert_close(value, trained[name], rtol=0, atol=0)
    fresh = build_trainer(resolve_config("platipus", task={"dataset": "sinusoid", "shots": 5}, train={"steps": 0}),
                          tmp_path / "fresh").learner
    assert not torch.equal(fresh.model.state_dict()["net.0.weight"], trained["net.0.weight"])
    torch.testing.assert_close(platipus.prior_step, fresh.prior_step)

    wider = resolve_config("maml", task={"dataset": "omniglot", "ways": 5, "shots": 1},
                           train={"steps": 0, "init_from": str(tmp_path / "maml")})
    with pytest.raises(MetalearnError, match="network differs"):
        initialise_from_run(build_learner("maml", wider.method_config, problem_of(wider.task)), tmp_path / "maml")
    # a run refuses it before any data is read (an image folder's decoding can take minutes), naming
    # the options that differ
    import metalearn.training

    monkeypatch.setattr(metalearn.training, "check_task_source", lambda *a: pytest.fail("the data was read first"))
    with pytest.raises(MetalearnError, match=r"network differs from this one \(at model\.[^;]*; dataset sinusoid "
                                             r"there, omniglot here\); both runs need the same network: the same "
                                             r"model \(or hidden\)"):
        build_trainer(wider, tmp_path / "wider")
    monkeypatch.undo()
    nowhere = dataclasses.replace(config, train=dataclasses.replace(config.train, init_from=str(tmp_path / "nowhere")))
    with pytest.raises(MetalearnError, match="no checkpoint"):
        build_trainer(nowhere, tmp_path / "other")
    assert not (tmp_path / "other").exists()  # a refused run leaves no folder behind


def test_trainer_tells_the_method_each_step(tmp_path):
    """The trainer calls ``start_step`` before every meta-step (MAML++'s loss schedule)."""
    trainer = build_trainer(sinusoid_config(4), tmp_path)
    seen = []
    trainer.learner.start_step = seen.append
    trainer.fit(progress=False)
    assert seen == [0, 1, 2, 3]


def test_a_non_finite_gradient_stops_before_the_update_and_keeps_the_checkpoint(tmp_path):
    """A finite loss whose gradient is infinite (sqrt at 0) must not reach Adam, which would
    write NaN into every weight and then into the next checkpoint."""
    trainer = build_trainer(sinusoid_config(6, checkpoint_every=2), tmp_path)
    real_meta_loss = trainer.learner.meta_loss

    def infinite_gradient_in_step_3(batch):
        loss, metrics = real_meta_loss(batch)
        if trainer.step == 2:
            loss = loss + torch.sqrt(loss - loss.detach())  # value unchanged, gradient infinite
        return loss, metrics

    trainer.learner.meta_loss = infinite_gradient_in_step_3
    with pytest.raises(MetalearnError, match=r"meta-gradient became non-finite at step 3.*Try a smaller inner_lr"):
        trainer.fit(progress=False)
    _, learner, step = load_trained(tmp_path)
    assert step == 2
    assert all(torch.isfinite(p).all() for p in learner.parameters())
    assert all(torch.isfinite(p).all() for p in trainer.learner.parameters())  # no update was taken
    # training into the folder again: a resume would repeat the step, so another run_dir is advised, not resume
    with pytest.raises(MetalearnError) as refused:
        build_trainer(sinusoid_config(6, checkpoint_every=2), tmp_path)
    assert re.fullmatch(rf"{re.escape(str(tmp_path))} already holds a run that diverged at step 3 \(.+\), which a "
                        r"resume repeats: train anew in another run_dir with other options \(a smaller learning "
                        rf"rate\), or with init_from {re.escape(str(tmp_path))} to keep its last good weights",
                        str(refused.value))
    assert "--run-dir" in refused.value.with_flags() and "resume=True" not in str(refused.value)
    # the advice followed: a new run from its last good weights
    new = build_trainer(sinusoid_config(6), tmp_path / "new")
    assert initialise_from_run(new.learner, tmp_path) > 0


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_all_finite_finds_one_bad_element_anywhere_and_keeps_large_finite_values(bad):
    """The trainer's check of gradients and weights: against torch.isfinite, element by element,
    across the dtypes a learner holds; the largest finite floats (whose norm overflows) pass."""
    shapes = [(4, 1, 3, 3), (4,), (5, 16), (5,), (1,)]
    dtypes = [torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.complex64]
    tensors = [torch.randn(shape).to(dtype) for shape, dtype in zip(shapes, dtypes)]
    assert all_finite(tensors) and all_finite([]) and all_finite([torch.empty(0), torch.arange(3)])
    assert all_finite([torch.full((1000,), torch.finfo(torch.float32).max), torch.full((3,), -6e4).half()])
    for i, tensor in enumerate(tensors):
        for position in (0, tensor.numel() // 2, -1):
            spoiled = [t.clone() for t in tensors]
            spoiled[i].view(-1)[position] = bad
            assert not all_finite(spoiled) and not all(torch.isfinite(t).all() for t in spoiled)
    assert not all_finite([torch.tensor([complex(1.0, bad)])])


def test_a_stop_signal_in_the_last_step_saves_it_and_skips_the_test_evaluation(tmp_path, monkeypatch):
    """A scheduler's SIGTERM (then SIGKILL) must not be answered with a whole test evaluation,
    nor with the last step's validation: the resume validates it, then evaluates."""
    from metalearn.api import train

    def signalled_in_the_last_step(*args, **kwargs):
        trainer = build_trainer(*args, **kwargs)
        signal_during_step(trainer, 3, signal.SIGTERM)
        return trainer

    monkeypatch.setattr("metalearn.api.build_trainer", signalled_in_the_last_step)
    with pytest.raises(TrainingInterrupted, match=r"after step 3 of 3.*continue with `metalearn\.train\(config, "
                                                  r"run_dir=.*, resume=True\)`"):
        train(sinusoid_config(3), tmp_path, progress=False)
    assert load_trained(tmp_path)[2] == 3
    assert not (tmp_path / "eval.json").exists()
    assert not any("val_mse" in r for r in RunDir(tmp_path).read_metrics())
    monkeypatch.undo()
    train(sinusoid_config(3), tmp_path, resume=True, progress=False)
    assert [r["step"] for r in RunDir(tmp_path).read_metrics() if "val_mse" in r] == [3]
    assert (tmp_path / "eval.json").exists()


def test_training_time_counts_meta_steps_only(tmp_path, monkeypatch):
    """elapsed_s and tasks_per_s measure meta-steps alone: on a fake clock, step s takes
    (s + 1) / 4 s and every validation and checkpoint 100 s, so the numbers are exact."""
    from types import SimpleNamespace

    clock = [1000.0]
    monkeypatch.setattr("metalearn.training.time", SimpleNamespace(perf_counter=lambda: clock[0]))
    trainer = build_trainer(sinusoid_config(4, val_every=1, log_every=2, checkpoint_every=1), tmp_path)
    real_meta_loss, real_save = trainer.learner.meta_loss, trainer.save

    def meta_loss(batch):
        clock[0] += (trainer.step + 1) / 4
        return real_meta_loss(batch)

    def save():
        real_save()
        clock[0] += 100

    def validate():
        clock[0] += 100

    trainer.learner.meta_loss = meta_loss
    monkeypatch.setattr(trainer, "save", save)
    monkeypatch.setattr(trainer, "validate", validate)
    trainer.fit(progress=False)
    assert clock[0] == 1000 + 2.5 + 100 * (4 + 6)  # four validations, six checkpoints (0, 1..4, the end)
    assert trainer.elapsed_s == 2.5  # 0.25 + 0.5 + 0.75 + 1
    records = [r for r in RunDir(tmp_path).read_metrics() if "tasks_per_s" in r]
    # each record covers the steps since the last one: 2 steps x 4 tasks in 0.75 s, then in 1.75 s
    assert [(r["step"], r["tasks_per_s"], r["elapsed_s"]) for r in records] == [(2, 8 / 0.75, 0.75),
                                                                              (4, 8 / 1.75, 2.5)]
    assert RunDir(tmp_path).read_checkpoint()["elapsed_s"] == 2.5


def test_resuming_with_fewer_steps_than_done_is_refused(tmp_path):
    build_trainer(sinusoid_config(4), tmp_path).fit(progress=False)
    with pytest.raises(MetalearnError, match="already at step 4; steps=2 would end it before that. Give steps=4 or "
                                             "more."):
        build_trainer(sinusoid_config(2), tmp_path, resume=True)


def test_checkpoints_hold_tensors_and_plain_values_only(tmp_path):
    """They load with ``weights_only=True``, and a file that would run pickled code is refused."""
    from metalearn.checkpoints import on_cpu

    trainer = build_trainer(sinusoid_config(2), tmp_path)
    trainer.fit(progress=False)
    torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    nested = on_cpu({"a": [torch.ones(2), (torch.zeros(1), 3)], "b": "x"})
    assert isinstance(nested["a"], list) and isinstance(nested["a"][1], tuple) and nested["b"] == "x"
    state = trainer.learner.state_dict()
    moved = on_cpu(state)
    assert type(moved) is type(state) and moved._metadata == state._metadata  # module versions kept
    torch.save({"step": 1, "payload": datetime.date(2026, 11, 30)}, tmp_path / "checkpoint.pt")  # not a tensor
    with pytest.raises(MetalearnError, match="checkpoint.pt is unreadable"):
        RunDir(tmp_path).read_checkpoint()


def test_a_run_refused_before_it_starts_leaves_no_empty_default_folder(tmp_path, monkeypatch):
    from metalearn.api import train

    monkeypatch.setenv("METALEARN_RUNS", str(tmp_path / "runs"))
    config = resolve_config("maml", task={"dataset": "omniglot", "ways": 3000}, train={"steps": 1})
    with pytest.raises(MetalearnError):
        train(config, data_dir=tmp_path / "no-data", progress=False)
    assert not any((tmp_path / "runs").iterdir())


def test_default_run_directories_never_collide(tmp_path):
    from metalearn.runs import claim_new_run_dir

    first = claim_new_run_dir(tmp_path / "runs", "maml-sinusoid-k5-20261130-010203")
    second = claim_new_run_dir(tmp_path / "runs", "maml-sinusoid-k5-20261130-010203")
    assert first.is_dir() and second.is_dir() and first != second
    assert second.name == "maml-sinusoid-k5-20261130-010203-2"


def test_bad_schedule_and_seed_options_are_refused():
    from metalearn.config import MAX_SEED, TrainConfig

    with pytest.raises(MetalearnError, match="TrainConfig.lr_halve_every must be >= 0"):
        TrainConfig(lr_halve_every=-1)
    with pytest.raises(MetalearnError, match="TrainConfig.seed must be between 0 and"):
        TrainConfig(seed=MAX_SEED + 1)
    TrainConfig(seed=MAX_SEED)


@pytest.mark.parametrize("train, message", [
    ({"meta_batch_size": 4}, "^meta_batch_size=4 is smaller than the 8 processes: every rank needs at least one task. "
                             "Raise meta_batch_size or start fewer processes.$"),
])
def test_shares_too_small_for_the_ranks_are_refused_at_the_start(tmp_path, train, message):
    from metalearn.distributed import World
    from metalearn.tasks import build_task_source
    from metalearn.training import Trainer

    config = sinusoid_config(2, **train)
    learner = build_learner(config.method, config.method_config, problem_of(config.task))
    tasks = build_task_source(config.task, "train")
    with pytest.raises(MetalearnError, match=message):
        Trainer(config, learner, tasks, build_task_source(config.task, "val"), tmp_path / "new", world=World(0, 8))
    assert not (tmp_path / "new").exists()  # refused before it made a folder


def test_a_run_older_than_an_option_resumes_with_its_default_and_refuses_another_value():
    from metalearn.config import RunConfig
    from metalearn.checkpoints import check_compatible

    requested = RunConfig("maml", method_config={"inner_lr": 0.4, "adapt_norm": True})
    saved = RunConfig("maml", method_config={"inner_lr": 0.4})  # config.json written before adapt_norm existed
    check_compatible(saved, requested, "the run")
    check_compatible(requested, saved, "the run")
    with pytest.raises(MetalearnError, match="method_config.adapt_norm: True there, False requested"):
        check_compatible(saved, dataclasses.replace(requested, method_config={"adapt_norm": False}), "the run")


def test_a_linearly_annealed_run_refuses_a_new_step_count_and_says_why():
    from metalearn.config import RunConfig, TrainConfig
    from metalearn.checkpoints import check_compatible

    saved = RunConfig("reptile", train=TrainConfig(steps=4, lr_anneal="linear"))
    longer = dataclasses.replace(saved, train=dataclasses.replace(saved.train, steps=6))
    with pytest.raises(MetalearnError, match=r"annealed \(linear\) over steps,"):
        check_compatible(saved, longer, "the run")
    check_compatible(dataclasses.replace(saved, train=TrainConfig(steps=4)),
                     dataclasses.replace(longer, train=TrainConfig(steps=6)), "the run")  # no anneal: fine


def test_a_trainer_built_by_hand_makes_a_run_directory_that_loads(tmp_path):
    """Your own task source and learner through Trainer: a path is enough; the folder and its
    config.json are written, so load_trained and `metalearn eval` read the run later."""
    from metalearn import MAML, SinusoidTasks, Trainer
    from metalearn.config import RunConfig, TaskConfig, TrainConfig
    from metalearn.models import MLP

    config = RunConfig("maml", TaskConfig(dataset="sinusoid", split="none", ways=0, shots=5, query=5),
                       {"model": "mlp", "inner_lr": 0.01}, TrainConfig(steps=3, meta_batch_size=2, val_every=0))
    torch.manual_seed(0)
    learner = MAML(MLP(), MAML.Config(model="mlp", inner_lr=0.01))
    trainer = Trainer(config, learner, SinusoidTasks(shots=5, query=5), None, tmp_path / "new" / "run")
    trainer.fit(progress=False)
    loaded_config, loaded, step = load_trained(tmp_path / "new" / "run")
    # the config given, with the learner's other options (its defaults here) recorded beside it
    assert step == 3 and loaded_config == trainer.config == dataclasses.replace(
        config, method_config={"model": "mlp", **dataclasses.asdict(learner.config), "model": "mlp"})
    for (name, a), b in zip(learner.state_dict().items(), loaded.state_dict().values()):
        assert torch.equal(a, b), name
    # rerunning the same lines (a notebook cell) is refused, not written over the run; a resume
    # continues it
    with pytest.raises(MetalearnError, match="already holds a run"):
        Trainer(config, learner, SinusoidTasks(shots=5, query=5), None, tmp_path / "new" / "run")
    more = dataclasses.replace(config, train=dataclasses.replace(config.train, steps=5))
    again = Trainer(more, learner, SinusoidTasks(shots=5, query=5), None, tmp_path / "new" / "run", resume=True)
    again.restore(RunDir(tmp_path / "new" / "run").read_checkpoint())
    again.fit(progress=False)
    assert load_trained(tmp_path / "new" / "run")[2] == 5
    assert RunDir(tmp_path / "new" / "run").read_config().train.steps == 5


def test_learning_curves_show_a_run_of_a_single_record(tmp_path):
    # one metrics line (a run shorter than --log-every): its point is drawn, not an empty panel
    from PIL import Image

    from metalearn.plotting import plot_learning_curves

    path = plot_learning_curves([{"step": 20, "loss": 1.5}], tmp_path / "curves.png")
    pixels = torch.tensor(list(Image.open(path).convert("RGB").tobytes())).view(-1, 3)
    line_colour = torch.tensor([31, 119, 180])  # matplotlib's first colour
    assert int(((pixels - line_colour).abs().sum(dim=1) < 30).sum()) > 5


def test_learning_curves_draw_metrics_not_the_timing_of_validation(tmp_path):
    """A validation record's validation_s (seconds, for metalearn status) gets no panel: the
    figure, one panel per series, is as wide with it as without it."""
    from PIL import Image

    from metalearn.plotting import plot_learning_curves

    records = [{"step": 1, "loss": 1.5}, {"step": 2, "loss": 1.2},
               {"step": 2, "val_mse": 0.7, "val_ci95": 0.1, "elapsed_s": 3.0}]
    plain = plot_learning_curves(records, tmp_path / "plain.png")
    records[-1]["validation_s"] = 0.4
    timed = plot_learning_curves(records, tmp_path / "timed.png")
    assert Image.open(timed).size == Image.open(plain).size


def test_learning_curves_leave_rare_spikes_off_the_axis_and_say_so():
    from metalearn.plotting import axis_limits

    steady = [-200.0 + (i % 7) for i in range(50)]
    assert axis_limits(steady) is None  # nothing to leave out
    low, high, outside = axis_limits(steady[:25] + [-13830.0] + steady[25:])
    assert outside == 1 and -210 < low < -200 and -194 < high < -185
    assert axis_limits([1.0, 1e6] * 5) is None  # too few points to tell a spike from the curve
    low, high, outside = axis_limits([1.0] * 40 + [0.2])  # one value but a spike: an axis of some height
    assert outside == 1 and low == pytest.approx(0.95) and high == pytest.approx(1.05)


def test_a_run_on_a_task_source_of_your_own_is_not_evaluated_on_a_built_in_one(tmp_path):
    """config.json can only name a built-in dataset; the checkpoint records the task source, so
    `eval` refuses a run whose tasks it cannot rebuild instead of scoring it on sinusoids."""
    from metalearn import MAML, SinusoidTasks, Trainer
    from metalearn.config import RunConfig, TaskConfig, TrainConfig
    from metalearn.models import MLP

    class LineTasks(SinusoidTasks):  # the user's own tasks, here lines in a sinusoid's clothing
        pass

    config = RunConfig("maml", TaskConfig(dataset="sinusoid", split="none", ways=0, shots=5, query=5),
                       {"model": "mlp", "inner_lr": 0.01}, TrainConfig(steps=1, meta_batch_size=2, val_every=0))
    learner = MAML(MLP(), MAML.Config(model="mlp", inner_lr=0.01))
    Trainer(config, learner, LineTasks(shots=5, query=5), None, tmp_path / "own").fit(progress=False)
    state = RunDir(tmp_path / "own").read_checkpoint()
    assert state["task_source"].endswith("LineTasks")
    with pytest.raises(MetalearnError, match="task source of your own"):
        evaluate_run(tmp_path / "own", episodes=4, progress=False)
    learner.load_state_dict(state["learner"])  # the documented way back to the weights


def test_a_run_records_the_options_of_the_learner_that_trained(tmp_path):
    """A learner built in Python carries options of its own: the run records those, not the
    config's, so that eval rebuilds the method that trained (10 test steps would score another
    algorithm); a resume with other options is refused as any changed option is; a learner of
    another method than the config's is refused in one line."""
    from metalearn import MAML, ProtoNet, SinusoidTasks, Trainer
    from metalearn.models import MLP

    config = resolve_config("maml", task={"dataset": "sinusoid"},
                            train={"steps": 2, "meta_batch_size": 2, "val_every": 0, "checkpoint_every": 2})
    options = {"inner_lr": 0.5, "test_inner_steps": 2}
    Trainer(config, MAML(MLP(), options), SinusoidTasks(), None, tmp_path / "own").fit(progress=False)
    assert config.method_config["inner_lr"] == 0.01  # the caller's config is left as it was
    recorded = RunDir(tmp_path / "own").read_config().method_config
    assert {key: recorded[key] for key in options} == options and recorded["model"] == "mlp"
    _, learner, _ = load_trained(tmp_path / "own")
    assert (learner.config.inner_lr, learner.config.test_inner_steps) == (0.5, 2)
    assert len(evaluate_run(tmp_path / "own", episodes=2, progress=False)["per_step"]) == 3  # steps 0, 1, 2

    saved = resolve_config("maml", train={"steps": 4}, resume_from=tmp_path / "own")
    with pytest.raises(MetalearnError, match="inner_lr"):
        Trainer(saved, MAML(MLP(), {**options, "inner_lr": 0.1}), SinusoidTasks(), None, tmp_path / "own",
                resume=True).restore(RunDir(tmp_path / "own").read_checkpoint())
    with pytest.raises(MetalearnError, match=r"^the learner is protonet \(ProtoNet\) but the config is for maml: "
                                             r"build the config for the learner, metalearn.resolve_config\('protonet'"):
        Trainer(config, ProtoNet(MLP()), SinusoidTasks(), None, tmp_path / "other")
    # a subclass whose Config adds options: the registered method's are recorded, so config.json reads
    @dataclasses.dataclass(frozen=True)
    class WiderConfig(MAML.Config):
        inner_loss: str = "mse"

    class MyMAML(MAML):
        Config = WiderConfig

    Trainer(config, MyMAML(MLP(), WiderConfig()), SinusoidTasks(), None, tmp_path / "sub").fit(progress=False)
    assert "inner_loss" not in RunDir(tmp_path / "sub").read_config().method_config

    class Renamed(MAML):
        name = "my-maml"

    with pytest.raises(MetalearnError, match=r"resolve_config\('my-maml', ...\) \(after "
                                             r"metalearn.algorithms.register_method\(Renamed\)\)$"):
        Trainer(config, Renamed(MLP()), SinusoidTasks(), None, tmp_path / "other")
    with pytest.raises(MetalearnError, match="^Trainer takes a RunConfig"):
        Trainer({"train": {"steps": 2}}, MAML(MLP()), SinusoidTasks(), None, tmp_path / "other")


@pytest.mark.parametrize("resume", [False, True])
def test_a_run_killed_before_its_first_checkpoint_starts_again(tmp_path, resume):
    """config.json and no checkpoint: a run that never started. Started again, with --resume or
    without, with its options or others, it trains as a new run would."""
    RunDir(tmp_path / "run").write_config(sinusoid_config(2))  # what a kill between the two leaves
    other = sinusoid_config(3, seed=5)
    trainer = build_trainer(other, tmp_path / "run", resume=resume)
    assert trainer.step == 0
    trainer.fit(progress=False)
    alone = build_trainer(other, tmp_path / "alone")
    alone.fit(progress=False)
    assert RunDir(tmp_path / "run").read_config() == other
    for name, value in parameters_of(alone.learner).items():
        assert torch.equal(value, trainer.learner.state_dict()[name]), name


def test_a_run_killed_before_its_first_checkpoint_restarts_from_the_command_line(tmp_path, capsys):
    import cli_runner

    args = ["train", "maml", "--dataset", "sinusoid", "--steps", 2, "--meta-batch-size", 2, "--no-progress",
            "--no-eval", "--run-dir", tmp_path]
    RunDir(tmp_path).write_config(resolve_config("maml", task={"dataset": "sinusoid"}, train={"steps": 2}))
    code, out, err = cli_runner.run([*args, "--resume"], capsys)
    assert code == 0 and "starting: maml" in out, err
    (tmp_path / "checkpoint.pt").unlink()
    (tmp_path / "metrics.jsonl").unlink()
    code, out, err = cli_runner.run([*args, "--seed", 4], capsys)  # afresh, another seed
    assert code == 0, err
    assert RunDir(tmp_path).read_config().train.seed == 4


def test_config_json_is_written_once_at_the_start(tmp_path, monkeypatch):
    written = []
    plain = RunDir.write_config
    monkeypatch.setattr(RunDir, "write_config",
                        lambda self, config, **options: written.append(config) or plain(self, config, **options))
    trainer = build_trainer(sinusoid_config(2, checkpoint_every=100), tmp_path)
    assert written == [] and not (tmp_path / "config.json").exists()  # not before the first checkpoint
    trainer.fit(progress=False)
    assert written == [sinusoid_config(2, checkpoint_every=100)]


def test_grad_clip_clips_every_element_of_the_meta_gradient_before_the_step(tmp_path):
    """With plain SGD at lr 1, one step moves each weight by exactly minus its clipped gradient,
    computed here independently on the step's batch; without clipping some elements move further."""
    import copy

    from metalearn.training import meta_gradient, step_seed

    clip = 1e-3
    trainer = build_trainer(sinusoid_config(1, meta_optimizer="sgd", meta_lr=1.0, grad_clip=clip), tmp_path / "run")
    before = {k: v.detach().clone() for k, v in trainer.learner.named_parameters()}
    reference = copy.deepcopy(trainer.learner)
    batch = trainer.train_tasks.sample(4, torch.Generator().manual_seed(step_seed(trainer.config.train.seed, 0)))
    reference.start_step(0)
    meta_gradient(reference, batch)
    grads = {k: p.grad.detach().clone() for k, p in reference.named_parameters()}
    assert max(float(g.abs().max()) for g in grads.values()) > 10 * clip  # the clip bites
    trainer.fit(progress=False)
    for name, p in trainer.learner.named_parameters():
        torch.testing.assert_close(before[name] - p.detach(), grads[name].clamp(-clip, clip), rtol=1e-5, atol=1e-7)


def test_grad_clip_must_be_a_number_of_at_least_0():
    from metalearn.config import TrainConfig

    with pytest.raises(MetalearnError, match="TrainConfig.grad_clip must be a finite number >= 0"):
        TrainConfig(grad_clip=-1.0)


def test_steps_0_trains_nothing_says_so_and_tests_the_initial_weights(tmp_path, capsys):
    """--steps 0 is a baseline on purpose (the initial weights, saved and tested), and the
    command says so rather than looking like a finished training run."""
    import cli_runner

    code, out, err = cli_runner.run(["train", "maml", "--dataset", "sinusoid", "--steps", 0, "--meta-batch-size", 2,
                                     "--eval-episodes", 10, "--no-progress", "--run-dir", tmp_path], capsys)
    assert code == 0, err
    assert "(--steps 0: no training; the initial weights are saved and tested)" in out.splitlines()[0]
    assert load_trained(tmp_path)[2] == 0 and (tmp_path / "eval.json").is_file()
    config = resolve_config("maml", task={"dataset": "sinusoid"})
    torch.manual_seed(config.train.seed)  # as training draws its initial weights
    initial = build_learner("maml", config.method_config, problem_of(config.task))
    for name, value in load_trained(tmp_path)[1].state_dict().items():
        assert torch.equal(value, initial.state_dict()[name]), name


def test_the_python_api_refuses_what_its_signatures_do_not_take_in_one_line(tmp_path):
    """What a user of the Python API plausibly passes wrong: a dict for a RunConfig, a file for a
    run folder, a misspelt option, an unknown part, a seed or episode count that is no count, a
    list of runs for compare's {label: run}. Each is a MetalearnError naming what is wanted."""
    from metalearn.api import train
    from metalearn.uncertainty import compare_learners

    config = resolve_config("maml", task={"dataset": "sinusoid"},
                            train={"steps": 1, "meta_batch_size": 2, "val_every": 0, "eval_episodes": 2})
    with pytest.raises(MetalearnError, match="train takes a RunConfig .*got dict"):
        train(config.to_dict(), run_dir=tmp_path / "dict", progress=False)
    file = tmp_path / "notes.txt"
    file.write_text("not a run")
    with pytest.raises(MetalearnError, match=f"{file} is a file, not a folder; give a folder path"):
        train(config, run_dir=file, progress=False)
    with pytest.raises(MetalearnError, match="TaskConfig has no option\\(s\\) 'shot'; known: .*shots"):
        resolve_config("maml", task={"dataset": "sinusoid", "shot": 5})
    with pytest.raises(MetalearnError, match="TrainConfig has no option\\(s\\) 'stepz'"):
        resolve_config("maml", task={"dataset": "sinusoid"}, train={"stepz": 5})
    with pytest.raises(MetalearnError, match="resolve_config's task is a dict of options"):
        resolve_config("maml", task="sinusoid")
    run_dir, _ = train(config, run_dir=tmp_path / "run", progress=False, evaluate_after=False)
    for kwargs, message in (({"part": "testing"}, "unknown split part 'testing': give test, val or train"),
                            ({"seed": "1"}, "seed must be a whole number from 0 to"),
                            ({"seed": -1}, "seed must be a whole number from 0 to"),
                            ({"episodes": 0}, "episodes must be a whole number of at least 1, got 0")):
        with pytest.raises(MetalearnError, match=message):
            evaluate_run(run_dir, progress=False, **kwargs)
    assert not list(run_dir.glob("eval*.json"))
    with pytest.raises(MetalearnError, match="compare_learners takes \\{label: run directory\\}, got list; e.g. "
                                             "metalearn.uncertainty.run_labels\\(run_dirs\\)"):
        compare_learners([run_dir], episodes=2)
    from metalearn.uncertainty import run_labels  # the labels metalearn compare gives

    assert run_labels([run_dir]) == {"run": run_dir}
    with pytest.raises(MetalearnError, match=r"^the run \S+ is given twice; give each run once$"):
        run_labels([run_dir, tmp_path / "." / "run"])
    with pytest.raises(MetalearnError, match="unknown split part 'Test'"):
        compare_learners({"maml": run_dir}, episodes=2, part="Test")
    with pytest.raises(MetalearnError, match="grid_points must be a whole number of at least 1, got 0"):
        compare_learners({"maml": run_dir}, episodes=2, grid_points=0)


def test_a_run_whose_folder_is_taken_during_its_final_test_writes_no_result_there(tmp_path, monkeypatch):
    """`rm -rf run` while training tests its last step, then a new run under that name: the test's
    result must not land in the new run's folder (the write goes by path)."""
    import shutil

    import metalearn.api as api

    config = resolve_config("maml", task={"dataset": "sinusoid", "shots": 5},
                            train={"steps": 2, "meta_batch_size": 2, "val_every": 0, "eval_episodes": 4})
    folder = tmp_path / "run"
    taken = []
    real_evaluate = api.evaluate

    def evaluate(*args, **kwargs):  # the test runs; meanwhile the folder goes and another run takes its name
        result = real_evaluate(*args, **kwargs)
        shutil.rmtree(folder)
        taken.append(RunDir(folder).lock())
        return result

    monkeypatch.setattr(api, "evaluate", evaluate)
    with pytest.raises(MetalearnError, match=rf"the run folder {folder} was deleted, moved or replaced"):
        api.train(config, folder, progress=False)
    assert sorted(p.name for p in folder.iterdir()) == [".lock"]  # no eval.json of the old run
    assert taken[0].still_ours()
    taken[0].release()


def test_a_stored_configuration_is_refused_as_a_file_not_as_flags():
    """A config.json from a later version (an option this one lacks), or one edited by hand (a
    value of the wrong type): named by its fields, never as command-line flags nobody typed."""
    from metalearn.config import RunConfig

    stored = sinusoid_config(2).to_dict()
    for part, key in (("train", "new_future_option"), ("method_config", "new_inner_thing"), ("task", "zoom")):
        data = json.loads(json.dumps(stored))
        data[part][key] = 1
        with pytest.raises(MetalearnError, match=rf"options that this metalearn does not know \({part}.{key}\): "
                                                 r"it was written by a newer version \(upgrade metalearn"):
            RunConfig.from_dict(data)
    data = json.loads(json.dumps(stored))
    data["train"]["steps"] = "abc"
    with pytest.raises(MetalearnError, match=r"^invalid run configuration: TrainConfig.steps must be int"):
        RunConfig.from_dict(data)


def test_training_into_a_run_folder_again_names_the_python_way_to_continue(tmp_path):
    # a notebook cell run twice: the refusal names resume=True beside the command line's --resume
    from metalearn.api import train

    train(sinusoid_config(1), tmp_path / "run", progress=False, evaluate_after=False, announce=lambda _: None)
    with pytest.raises(MetalearnError, match=r"already holds a run; continue it \(resume=True\) or choose another "
                                             r"run_dir$"):
        train(sinusoid_config(1), tmp_path / "run", progress=False, evaluate_after=False, announce=lambda _: None)


def test_float16_weights_under_an_adam_are_refused_before_training(tmp_path):
    """Adam's eps, 1e-8, is 0 in float16: the first step would divide 0 by 0 and the trainer
    blame meta_lr. Refused in one line where an Adam updates float16 weights (the meta-optimiser,
    Reptile's inner one), before anything is written; SGD and bfloat16 are taken."""
    from metalearn import SinusoidTasks, Trainer

    def trainer(method, dtype, path, options=None, **train):
        config = resolve_config(method, task={"dataset": "sinusoid"}, method_config=options,
                                train={"steps": 2, "meta_batch_size": 2, "val_every": 0, **train})
        learner = build_learner(method, config.method_config, problem_of(config.task)).to(dtype)
        return Trainer(config, learner, SinusoidTasks(), None, tmp_path / path)

    with pytest.raises(MetalearnError, match=r"^the learner's weights are torch.float16, in which the meta-optimiser "
                                             r"Adam's eps \(1e-8\) rounds to 0 and the first step divides 0 by 0: "
                                             r"train in bfloat16 or float32 \(learner.to\(torch.bfloat16\)\), or "
                                             r"with meta_optimizer sgd$"):
        trainer("maml", torch.float16, "adam")
    with pytest.raises(MetalearnError, match=r"in which reptile's inner Adam's eps .* or with inner_optimizer sgd$"):
        trainer("reptile", torch.float16, "inner", {"model": "mlp", "inner_optimizer": "adam"}, meta_optimizer="sgd")
    assert not (tmp_path / "adam").exists() and not (tmp_path / "inner").exists()
    trainer("maml", torch.float16, "sgd", meta_optimizer="sgd")
    trainer("reptile", torch.float16, "inner-sgd", {"model": "mlp", "inner_optimizer": "sgd"}, meta_optimizer="sgd")
    trainer("maml", torch.bfloat16, "bf16")


def test_a_float64_run_resumes_only_in_float64_and_loads_in_float64(tmp_path):
    """A run keeps its floating-point type: a resume with a learner of another (a float32 learner
    for a float64 run) is refused in one line, not continued in float32 by load_state_dict's
    cast; build_trainer's resume (metalearn train --resume) and load_trained build the learner in
    the run's type, whose weights are the saved ones, and evaluate_run scores it so (MAML-RL: its
    policy converts the environment's float32 observations and actions at its boundary)."""
    from metalearn import Trainer
    from metalearn.envs import MDPTasks
    from metalearn.envs.nav2d import Nav2D

    config = resolve_config("maml-rl", {"dataset": "nav2d"}, {"trajectories": 2, "test_trajectories": 2, "horizon": 5,
                                                               "hidden": 4},
                            {"steps": 2, "meta_batch_size": 2, "val_every": 0, "checkpoint_every": 1})

    def trainer(dtype, resume=False):
        torch.manual_seed(0)
        learner = build_learner("maml-rl", config.method_config, problem_of(config.task)).to(dtype)
        return Trainer(config, learner, MDPTasks(Nav2D()), None, tmp_path / "run", resume=resume)

    with pytest.raises(TrainingStopped):
        trainer(torch.float64).fit(progress=False, stop_at=1)
    with pytest.raises(MetalearnError, match=r"^the checkpoint in .*run: the run's weights are torch.float64 and this "
                                             r"learner's torch.float32: convert the learner first "
                                             r"\(learner.to\(torch.float64\)\)$"):
        trainer(torch.float32, resume=True).fit(progress=False)
    resumed = build_trainer(config, tmp_path / "run", resume=True)  # metalearn train --resume builds float32
    resumed.fit(progress=False)
    assert resumed.step == 2 and {p.dtype for p in resumed.learner.parameters()} == {torch.float64}
    saved = RunDir(tmp_path / "run").read_checkpoint()["learner"]
    _, loaded, step = load_trained(tmp_path / "run")
    assert step == 2 and {p.dtype for p in loaded.parameters()} == {torch.float64}
    for name, value in loaded.state_dict().items():
        assert value.dtype == saved[name].dtype and torch.equal(value, saved[name]), name
    assert math.isfinite(evaluate_run(tmp_path / "run", episodes=2, progress=False)["mean"])


def test_a_trainer_built_to_resume_continues_the_run_without_an_explicit_restore(tmp_path):
    """Trainer(..., resume=True).fit() restores the checkpoint itself: it continues the run (the
    weights of an uninterrupted one), never trains over it from step 0."""
    from metalearn import MAML, SinusoidTasks, Trainer
    from metalearn.models import MLP

    def trainer(path, steps, resume=False):
        torch.manual_seed(1 if resume else 0)  # a resume's own initial weights are not what it continues
        return Trainer(sinusoid_config(steps, val_every=0), MAML(MLP(), {"test_inner_steps": 2}),
                       SinusoidTasks(shots=5), None, path, resume=resume)

    straight = trainer(tmp_path / "straight", 6)
    straight.fit(progress=False)
    with pytest.raises(TrainingStopped):
        trainer(tmp_path / "split", 6).fit(progress=False, stop_at=4)
    resumed = trainer(tmp_path / "split", 6, resume=True)
    assert resumed.step == 0
    resumed.fit(progress=False)
    assert resumed.step == 6
    for name, value in parameters_of(straight.learner).items():
        assert torch.equal(value, resumed.learner.state_dict()[name]), name
    steps = [r["step"] for r in RunDir(tmp_path / "split").read_metrics() if "loss" in r]
    assert steps == sorted(set(steps)) and steps[-1] == 6
    # fewer steps than the run has taken: refused before anything is written, as build_trainer does
    written = (tmp_path / "split" / "config.json").read_bytes()
    with pytest.raises(MetalearnError, match="is already at step 6; steps=4 would end it before that"):
        trainer(tmp_path / "split", 4, resume=True).fit(progress=False)
    assert (tmp_path / "split" / "config.json").read_bytes() == written


def test_a_run_whose_first_step_failed_is_refused_as_a_model_to_score(tmp_path):
    """config.json and the step-0 checkpoint of an attempt that failed in its first step hold no
    trained weights: load_trained and evaluate_run say so instead of scoring the initial ones;
    training into the folder starts it over."""
    trainer = build_trainer(sinusoid_config(2), tmp_path)
    trainer.learner.meta_loss = lambda batch: (_ for _ in ()).throw(RuntimeError("boom"))
    with pytest.raises(RuntimeError, match="boom"):
        trainer.fit(progress=False)
    assert RunDir(tmp_path).has_checkpoint() and RunDir(tmp_path).read_checkpoint("step")["step"] == 0
    for load in (lambda: load_trained(tmp_path), lambda: evaluate_run(tmp_path, episodes=2, progress=False)):
        with pytest.raises(MetalearnError, match="holds no trained step: its training stopped or failed in the first"):
            load()
    assert not (tmp_path / "eval.json").exists()
    with pytest.raises(MetalearnError, match="init_from .*: it holds no trained step"):  # nor as a start
        initialise_from_run(build_trainer(sinusoid_config(2), tmp_path / "other", lock=False).learner, tmp_path)
    build_trainer(sinusoid_config(2), tmp_path).fit(progress=False)  # started over
    assert load_trained(tmp_path)[2] == 2


def test_a_diverging_method_without_an_inner_loop_is_advised_on_its_own_options(tmp_path):
    """A ProtoNet has no inner step size or steps: the advice names the meta learning rate alone."""
    from metalearn import EpisodeSampler, ProtoNet, Trainer
    from metalearn.models import MLP

    config = resolve_config("protonet", task={"dataset": "omniglot", "ways": 2, "shots": 1, "query": 1},
                            train={"steps": 3, "val_every": 0, "meta_batch_size": 2, "log_every": 1})
    sampler = EpisodeSampler.from_labels(torch.randn(40, 4), torch.arange(40) % 4, ways=2, shots=1, query=1)
    trainer = Trainer(config, ProtoNet(MLP(4, None, hidden=(8,))), sampler, None, tmp_path)
    real_meta_loss = trainer.learner.meta_loss
    trainer.learner.meta_loss = lambda batch: (lambda loss, metrics: (loss * float("nan"), metrics))(
        *real_meta_loss(batch))
    with pytest.raises(MetalearnError, match=r"meta-loss became nan at step 1.*Try a smaller meta_lr, in a new "
                                             r"run_dir \(a resume repeats this step\)\.$"):
        trainer.fit(progress=False)


def test_a_trainer_of_one_s_own_without_val_tasks_says_it_will_not_validate(tmp_path):
    """val_every > 0 (resolve_config's default) and no val_tasks: training goes on without
    validation, and says so once; build_trainer's runs on datasets without validation do not."""
    from metalearn import MAML, SinusoidTasks, Trainer
    from metalearn.models import MLP

    config = sinusoid_config(2, val_every=1)
    with pytest.warns(UserWarning, match="val_every is 1 but this Trainer has no val_tasks: it trains without "
                                         "validation and keeps no best checkpoints; give val_tasks, or set "
                                         "val_every to 0"):
        Trainer(config, MAML(MLP(), {"test_inner_steps": 2}), SinusoidTasks(shots=5), None, tmp_path / "a").fit(
            progress=False)
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for name, steps, every in (("b", 2, 0), ("c", 2, 5)):  # no validation asked, or none within the run
            Trainer(sinusoid_config(steps, val_every=every), MAML(MLP(), {"test_inner_steps": 2}),
                    SinusoidTasks(shots=5), None, tmp_path / name).fit(progress=False)
        # the complete run resumed: nothing left to validate
        Trainer(config, MAML(MLP(), {"test_inner_steps": 2}), SinusoidTasks(shots=5), None, tmp_path / "a",
                resume=True).fit(progress=False)


def test_init_from_a_run_of_another_split_of_the_dataset_warns_of_its_classes(tmp_path, omniglot_data_dir):
    """Starting weights trained on the maml split have seen a third of the vinyals test
    characters: a run of vinyals started from them is warned in one line naming both splits; a
    run of the same split, or of another dataset, is not."""
    source = resolve_config("protonet", task={"dataset": "omniglot", "split": "maml", "ways": 2, "shots": 1,
                                              "query": 1}, train={"steps": 1, "val_every": 0, "meta_batch_size": 1})
    build_trainer(source, tmp_path / "maml", data_dir=omniglot_data_dir).fit(progress=False)

    def started(split):
        config = resolve_config("protonet", task={"dataset": "omniglot", "split": split, "ways": 2, "shots": 1,
                                                  "query": 1}, train={"steps": 0, "init_from": str(tmp_path / "maml")})
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            build_trainer(config, tmp_path / f"to-{split}", data_dir=omniglot_data_dir)
        return [str(w.message) for w in caught if issubclass(w.category, MetalearnWarning)]

    assert started("vinyals") == [
        "this run starts from weights that have seen classes it will be scored on: 411 of its validation and test "
        f"characters were seen by init_from {tmp_path / 'maml'}, a run of the maml split (in training, or in the "
        "validation that chose them), which would overstate its scores; start from a run of the same split"]
    assert started("maml") == []


def test_init_from_a_run_of_the_same_folder_split_otherwise_warns_only_of_classes_it_shares(tmp_path):
    """Class folders: the source's split.json against this run's parts, by name, on the folder
    the source trained on. Fractions spelled out as the default split alike: no warning."""
    from images import write_tiny

    data = tmp_path / "data"
    write_tiny(data, {f"c{i}": 4 for i in range(10)})
    common = {"dataset": "folder", "ways": 2, "shots": 1, "query": 1, "image_size": 16, "channels": 1}
    source = resolve_config("protonet", task={**common, "split_fractions": "0.6,0.2,0.2"},
                            train={"steps": 1, "val_every": 0, "meta_batch_size": 1})
    build_trainer(source, tmp_path / "src", data_dir=data).fit(progress=False)

    def started(fractions, name):
        config = resolve_config("protonet", task={**common, "split_fractions": fractions},
                                train={"steps": 0, "init_from": str(tmp_path / "src")})
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            build_trainer(config, tmp_path / name, data_dir=data)
        return [str(w.message) for w in caught if issubclass(w.category, MetalearnWarning)]

    assert started("0.6,0.2,0.2", "same") == []
    warned = started("0.2,0.2,0.6", "other")
    assert len(warned) == 1 and "of its validation and test classes were seen by " \
        f"init_from {tmp_path / 'src'} (its split.json)" in warned[0], warned


def test_on_record_receives_every_record_metrics_jsonl_gets(tmp_path):
    """fit's on_record sees a copy of each logged training window and validation, the same as
    metrics.jsonl holds (for TensorBoard or W&B); train passes it on; a callback that raises
    ends the fit, which resumes; a callback that is no function is refused in one line."""
    from metalearn import api

    seen = []
    trainer = build_trainer(sinusoid_config(4, val_every=2, log_every=1), tmp_path / "run")
    trainer.fit(progress=False, on_record=seen.append)
    assert seen == RunDir(tmp_path / "run").read_metrics()
    assert [("loss" in r, "val_mse" in r) for r in seen] == [(True, False), (True, False), (False, True),
                                                             (True, False), (True, False), (False, True)]
    seen[0]["loss"] = "changed"  # a copy: the trainer's own record is not the callback's to change
    assert RunDir(tmp_path / "run").read_metrics()[0]["loss"] != "changed"

    def failing(record):
        if record["step"] == 3:
            raise RuntimeError("the dashboard is down")

    config = sinusoid_config(4, val_every=0, log_every=1)
    trainer = build_trainer(config, tmp_path / "failing")
    with pytest.raises(RuntimeError, match="the dashboard is down"):
        trainer.fit(progress=False, on_record=failing)
    build_trainer(config, tmp_path / "failing", resume=True).fit(progress=False)
    assert load_trained(tmp_path / "failing")[2] == 4
    with pytest.raises(MetalearnError, match="^on_record is a function of one record \\(a dict\\), got str$"):
        build_trainer(config, tmp_path / "other").fit(progress=False, on_record="print")
    from_train = []
    api.train(config, tmp_path / "api", progress=False, evaluate_after=False, announce=None,
              on_record=from_train.append)
    assert len(from_train) == 4 and [r["step"] for r in from_train] == [1, 2, 3, 4]


def test_a_default_run_name_tells_a_seed_other_than_the_default():
    """Runs of a seed sweep started without --run-dir: their names say their seeds."""
    from metalearn.runs import new_run_name

    assert re.fullmatch(r"maml-sinusoid-k5-\d{8}-\d{6}", new_run_name(sinusoid_config(2)))
    assert re.fullmatch(r"maml-sinusoid-k5-seed7-\d{8}-\d{6}", new_run_name(sinusoid_config(2, seed=7)))


def test_a_trainer_that_fits_again_after_a_pause_keeps_its_metrics(tmp_path):
    """fit(stop_at=3), then fit() on the same Trainer (a notebook looking at a run half-way):
    metrics.jsonl holds every step once, 1 to 6 (a new run's clean-up of an attempt's records
    must not take a paused run's)."""
    trainer = build_trainer(sinusoid_config(6, val_every=0, log_every=1), tmp_path)
    with pytest.raises(TrainingStopped):
        trainer.fit(progress=False, stop_at=3)
    trainer.fit(progress=False)
    assert [record["step"] for record in RunDir(tmp_path).read_metrics()] == [1, 2, 3, 4, 5, 6]


def test_a_progress_bar_that_cannot_be_written_ends_no_training(tmp_path, monkeypatch):
    """From Python, with the error output on a full disk (``2> log``): the bar falls silent and
    training goes on to its end, where a failed write used to end it and lose its steps."""
    import sys

    from cli_runner import FullDisk

    monkeypatch.setattr(sys, "stderr", FullDisk())
    trainer = build_trainer(sinusoid_config(4, val_every=0), tmp_path, progress=True)
    trainer.fit(progress=True)
    assert RunDir(tmp_path).read_checkpoint()["step"] == 4
    evaluate_run(tmp_path, episodes=3, progress=True)  # the evaluation's bar too
