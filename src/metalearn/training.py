"""The meta-training loop: sample a meta-batch, take the method's meta-loss, step the
meta-optimiser (Adam, or SGD as for Reptile); log, validate and checkpoint. Readable top to
bottom; it never knows which method it trains."""

from __future__ import annotations

import contextlib
import dataclasses
import math
import numbers
import os
import signal
import sys
import threading
import time
import warnings
from pathlib import Path
from typing import Any, Callable

import torch

from metalearn.algorithms import MetaLearner, build_learner
from metalearn.algorithms.base import device_of, drawing_from
from metalearn.checkpoints import (RESUME_ENTRIES, RESUME_OPTIONAL_ENTRIES, all_finite, check_compatible,
                                   check_entries, check_run_dir, check_test_ways, check_weights_finite,
                                   in_run_type, initialise_from_run, load_learner_state, network_difference, on_cpu,
                                   own_learner, own_tasks, recorded_images, run_images, saved_config,
                                   unreadable_checkpoint, untrained_attempt, warn_of_seen_classes)
from metalearn.config import RunConfig
from metalearn.distributed import RankLost, World, environment_count
from metalearn.errors import (STOP_SIGNALS, TIME_LIMIT_EXIT, ConfigError, MetalearnError, OptionError, OptionWarning,
                              TrainingInterrupted, TrainingStopped, caller_level, check_count, kind_of, spellings,
                              keyword_only_after, training_stop, valued)
from metalearn.evaluation import HIGHER_IS_BETTER, evaluate
from metalearn.files import WriteError, check_folder_path, same_path, user_path
from metalearn.memory_budget import (available_memory, chunk_candidates, chunk_sizes, fastest_chunk, largest_chunk,
                                     peak_memory_of, seconds_of)
from metalearn.runs import RunDir, lock_for_training, registered_in_python
from metalearn.runtime import DroppingStream, cuda_devices, float32_default, machine, own_random_state, show_progress
from metalearn.data.folder import shared_scans
from metalearn.tasks import (TaskBatch, TaskSource, build_task_source, check_outside_data, check_task_source,
                             has_validation, problem_of, require_sampled_batch, require_task_source)
from metalearn.tasks.batch import data_fix

VALIDATION_SEED_OFFSET = 1_000_003
TEST_SEED_OFFSET = 2_000_003
TRAINING_CLASSES_SEED_OFFSET = 3_000_017  # `metalearn eval --part train`


def resume_command(method: str, run_dir: Path | str, data_dir: Path | str | None = None) -> str:
    """The command that continues a run: ``metalearn train METHOD --run-dir DIR [--data-dir D]
    --resume`` (a folder run's images are not part of the run, so it names them again)."""
    data = f" --data-dir {data_dir}" if data_dir is not None else ""
    return f"metalearn train {method} --run-dir {run_dir}{data} --resume"


def continue_lines(config: RunConfig, run_dir: Path | str, data_dir: Path | str | None = None) -> tuple[str, str]:
    """What continues a run of the library's tasks from its checkpoint, as (the Python API, the
    command line) say it, for a message's ``{next}`` (an :class:`~metalearn.errors.Options`
    field): ``metalearn.train(config, ..., resume=True)`` and ``metalearn train --resume``; the
    Python line alone for a method registered in a notebook or a script, which no command knows."""
    here = registered_in_python(config)
    if here is not None:
        return (f"continue from Python: {registered_resume(run_dir, here)}",) * 2
    images = f", data_dir={str(data_dir)!r}" if data_dir is not None else ""
    return (f"continue with `metalearn.train(config, run_dir={str(run_dir)!r}{images}, resume=True)`",
            f"continue with `{resume_command(config.method, run_dir, data_dir)}`")


def part_seed_offset(part: str) -> int:
    """What an evaluation of ``part`` adds to its seed: each part its own episode stream, so that
    on a regression family (one family for every part) the parts still score different tasks.
    Another name than train, val or test is refused (it would silently score the test part)."""
    if part not in ("train", "val", "test"):
        raise MetalearnError(f"unknown split part {part!r}: give test, val or train")
    return {"val": VALIDATION_SEED_OFFSET, "train": TRAINING_CLASSES_SEED_OFFSET}.get(part, TEST_SEED_OFFSET)


def step_seed(seed: int, step: int) -> int:
    """The seed of meta-step ``step``: episodes and any model randomness at a step depend only
    on (seed, step), so a resumed run draws exactly what the uninterrupted one would."""
    return (seed * 1_000_000_007 + step * 7_919 + 1) % (2**62)


def lr_factor(train, step: int) -> float:
    """Multiplier of ``meta_lr`` at ``step``: halvings, then the anneal over ``steps``: linear to
    zero (Reptile), or cosine from 1 to ``min_meta_lr / meta_lr`` (MAML++, section 4, "cosine
    annealing of meta-optimizer learning rate", SGDR's schedule without restarts; their code
    moves it once per epoch, here every step)."""
    factor = 0.5 ** (step // train.lr_halve_every) if train.lr_halve_every > 0 else 1.0
    progress = min(step / max(train.steps, 1), 1.0)
    if train.lr_anneal == "linear":
        factor *= 1.0 - progress
    elif train.lr_anneal == "cosine":
        floor = train.min_meta_lr / train.meta_lr
        factor *= floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))
    return factor


def check_stop_at(stop_at, step: int, steps: int, lr_anneal: str = "none") -> None:
    """``--stop-at``: a step not before the run's current ``step`` (equal: it is paused there
    already, and :meth:`Trainer.fit` stops at once, so that the same command can be repeated)
    and before its last, ``steps``. A complete run is extended by a larger ``steps``, which a
    resume may change unless ``lr_anneal`` anneals the learning rate over them."""
    stop_at = check_count(stop_at, "stop_at", error=lambda text: OptionError(text, stop_at="stop_at"),
                          message="{{stop_at}} takes a step number (a positive integer), got {value!r}")
    given = (f"stop_at={stop_at}", f"--stop-at {stop_at}")
    if step >= steps:  # complete: no step left to stop at
        extend = (f"; its learning rate is annealed ({lr_anneal}) over its steps, so it cannot be extended"
                  if lr_anneal != "none" else
                  "; or extend it with a larger {steps} (e.g. {more}) and a {pause} after step " + str(step))
        raise OptionError(f"{{stop_at}}: the run is complete (step {step} of {steps}): leave {{pause}} out{extend}",
                          stop_at=given, pause="stop_at", steps="steps",
                          more=(f"steps={2 * steps}", f"--steps {2 * steps}"))
    if stop_at < step:
        raise OptionError(f"{{stop_at}}: the run is already at step {step}; give a later step", stop_at=given)
    if stop_at >= steps:
        raise OptionError(f"{{stop_at}} is not before the run's last step ({steps}); leave it out to train to the end",
                          stop_at=given)


def now() -> float:
    """The clock of ``--time-limit`` (monotonic seconds); the tests replace it."""
    return time.monotonic()


class StopRequests:
    """While active, the first SIGINT or SIGTERM is only noted, so that training finishes the
    step it is in and saves it; a second one acts as usual (Ctrl-C twice stops at once).
    SIGUSR1 and SIGUSR2 (not on Windows) are taken the same way: they are a scheduler's warning
    that the job's time is nearly up (Slurm's ``--signal=USR1@120``; submitit's default is
    SIGUSR2), and their default action would kill the process without its checkpoint.
    ``continued`` counts the SIGCONTs received: the process was stopped (Ctrl-Z, SIGSTOP, a
    scheduler's suspend) and continued, which ``--time-limit`` must not take for a long
    iteration. Signal handlers can only be set from the main thread; elsewhere nothing is
    caught.

    ``note_repeats`` (a worker started by torchrun): every one of these signals is only noted, up
    to the process's exit. torchrun passes the signals it gets on to its workers, so a
    scheduler that signals the whole job (SLURM at a time limit, systemd, ``kill`` of every
    process) reaches each worker twice, and a second signal must not kill it before its
    checkpoint; once one was received the handler stays after training too, so that the
    worker still reports its stop and leaves the group. The hard stop is torchrun's own
    SIGKILL after its ``--shutdown_timeout``."""

    SIGNALS = (signal.SIGINT,) + STOP_SIGNALS

    def __init__(self, note_repeats: bool = False, announce: Callable[[str], None] | None = None):
        """``announce``: told once, at the first signal, that the step in progress finishes
        first (a step can take a minute: without a word a user presses Ctrl-C again)."""
        self.received: signal.Signals | None = None
        self.continued = 0
        self.note_repeats = note_repeats
        self.announce = announce
        self._previous: dict[int, Any] = {}
        # a torchrun worker's launcher: torch starts its workers in sessions of their own, so a
        # SIGKILL of torchrun alone (an OOM kill, `timeout -s KILL torchrun ...`) reaches none of
        # them, and they would train on unseen, holding the run folder, to the run's end
        self.launcher = (LAUNCHER or os.getppid()) if note_repeats else None

    def orphaned(self) -> bool:
        """Whether this torchrun worker's launcher is gone (the process was re-parented): it
        then stops after the step in progress, with a checkpoint, as for a SIGTERM."""
        return self.launcher is not None and os.getppid() != self.launcher

    def __enter__(self) -> "StopRequests":
        if threading.current_thread() is threading.main_thread():
            for sig in self.SIGNALS:
                self._previous[sig] = signal.signal(sig, self._note)
            if hasattr(signal, "SIGCONT"):  # not on Windows; a handler does not change that SIGCONT continues
                self._previous[signal.SIGCONT] = signal.signal(signal.SIGCONT, self._count_continue)
        return self

    def _note(self, signum, frame) -> None:
        if self.received is None:
            self.received = signal.Signals(signum)
            if self.announce is not None:
                # the repeat acts as usual only where the handler underneath does (not an inherited SIG_IGN)
                acts = not self.note_repeats and self._previous.get(signum) not in (signal.SIG_IGN, None)
                again = f" ({'Ctrl-C' if signum == signal.SIGINT else self.received.name} again stops at once, " \
                        "without saving it)" if acts else ""
                self.announce(f"{self.received.name} received: finishing this step, then saving it{again}")
        if not self.note_repeats:
            signal.signal(signum, self._previous[signum])

    def _count_continue(self, signum, frame) -> None:
        self.continued += 1

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            if not (self.note_repeats and self.received is not None and sig in self.SIGNALS):
                signal.signal(sig, handler)
        self._previous.clear()


# a torchrun worker's launcher, as the process found it when it started (this module is imported
# at once): a launcher killed while the worker prepares its data is noticed at its first step
LAUNCHER = os.getppid() if "TORCHELASTIC_RUN_ID" in os.environ else None


def launched_by_torchrun() -> bool:
    """Whether this process is a worker that torchrun (torch.distributed.elastic) started."""
    return "TORCHELASTIC_RUN_ID" in os.environ


def python_resume(run_dir: Path | str) -> str:
    """The Python lines that continue a run trained from Python on tasks or with a network of
    the user's own, which ``metalearn train --resume`` cannot rebuild from its config.json."""
    path = repr(str(run_dir))
    return f"Trainer(config, learner, train_tasks, val_tasks, {path}, resume=True).fit()"


def refuse_own_tasks(run: RunDir, state: dict[str, Any]) -> None:
    """Refuse to rebuild, from config.json's dataset, a run whose checkpoint ``state`` records a
    task source of the user's own (:func:`~metalearn.checkpoints.own_tasks`): it continues from
    Python, with those tasks."""
    saved_tasks = own_tasks(state)
    if saved_tasks is not None:
        raise MetalearnError(f"the run in {run.path} was trained on a task source of your own ({saved_tasks}), "
                             f"which its config.json does not describe: continue it from Python: "
                             f"{python_resume(run.path)}")


def python_test(run_dir: Path | str) -> str:
    """The Python lines that score such a run (:func:`python_resume`) on the user's own tasks."""
    return (f"learner.load_state_dict(RunDir({str(run_dir)!r}).read_checkpoint()['learner']); "
            "metalearn.evaluate(learner, your_tasks)")


def registered_resume(run_dir: Path | str, here: str) -> str:
    """The Python line that continues a run of a method, dataset or network registered in a
    notebook or a script, with ``here`` (:func:`metalearn.runs.registered_in_python`) after it."""
    return f"metalearn.train(config, run_dir={str(run_dir)!r}, resume=True) ({here})"


def registered_test(run_dir: Path | str, here: str) -> str:
    """The Python line that scores such a run (:func:`registered_resume`)."""
    return f"metalearn.evaluate_run({str(run_dir)!r}) ({here})"


def with_learner_options(config: RunConfig, learner: MetaLearner) -> RunConfig:
    """``config`` with the method options of ``learner`` (a learner built in Python, e.g.
    ``MAML(network, {"inner_lr": 0.5})``, carries options of its own): the run records what
    trained, so that eval and load_trained rebuild the same method. ``model`` stays
    ``config``'s: it names the library network config.json describes, which loading checks
    against the weights. A learner of another method than ``config.method`` is refused: every
    option would be another method's."""
    from metalearn.algorithms import METHODS, method_class

    if learner.name != config.method:
        register = (f" (after metalearn.algorithms.register_method({type(learner).__name__}))"
                    if learner.name not in METHODS else "")
        raise MetalearnError(f"the learner is {learner.name} ({type(learner).__name__}) but the config is for "
                             f"{config.method}: build the config for the learner, "
                             f"metalearn.resolve_config({learner.name!r}, ...){register}")
    options = getattr(learner, "config", None)
    if not dataclasses.is_dataclass(options):
        return config
    # the registered method's options only: a subclass's own fields would make a config.json that
    # no reader knows (its run is the user's learner, which load_trained routes to Python anyway)
    known = {field.name for field in dataclasses.fields(method_class(config.method).Config)}
    absent = object()  # a config of some options only: the learner's others are recorded too
    own = {key: value for key, value in dataclasses.asdict(options).items()
           if key in known and key != "model" and config.method_config.get(key, absent) != value}
    return dataclasses.replace(config, method_config={**config.method_config, **own}) if own else config


def check_augmentation(config: RunConfig, train_tasks: TaskSource, val_tasks: TaskSource | None) -> None:
    """Refuse samplers built in Python whose augmentation (an EpisodeSampler's ``augment``) is
    not what ``config.task.augment`` records: config.json would misstate the run, and a resume
    from the command line, which builds its samplers from it, would not continue it exactly;
    and validation episodes that are augmented (never, in a run built from its config)."""
    drawn = getattr(train_tasks, "augmentation", None)
    parts = ",".join(getattr(drawn, "parts", ()))
    if drawn is None and config.task.augment:
        raise MetalearnError(f"the config records augment={config.task.augment!r} but the Trainer's train_tasks "
                             f"({kind_of(train_tasks)}) change no images: draw them with an EpisodeSampler(..., "
                             f"augment={config.task.augment!r}), or leave augment out of the config")
    if drawn is not None and parts != config.task.augment:
        raise MetalearnError(f"the Trainer's train_tasks change their images with augment={parts!r} but the "
                             f"config records augment={config.task.augment!r}: give the config the same, "
                             f"resolve_config(..., task={{'augment': {parts!r}, ...}})")
    if getattr(getattr(val_tasks, "augmentation", None), "parts", ()):
        raise MetalearnError("the Trainer's val_tasks change their images (augment): validation scores the "
                             "images as they are; build them without augment")


def refuse_float16_adam(learner: MetaLearner, train: Any) -> None:
    """Refuse, before anything trains, float16 weights where an Adam updates them (the
    meta-optimiser, ``meta_optimizer`` adam, or a method's inner Adam: Reptile's
    ``inner_optimizer`` adam): its eps, 1e-8, is 0 in float16 (the smallest float16 is 6e-8),
    so the first step divides a gradient of 0 by 0 and the weights turn NaN whatever the
    learning rate, which the trainer's divergence message would blame on meta_lr. bfloat16 has
    float32's range and trains."""
    if not any(p.dtype == torch.float16 for p in learner.parameters()):
        return
    adams = {}  # each Adam's words -> the option that replaces it with SGD
    if train.meta_optimizer == "adam":
        adams["the meta-optimiser Adam's"] = "meta_optimizer"
    if getattr(getattr(learner, "config", None), "inner_optimizer", None) == "adam":
        adams[f"{learner.name}'s inner Adam's"] = "inner_optimizer"
    if adams:
        raise MetalearnError(f"the learner's weights are torch.float16, in which {' and '.join(adams)} eps (1e-8) "
                             "rounds to 0 and the first step divides 0 by 0: train in bfloat16 or float32 "
                             f"(learner.to(torch.bfloat16)), or with {' and '.join(adams.values())} sgd")


class Trainer:
    """Trains ``learner`` on ``train_tasks`` as ``config.train`` says, writing into ``run_dir``.

    ``run_dir`` must not hold a run already, unless ``resume`` says that the run there is to be
    continued (:meth:`fit` restores its checkpoint, unless :meth:`restore` was called); an attempt that failed
    in its first step (:func:`untrained_attempt`) is no run to keep, and a new one starts over
    it. Nothing is written before :meth:`fit`: a Trainer that is built and dropped (``train
    --print-config``) leaves the folder as it was. A :meth:`fit` that fails may be called again:
    it goes on from the run's last checkpoint.

    The run records ``learner``'s method options where they differ from ``config``'s
    (:func:`with_learner_options`): a learner built in Python is what trained.

    ``val_tasks``: the task source scored every ``config.train.val_every`` steps, whose scores
    pick the best checkpoints; None: no validation and no best checkpoints (:meth:`fit` warns
    where ``val_every`` asks for one). ``world``: this process's rank and the number of processes
    (:func:`~metalearn.distributed.init_world` under torchrun): each rank trains its share of the
    meta-batch, the gradients are summed over the ranks, and rank 0 alone writes; the default,
    ``World()``, is one process. The batches go to the learner's device. ``lock``: a hold on the
    run folder taken already (:func:`build_trainer`'s), let go when :meth:`fit` returns or by
    :meth:`release`; None (the default): :meth:`fit` takes the folder's lock itself."""

    @keyword_only_after(6)  # self and what it trains: the options (world, resume, lock) by keyword
    def __init__(self, config: RunConfig, learner: MetaLearner, train_tasks: TaskSource,
                 val_tasks: TaskSource | None, run_dir: RunDir | Path | str | None, *, world: World = World(),
                 resume: bool = False, lock=None):
        if run_dir is not None and not isinstance(run_dir, RunDir):
            run_dir = RunDir(user_path(run_dir, "run_dir"))
        if run_dir is not None:
            check_folder_path(run_dir.path, "Trainer's run_dir")
        # rank 0 alone looks: it writes config.json only after this, other ranks may come later
        if not resume and world.is_main and run_dir is not None and run_dir.holds_run() \
                and not untrained_attempt(run_dir):
            raise OptionError(f"{run_dir.path} already holds a run; continue it ({{resume}}) or choose another folder",
                              resume=("Trainer(..., resume=True)", "--resume, or Trainer(..., resume=True)"))
        if not isinstance(config, RunConfig):
            raise MetalearnError(f"Trainer takes a RunConfig (metalearn.resolve_config(...)), got "
                                 f"{type(config).__name__}")
        if not isinstance(learner, MetaLearner):
            raise MetalearnError(f"Trainer takes a MetaLearner (e.g. metalearn.MAML(network)), got "
                                 f"{type(learner).__name__}")
        config = with_learner_options(config, learner)
        refuse_float16_adam(learner, config.train)
        require_task_source(train_tasks, "Trainer's train_tasks")
        if val_tasks is not None:
            require_task_source(val_tasks, "Trainer's val_tasks")
        check_augmentation(config, train_tasks, val_tasks)
        self.config, self.learner, self.run_dir, self.world = config, learner, run_dir, world
        self.resume = resume
        self.device = device_of(learner)  # the batches go where the learner is
        # training's torch random state, kept apart from the caller's (_own_random_state); None:
        # the first fit begins from the caller's
        self.torch_rng: torch.Tensor | None = None
        self.train_tasks, self.val_tasks = train_tasks, val_tasks
        # the tasks' class where the user built them (a sampler of their own examples names itself,
        # source_name); build_trainer marks its own "dataset:NAME"
        self.task_source = getattr(train_tasks, "source_name", None) or \
            f"{type(train_tasks).__module__}.{type(train_tasks).__qualname__}"
        # the learner's class where the user built it; build_trainer marks its own "method:NAME"
        self.learner_source = f"{type(learner).__module__}.{type(learner).__qualname__}"
        # the images of a folder dataset, so that a resume on another folder is refused
        self.data_fingerprint = getattr(train_tasks, "data_fingerprint", None)
        self.class_split = getattr(train_tasks, "class_split", None)  # class folders: written as split.json
        # the images' folder (build_trainer sets it): the messages that say how to continue name it,
        # the test after training reads it; ``data_dir_given``: the user's --data-dir, not the
        # folder a resumed checkpoint records
        self.data_dir, self.data_dir_given = None, True
        train = config.train
        if world.size > train.meta_batch_size:
            raise OptionError(
                f"{{given}} is smaller than the {world.size} processes: every rank needs at least one task. Raise "
                "{meta_batch_size} or start fewer processes.", meta_batch_size="meta_batch_size",
                given=(f"meta_batch_size={train.meta_batch_size}", f"--meta-batch-size {train.meta_batch_size}"))
        refused = learner.chunking_refused() if train.task_chunk != 0 else None
        if refused:
            raise ConfigError("TrainConfig", "task_chunk", f"cannot split the meta-batch of {refused}; leave it at 0 "
                                                          f"(the whole meta-batch at once), got {train.task_chunk!r}")
        self.task_chunk = train.task_chunk if train.task_chunk != "auto" else None  # auto: chosen by fit
        # steps taken after which the method's meta-step costs change (auto measures again there)
        self.cost_changes = {step for step, _ in learner.cost_changes(getattr(learner, "config", None))}
        optimizer = torch.optim.Adam if train.meta_optimizer == "adam" else torch.optim.SGD
        self.optimizer = optimizer(learner.parameters(), lr=train.meta_lr)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lambda step: lr_factor(train, step))
        self.step = 0
        self.elapsed_s = 0.0  # training wall time so far, across resumes
        self.machines: list[dict[str, Any]] = []  # what trained which steps: see _note_machine
        self.validation_pending = False  # this step's validation was left for the resume (a signal)
        self._abandon_validation: Callable[[], bool] | None = None  # while the loop validates: a stop came
        self.config_written = False  # by the first save: the config this Trainer continues with
        self.lock = lock  # the hold on the run folder (build_trainer's, or fit takes one; see lock_for_training)
        self.on_record: Callable[[dict[str, Any]], None] | None = None  # fit's, for the records it logs
        # whether the state in memory is one this trainer saved or restored (a failed fit goes back to it)
        self.saved = False
        # a fit failed, perhaps within a step (weights updated, step not counted, metrics logged): the
        # next fit goes back to the last checkpoint first (_recover)
        self.failed = False
        self.folder_lost = False  # the run folder was replaced while this trainer trained it

    # -- checkpoints ---------------------------------------------------------------------------

    def state(self) -> dict[str, Any]:
        """Everything a resume needs, as CPU tensors: a run trained on a GPU resumes or
        evaluates anywhere, also with a plain ``torch.load``."""
        return on_cpu({
            "step": self.step,
            "elapsed_s": self.elapsed_s,
            "machines": self.machines,
            "config": self.config.to_dict(),
            "learner": self.learner.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "torch_rng": torch.get_rng_state(),
            **({"validation_pending": True} if self.validation_pending else {}),
            # "dataset:NAME" when the registry built the tasks that config.json names; else the
            # class of a task source of the user's own, which config.json's dataset does not describe
            "task_source": self.task_source,
            # "method:NAME" when build_trainer built the learner that config.json describes; else the
            # class of a learner the user built (its network any module), which load_trained cannot rebuild
            "learner_source": self.learner_source,
            **({"data_fingerprint": self.data_fingerprint} if self.data_fingerprint is not None else {}),
            # the image folder read, absolute: eval, compare, plot and a resume read it where no
            # --data-dir is given; export refuses an OUT_DIR inside it
            **({"data_dir": str(Path(self.data_dir).expanduser().resolve())} if self.data_dir is not None else {}),
        })

    def save(self) -> None:
        if self.world.is_main:
            self.check_folder_is_ours()
            self._write_config()
            self.run_dir.write_checkpoint(self.state())
        self.world.barrier()
        self.saved = True

    def check_folder_is_ours(self) -> None:
        """Before writing: a run folder deleted, moved or replaced while this process trained it (its
        lock file gone, or another process's) is no longer this run's; writing by path would put
        this run's metrics and checkpoint into whatever folder now has that name, perhaps a new
        run's. Stop instead, writing nothing."""
        if self.lock is not None and not self.lock.still_ours():
            self.folder_lost = True  # no retry of this trainer writes there either (_recover)
            raise MetalearnError(f"the run folder {self.run_dir.path} was deleted, moved or replaced while this "
                                 f"process trained it (at step {self.step}); stopping without writing into it, "
                                 "since another run may be using that name now")

    def _write_config(self) -> None:
        """The folder and config.json, once: the configuration this Trainer trains with (on a
        resume it may change what RESUMABLE_CHANGES allows, such as --steps); for class folders
        the split as well (``split.json``; on a resume, after the checkpoint's data fingerprint
        matched the folder's, so that a run from before split.json gets the one it trained on;
        a checkpoint from before data fingerprints gets the folder's split as given). Other
        tasks remove a split.json left by an attempt killed before its first checkpoint."""
        if not self.config_written:
            self.run_dir.write_config(self.config, resumed=self.resume)
            if self.class_split is not None:
                self.run_dir.write_split(self.class_split)
            else:
                self.run_dir.split_path.unlink(missing_ok=True)
            self.config_written = True

    def _begin(self) -> None:
        """What fit writes before its first step, rank 0 alone, after every rank has read the
        folder: config.json, and on a resume the metrics and the best checkpoints cut back to
        the checkpoint's step, also when that is step 0 (a run killed after logging a step it
        had not saved logs that step again; a best checkpoint from past it is not this run's).
        Records past the trainer's step are dropped in any case: those of an attempt that
        diverged in its first step, which a new run starts over (step 0); a trainer that fits
        again after a pause (``stop_at``) keeps its own, none of which lies past its step."""
        self.world.barrier()
        if self.world.is_main:
            if self.resume:
                self.run_dir.truncate_metrics(self.step)
                self.run_dir.drop_best_after(self.step)
            elif self.run_dir.metrics_path.exists():
                self.run_dir.truncate_metrics(self.step)
            self._write_config()
        self.world.barrier()

    def _note_machine(self) -> None:
        """Record the machine this fit trains on (:func:`metalearn.runtime.machine`, rank 0's
        under torchrun, with the number of processes) from the current step, where it differs
        from the last record: a run resumed elsewhere, or with other threads, gets a record per
        stretch, so that its training time and step costs can be read against the processor
        that gave them. Saved with the checkpoint: steps after the last checkpoint are trained
        again by the resume, on its machine, so a record from the same step as the last one
        replaces it, and a complete run resumed (to validate, say) adds none."""
        if self.step >= self.config.train.steps:  # a complete run trains nothing more here
            return
        here = machine(self.device, self.world.size)
        if self.machines and self.machines[-1].get("from_step") == self.step:
            self.machines.pop()  # that stretch kept no step
        last = self.machines[-1] if self.machines else None
        if last is None or {key: value for key, value in last.items() if key != "from_step"} != here:
            self.machines.append({"from_step": self.step, **here})

    def _split_file_moved(self) -> OptionError | None:
        """Where a resume's data fingerprint differs and the run's ``split_file`` now puts a class
        in another part than the run's split.json records: the error that says so (None where
        that is not the difference, e.g. the images changed)."""
        split_file = self.config.task.split_file
        own = self.run_dir.read_split() if self.run_dir is not None else None
        if not split_file or not own or self.class_split is None:
            return None
        then = {name: part for part, names in own.items() for name in names}
        now = {name: part for part, names in self.class_split.items() for name in names}
        if then == now:
            return None
        moved = [name for name in sorted(set(then) | set(now)) if then.get(name) != now.get(name)]
        name, changed = moved[0], len(moved)
        return OptionError(f"{{split_file}} puts {changed} class{'es' if changed > 1 else ''} of the run in "
                           f"{self.run_dir.path} in another part than when it trained (e.g. {name!r}: "
                           f"{then.get(name, 'no part')} then, {now.get(name, 'no part')} now): put the file back as "
                           f"it was (the run's copy of its split: {self.run_dir.split_path}), or start a new "
                           "{run_dir}", split_file=valued("split_file", split_file),
                           run_dir="run_dir")

    def restore(self, state: dict[str, Any]) -> None:
        """Continue from the checkpoint ``state``: the learner, optimiser, schedule, random
        streams, step and training time, exactly. Raises :class:`MetalearnError` when the
        checkpoint's configuration does not match this trainer's, when it trained on other
        images (a folder dataset), or when its weights are not finite; and, in one line naming
        ``checkpoint.pt`` and the entry, when an entry is missing, of the wrong type
        (:func:`~metalearn.checkpoints.check_entries`) or does not load (an optimiser or random
        state of another shape), and when the run's ``best/index.json`` is damaged: all before
        a step is trained, so that nothing trained is lost to the refusal."""
        path = self.run_dir.checkpoint_path
        check_entries(state, path, RESUME_ENTRIES, RESUME_OPTIONAL_ENTRIES)
        saved = saved_config(state, path)
        check_compatible(saved, self.config, f"the checkpoint in {self.run_dir.path}")
        step, steps = int(state["step"]), self.config.train.steps
        if step > steps:  # config.json would say steps it has passed: a resume that shortens the run
            raise OptionError(
                f"the run in {self.run_dir.path} is already at step {step}; {{steps}} would end it before that. "
                "Give {more} or more.", steps=(f"steps={steps}", f"--steps {steps}"),
                more=(f"steps={step}", f"--steps {step}"))
        # read by the first validation's keep_best (and fit's drop_best_after): refused now,
        # not after the steps up to that validation were trained
        self.run_dir.read_best_index()
        train = self.config.train
        if train.keep_best and train.val_every and step < steps and self.world.is_main:
            self.run_dir.check_best_writable()
        trained_on = state.get("data_fingerprint")  # absent in runs of fixed datasets and older runs
        if trained_on is not None and self.data_fingerprint is not None and trained_on != self.data_fingerprint:
            where = ("{data_dir}" if self.data_dir is not None and self.data_dir_given else
                     f"its folder {self.data_dir} now" if self.data_dir is not None else "this dataset")
            then, now = (fingerprint.split(":", 1)[-1] for fingerprint in (trained_on, self.data_fingerprint))
            differ = f"{then}, now {now}" if then != now else f"{now} either way, other images, class names or parts"
            moved = self._split_file_moved()
            if moved is not None:
                raise moved
            raise OptionError(
                f"the run in {self.run_dir.path} trained on other images than {where} holds ({differ}): resume "
                "it with the folder as it trained on it, or start a new {run_dir} ({init_from} the run to keep "
                "its weights)", data_dir=valued("data_dir", self.data_dir),
                run_dir="run_dir", init_from="init_from")
        # a run trained from Python on tasks or with a network of the user's own continues from Python:
        # metalearn train --resume would build config.json's dataset and network, not what it learned
        route = f"continue it from Python: {python_resume(self.run_dir.path)}"
        if self.task_source.startswith("dataset:"):
            refuse_own_tasks(self.run_dir, state)
        check_weights_finite(state["learner"], self.run_dir.path)
        try:
            load_learner_state(self.learner, state["learner"], self.run_dir.path)
        except MetalearnError as err:
            saved_learner = own_learner(state)
            if saved_learner is None or not self.learner_source.startswith("method:"):
                raise
            raise MetalearnError(f"the run in {self.run_dir.path} was trained with a network of your own (in a "
                                 f"{saved_learner}) that its config.json does not describe: {route}") from err
        # their types are checked above; what still does not load (the state of other parameters,
        # a generator state of another size) is the same damage, and torch says it in many ways
        for name, load in (("optimizer", lambda saved: load_optimizer_state(self.optimizer, saved)),
                           ("scheduler", self.scheduler.load_state_dict), ("torch_rng", self._keep_torch_rng)):
            try:
                load(state[name])
            except Exception as err:  # noqa: BLE001 -- KeyError, ValueError, RuntimeError, ...
                detail = str(err).splitlines()[0][:160] if str(err) else ""
                raise unreadable_checkpoint(path, f"its {name} does not load: {type(err).__name__}"
                                                  f"{': ' + detail if detail else ''}") from None
        self.step = int(state["step"])
        self.elapsed_s = float(state.get("elapsed_s", 0.0))
        self.machines = [dict(record) for record in state.get("machines", [])]  # none in older runs
        self.validation_pending = bool(state.get("validation_pending", False))
        self.saved = True

    def _recover(self) -> None:
        """Before a fit that follows a failed one (an error or memory error in a step, a second
        Ctrl-C, a full disk): the learner, optimiser and schedule may hold part of a step that
        no checkpoint holds, and the metrics a step that is not counted. Go back to the run's
        last checkpoint as a resume does (its metrics and best checkpoints cut back to its step),
        so that the retry trains exactly what an uninterrupted run would. A failure before this
        trainer's first checkpoint changed nothing in memory: nothing to go back to. A trainer
        whose folder was replaced meanwhile does not write there again."""
        if not self.failed:
            return
        if self.folder_lost:
            raise MetalearnError(f"this Trainer's run folder {self.run_dir.path} was deleted, moved or replaced while "
                                 "it trained; it cannot go on there: build a new trainer (resume=True continues the "
                                 "run that is there now) or choose another folder")
        if self.saved:
            if not self.run_dir.has_checkpoint():
                raise MetalearnError(f"the checkpoint of this Trainer's run in {self.run_dir.path} is gone, so its "
                                     "failed fit cannot go back to it: start a new run in another folder")
            self.restore(self.run_dir.read_checkpoint(*RESUME_ENTRIES))
            self.resume = True  # _begin cuts the metrics and best checkpoints back to the checkpoint's step
        self.failed = False

    # -- the loop ------------------------------------------------------------------------------

    @keyword_only_after(1)
    def fit(self, *, progress: bool | None = None, time_limit_s: float | None = None, stop_at: int | None = None,
            keep_lock: bool = False, on_record: Callable[[dict[str, Any]], None] | None = None) -> None:
        """Train to ``config.train.steps``, saving as configured. A first Ctrl-C or stop signal
        (SIGTERM, SIGUSR1, SIGUSR2) ends training after the step in progress with a checkpoint of
        it and :class:`~metalearn.errors.TrainingInterrupted` (a ``BaseException``, as
        ``KeyboardInterrupt``), and ``time_limit_s`` seconds from this call the same way with
        :class:`~metalearn.errors.TrainingStopped`. ``stop_at``: end the
        same way after that step of the run's schedule (exit code 0: a pause asked for, so that
        runs can be compared at equal steps of a schedule longer than the time at hand; every
        rank stops after the same step); it must lie before the run's last step and not before its
        current one (equal: it stops at once, trains nothing). The time limit is
        kept by not starting an iteration (a step with its logging, validation and checkpoint)
        that would end past it, taking the longest iteration so far as the next one's length:
        a run with validation every N steps stops about one validation's time early. An
        iteration during which the process was stopped and continued (Ctrl-Z, SIGSTOP, a
        scheduler's suspend: a SIGCONT arrived) is not taken as a length; the time it lost
        counts against the limit all the same. At least one step runs. A signal that arrives
        during a step after which the run validates stops it before the validation, which the
        resumed run then does first (the same scores). ``keep_lock``: a training that returns
        keeps the run folder's lock for the caller's final test (``metalearn status`` then says
        the run is being tested), who lets go with :meth:`release`; a stop or an error lets go.
        A fit that failed (an error or memory error in a step, a second Ctrl-C) may be called
        again once the cause is fixed: it goes on from the run's last checkpoint (:meth:`_recover`).
        Training keeps a torch random state of its own: the caller's is as it was when fit returns.
        ``progress``: a progress bar; None (the default) draws it only when the error output is a
        terminal or a notebook (:func:`~metalearn.runtime.show_progress`), as ``train`` does.

        ``on_record``: called (on rank 0) with a copy of each record as it is added to
        ``metrics.jsonl``: every logged training step (``step``, ``loss``, ``tasks_per_s``,
        ``elapsed_s`` and the method's metrics) and every validation (``step``, ``val_accuracy``
        or ``val_mse``, ``val_ci95``, ...), to send them on to TensorBoard, Weights & Biases or a
        dashboard of one's own. What it raises ends the fit as any error does (the run resumes).
        A resume logs the steps after its checkpoint again, so their records come again.

        >>> from torch.utils.tensorboard import SummaryWriter
        >>> writer = SummaryWriter("runs/tb")
        >>> trainer.fit(on_record=lambda r: [writer.add_scalar(k, v, r["step"]) for k, v in r.items() if k != "step"])
        """
        if on_record is not None and not callable(on_record):
            raise MetalearnError(f"on_record is a function of one record (a dict), got {type(on_record).__name__}")
        self.on_record = on_record
        progress = show_progress(progress, "fit")
        started = None if time_limit_s is None else now()  # the clock is read only for a time limit
        if self.run_dir is None:
            raise MetalearnError("this Trainer has no run folder to write into; build it with a run_dir")
        train = self.config.train
        if self.lock is None:  # one writer per folder, until fit returns (the same test on every rank)
            self.lock = lock_for_training(self.run_dir, self.world)
        bar = None
        trained = False  # returned normally: the lock may be kept for the caller's test
        random_state = self._own_random_state()
        random_state.__enter__()
        try:  # from here on, whatever fails lets go of the folder and leaves the trainer to retry
            # any number of seconds: none left (train's own set-up took it) still trains one step
            number = isinstance(time_limit_s, numbers.Real) and not isinstance(time_limit_s, bool)
            if time_limit_s is not None and (not number or math.isnan(time_limit_s)):
                raise MetalearnError(f"time_limit_s is a number of seconds, got {time_limit_s!r}")
            deadline = None if time_limit_s is None else started + time_limit_s
            self._recover()
            if self.resume and not self.saved and self.run_dir.has_checkpoint():
                # Trainer(..., resume=True).fit() without restore(): continue the run, not train over it
                self.restore(self.run_dir.read_checkpoint(*RESUME_ENTRIES))
            every = train.val_every
            if (self.val_tasks is None and every > 0 and train.steps // every > self.step // every
                    and self.world.is_main and not self.task_source.startswith("dataset:")):
                # a validation lies ahead that cannot run (build_trainer's: the dataset has no validation part)
                warnings.warn(OptionWarning(
                    f"{{val_every}} is {every} but this Trainer has no val_tasks: it trains without validation and "
                    "keeps no best checkpoints; give val_tasks, or set {val_every} to 0",
                    val_every="val_every"), stacklevel=caller_level())
            if self.torch_rng is not None:  # the state _recover's checkpoint restored, where it did
                torch.set_rng_state(self.torch_rng)
            if progress and self.world.is_main:
                from tqdm import tqdm

                bar = tqdm(total=train.steps, initial=self.step, desc=f"{self.config.method}", unit="step",
                           file=DroppingStream(drop_when_busy=True))  # a bar that cannot be written ends no training
            parameters = list(self.learner.parameters())
            if train.task_chunk == "auto":
                self.task_chunk = None  # measured again at the first step: a resume may run on another machine
            share = self.world.share(train.meta_batch_size)
            local_fraction = (share.stop - share.start) / train.meta_batch_size
            if stop_at is not None:
                check_stop_at(stop_at, self.step, train.steps, train.lr_anneal)
                if stop_at == self.step:  # paused there already: the same command again does nothing
                    raise TrainingStopped(f"the run is at step {stop_at} of {train.steps} already ({{stop_at}}); "
                                          "{next}", 0, stop_at="stop_at", next=self.resume_hints())
            self._begin()
            self._note_machine()
            if self.step == 0:
                self.save()  # eval, resume and a NaN at step 1 always find a checkpoint
            if self.validation_pending and self.val_tasks is not None:  # left by a signal at that step
                self.validation_pending = False  # before validate: best/ keeps this state
                self.validate()
                self.save()  # a resume from here must not log this validation twice
            first = self.step
            say = (lambda text: print(text, file=sys.stderr, flush=True)) if self.world.is_main else None
            with StopRequests(note_repeats=launched_by_torchrun(), announce=say) as stop, \
                    drawing_from(self.train_tasks):  # a refusal of the batches' dtype names this source's remedy
                self._loop(stop, bar, parameters, share, local_fraction, deadline, stop_at)
            if self.step != first:  # a complete run resumed trains nothing: its checkpoint stays as it is
                self.save()
            trained = True
        except (TrainingStopped, TrainingInterrupted):  # after its checkpoint was saved, or before anything changed
            raise
        except RankLost as err:
            self._failed()
            raise OptionError(
                f"rank {self.world.rank} lost contact with the other ranks at step {self.step + 1} "
                f"({{error}}); another process probably died. The last "
                f"checkpoint in {self.run_dir.path} is kept: resume with {{resume}}.",
                error=spellings(err), resume=("resume=True", "--resume")) from None
        except WriteError:
            self._failed()
            if self.world.is_main:  # the folder removed between check_folder_is_ours and the write: say that
                try:
                    self.check_folder_is_ours()
                except MetalearnError as lost:
                    raise lost from None
            raise
        except BaseException:
            self._failed()
            raise
        finally:
            random_state.__exit__(None, None, None)  # the caller's random state back, whatever happened
            if bar is not None:
                bar.close()
            if not (trained and keep_lock):  # a stop or an error lets go at once
                self.release()

    def _failed(self) -> None:
        """Note a failed fit (the next one goes back to the last checkpoint, :meth:`_recover`)
        and drop the gradients, which a retry after a memory error would otherwise find held."""
        self.failed = True
        self.optimizer.zero_grad(set_to_none=True)

    def _keep_torch_rng(self, saved: torch.Tensor) -> None:
        """Keep a checkpoint's random state for :meth:`fit` (which sets it in its own fork of
        the random state), after torch checked that it loads: restoring a run leaves the caller's
        random state alone."""
        previous = torch.get_rng_state()
        torch.set_rng_state(saved)  # refuses a state of another size or type
        torch.set_rng_state(previous)
        self.torch_rng = saved

    @contextlib.contextmanager
    def _own_random_state(self):
        """Training's torch random state, apart from the caller's: forked on entry (the CPU's,
        and every GPU's, which torch.manual_seed reseeds), set to the one the last fit or restore
        left, and kept again on exit, so that a notebook's own draws are the same with or without
        a training between them, and two fits in one process draw what one would; within it
        torch's default dtype is float32 (:func:`metalearn.runtime.float32_default`)."""
        with own_random_state(cuda_devices()), float32_default():
            if self.torch_rng is not None:
                torch.set_rng_state(self.torch_rng)
            try:
                yield
            finally:
                self.torch_rng = torch.get_rng_state()

    def release(self) -> None:
        """Let go of the run folder (its one-writer lock), as :meth:`fit` does when it returns:
        for a trainer built and then not trained."""
        if self.lock is not None:
            self.lock.release()
            self.lock = None

    def _loop(self, stop: StopRequests, bar, parameters, share: slice, local_fraction: float,
              deadline: float | None = None, stop_at: int | None = None) -> None:
        train = self.config.train
        window_time, window_tasks = 0.0, 0  # meta-steps only: no validation or checkpoint time
        # for the deadline: the longest iteration so far, from one stop decision to the next (a
        # step with its logging, validation and the checkpoint after the decision before it),
        # leaving out those during which the process was stopped
        longest, mark, continued = 0.0, now() if deadline is not None else 0.0, stop.continued
        while self.step < train.steps:
            clock = time.perf_counter()
            seed = step_seed(train.seed, self.step)
            batch = self.train_tasks.sample(train.meta_batch_size, torch.Generator().manual_seed(seed), tasks=share)
            require_sampled_batch(batch, self.train_tasks, "Trainer's train_tasks")
            batch = batch.to(self.device)
            self.learner.train()
            self.learner.start_step(self.step)
            if train.task_chunk == "auto" and self.step in self.cost_changes:
                self.task_chunk = None  # the steps from here cost more (or less) memory: measure again
            if self.task_chunk is None:
                self.task_chunk = self._choose_task_chunk(batch, bar)
                self.learner.start_step(self.step)  # the trial passes leave nothing for end_step
            torch.manual_seed(seed + self.world.rank)
            self.optimizer.zero_grad(set_to_none=True)
            loss, metrics = meta_gradient(self.learner, batch, self.task_chunk, local_fraction)
            total_loss = float(self.world.sum(loss * local_fraction))
            if not math.isfinite(total_loss):
                where = batch.data_problem(share.start or 0) if isinstance(batch, TaskBatch) else None
                if self.world.distributed:  # every rank is here (the loss is a sum): one account for all
                    flagged = self.world.sum(torch.tensor(float(where is not None), device=self.world.device))
                    if where is None and float(flagged) > 0:
                        where = "unusable data into another rank's share (whose message names it)"
                if where is not None:  # the data's doing: a smaller learning rate would not help
                    self._note_divergence(f"the task source drew {where}")
                    fix = data_fix(where)
                    if fix.startswith("rescale") and self.config.task.noise_std:  # a built-in's noise
                        fix = "rescale the data, or lower the noise ({noise_std})"
                    raise OptionError(f"the meta-loss became {total_loss} at step {self.step + 1}: the task source "
                                      f"drew {where}; training stopped before saving it, and the last good "
                                      f"checkpoint in {self.run_dir.path} is kept. {fix[0].upper() + fix[1:]}",
                                      noise_std="noise_std")
                raise self._diverged(f"the meta-loss became {total_loss}", "")
            self.world.sum_gradients(parameters)
            if not gradients_finite(parameters):  # the same on every rank: gradients are summed
                raise self._diverged("the meta-gradient became non-finite", f" (the meta-loss was {total_loss:.4g})")
            if train.grad_clip > 0:  # after the sum over ranks and chunks: every rank clips the same gradient
                torch.nn.utils.clip_grad_value_(parameters, train.grad_clip)
            self.optimizer.step()
            self.learner.end_step(self.world)
            # a huge --meta-lr can overflow a finite gradient into inf weights; caught here, before
            # this step's checkpoint would keep them (every rank holds the same weights: no collective)
            if not all_finite(parameters):
                raise self._diverged("the update made the parameters non-finite",
                                     f" (the meta-loss was {total_loss:.4g})", "Try a smaller {meta_lr}.")
            self.scheduler.step()
            self.step += 1
            if self.world.is_main:
                self.check_folder_is_ours()  # before this step's metrics, validation and checkpoint
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
                    self._log(record)
                    if bar is not None:
                        bar.set_postfix({k: f"{v:.3g}" for k, v in record.items() if k != "step"})
                window_time, window_tasks = 0.0, 0
            if bar is not None:
                bar.update(1)
            if self.val_tasks is not None and train.val_every > 0 and self.step % train.val_every == 0:
                # a signal during the step: save and stop now, and validate this step first thing
                # on resume (the same scores: the model and the validation episodes are the same).
                # A scheduler's grace after its SIGTERM (SLURM's KillWait, torchrun's
                # --shutdown_timeout: 30 s each by default) can be shorter than a validation.
                if self._stop_requested(stop):
                    self.validation_pending = True
                else:  # a signal during the validation: given up, as above
                    if type(self).validate is Trainer.validate:  # an override may read its result: not None
                        self._abandon_validation = lambda: self._stop_requested(stop)
                    try:
                        self.validate()
                    finally:
                        self._abandon_validation = None
            out_of_time = False
            if deadline is not None:
                previous, mark = mark, now()
                if stop.continued == continued:
                    longest = max(longest, mark - previous)
                continued = stop.continued
                out_of_time = mark + longest > deadline
            stopping = self._stop_requested(stop, out_of_time)
            # the step asked for: the same on every rank, no collective; it is the reason given
            # even when a signal or the time limit stops the run at the same step
            paused = self.step == stop_at
            stopping = stopping or paused
            if self.step % train.checkpoint_every == 0 or stopping:
                self.save()
            if stopping:  # also after the last step: the test evaluation is then skipped
                if paused:
                    why, code = "stopped as asked ({stop_at})", 0
                elif stop.received is not None:
                    why, code = f"stopped by {stop.received.name}", 128 + int(stop.received)
                elif stop.orphaned():
                    why, code = "stopped: torchrun, which launched this process, is gone", 128 + int(signal.SIGTERM)
                elif out_of_time:
                    why, code = "stopped at its time limit", TIME_LIMIT_EXIT
                elif deadline is None:  # another rank was signalled; all stop after the same step
                    why, code = "stopped by another rank's signal", 128 + int(signal.SIGTERM)
                else:  # another rank was signalled or ran out of time (its clock may run ahead)
                    why, code = "stopped by another rank's signal or time limit", TIME_LIMIT_EXIT
                raise training_stop(  # what goes on from it, as the caller would: Python's call or the command
                    f"{why} after step {self.step} of {train.steps}; its checkpoint is "
                    f"saved in {self.run_dir.path}: {{next}}",
                    code, stop_at="stop_at", next=self.resume_hints(),
                )

    def rebuilt_by_commands(self) -> bool:
        """Whether ``metalearn train --resume`` and ``metalearn eval`` rebuild what this trainer
        trains from config.json, as ``status`` judges a checkpoint: the library's tasks (the
        registry's, or a built-in source such as ``SinusoidTasks``) and a learner whose network
        is the one config.json describes (by its weights' names and shapes), also where the
        user built it."""
        if own_tasks({"task_source": self.task_source}) is not None:
            return False
        if self.learner_source.startswith("method:"):
            return True
        try:
            return network_difference(self.config, self.learner.state_dict()) == ""
        except MetalearnError:  # config.json names no network metalearn can build for these tasks
            return False

    def resume_hints(self) -> tuple[str, str]:
        """What goes on from this trainer's checkpoint, as (the Python API, the command line) do
        it, for a message that names it as its caller would (an :class:`~metalearn.errors.Options`
        field): ``metalearn.train(config, ..., resume=True)`` and ``metalearn train --resume``, or
        once training is complete ``metalearn.evaluate_run`` and ``metalearn eval``; the Python
        lines alone where no command rebuilds the run."""
        unfinished = self.step < self.config.train.steps or self.validation_pending  # its last validation is to do
        if not self.rebuilt_by_commands():
            # tasks or a network of the user's own, which the commands cannot rebuild from config.json
            if unfinished:
                return (f"continue from Python: {python_resume(self.run_dir.path)}",) * 2
            return (f"training is complete; evaluate it from Python: {python_test(self.run_dir.path)}",) * 2
        if unfinished:
            return continue_lines(self.config, self.run_dir.path, self.data_dir)
        here = registered_in_python(self.config)
        if here is not None:  # a method of a notebook's or a script's: no command knows it
            return (f"training is complete; evaluate it from Python: {registered_test(self.run_dir.path, here)}",) * 2
        path = repr(str(self.run_dir.path))
        images = f", data_dir={str(self.data_dir)!r}" if self.data_dir is not None else ""
        data = f" --data-dir {self.data_dir}" if self.data_dir is not None else ""
        return (f"training is complete; evaluate with `metalearn.evaluate_run({path}{images})`",
                f"training is complete; evaluate with `metalearn eval {self.run_dir.path}{data}`")

    def _choose_task_chunk(self, batch, bar) -> int:
        """``task_chunk="auto"``: of the chunk sizes whose step fits in ``memory_budget`` of the
        memory available now, the one with the fastest measured step per task.

        Memory: the measured peak of this step on two tasks (its meta-loss and backward pass),
        halved: two, because MAML runs a single task outside vmap with a leaner batch norm
        (``MAML.meta_loss``), which would understate a task of a larger chunk; the step's fixed
        costs are included, an overestimate per task, on the safe side. Speed: each candidate
        (:func:`chunk_candidates`: 1, 2, 4, ... and the largest that fits) is timed once on its
        first tasks after one untimed call, so the choice may differ from run to run; a candidate
        slower per task than the best so far by a quarter ends the probe (it assumes the time per
        task does not fall again at larger sizes), so the probe costs at most about two
        meta-steps. Whole meta-batch and chunks give the same meta-gradient to float rounding, so
        the choice changes the speed, not the training, but for a method that draws random
        numbers in a step (PLATIPUS, Reptile, dropout): it draws them chunk by chunk, which the
        chosen line then says. Under torchrun every rank measures its own share and all take rank
        0's choice, made smaller where another rank's memory fits fewer tasks. The probes'
        gradients are dropped; the trainer seeds the random generators after them, so the step
        itself draws what it would without them."""
        train = self.config.train
        budget = int(train.memory_budget * available_memory(self.device))
        if self.device.type == "cpu":  # the processes torchrun starts on one machine share its memory
            budget //= max(environment_count("LOCAL_WORLD_SIZE", 1), 1)

        probed = min(batch.num_tasks, 2)

        def step_on(tasks: int):
            def call():
                loss, _ = self.learner.meta_loss(batch.select(slice(0, tasks)))
                loss.backward()
            return call

        def random_states() -> list[torch.Tensor]:  # the generators a step on this device draws from
            cuda = [torch.cuda.get_rng_state(self.device)] if self.device.type == "cuda" else []
            return [torch.get_rng_state(), *cuda]

        before = random_states()
        per_task = peak_memory_of(step_on(probed), self.device) // probed
        draws = not all(map(torch.equal, before, random_states()))  # its step draws random numbers
        most = largest_chunk(batch.num_tasks, per_task, budget)
        step_on(1)()  # warm-up: first-call costs (allocator, the one-task path's kernels) are not a chunk's
        seconds: dict[int, float] = {}
        for size in chunk_candidates(batch.num_tasks, most):
            seconds[size] = seconds_of(step_on(size), self.device) / size
            if seconds[size] > 1.25 * min(seconds.values()):
                break
        self.optimizer.zero_grad(set_to_none=True)
        chunk = fastest_chunk(seconds)
        if self.world.distributed:
            # one choice for all ranks: rank 0's, bounded by what fits on every rank (a rank whose
            # whole share fits sets no bound), so that no rank runs out of memory with another's choice
            fits = most if most < batch.num_tasks else sys.maxsize
            rows = self.world.gather(torch.tensor([[chunk, fits]], dtype=torch.long, device=self.world.device))
            chunk = min(int(rows[0, 0]), int(rows[:, 1].min()))
        if self.world.is_main:  # also without a progress bar: a long run's log says what it chose
            timed = ", ".join(f"{size}: {1000 * s:.0f} ms" for size, s in seconds.items())
            line = (f"--task-chunk auto at step {self.step}: {chunk} of {batch.num_tasks} tasks at a time (fits: up "
                    f"to {most}, a task's step {per_task / 2**20:.0f} MiB of a {budget / 2**20:.0f} MiB budget; "
                    f"per task {timed})")
            if draws:  # chunk by chunk: another chunk, other draws; a timed choice is not always the same
                line += (f"; {self.config.method} draws random numbers in a step, chunk by chunk: --task-chunk "
                         f"{chunk} repeats this run exactly")
            if bar is not None:
                bar.write(line)
            else:
                print(line, flush=True)
        return chunk

    def _diverged(self, what: str, detail: str, advice: str | None = None) -> OptionError:
        """The one error for a step that went non-finite: training stops before that step is
        saved, so the last checkpoint (from before it) holds good weights. ``advice`` names the
        options to change as fields of :class:`~metalearn.errors.Options` (``{meta_lr}``); by
        default the meta learning rate, and the inner loop's step size and steps where the
        method has them (a ProtoNet has neither)."""
        if advice is None:
            inner = {"inner_lr", "inner_steps"} <= set(self.config.method_config)
            advice = ("Try a smaller {inner_lr} or {meta_lr}, or fewer {inner_steps}." if inner else
                      "Try a smaller {meta_lr}.")
        self._note_divergence(what + detail)
        # a resume takes the same options and draws the same batch: it would diverge again
        advice = advice[:-1] + ", in a new {run_dir} (a resume repeats this step)."
        return OptionError(f"{what} at step {self.step + 1}{detail}; training stopped before saving it, and "
                           f"the last good checkpoint in {self.run_dir.path} is kept. {advice}",
                           inner_lr="inner_lr", meta_lr="meta_lr", inner_steps="inner_steps", run_dir="run_dir")

    def _log(self, record: dict[str, Any]) -> None:
        """Add ``record`` to ``metrics.jsonl``, then hand a copy to fit's ``on_record``."""
        self.run_dir.append_metrics(record)
        if self.on_record is not None:
            self.on_record(dict(record))

    def _note_divergence(self, what: str) -> None:
        """Log the step that went non-finite to ``metrics.jsonl`` (``{"step", "diverged"}``), so
        that ``metalearn status`` says the run diverged instead of offering a resume that would
        repeat it. The record follows the last checkpoint, so a resume drops it with the
        records of steps it retrains. fit's ``on_record`` gets it too (a dashboard shows the
        stop). A failure to write it, or one of ``on_record``, leaves the error that follows
        (the divergence's) as it is."""
        if self.world.is_main:
            try:
                self._log({"step": self.step + 1, "diverged": what})
            except Exception:  # the divergence is the error to report, not its record's
                pass

    def _stop_requested(self, stop: StopRequests, out_of_time: bool = False) -> bool:
        """Whether any rank was asked to stop or is out of time: all ranks then stop after the
        same step."""
        asked = stop.received is not None or out_of_time or stop.orphaned()
        if not self.world.distributed:
            return asked
        return bool(self.world.sum(torch.tensor(float(asked), device=self.world.device)) > 0)

    def validate(self, abandon: Callable[[], bool] | None = None) -> dict[str, Any] | None:
        """Score the validation episodes; the record also holds ``validation_s``, the seconds
        they took (``metalearn status`` counts them into the time a run has left). ``abandon``:
        as :func:`~metalearn.evaluation.evaluate`'s (by default, in the training loop, whether a
        stop signal came); where it gives up, nothing is logged, the validation is left pending
        for the resumed run (:attr:`validation_pending`) and None is returned."""
        abandon = abandon if abandon is not None else self._abandon_validation
        start = time.perf_counter()
        result = evaluate(self.learner, self.val_tasks, self.config.train.val_episodes,  # final score only
                          seed=self.config.train.seed + VALIDATION_SEED_OFFSET, world=self.world, per_step=False,
                          memory_budget=self.config.train.memory_budget, abandon=abandon)
        if result is None:
            self.validation_pending = True
            return None
        if self.world.is_main:
            self._log({"step": self.step, f"val_{result['metric']}": result["mean"], "val_ci95": result["ci95"],
                       "elapsed_s": round(self.elapsed_s, 2), "validation_s": round(time.perf_counter() - start, 3)})
            if self.config.train.keep_best:
                self.run_dir.keep_best(self.state(), result["mean"], self.config.train.keep_best,
                                       higher_is_better=HIGHER_IS_BETTER[result["metric"]])
        return result


def meta_gradient(learner: MetaLearner, batch, task_chunk: int = 0,
                  scale: float = 1.0) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The meta-loss of ``batch`` and its metrics (detached), with the meta-gradient times
    ``scale`` accumulated into the parameters' ``.grad``, ``task_chunk`` tasks at a time (0:
    all at once): each chunk's loss, gradient and metrics are weighted by its share of the
    tasks, and only one chunk's autograd graph is held at a time, which bounds the memory.

    The meta-loss is a mean over tasks that are independent within the batch
    (:meth:`MetaLearner.chunking_refused` names the exception), so the weighted sum has the
    whole batch's gradient to float rounding. A metric that is not a mean over tasks (Reptile's
    update_norm) becomes the chunks' weighted mean, as it does over torchrun's ranks. A method
    that draws random numbers (PLATIPUS's noise, Reptile's mini-batch order) draws them chunk
    by chunk: other draws than the whole batch's, of the same distribution."""
    tasks, start = batch.num_tasks, 0
    loss_sum, metric_sums = torch.zeros(()), {}
    for size in chunk_sizes(tasks, task_chunk):
        chunk = batch if size == tasks else batch.select(slice(start, start + size))
        start += size
        share = size / tasks
        loss, metrics = learner.meta_loss(chunk)
        (loss * (scale * share)).backward()
        loss_sum = loss_sum.to(loss) + loss.detach() * share
        for name, value in metrics.items():
            metric_sums[name] = metric_sums.get(name, 0) + value.detach() * share
    return loss_sum, metric_sums


# -- assembling a run ------------------------------------------------------------------------


def load_optimizer_state(optimizer: torch.optim.Optimizer, saved: dict[str, Any]) -> None:
    """``optimizer.load_state_dict(saved)``, refusing (``ValueError``) a per-parameter state
    (Adam's moments, SGD's momentum) of another shape than its parameter: torch checks only the
    sizes of the parameter groups, so such a state would fail at the first step, a traceback
    after the resume had started."""
    optimizer.load_state_dict(saved)
    for group in optimizer.param_groups:
        for parameter in group["params"]:
            for key, value in optimizer.state.get(parameter, {}).items():
                if isinstance(value, torch.Tensor) and value.dim() > 0 and value.shape != parameter.shape:
                    raise ValueError(f"{key} of shape {tuple(value.shape)} for a parameter of shape "
                                     f"{tuple(parameter.shape)}")


def gradients_finite(parameters: list[torch.Tensor]) -> bool:
    """Whether every gradient is finite (one synchronisation for all tensors)."""
    return all_finite(p.grad for p in parameters if p.grad is not None)


def resume_without_run_dir() -> OptionError:
    """The refusal of a resume that names no run folder to continue (:func:`build_trainer`,
    :func:`metalearn.train`)."""
    return OptionError("{resume} needs {run_dir}, the run to continue", resume=("resume=True", "--resume"),
                       run_dir="run_dir")


@keyword_only_after(2)
def build_trainer(config: RunConfig, run_dir: Path | str | None = None, *,
                  data_dir: Path | str | None = None,
                  resume: bool = False, world: World = World(), progress: bool | None = None,
                  lock: bool = True, tested: bool = True) -> Trainer:
    """A trainer for ``config`` writing into ``run_dir``; with ``resume``, the run found there
    continues (its configuration must agree with ``config``; a run that never reached its first
    checkpoint starts again); without, a folder that holds only an attempt that failed in its
    first step (:func:`untrained_attempt`) is started over. Every check a run makes before its
    first step is made here: the run folder, the test shape against the method, the data (every
    part of the split holds its episodes), the network, ``--init-from``. ``tested`` False
    (``train --no-eval``): the test part is not built, so a folder whose classes all train
    (``--split-fractions 1,0,0``) trains.

    With ``lock`` (the default), rank 0 takes the run folder's lock first, so that a second
    writer is refused at once, and the trainer holds it until its :meth:`Trainer.fit` returns.
    Nothing else is written until ``fit``: ``train --print-config`` builds a trainer without the
    lock (``run_dir`` may then be None) and drops it, so a dry run refuses what training would.
    ``progress``: progress bars while the data is read, as :meth:`Trainer.fit`'s.

    ``data_dir``: where the dataset's images are (Omniglot's default: ``$METALEARN_DATA`` or the
    cache folder; required for ``folder`` and ``mini-imagenet``); None on a resume reads the
    folder the run's checkpoint records. ``world``: this process's rank, the number of processes
    and the device (:func:`~metalearn.distributed.init_world` under torchrun); the learner is
    moved to ``world.device``. The default, ``World()``, is one process on the CPU."""
    progress = show_progress(progress, "build_trainer")
    run_dir = user_path(run_dir, "run_dir", optional=True)  # "~/runs/x" as a shell expands it
    data_dir = user_path(data_dir, "data_dir", optional=True)
    if resume and run_dir is None:
        raise resume_without_run_dir()
    if run_dir is not None:
        check_folder_path(run_dir)  # as the CLI says of any path
    if run_dir is not None:  # before the lock, which would make the folder (and its .lock) among the images
        check_outside_data(config.task, data_dir, "run_dir", run_dir)
    # a test result that could not be written (a folder named eval.json) is refused before the
    # training, as eval refuses it, on every rank
    run = RunDir(run_dir) if run_dir is not None else None
    hold = lock_for_training(run, world, run.writable_eval_file if tested else None) if lock and run else None
    try:
        return _build_trainer(config, run_dir, data_dir, resume, world, progress, hold, tested)
    except BaseException:
        if hold is not None:
            hold.release()
        raise


def _build_trainer(config: RunConfig, run_dir: Path | str | None, data_dir: Path | str | None, resume: bool,
                   world: World, progress: bool, lock, tested: bool = True) -> Trainer:
    run = RunDir(run_dir) if run_dir is not None else None
    state = None  # a resume's checkpoint, read once for every look below and the restore
    if run is not None:
        if resume or not untrained_attempt(run):  # such an attempt is started over, like one never started
            check_run_dir(config, run, resume)
        if resume and run.has_checkpoint():  # without one, a run that never started starts now
            state = run.read_checkpoint(*RESUME_ENTRIES)
            # before config.json's dataset is read: a run on tasks of one's own continues from Python
            refuse_own_tasks(run, state)
    resume = state is not None
    # a resume reads the images the run trained on: its checkpoint records the folder
    recorded = recorded_images(run, state) if resume else None  # kept only where --data-dir names another folder
    given = data_dir is not None
    if resume and data_dir is None:
        data_dir, recorded = run_images(run, data_dir, state), None
    elif recorded is not None and same_path(data_dir, recorded):
        recorded = None
    check_test_ways(config)
    with own_random_state(cuda_devices()):  # the caller's random state stays as it was
        torch.manual_seed(config.train.seed)  # the initial weights
        learner = build_learner(config.method, config.method_config, problem_of(config.task))
        # where the training's random state begins (Trainer._own_random_state), as the process's
        # did before training kept its own
        seeded = torch.get_rng_state()
    learner.check_run(config)
    if state is not None and isinstance(state.get("learner"), dict):  # a resume continues in the run's type
        learner = in_run_type(learner, state["learner"])
    task = config.task
    gone = bool(task.split_file) and not Path(task.split_file).is_file()
    if resume and run is not None and gone and run.split_path.is_file():
        task = run.with_own_split(config).task  # the split file is gone: the run's copy of its split
    if config.train.init_from and not resume:  # before any image is decoded: a mismatch is refused at once
        initialise_from_run(learner, config.train.init_from, config)
    # no validation (--val-every 0): the val part is not built, so a folder without val/ classes trains
    validates = has_validation(task) and config.train.val_every > 0
    # every part's shape before the training part is read, so that no part fails after minutes of
    # decoding (the training part first: its mistakes are named first, as its build would)
    try:
        with shared_scans():  # an image folder is listed once for all these
            for part in ("train", *(("val",) if validates else ()), *(("test",) if tested else ())):
                check_task_source(task, part, data_dir, progress)
            train_tasks = build_task_source(task, "train", data_dir=data_dir, progress=progress)
            val_tasks = build_task_source(task, "val", data_dir=data_dir, progress=progress) if validates else None
            if tested:  # an impossible test episode fails now, not after training
                build_task_source(task, "test", data_dir=data_dir, progress=progress)
    except MetalearnError as err:  # another folder than the run's: the folder is the news, not its split
        if recorded is None or data_dir is None or not recorded.is_dir():
            raise
        raise OptionError(f"{{given}} is not the folder the run in {run.path} trained on ({recorded}; leave "
                          "{data_dir} out to resume on it): {error}", data_dir="data_dir", error=spellings(err),
                          given=valued("data_dir", data_dir)) from None
    if config.train.init_from and not resume and world.is_main:  # the classes are known once the parts are built
        warn_of_seen_classes(RunDir(config.train.init_from), config, getattr(train_tasks, "class_split", None),
                             data_dir)
    learner = learner.to(world.device)
    trainer = Trainer(config, learner, train_tasks, val_tasks, run, world=world, resume=resume, lock=lock)
    trainer.task_source = f"dataset:{config.task.dataset}"
    trainer.learner_source = f"method:{config.method}"  # built from config.json: load_trained rebuilds it
    trainer.data_dir, trainer.data_dir_given = data_dir, given
    trainer.torch_rng = seeded
    if resume:
        trainer.restore(state)
    return trainer
