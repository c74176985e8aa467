"""A Trainer whose fit failed (an error, a memory error or a second Ctrl-C in a step) is retried:
the same trainer goes on from the run's last checkpoint, exactly, and a new trainer starts over
an attempt that failed in its first step."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from metalearn import MAML, SinusoidTasks
from metalearn.api import resolve_config, train
from metalearn.checkpoints import load_trained
from metalearn.errors import MetalearnError
from metalearn.locking import lock_is_held
from metalearn.models import MLP
from metalearn.runs import RunDir
from metalearn.training import Trainer, build_trainer, untrained_attempt
from configs import sinusoid_config as training_config


def sinusoid_config(steps: int, **train):
    return training_config(steps, **{"log_every": 1, **train})  # every step logged: a repeated one shows


def fail_once(obj, name: str, when, error: BaseException) -> None:
    """Make ``obj.name`` raise ``error`` the first time ``when()`` holds as it is called."""
    real = getattr(obj, name)
    failed = []

    def failing(*args, **kwargs):
        if not failed and when():
            failed.append(True)
            raise error
        return real(*args, **kwargs)

    setattr(obj, name, failing)


def assert_same_run(a, run_a, b, run_b) -> None:
    """Two trainers hold the same weights and optimiser state, and their runs logged the same."""
    for (name, x), y in zip(a.learner.state_dict().items(), b.learner.state_dict().values()):
        assert torch.equal(x, y), name
    assert a.optimizer.state_dict()["state"][0]["step"] == b.optimizer.state_dict()["state"][0]["step"]
    # the same records in the same order: none twice, none missing
    strip = [{k: v for k, v in r.items() if k not in ("tasks_per_s", "elapsed_s", "validation_s")}
             for r in RunDir(run_a).read_metrics()]
    again = [{k: v for k, v in r.items() if k not in ("tasks_per_s", "elapsed_s", "validation_s")}
             for r in RunDir(run_b).read_metrics()]
    assert strip == again


@pytest.mark.parametrize("error", [RuntimeError("a bad batch"), MemoryError(), KeyboardInterrupt()],
                         ids=["error", "memory", "ctrl-c"])
def test_a_fit_that_fails_in_its_first_step_lets_go_and_can_be_called_again(tmp_path, error):
    straight = build_trainer(sinusoid_config(4), tmp_path / "straight")
    straight.fit(progress=False)

    trainer = build_trainer(sinusoid_config(4), tmp_path / "run")
    fail_once(trainer.learner, "meta_loss", lambda: True, error)
    with pytest.raises(type(error)):
        trainer.fit(progress=False)
    assert trainer.lock is None and not lock_is_held(RunDir(tmp_path / "run").lock_path)
    assert all(p.grad is None for p in trainer.learner.parameters())  # freed for a retry after a memory error
    assert RunDir(tmp_path / "run").read_checkpoint("step")["step"] == 0  # the initial checkpoint
    trainer.fit(progress=False)
    assert trainer.step == 4
    assert_same_run(straight, tmp_path / "straight", trainer, tmp_path / "run")


@pytest.mark.parametrize("where", ["end_step", "validate"])
def test_a_fit_that_fails_within_a_step_goes_back_to_the_last_checkpoint(tmp_path, where):
    """The failure comes after the weights were updated (end_step) or after the step was logged
    (validate, at step 3 of a run saved every 2): going on from memory would update twice, or
    log step 3 twice. The retry trains exactly what the uninterrupted run did."""
    straight = build_trainer(sinusoid_config(6), tmp_path / "straight")
    straight.fit(progress=False)

    trainer = build_trainer(sinusoid_config(6), tmp_path / "run")
    at_step_3 = (lambda: trainer.step == 2) if where == "end_step" else (lambda: trainer.step == 3)
    fail_once(trainer.learner if where == "end_step" else trainer, where, at_step_3, RuntimeError("failed"))
    with pytest.raises(RuntimeError, match="failed"):
        trainer.fit(progress=False)
    trainer.fit(progress=False)
    assert trainer.step == 6
    assert_same_run(straight, tmp_path / "straight", trainer, tmp_path / "run")


def test_a_non_finite_update_in_the_first_step_does_not_reach_the_initial_checkpoint(tmp_path):
    trainer = build_trainer(sinusoid_config(2), tmp_path)
    real_step = trainer.optimizer.step

    def overflowing(*args, **kwargs):  # once: a step that makes the weights infinite
        trainer.optimizer.step = real_step
        real_step(*args, **kwargs)
        with torch.no_grad():
            next(trainer.learner.parameters()).fill_(float("inf"))

    trainer.optimizer.step = overflowing
    with pytest.raises(MetalearnError, match="the update made the parameters non-finite at step 1"):
        trainer.fit(progress=False)
    trainer.fit(progress=False)  # back to the finite initial weights, not saving the infinite ones as step 0
    _, learner, step = load_trained(tmp_path)
    assert step == 2 and all(torch.isfinite(p).all() for p in learner.parameters())


def test_a_new_trainer_starts_over_an_attempt_that_failed_in_its_first_step(tmp_path):
    first = build_trainer(sinusoid_config(4), tmp_path)
    fail_once(first.learner, "meta_loss", lambda: True, MemoryError())
    with pytest.raises(MemoryError):
        first.fit(progress=False)
    assert untrained_attempt(RunDir(tmp_path))
    # the retry with fewer tasks per step (another configuration, which a resume would refuse)
    smaller = sinusoid_config(4, meta_batch_size=2)
    build_trainer(smaller, tmp_path).fit(progress=False)
    assert load_trained(tmp_path)[:3:2] == (smaller, 4)
    assert not untrained_attempt(RunDir(tmp_path))
    with pytest.raises(MetalearnError, match="already holds a run; continue it"):
        build_trainer(smaller, tmp_path)  # a run that trained is still kept

    # the same from Python with a learner of one's own (a notebook cell run again)
    config = resolve_config("maml", task={"dataset": "sinusoid", "shots": 5}, method_config={"model": "mlp"},
                            train={"steps": 3, "meta_batch_size": 2, "val_every": 0})
    learner = MAML(MLP(), MAML.Config(model="mlp"))
    own = Trainer(config, learner, SinusoidTasks(shots=5, query=5), None, tmp_path / "own")
    fail_once(learner, "meta_loss", lambda: True, ValueError("a bad batch"))
    with pytest.raises(ValueError):
        own.fit(progress=False)
    Trainer(config, learner, SinusoidTasks(shots=5, query=5), None, tmp_path / "own").fit(progress=False)
    assert load_trained(tmp_path / "own")[2] == 3


def test_what_is_not_an_untrained_attempt_is_kept(tmp_path):
    # a run of --steps 0: its initial weights are the whole run
    train(sinusoid_config(0), tmp_path / "zero", progress=False, evaluate_after=False, announce=lambda _: None)
    assert not untrained_attempt(RunDir(tmp_path / "zero"))
    with pytest.raises(MetalearnError, match="already holds a run"):
        build_trainer(sinusoid_config(0), tmp_path / "zero")
    # an attempt that failed at step 1, then was evaluated: its eval file is kept
    trainer = build_trainer(sinusoid_config(3), tmp_path / "evaluated")
    fail_once(trainer.learner, "meta_loss", lambda: True, RuntimeError("failed"))
    with pytest.raises(RuntimeError):
        trainer.fit(progress=False)
    (tmp_path / "evaluated" / "eval.json").write_text("{}\n")
    with pytest.raises(MetalearnError, match="already holds a run"):
        build_trainer(sinusoid_config(3), tmp_path / "evaluated")


def test_a_trainer_whose_folder_was_replaced_does_not_write_there_on_a_retry(tmp_path):
    trainer = build_trainer(sinusoid_config(4), tmp_path / "run")
    real = trainer.learner.meta_loss

    def moved_away(batch):
        if trainer.step == 1:
            (tmp_path / "run").rename(tmp_path / "moved")
            trainer.learner.meta_loss = real
        return real(batch)

    trainer.learner.meta_loss = moved_away
    with pytest.raises(MetalearnError, match="deleted, moved or replaced"):
        trainer.fit(progress=False)
    with pytest.raises(MetalearnError, match=r"cannot go on there: build a new trainer .*or choose another folder$"):
        trainer.fit(progress=False)
    assert not (tmp_path / "run").exists() or not RunDir(tmp_path / "run").has_checkpoint()


def test_a_config_of_the_retry_equals_a_fresh_run(tmp_path):
    """A retry over an untrained attempt trains what a new folder would (the same seed, weights)."""
    fresh = build_trainer(sinusoid_config(2), tmp_path / "fresh")
    fresh.fit(progress=False)
    first = build_trainer(sinusoid_config(2), tmp_path / "run")
    fail_once(first.learner, "meta_loss", lambda: True, KeyboardInterrupt())
    with pytest.raises(KeyboardInterrupt):
        first.fit(progress=False)
    again = build_trainer(sinusoid_config(2), tmp_path / "run")
    again.fit(progress=False)
    assert dataclasses.asdict(RunDir(tmp_path / "run").read_config()) == dataclasses.asdict(sinusoid_config(2))
    assert_same_run(fresh, tmp_path / "fresh", again, tmp_path / "run")
