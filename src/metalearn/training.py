"""The meta-training loop: sample a meta-batch, take the method's meta-loss, step the
meta-optimiser (Adam, or SGD as for Reptile); log, validate and checkpoint. Readable top to
bottom; it never knows which method it trains."""

from __future__ import annotations

import dataclasses
import math
import signal
import threading
import time
from pathlib import Path
from typing import Any, Iterable

import torch

from metalearn.algorithms import MetaLearner, algorithm_class, build_learner, make_algorithm_config
from metalearn.algorithms.base import device_of
from metalearn.config import RESUMABLE_CHANGES, RunConfig, config_differences
from metalearn.distributed import RankLost, World
from metalearn.errors import MetalearnError, TrainingStopped
from metalearn.evaluation import evaluate
from metalearn.runs import RunDir, lock_for_training
from metalearn.tasks import TaskSource, build_task_source, has_validation, problem_of

VALIDATION_SEED_OFFSET = 1_000_003
TEST_SEED_OFFSET = 2_000_003
RESUME_ENTRIES = ("step", "config", "learner", "optimizer", "scheduler", "torch_rng")  # what restore reads


def on_cpu(value: Any) -> Any:
    """``value`` with every tensor in it (through dicts, lists and tuples) moved to the CPU."""
    if isinstance(value, torch.Tensor):
        return value.cpu()
    if isinstance(value, dict):  # a module's state dict is an OrderedDict with version metadata
        moved = type(value)((k, on_cpu(v)) for k, v in value.items())
        if hasattr(value, "_metadata"):
            moved._metadata = value._metadata
        return moved
    if isinstance(value, (list, tuple)):
        return type(value)(on_cpu(v) for v in value)
    return value


def step_seed(seed: int, step: int) -> int:
    """The seed of meta-step ``step``: episodes and any model randomness at a step depend only
    on (seed, step), so a resumed run draws exactly what the uninterrupted one would."""
    return (seed * 1_000_000_007 + step * 7_919 + 1) % (2**62)


def lr_factor(train, step: int) -> float:
    """Multiplier of ``meta_lr`` at ``step``: halvings, then the linear anneal to zero."""
    factor = 0.5 ** (step // train.lr_halve_every) if train.lr_halve_every > 0 else 1.0
    if train.lr_anneal == "linear":
        factor *= max(0.0, 1.0 - step / max(train.steps, 1))
    return factor


class StopRequests:
    """While active, the first SIGINT or SIGTERM is only noted, so that training finishes the
    step it is in and saves it; a second one acts as usual (Ctrl-C twice stops at once).
    Signal handlers can only be set from the main thread; elsewhere nothing is caught."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self):
        self.received: signal.Signals | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> "StopRequests":
        if threading.current_thread() is threading.main_thread():
            for sig in self.SIGNALS:
                self._previous[sig] = signal.signal(sig, self._note)
        return self

    def _note(self, signum, frame) -> None:
        self.received = signal.Signals(signum)
        signal.signal(signum, self._previous[signum])

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()


class Trainer:
    """Trains ``learner`` on ``train_tasks`` as ``config.train`` says, writing into ``run_dir``.

    ``run_dir`` must not hold a run already, unless ``resume`` says that the run there is to be
    continued (then :meth:`restore` its checkpoint before :meth:`fit`)."""

    def __init__(self, config: RunConfig, learner: MetaLearner, train_tasks: TaskSource,
                 val_tasks: TaskSource | None, run_dir: RunDir | Path | str, world: World = World(),
                 resume: bool = False, lock=None):
        run_dir = run_dir if isinstance(run_dir, RunDir) else RunDir(run_dir)
        # rank 0 alone looks: it writes config.json only after this, other ranks may come later
        if not resume and world.is_main and run_dir.holds_run():
            raise MetalearnError(f"{run_dir.path} already holds a run; continue it (--resume, or Trainer(..., "
                                 "resume=True) and restore) or choose another folder")
        self.config, self.learner, self.run_dir, self.world = config, learner, run_dir, world
        self.device = device_of(learner)  # the batches go where the learner is
        self.train_tasks, self.val_tasks = train_tasks, val_tasks
        train = config.train
        if world.size > train.meta_batch_size:
            raise MetalearnError(
                f"--meta-batch-size {train.meta_batch_size} is smaller than the {world.size} processes: "
                "every rank needs at least one task. Raise --meta-batch-size or start fewer processes."
            )
        optimizer = torch.optim.Adam if train.meta_optimizer == "adam" else torch.optim.SGD
        self.optimizer = optimizer(learner.parameters(), lr=train.meta_lr)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lambda step: lr_factor(train, step))
        self.step = 0
        self.elapsed_s = 0.0  # training wall time so far, across resumes
        self.config_written = False  # by the first save: the config this Trainer continues with
        self.lock = lock  # the hold on the run folder (build_trainer's, or fit takes one; see lock_for_training)
        if world.is_main:  # last: a Trainer refused above leaves no folder behind
            run_dir.path.mkdir(parents=True, exist_ok=True)

    # -- checkpoints ---------------------------------------------------------------------------

    def state(self) -> dict[str, Any]:
        """Everything a resume needs, as CPU tensors: a run trained on a GPU resumes or
        evaluates anywhere, also with a plain ``torch.load``."""
        return on_cpu({
            "step": self.step,
            "elapsed_s": self.elapsed_s,
            "config": self.config.to_dict(),
            "learner": self.learner.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "torch_rng": torch.get_rng_state(),
            # a task source of the user's own: config.json's dataset does not describe its tasks
            "task_source": f"{type(self.train_tasks).__module__}.{type(self.train_tasks).__qualname__}",
        })

    def save(self) -> None:
        if self.world.is_main:
            if not self.config_written:  # a Trainer built by hand: the folder and config.json too
                self.run_dir.write_config(self.config)
                self.config_written = True
            self.run_dir.write_checkpoint(self.state())
        self.world.barrier()

    def restore(self, state: dict[str, Any]) -> None:
        saved = RunConfig.from_dict(state["config"])
        check_compatible(saved, self.config, f"the checkpoint in {self.run_dir.path}")
        check_weights_finite(state["learner"], self.run_dir.path)
        load_learner_state(self.learner, state["learner"], self.run_dir.path)
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        torch.set_rng_state(state["torch_rng"])
        self.step = int(state["step"])
        self.elapsed_s = float(state.get("elapsed_s", 0.0))

    # -- the loop ------------------------------------------------------------------------------

    def fit(self, progress: bool = True) -> None:
        train = self.config.train
        if self.lock is None:  # one writer per folder, until fit returns (the same test on every rank)
            self.lock = lock_for_training(self.run_dir, self.world)
        bar = None
        if progress and self.world.is_main:
            from tqdm import tqdm

            bar = tqdm(total=train.steps, initial=self.step, desc=f"{self.config.algorithm}", unit="step")
        parameters = list(self.learner.parameters())
        share = self.world.share(train.meta_batch_size)
        local_fraction = (share.stop - share.start) / train.meta_batch_size
        try:
            if self.step == 0:
                self.save()  # eval, resume and a NaN at step 1 always find a checkpoint
            with StopRequests() as stop:
                self._loop(stop, bar, parameters, share, local_fraction)
            self.save()
        except RankLost as err:
            raise MetalearnError(
                f"rank {self.world.rank} lost contact with the other ranks at step {self.step + 1} "
                f"({err}); another process probably died. The last "
                f"checkpoint in {self.run_dir.path} is kept: resume with --resume."
            ) from None
        finally:
            if bar is not None:
                bar.close()
            self.lock.release()
            self.lock = None

    def _loop(self, stop: StopRequests, bar, parameters, share: slice, local_fraction: float) -> None:
        train = self.config.train
        window_time, window_tasks = 0.0, 0  # meta-steps only: no validation or checkpoint time
        while self.step < train.steps:
            clock = time.perf_counter()
            seed = step_seed(train.seed, self.step)
            batch = self.train_tasks.sample(train.meta_batch_size, torch.Generator().manual_seed(seed), share)
            batch = batch.to(self.device)
            torch.manual_seed(seed + self.world.rank)
            self.learner.train()
            self.learner.start_step(self.step)
            loss, metrics = self.learner.meta_loss(batch)
            total_loss = float(self.world.sum(loss.detach() * local_fraction))
            if not math.isfinite(total_loss):
                raise MetalearnError(
                    f"the meta-loss became {total_loss} at step {self.step + 1}; training stopped "
                    f"and the last good checkpoint in {self.run_dir.path} is kept. Try a smaller "
                    "--inner-lr or --meta-lr, or fewer --inner-steps."
                )
            self.optimizer.zero_grad(set_to_none=True)
            (loss * local_fraction).backward()
            self.world.sum_gradients(parameters)
            if not gradients_finite(parameters):  # the same on every rank: gradients are summed
                raise MetalearnError(
                    f"the meta-gradient became non-finite at step {self.step + 1} (the meta-loss was "
                    f"{total_loss:.4g}); training stopped before the update, and the last good checkpoint "
                    f"in {self.run_dir.path} is kept. Try a smaller --inner-lr or --meta-lr, or fewer "
                    "--inner-steps."
                )
            self.optimizer.step()
            self.learner.end_step(self.world)
            # a huge --meta-lr can overflow a finite gradient into inf weights; caught here, before
            # this step's checkpoint would keep them (every rank holds the same weights: no collective)
            if not all_finite(parameters):
                raise MetalearnError(
                    f"the update of step {self.step + 1} made the parameters non-finite (the meta-loss was "
                    f"{total_loss:.4g}); training stopped, and the last good checkpoint in {self.run_dir.path} "
                    "(from before this step) is kept. Try a smaller --meta-lr."
                )
            self.scheduler.step()
            self.step += 1
            window_tasks += train.meta_batch_size
            step_time = time.perf_counter() - clock
            self.elapsed_s += step_time
            window_time += step_time

            if self.step % train.log_every == 0 or self.step == train.steps:
                record = {"step": self.step, "loss": total_loss,
                          "tasks_per_s": window_tasks / max(window_time, 1e-9),
                          "elapsed_s": round(self.elapsed_s, 2)}
                for name, value in metrics.items():
                    if name != "loss":
                        record[name] = float(self.world.sum(value.detach() * local_fraction))
                if self.world.is_main:
                    self.run_dir.append_metrics(record)
                    if bar is not None:
                        bar.set_postfix({k: f"{v:.3g}" for k, v in record.items() if k != "step"})
                window_time, window_tasks = 0.0, 0
            if bar is not None:
                bar.update(1)
            if self.val_tasks is not None and train.val_every > 0 and self.step % train.val_every == 0:
                self.validate()
            stopping = self._stop_requested(stop)
            if self.step % train.checkpoint_every == 0 or stopping:
                self.save()
            if stopping:  # also after the last step: the test evaluation is then skipped
                name = stop.received.name if stop.received else "another rank's signal"
                then = (f"continue with `metalearn train {self.config.algorithm} --run-dir "
                        f"{self.run_dir.path} --resume`" if self.step < train.steps
                        else f"training is complete; evaluate with `metalearn eval {self.run_dir.path}`")
                raise TrainingStopped(
                    f"stopped by {name} after step {self.step} of {train.steps}; its checkpoint is "
                    f"saved in {self.run_dir.path}: {then}",
                    128 + int(stop.received or signal.SIGTERM),
                )

    def _stop_requested(self, stop: StopRequests) -> bool:
        """Whether any rank was asked to stop: all ranks then stop after the same step."""
        asked = stop.received is not None
        if not self.world.distributed:
            return asked
        return bool(self.world.sum(torch.tensor(float(asked), device=self.world.device)) > 0)

    def validate(self) -> dict[str, Any]:
        result = evaluate(self.learner, self.val_tasks, self.config.train.val_episodes,  # final score only
                          seed=self.config.train.seed + VALIDATION_SEED_OFFSET, world=self.world, per_step=False)
        if self.world.is_main:
            self.run_dir.append_metrics({"step": self.step, f"val_{result['metric']}": result["mean"],
                                         "val_ci95": result["ci95"]})
        return result


# -- assembling a run ------------------------------------------------------------------------


def all_finite(tensors: Iterable[torch.Tensor]) -> bool:
    """Whether every element of ``tensors`` is finite (one synchronisation for all tensors).
    Not a norm: the norm of large finite weights overflows to inf."""
    flags = [torch.isfinite(t.detach()).all() for t in tensors]
    return not flags or bool(torch.stack(flags).all())


def gradients_finite(parameters: list[torch.Tensor]) -> bool:
    """Whether every gradient is finite (one synchronisation for all tensors)."""
    return all_finite(p.grad for p in parameters if p.grad is not None)


def check_weights_finite(weights: dict[str, Any], where: Path) -> None:
    """Refuse a checkpoint whose learner holds a NaN or inf weight (one saved before training
    checked its updates): evaluating it only prints NaN scores, resuming it a NaN loss."""
    for name, value in weights.items():
        if isinstance(value, torch.Tensor) and value.is_floating_point() and not all_finite([value]):
            raise MetalearnError(
                f"the checkpoint in {where} holds non-finite weights ({name}): the run diverged before it "
                "was saved. Train it again in a new --run-dir with a smaller --meta-lr."
            )


def check_same_method(saved: RunConfig, algorithm: str, run_path: Path | str) -> None:
    """Refuse to continue a run of one method as another: its saved options are the other
    method's, which this one would only call unknown."""
    if saved.algorithm != algorithm:
        raise MetalearnError(
            f"{run_path} is a {saved.algorithm} run, not {algorithm}: continue it with `metalearn train "
            f"{saved.algorithm} --resume --run-dir {run_path}`, or train {algorithm} in another --run-dir"
        )


RESUME_ADVICE = "Resume with the same options, or start a new run directory."


def configuration_conflict(what: str, conflicts: dict[str, tuple[Any, Any]], why: str = "",
                           advice: str = RESUME_ADVICE) -> MetalearnError:
    """The error for ``what`` (a run, a checkpoint) made with other values: ``conflicts`` maps
    ``part.option`` to (saved value, requested value)."""
    lines = "; ".join(f"{k}: {old!r} there, {new!r} requested" for k, (old, new) in conflicts.items())
    return MetalearnError(f"{what} was made with another configuration ({lines}).{why} {advice}")


def check_compatible(saved: RunConfig, requested: RunConfig, what: str, advice: str = RESUME_ADVICE) -> None:
    """Refuse to continue ``saved`` with a configuration that changes what it computes. An
    option that ``saved`` lacks (the run is older than the option) counts as its default."""
    if saved.algorithm != requested.algorithm:  # the options of one method are unknown to the other
        raise configuration_conflict(what, {"algorithm": (saved.algorithm, requested.algorithm)}, "", advice)
    saved, requested = with_all_options(saved), with_all_options(requested)
    resumable = set(RESUMABLE_CHANGES)
    if saved.train.lr_anneal == "linear":
        resumable.discard("train.steps")  # the anneal's horizon: changing it rewrites the schedule
    conflicts = {k: v for k, v in config_differences(saved, requested).items() if k not in resumable}
    if conflicts:
        why = (" Its learning rate is annealed linearly to 0 over --steps, so the step count cannot change."
               if "train.steps" in conflicts else "")
        raise configuration_conflict(what, conflicts, why, advice)


def with_all_options(config: RunConfig) -> RunConfig:
    """``config`` with every option of its algorithm spelled out, defaults included."""
    options = make_algorithm_config(config.algorithm, config.algorithm_config)
    return dataclasses.replace(config, algorithm_config=dataclasses.asdict(options))


def load_learner_state(learner: MetaLearner, state: dict[str, Any], where: Path, changed: str = "") -> None:
    """Load ``state`` into ``learner``; a mismatch is one line naming what does not fit (and
    ``changed``, the options a caller altered, as the likely cause)."""
    try:
        learner.load_state_dict(state)
    except RuntimeError as err:
        # torch's first line is a header ("Error(s) in loading state_dict for MAML:"); the next says what
        lines = [line.strip() for line in str(err).splitlines() if line.strip()]
        detail = (lines[1] if len(lines) > 1 else lines[0])[:200]
        cause = f"{changed} changes the trained network; " if changed else ""
        raise MetalearnError(f"the checkpoint in {where} does not fit this model: {cause}{detail}") from None


def initialise_from_run(learner: MetaLearner, run_dir: Path | str) -> int:
    """Copy the network weights (``model.*``) of the checkpoint in ``run_dir`` into ``learner``;
    everything else of ``learner`` (a method's own parameters) keeps its initial value. The
    networks must be the same (names and shapes). Returns the number of tensors copied."""
    source = RunDir(run_dir)
    if not source.has_checkpoint():
        raise MetalearnError(f"--init-from {source.path}: no checkpoint there; give a run directory of a trained run")
    saved = source.read_checkpoint("learner")["learner"]
    check_weights_finite(saved, source.path)
    own = {name: p for name, p in learner.state_dict(keep_vars=True).items() if name.startswith("model.")}
    mismatched = [name for name, p in own.items() if name not in saved or saved[name].shape != p.shape]
    if mismatched:
        raise MetalearnError(
            f"--init-from {source.path}: its network differs from this one (at {mismatched[0]}); "
            "both runs need the same --model, image size and number of ways"
        )
    with torch.no_grad():
        for name, p in own.items():
            p.copy_(saved[name])
    return len(own)


def check_test_ways(config: RunConfig) -> None:
    """A method with one output per class (MAML, PLATIPUS, Reptile) can only be tested with as
    many ways as it was trained with; the others (ProtoNets, Matching Nets) with any number."""
    test_ways = config.task.for_testing().ways
    if algorithm_class(config.algorithm).fixed_ways and test_ways != config.task.ways:
        raise MetalearnError(
            f"{config.algorithm} has one output per class: it is tested with as many ways as it is "
            f"trained with ({config.task.ways}), not {test_ways}."
        )


def prepare_run(config: RunConfig, data_dir: Path | str | None = None, progress: bool = False):
    """(learner with its initial weights, training tasks, validation tasks or None) of
    ``config``, after every check a run makes before it starts: the method fits the task, the
    test shape fits the method, every part of the split holds its episodes (the data is read).
    ``train --print-config`` runs it too, so that a dry run says what training would refuse."""
    check_test_ways(config)
    torch.manual_seed(config.train.seed)  # the initial weights
    learner = build_learner(config.algorithm, config.algorithm_config, problem_of(config.task))
    train_tasks = build_task_source(config.task, "train", data_dir, progress)
    val_tasks = build_task_source(config.task, "val", data_dir, progress) if has_validation(config.task) else None
    build_task_source(config.task, "test", data_dir, progress)  # an impossible test episode fails now, not after training
    return learner, train_tasks, val_tasks


def check_run_dir(config: RunConfig, run: RunDir, resume: bool) -> None:
    """Refuse a run folder that ``config`` cannot train into: with ``resume``, one without a
    run of the same method and options to continue; without, one that already holds a run."""
    if resume:
        if not run.exists():
            raise MetalearnError(f"cannot resume: {run.path} holds no run (no config.json)")
        if not run.has_checkpoint():
            if run.never_started():
                return  # killed between config.json and its first checkpoint: it starts now
            raise MetalearnError(f"cannot resume: {run.path} has no checkpoint.pt (removed; its metrics.jsonl "
                                 "remains); start afresh in another --run-dir")
        check_compatible(run.read_config(), config, f"the run in {run.path}")  # the method too
    elif run.holds_run():
        raise MetalearnError(f"{run.path} already holds a run; pass --resume to continue it or choose another --run-dir")


def prepare_training(config: RunConfig, run_dir: Path | str | None = None, data_dir: Path | str | None = None,
                     resume: bool = False, progress: bool = False):
    """(learner with its initial weights, training tasks, validation tasks or None), after every
    check a run makes before its first step (the run folder, the data, the network,
    ``--init-from``), writing nothing: :func:`build_trainer` starts from it, and ``train
    --print-config`` runs it alone, so that a dry run refuses what training would."""
    if resume and run_dir is None:
        raise MetalearnError("--resume needs --run-dir, the run to continue")
    if run_dir is not None:
        check_run_dir(config, RunDir(run_dir), resume)
    learner, train_tasks, val_tasks = prepare_run(config, data_dir, progress)
    if config.train.init_from and not (resume and RunDir(run_dir).has_checkpoint()):
        initialise_from_run(learner, config.train.init_from)
    return learner, train_tasks, val_tasks


def build_trainer(config: RunConfig, run_dir: Path | str, data_dir: Path | str | None = None,
                  resume: bool = False, world: World = World(), progress: bool = True) -> Trainer:
    """A trainer for ``config`` writing into ``run_dir``; with ``resume``, continue the run
    found there (its configuration must agree with ``config``). The trainer holds the run
    folder's lock (rank 0) until its ``fit`` returns."""
    lock = lock_for_training(RunDir(run_dir), world)  # before any check: another writer is refused at once
    try:
        return _build_trainer(config, run_dir, data_dir, resume, world, progress, lock)
    except BaseException:
        lock.release()
        raise


def _build_trainer(config: RunConfig, run_dir: Path | str, data_dir: Path | str | None, resume: bool,
                   world: World, progress: bool, lock) -> Trainer:
    run = RunDir(run_dir)
    learner, train_tasks, val_tasks = prepare_training(config, run_dir, data_dir, resume, progress)
    resume = resume and run.has_checkpoint()  # a run that never started starts now
    world.barrier()  # every rank has looked at the folder before rank 0 writes into it (the Trainer)
    learner = learner.to(world.device)
    trainer = Trainer(config, learner, train_tasks, val_tasks, run, world, resume=resume, lock=lock)
    if resume:
        trainer.restore(run.read_checkpoint(*RESUME_ENTRIES))
        if trainer.step > config.train.steps:
            raise MetalearnError(
                f"the run in {run.path} is already at step {trainer.step}; --steps {config.train.steps} "
                f"would end it before that. Give --steps {trainer.step} or more."
            )
        if world.is_main:
            run.truncate_metrics(trainer.step)
    world.barrier()
    return trainer  # config.json is written by its first checkpoint, just before it


def load_trained(run_dir: Path | str, overrides: dict[str, Any] | None = None) -> tuple[RunConfig, MetaLearner, int]:
    """(config, learner with the checkpoint's weights, step) of a finished or running run.
    ``overrides`` changes options of the method that do not touch its weights (for instance
    the number of test-time steps) for this evaluation only."""
    run = RunDir(run_dir)
    config = run.read_config()
    state = run.read_checkpoint("config", "learner", "step")
    source = state.get("task_source", "metalearn.")  # checkpoints before 2026-11-30: the library's tasks
    if not source.startswith("metalearn."):
        raise MetalearnError(
            f"{run.path} was trained on a task source of your own ({source}): its config.json names a built-in "
            "dataset that is not what it learned. Load the weights with learner.load_state_dict(RunDir(run_dir)"
            ".read_checkpoint()['learner']) and score them with metalearn.evaluate(learner, your_source)."
        )
    check_compatible(RunConfig.from_dict(state["config"]), config, f"the checkpoint in {run.path}",
                     "Its config.json and checkpoint.pt come from different runs: put back the run's own files.")
    if "model" in (overrides or {}) and overrides["model"] != config.algorithm_config.get("model"):
        # same-shaped weights would load into another architecture without complaint
        raise MetalearnError(f"--set model={overrides['model']}: the run trained "
                             f"{config.algorithm_config.get('model')}; a network cannot change at evaluation")
    check_weights_finite(state["learner"], run.path)
    options = {**config.algorithm_config, **(overrides or {})}
    learner = build_learner(config.algorithm, options, problem_of(config.task))
    changed = ", ".join(f"--set {key}" for key in (overrides or {}))
    load_learner_state(learner, state["learner"], run.path, changed)
    return config, learner, int(state["step"])
