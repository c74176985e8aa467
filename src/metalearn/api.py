"""What the CLI does, as Python functions: build a config with the papers' defaults, train,
evaluate and plot a run directory."""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import inspect
import json
import math
import numbers
import os
import statistics
import warnings
from collections.abc import Iterable
from pathlib import Path
from typing import Any, Callable

import torch

from metalearn.algorithms import METHODS, can, make_method_config, method_class, methods_that
from metalearn.algorithms.base import MetaLearner
from metalearn.config import (RESUMABLE_CHANGES, RunConfig, TaskConfig, TrainConfig, default_log_every,
                              sets_task_option, task_differences)
from metalearn.datasets import DATASETS, get_dataset, reads_image_folder
from metalearn.distributed import World, init_world
from metalearn.errors import (ConfigError, MetalearnError, MetalearnWarning, OptionError, OptionLine, OptionWarning,
                              Terminated, TrainingInterrupted, caller_level, check_count, check_flags, check_whole,
                              flag, keyword_only_after, stopped_by, valued)
from metalearn.evaluation import EPISODE_CHUNK, evaluate
from metalearn.evaluation_setup import (episode_seed, evaluation_labels, given_split, other_images_label, plain_shape,
                                        plain_values, recorded_seeds, warn_of_other_images, warn_of_training_classes,
                                        warn_of_validation_episodes, with_split, with_test_shape)
from metalearn.options import option_defaults
from metalearn.runs import (RunDir, claim_new_run_dir, default_runs_root, evaluation_step, json_finite,
                            new_run_name, recorded_plugins, registered_in_python)
from metalearn.files import (FILE, FOLDER, IMAGES, RUN, WriteError, atomic_write_files, check_folder_path, check_paths,
                             obstacle, probe_writable, remove_export_temporaries, remove_stale_folders, user_path)
from metalearn.locking import make_folders
from metalearn.models import NETWORKS
from metalearn.plugins import load_plugins, unknown_hint
from metalearn.runtime import cuda_devices, own_random_state, show_progress
from metalearn.tasks import has_validation, no_validation_reason, problem_of
from metalearn.checkpoints import (check_compatible, check_same_method, configuration_conflict, load_trained,
                                   load_trained_state, read_entries, recorded_images, run_images, saved_config)
from metalearn.training import (TEST_SEED_OFFSET, build_trainer, continue_lines, part_seed_offset, python_resume,
                                python_test, registered_resume, registered_test, resume_command,
                                resume_without_run_dir)


def resolve_config(method: str, task: dict[str, Any] | None = None,
                   method_config: dict[str, Any] | None = None, train: dict[str, Any] | None = None,
                   resume_from: Path | str | None = None, preset: str | None = None) -> RunConfig:
    """A full RunConfig from the options the user gave; everything else takes the paper's value
    for this method and task (its ``paper_defaults``), or ``preset``'s (one of the method's
    ``presets``, e.g. MAML's ``"maml++"``), or, when resuming, the value saved in the run directory.

    ``method``: a name in :data:`~metalearn.algorithms.METHODS` (a plugin's too). ``task``,
    ``method_config`` and ``train``: the options given, as dicts of :class:`TaskConfig`'s, the
    method's ``Config``'s and :class:`TrainConfig`'s fields (None, the default: none given); a
    key that is no such field is refused. ``resume_from``: a run folder whose saved configuration
    gives every option not given, the given ones replacing its (the method must be the run's;
    ``preset`` is refused); None (the default): a new run."""
    check_paths(("resume_from", resume_from, RUN))
    for name, given, fields in (("task", task, TaskConfig), ("train", train, TrainConfig), ("method_config",
                                                                                            method_config, None)):
        if given is not None and not isinstance(given, dict):
            raise MetalearnError(f"resolve_config's {name} is a dict of options, e.g. {{\"ways\": 5}}, got "
                                 f"{type(given).__name__} {given!r}")
        known = {f.name for f in dataclasses.fields(fields)} if fields is not None else None
        unknown = sorted(set(given or {}) - known) if known is not None else []
        if unknown:
            raise MetalearnError(f"{fields.__name__} has no option(s) {', '.join(map(repr, unknown))}; known: "
                                 f"{', '.join(sorted(known))}")
    task, method_config, train = dict(task or {}), dict(method_config or {}), dict(train or {})
    cls = method_class(method)
    if preset is not None:
        if preset not in cls.presets:
            known = ", ".join(cls.presets) if cls.presets else "none"
            raise MetalearnError(f"{method} has no preset {preset!r} (its presets: {known})")
        if resume_from is not None:
            raise OptionError("{preset} sets the options of a new run; a resumed run keeps the options it saved: "
                              "leave {preset} out", preset="preset")
    if resume_from is not None and not RunDir(resume_from).exists():  # as train(resume=True) refuses it
        if RunDir(resume_from).path.is_file():  # RUN/checkpoint.pt, a file of a run: named as every reader names it
            RunDir(resume_from).read_config()
        raise MetalearnError(f"cannot resume: {resume_from} holds no run (no config.json)")
    if resume_from is not None:
        saved = RunDir(resume_from).read_config()
        check_same_method(saved, method, resume_from)  # before its options meet another method's
        steps = train.get("steps")
        # a run extended with --steps logs as a new run of that length would, where it logged at
        # the default of its old length (a 50-step trial run at every 5th step, extended to 60,000)
        extended = (isinstance(steps, int) and steps > 0 and "log_every" not in train and steps != saved.train.steps
                    and saved.train.log_every == default_log_every(saved.train.steps))
        try:
            resumed = RunConfig(
                method,
                dataclasses.replace(saved.task, **task),
                {**saved.method_config, **method_config},
                dataclasses.replace(saved.train, **train),
            )
        except MetalearnError:
            # a given task option wrong on its own (a misspelt --augment part, --shots 0) is named
            # as such, not as a change of the run
            TaskConfig(**{"dataset": saved.task.dataset, **task})
            # a given option that contradicts the run makes its saved ones invalid (--dataset
            # omniglot over a sinusoid run's ways 0): name the contradiction, not the symptom
            given = [("task", task, dataclasses.asdict(saved.task)), ("train", train, dataclasses.asdict(saved.train)),
                     ("method_config", method_config, saved.method_config)]
            differ = {f"{part}.{key}": (old.get(key), value)
                      for part, options, old in given for key, value in options.items() if old.get(key) != value}
            # the changes a resume may make are no conflict
            differ = {key: values for key, values in differ.items() if key not in RESUMABLE_CHANGES}
            if not differ:
                raise
            raise configuration_conflict(f"the run in {resume_from}", differ) from None
        if extended:
            resumed = dataclasses.replace(resumed, train=dataclasses.replace(resumed.train,
                                                                             log_every=default_log_every(steps)))
        # the options given to the resumed run meet the checks a new run's meet
        check_options_apply(method, method_config, make_method_config(method, resumed.method_config), resumed.task,
                            train)
        # the schedule's warnings were given when the run was made; again only for new --steps
        check_train_options(train, resumed.train, make_method_config(method, resumed.method_config),
                            warn="steps" in train)
        return resumed
    dataset = dataset_for(cls, task.get("dataset", cls.default_dataset or TaskConfig.dataset))  # an unknown name first
    task.setdefault("dataset", dataset.name)
    check_method_fits_dataset(cls, dataset)
    given = [name for name in dataset.inapplicable if sets_task_option(name, task.get(name))]
    if given:
        raise dataset.refuse(given)  # each option with its reason
    preset_task = cls.preset_task_defaults(preset, dataset.name) if preset is not None else {}
    for defaults in (preset_task, cls.dataset_task_defaults(dataset.name), dataset.defaults):
        for name, value in defaults.items():
            if name not in dataset.inapplicable:
                task.setdefault(name, value)
    task.update(dataset.fixed)
    task.setdefault("query", task.get("shots", TaskConfig.shots))  # the MAML code queries K per class
    task_config = TaskConfig(**task)
    method_defaults, train_defaults = (cls.preset_defaults(preset, task_config) if preset is not None
                                       else paper_defaults(cls, task_config, method_config))
    method_defaults = network_for_inputs(cls, task_config, method_defaults, method_config)
    if not has_validation(task_config):  # the saved configuration says what happens: no validation
        train_defaults = {**train_defaults, "val_every": 0}
    method_defaults, train_defaults = unused_defaults_dropped(cls, method_defaults, method_config, train_defaults,
                                                              train)
    source = (("{preset}", {"preset": (f"preset={preset!r}", f"--preset {preset}")}) if preset is not None
              else (f"{method}'s default for {task_config.dataset}", {}))
    with defaults_named(source, {**method_defaults, **train_defaults}, {**method_config, **train}):
        method_options = make_method_config(method, {**method_defaults, **method_config})
        check_options_apply(method, method_config, method_options, task_config, train)
        train_config = TrainConfig(**{**train_defaults, **train})
    check_train_options(train, train_config, method_options)
    return RunConfig(method, task_config, dataclasses.asdict(method_options), train_config)


VECTOR_NETWORK = "mlp"  # the built-in network for tasks whose examples are vectors


def network_for_inputs(cls: type[MetaLearner], task: TaskConfig, defaults: dict[str, Any],
                       given: dict[str, Any]) -> dict[str, Any]:
    """The method's ``defaults`` with ``model`` set to :data:`VECTOR_NETWORK` where the tasks'
    examples are vectors (a dataset of the user's: features extracted beforehand, tabular data)
    and the network the method would otherwise take by default is an image network (every
    method's is, but for regression), unless the user named one: one generic rule, so that no
    method lists the datasets of vectors."""
    fields = {field.name: field for field in dataclasses.fields(cls.Config)} if dataclasses.is_dataclass(
        cls.Config) else {}
    if "model" in given or "model" not in fields:
        return defaults
    network = NETWORKS.get(defaults.get("model", fields["model"].default))
    if network is None or network.inputs != "image" or len(problem_of(task).input_shape) != 1:
        return defaults
    return {**defaults, "model": VECTOR_NETWORK}


def paper_defaults(cls: type[MetaLearner], task: TaskConfig, given: dict[str, Any]) -> tuple[dict, dict]:
    """``cls.paper_defaults(task, given)``; a method written before ``given`` existed (its
    override takes the task alone) is called as it was written."""
    if "given" in inspect.signature(cls.paper_defaults).parameters:
        return cls.paper_defaults(task, given=dict(given))
    return cls.paper_defaults(task)


# training options that act only beside another's value (a method's own: MetaLearner.option_requires)
TRAIN_OPTION_REQUIRES: dict[str, Callable[[dict[str, Any]], bool]] = {
    "min_meta_lr": lambda train: train["lr_anneal"] == "cosine",
    "keep_best": lambda train: train["val_every"] > 0,
}


def unused_defaults_dropped(cls: type[MetaLearner], method_defaults: dict[str, Any], method_given: dict[str, Any],
                            train_defaults: dict[str, Any], train_given: dict[str, Any]) -> tuple[dict, dict]:
    """The defaults of a preset (or a method's paper) without the values that the user's own
    options leave unused: ``--preset maml++ --no-multi-step-loss`` drops the preset's anneal of
    that loss, ``--lr-anneal none`` its minimum learning rate, ``--first-order`` its switch to
    second order; so that turning one part off is one option, as the paper's ablation does."""
    merged = {**option_defaults(cls.Config), **method_defaults, **method_given}
    method_defaults = {key: value for key, value in method_defaults.items()
                       if key in method_given or cls.option_acts(key, merged)}
    merged_train = {**option_defaults(TrainConfig), **train_defaults, **train_given}
    train_defaults = {key: value for key, value in train_defaults.items()
                      if key in train_given or key not in TRAIN_OPTION_REQUIRES
                      or TRAIN_OPTION_REQUIRES[key](merged_train)}
    return method_defaults, train_defaults


class defaults_named:
    """Within it, a :class:`ConfigError` about an option whose value came from ``defaults``
    (a preset's, a paper's) and not from the user says so: "--min-meta-lr must be at most
    --meta-lr, got 1e-05 (the value of --preset maml++: give --min-meta-lr to change it)".
    ``source``: (its words, the options they name as :class:`~metalearn.errors.Options` takes
    them), ``("{preset}", {"preset": ("preset='maml++'", "--preset maml++")})``."""

    def __init__(self, source: tuple[str, dict[str, tuple[str, str]]], defaults: dict[str, Any],
                 given: dict[str, Any]):
        self.source, self.defaults, self.given = source, defaults, given

    def __enter__(self) -> None:
        return None

    def __exit__(self, kind, error, traceback) -> bool:
        if isinstance(error, ConfigError):
            implied = [field for field in error.fields if field in self.defaults and field not in self.given]
            if implied:
                names = " and ".join(f"`{field}`" for field in implied)
                words, options = self.source
                raise ConfigError(error.owner, error.fields, f"{error.problem} (the value{'s' if len(implied) > 1 else ''}"
                                  f" of {words}: give {names} to change {'them' if len(implied) > 1 else 'it'})",
                                  **{**error.options, **options}) from None
        return False


def ensemble_checkpoints(run_dir: Path | str, config: RunConfig) -> list[Path]:
    """The best validation checkpoints that ``metalearn eval --ensemble`` averages, best first;
    a run that keeps some (``--keep-best``) but has not validated yet is told to train on; a
    method that scores its episodes otherwise than by predictions (a policy's returns) is refused."""
    if method_class(config.method).episode_scores is not MetaLearner.episode_scores:
        raise OptionError(f"{{ensemble}} averages the predictions of the run's best checkpoints; {config.method} "
                          "scores its episodes otherwise (a policy's returns), which do not average that way: "
                          "evaluate without {ensemble}", ensemble=ENSEMBLE)
    run = RunDir(run_dir)
    index = run.best_dir / "index.json"
    if config.train.keep_best and not (index.exists() or index.is_symlink()):  # kept by a validation yet to run
        raise MetalearnError(f"{run.path} holds no best checkpoints yet: it keeps {config.train.keep_best} by "
                             f"validation every {config.train.val_every} steps, and none has run; train on")
    return run.best_checkpoints()


def check_train_options(given: dict[str, Any], train: TrainConfig, method_options: Any = None,
                        warn: bool = True) -> None:
    """Refuse training options the user gave that the resolved ``train`` would store and never
    use (checkpoints kept by a validation that never runs), and warn of a schedule that stalls
    or that ``--steps`` end before (:func:`warn_of_schedule`; ``method_options``: the method's
    resolved Config, whose schedule steps are checked too)."""
    if train.val_every == 0 and given.get("keep_best"):  # no validation: no score to keep checkpoints by
        raise ConfigError("TrainConfig", "keep_best", "applies only with validation (`val_every` above 0); "
                                                      "without it {ensemble} would find none",
                          ensemble=("evaluate_run(run_dir, ensemble=True)", "`metalearn eval --ensemble`"))
    if warn:
        warn_of_schedule(train, method_options)


def dataset_for(cls, name: str):
    """The dataset ``name`` names; an unknown name is refused with the list of those ``cls`` can
    learn (the environments, as ``--env``, for a reinforcement-learning method)."""
    named = isinstance(name, str)  # a list names none (nor can it be looked up): refused as an unknown name
    if named and name not in DATASETS:
        load_plugins()  # a dataset or environment of a plugin: registered when its module is imported
    if named and name in DATASETS:
        return DATASETS[name]
    fitting = ", ".join(known for known, d in DATASETS.items() if d.reinforcement == cls.reinforcement)
    if cls.reinforcement:
        raise OptionError(f"{{dataset}} must be an environment for {cls.name} (one of {fitting}), got {name!r} "
                          f"({unknown_hint()})", dataset=ENV_DATASET)
    raise ConfigError("TaskConfig", "dataset", f"must be one of {fitting}, got {name!r} ({unknown_hint()})")


def check_method_fits_dataset(cls, dataset) -> None:
    """Refuse a reinforcement-learning method on supervised tasks, or the other way round, and a
    classification method on regression tasks."""
    if cls.reinforcement and not dataset.reinforcement:
        rl = ", ".join(name for name, d in DATASETS.items() if d.reinforcement)
        raise OptionError(f"{{dataset}} must be an environment for {cls.name} (one of {rl}), got "
                          f"{dataset.name!r}, a {dataset.kind} dataset", dataset=ENV_DATASET)
    if cls.classification_only and not dataset.classification and not dataset.reinforcement:
        names = ", ".join(name for name, d in DATASETS.items() if d.classification)
        raise ConfigError("TaskConfig", "dataset", f"{dataset.name!r} is a regression dataset; {cls.name} is a "
                                                   f"classification method: use {names}")
    if dataset.reinforcement and not cls.reinforcement:
        rl = ", ".join(name for name, method in METHODS.items() if method.reinforcement) or "none"
        raise ConfigError("TaskConfig", "dataset", f"{dataset.name!r} is a reinforcement-learning environment, which "
                                                   f"{cls.name} cannot learn; train it with {rl}")


MAX_HALVINGS = 10  # the rate then ends below 1/1000 of --meta-lr: later steps barely move the weights
# a reinforcement-learning method's dataset, by the name its command-line help gives it (--env)
ENV_DATASET = ("TaskConfig.dataset", "--env")
ENSEMBLE = ("ensemble=True", "--ensemble")


def warn_of_schedule(train: TrainConfig, method_options: Any = None) -> None:
    """Warn (:class:`MetalearnWarning`) when ``--lr-halve-every`` halves the meta learning rate
    more than :data:`MAX_HALVINGS` times over ``--steps`` (a paper's schedule kept for a much
    longer run: ProtoNets' halving every 2,000 steps over 75,000 is 37 halvings, a factor 7e-12);
    when a schedule step of the method (an option declared ``schedule_step``, such as MAML++'s
    switch to second order) lies at or beyond ``--steps``, so that the run never reaches it; and
    when ``--keep-best`` keeps checkpoints of a validation that ``--steps`` end before."""
    if train.steps <= 0:
        return
    steps = setting("steps", train.steps)
    if method_options is not None:
        for field in dataclasses.fields(method_options):
            value = getattr(method_options, field.name)
            if field.metadata.get("schedule_step") and value >= train.steps > 0 and value > 0:
                warnings.warn(OptionWarning(
                    "{given} lies at or beyond {steps}: this run ends before it (give a smaller {option}, or more "
                    "{more})", given=setting(field.name, value), steps=steps, option=field.name, more="steps"),
                    stacklevel=caller_level())
    if train.keep_best and train.val_every > train.steps:
        warnings.warn(OptionWarning(
            f"{{keep_best}} keeps no checkpoint: validation every {train.val_every} steps never runs in {{steps}} "
            "(give a smaller {val_every})", keep_best=setting("keep_best", train.keep_best), steps=steps,
            val_every="val_every"), stacklevel=caller_level())
    if train.lr_halve_every <= 0:
        return
    halvings = (train.steps - 1) // train.lr_halve_every
    if halvings > MAX_HALVINGS:
        final = train.meta_lr * 0.5 ** halvings
        warnings.warn(OptionWarning(
            f"{{given}} halves the meta learning rate {halvings} times over {{steps}}, to {final:.2g} (from "
            f"{{meta_lr}}), where its steps barely change the weights; give {{fewer}} (at most {MAX_HALVINGS} "
            "halvings) or 0 (none)", given=setting("lr_halve_every", train.lr_halve_every), steps=steps,
            meta_lr=setting("meta_lr", f"{train.meta_lr:g}"),
            fewer=setting("lr_halve_every", -(-train.steps // (MAX_HALVINGS + 1)))), stacklevel=caller_level())


def setting(field: str, value: Any) -> tuple[str, str]:
    """A configuration field with its value, as Python (``steps=5000``) and the command line
    (``--steps 5000``) give it."""
    return f"{field}={value}", f"{flag(field)} {value}"


def check_options_apply(method: str, given_method: dict[str, Any], method_config: Any, task: TaskConfig,
                        given_train: dict[str, Any]) -> None:
    """Refuse options the user gave that this run would store and never use: a method option
    that acts only beside another's value, validation on a split without a validation part."""
    cls = method_class(method)
    defaults, options = option_defaults(cls.Config), dataclasses.asdict(method_config)
    for option, (other, needed) in cls.option_requires.items():
        if option in given_method and given_method[option] != defaults.get(option) and \
                not cls.option_acts(option, options):
            wanted = f"`{other}`" if needed is True else f"`{other}` {needed}"
            raise ConfigError(f"{cls.__name__}.Config", option, f"applies only with {wanted}")
    missing = no_validation_reason(task)
    if missing is not None:
        given = tuple(name for name in ("val_every", "val_episodes", "keep_best") if given_train.get(name))
        if given:
            raise ConfigError("TrainConfig", given, f"cannot apply: {missing}")


@keyword_only_after(2)
def train(config: RunConfig, run_dir: Path | str | None = None, *, data_dir: Path | str | None = None,
          resume: bool = False, progress: bool | None = None, evaluate_after: bool = True,
          announce: Callable[[str], None] | None = print, device: str = "cpu",
          exact_gpu_kernels: bool = True, time_limit_s: float | None = None,
          stop_at: int | None = None,
          on_record: Callable[[dict[str, Any]], None] | None = None) -> tuple[Path, dict[str, Any] | None]:
    """Meta-train ``config`` into ``run_dir`` (joins a torchrun group when launched by one) on
    ``device`` (cpu, cuda, cuda:N or auto); then, unless told not to, evaluate on the test
    split. Returns (run dir, eval result). The device is not part of the run: a run resumes or
    evaluates on any device. ``exact_gpu_kernels``: on a GPU, full-precision deterministic
    kernels, set process-wide (see :mod:`metalearn.runtime`); False keeps torch's defaults.
    ``time_limit_s``: stop with a checkpoint before that many seconds from this call have
    passed, setup included (:meth:`~metalearn.training.Trainer.fit`): this raises
    :class:`~metalearn.errors.TrainingStopped` and skips the evaluation, as Ctrl-C or a stop
    signal does with :class:`~metalearn.errors.TrainingInterrupted`. Not part of the run:
    a resume takes its own limit. ``stop_at``: stop the same way after that meta-step of the run's
    schedule (exit code 0), which must lie before its last and not before the run's current
    step (equal: nothing is trained, so that the same call can be repeated): runs of a long
    schedule (cosine annealing, derivative-order switch) compared at equal steps. ``on_record``:
    called with each training and validation record as it is logged, to send it on to
    TensorBoard or Weights & Biases (:meth:`~metalearn.training.Trainer.fit`). ``progress``:
    progress bars; None (the default) draws them only when the error output is a terminal, not
    into a log file (:func:`~metalearn.runtime.show_progress`), as the command line does.

    ``run_dir``: None (the default) is a new folder named after the run in
    :func:`~metalearn.runs.default_runs_root` (``$METALEARN_RUNS``); under torchrun it must be
    given. ``data_dir``: where the dataset's images are (Omniglot's default: ``$METALEARN_DATA``
    or the cache folder; required for ``folder`` and ``mini-imagenet``); None on a resume reads
    the folder the run's checkpoint records. ``resume``: continue the run in ``run_dir`` from its
    checkpoint (``config`` must agree with the run's); False (the default) starts a new run, and
    a folder that holds one is refused. ``evaluate_after``: True (the default) scores the trained
    weights on the test part after training; False skips it and returns None as the result.
    ``announce``: called once before training with a line that says what happens (``starting:
    METHOD on DATASET, run directory RUN_DIR``, ``resuming at step N: ...``, or that the run is
    complete already), on rank 0 only; the default, ``print``, writes it to standard output, and
    None says nothing. The line is a ``str`` (:class:`~metalearn.errors.OptionLine`) whose
    ``with_flags()`` spells its options as the command line does.

    The test warns, as :func:`evaluate_run` does, of diverged episodes and of a mean carried by
    a few far-off tasks (:class:`~metalearn.errors.MetalearnWarning`). Unlike the ``metalearn``
    command (``--allocator tuned``, its default), this leaves glibc's allocator as it is: call
    :func:`metalearn.runtime.tune_allocator` once before training for the command's speed on
    the CPU (a 60-way ProtoNet step 681 -> 466 ms; the process then keeps its peak memory until
    it exits; on Linux with glibc only, elsewhere it does nothing)."""
    from metalearn.training import check_stop_at, now

    if not isinstance(config, RunConfig):
        raise MetalearnError(f"train takes a RunConfig (from resolve_config, or RunConfig.from_dict of a saved "
                             f"config.json), got {type(config).__name__}")
    started = now()
    check_flags("train", resume=resume, evaluate_after=evaluate_after, exact_gpu_kernels=exact_gpu_kernels)
    progress = show_progress(progress, "train")
    check_paths(("run_dir", run_dir, FOLDER), ("data_dir", data_dir, FOLDER))
    if time_limit_s is not None and (isinstance(time_limit_s, bool) or not isinstance(time_limit_s, numbers.Real)
                                     or not time_limit_s > 0):
        raise MetalearnError(f"the time limit must be a positive number of seconds, got {time_limit_s!r}")
    if stop_at is not None:  # a number; a resumed run's step and steps are checked once it is loaded
        check_stop_at(stop_at, 0, 2**63 - 1 if resume else config.train.steps)
    world = init_world(device, exact_gpu_kernels=exact_gpu_kernels)
    run_dir = user_path(run_dir, "run_dir", optional=True)  # "~/runs/x" as a shell expands it
    if run_dir is None:
        if resume:
            raise resume_without_run_dir()
        if world.distributed:
            raise OptionError("under torchrun give {run_dir}, so that every rank uses the same run directory",
                              run_dir="run_dir")
        run_dir = claim_new_run_dir(default_runs_root(), new_run_name(config))
        try:
            trainer = _build_or_stop(config, run_dir, data_dir, resume, world, progress, evaluate_after)
        except BaseException:
            if not any(run_dir.iterdir()):
                run_dir.rmdir()  # a run refused before it wrote anything leaves no empty folder
            raise
    else:
        trainer = _build_or_stop(config, run_dir, data_dir, resume, world, progress, evaluate_after)
    if stop_at is not None:
        try:  # a resumed run's step: refused before the announcement
            check_stop_at(stop_at, trainer.step, config.train.steps, config.train.lr_anneal)
        except MetalearnError:
            trainer.release()
            raise
    if world.is_main:
        start = ("starting" if not trainer.step else f"resuming at step {trainer.step}"
                 if trainer.step < config.train.steps else
                 f"complete already (step {trainer.step} of {config.train.steps}), nothing to train")
        # --steps 0 is allowed on purpose: the initial weights, saved and tested, are a baseline
        tested = " and tested" if evaluate_after else ""
        untrained = (f" ({{steps}}: no training; the initial weights are saved{tested})" if not config.train.steps
                     else "")
        if announce is not None:  # an OptionLine: steps=0 as Python gives it, --steps 0 on the command line
            said = f"{start}: {config.method} on {config.task.dataset}, run directory {run_dir}"  # a field: kept as is
            announce(OptionLine("{said}" + untrained, said=(said, said), steps=setting("steps", 0)))
    try:  # the loop turns Ctrl-C into TrainingInterrupted; before it (the first save) and after (the last) it is raw
        trainer.fit(progress=progress, time_limit_s=None if time_limit_s is None else time_limit_s - (now() - started),
                    stop_at=stop_at, keep_lock=evaluate_after, on_record=on_record)
    except (KeyboardInterrupt, Terminated) as err:
        said, code = stopped_by(err)
        raise TrainingInterrupted(f"{said}; {{next}}", code, next=_next_command(config, run_dir, data_dir)) from None
    result = None
    try:  # the run folder stays locked through its test: status says it is tested, a second writer waits
        if evaluate_after:  # the trained weights in memory: no rank needs to read the checkpoint back
            images = trainer.data_dir  # --data-dir, or on a resume without it the folder the run records
            tested, _ = with_split(config, run_dir=run_dir, data_dir=images)  # as eval scores it (a gone split file)
            try:
                result = _evaluate(run_dir, tested, trainer.learner, trainer.step, "test", None, 0, images,
                                   progress, world, None, before_write=trainer.check_folder_is_ours)
            except (KeyboardInterrupt, Terminated) as err:  # after training: saved, only the test is missing
                said, code = stopped_by(err)
                raise TrainingInterrupted(f"{said} during the test evaluation at step {trainer.step}; {{next}}",
                                          code, next=trainer.resume_hints()) from None
    finally:
        trainer.release()
    return Path(run_dir), result


def _build_or_stop(config: RunConfig, run_dir, data_dir, resume: bool, world: World, progress: bool,
                   tested: bool = True):
    """:func:`~metalearn.training.build_trainer`; Ctrl-C while it reads the data (a new folder's
    first preparation can take minutes) stops with the command that goes on from there: the
    same command for a run with no checkpoint yet (nothing of it was written), else --resume."""
    try:
        return build_trainer(config, run_dir, data_dir=data_dir, resume=resume, world=world, progress=progress,
                             tested=tested)
    except (KeyboardInterrupt, Terminated) as err:
        said, code = stopped_by(err)
        raise TrainingInterrupted(f"{said} before training began; {{next}}", code,
                                  next=_next_command(config, run_dir, data_dir)) from None


def _next_command(config: RunConfig, run_dir, data_dir) -> tuple[str, str]:
    """What goes on from a run stopped outside its training loop, as (the Python API, the
    command line) say it: resuming from its checkpoint, or the same call again where it has none."""
    if not RunDir(run_dir).has_checkpoint():
        return ("nothing was trained or saved: call train the same way again to start",
                "nothing was trained or saved: run the same command again to start")
    return continue_lines(config, run_dir, data_dir)


@keyword_only_after(1)
def evaluate_run(run_dir: Path | str, *, episodes: int | None = None, seed: int = 0, part: str = "test",
                 data_dir: Path | str | None = None, progress: bool | None = None, world: World | None = None,
                 overrides: dict[str, Any] | None = None, device: str | None = None,
                 episode_shape: dict[str, int] | None = None, per_step: bool = True,
                 exact_gpu_kernels: bool = True, ensemble: bool = False,
                 protocol: str | None = None, split_fractions: str | None = None,
                 split_file: Path | str | None = None,
                 announce: Callable[[str], None] | None = None,
                 written: Callable[[Path, str], None] | None = None) -> dict[str, Any]:
    """Evaluate the checkpoint of ``run_dir`` on ``episodes`` episodes of ``part`` and write
    ``eval.json``, or ``eval-<key>=<value>.json`` named by what differs from the run's own
    evaluation (see :func:`~metalearn.evaluation_setup.evaluation_labels`): ``overrides`` of the method's options, e.g.
    ``{"test_inner_steps": 10}``, another number of episodes or seed, ``eval-part=val.json``
    for the validation split, ``eval-part=train.json`` for the training classes (in the test
    episodes' shape: how far the test score falls behind the classes trained on). The episodes
    depend only on ``seed``, so methods compare on the same ones.

    ``episode_shape`` (keys ``ways``, ``shots``, ``query``) tests on episodes of another shape
    than the run's, e.g. a Prototypical Network trained 60-way tested 20-way, as in its paper.
    ``per_step`` False skips the scores after each adaptation step (see ``evaluate``).
    ``exact_gpu_kernels`` as for :func:`train`. ``ensemble``: score the average prediction of
    the checkpoints the run kept with ``keep_best`` (MAML++'s model selection; the result's
    ``step`` is then the latest checkpoint's, ``ensemble`` the members' steps). ``protocol``:
    one of the method's other evaluation protocols (``MetaLearner.protocols``, e.g. the Memory
    Module's ``"lifelong"``) instead of the standard episodes; written to
    ``eval-protocol=<name>.json``. ``split_fractions`` or ``split_file``: for a run on class
    folders, split ``data_dir``'s classes this way instead of as the run did (``"0,0,1"`` scores every
    class of another folder); the file is named ``eval-split_fractions=0,0,1.json`` or
    ``eval-split_file=<file stem>.json`` (see :func:`~metalearn.evaluation_setup.with_split`).
    Without them a run on class folders is scored on the split it recorded (its ``split.json``).
    An image folder that is not
    the one the run trained on (other images, class names or parts than its checkpoint's data
    fingerprint records) is scored all the same, with a :class:`MetalearnWarning`: its classes
    are found by name, so a class renamed or replaced since may be one the run trained on.
    ``announce``, where given, is called with one line once everything is checked, just before
    the episodes are scored ("evaluating the checkpoint of step 9000 on 600 test episodes..."):
    what ``metalearn eval`` writes where no progress bar shows. ``written``, where given, is
    called on the writing rank with the file written and the evaluation it replaced, in words
    ("" for none). The file is checked before the evaluation, which can take long: refused in
    one line where it cannot be written (a read-only run folder, a folder in its place) or
    where it holds the evaluation of a later checkpoint, which this one would not replace.
    ``progress``: progress bars; None (the default) draws them only when the error output is a
    terminal, not into a log file, as the command line does. ``episodes``: None (the default)
    scores the run's ``eval_episodes``. ``device``: where it is scored (cpu, the default, cuda,
    cuda:N or auto); or, instead, ``world``: a :class:`~metalearn.distributed.World` the caller
    holds (:func:`~metalearn.distributed.init_world`'s, a torchrun job's group once joined),
    whose ranks share the episodes and whose device they are scored on. Both together are
    refused: the world's device would be taken silently.

    Returns what the file holds: :func:`metalearn.evaluation.evaluate`'s result (``metric``,
    ``mean`` (accuracy in percent, MSE, or return), ``ci95``, ``per_step``, ``scores``, ...)
    with what was scored: ``part``, ``step``, ``method``, ``dataset``, ``ways``, ``shots``,
    ``query`` (``ways`` 0 for regression), ``overrides``, and ``seed`` and ``episode_seed``
    (:func:`~metalearn.evaluation_setup.recorded_seeds`); a protocol's result has that protocol's scores instead.
    """
    from metalearn.config import MAX_SEED
    from metalearn.evaluation import check_seed

    check_flags("evaluate_run", per_step=per_step, exact_gpu_kernels=exact_gpu_kernels, ensemble=ensemble)
    if world is not None and device is not None:
        raise MetalearnError(f"evaluate_run takes device or world, not both: a world computes on its own device "
                             f"({world.device}), not on device={device!r}")
    device = device or "cpu"
    progress = show_progress(progress, "evaluate_run")
    check_paths(("run_dir", run_dir, RUN), ("data_dir", data_dir, FOLDER), ("split_file", split_file, "a JSON file"))
    check_protocol_or_ensemble(protocol, ensemble)
    if episodes is not None:
        episodes = check_count(episodes, "episodes")
    seed = check_seed(seed, most=MAX_SEED)
    episode_shape, overrides = plain_shape(episode_shape), plain_values(overrides)
    part_seed_offset(part)  # an unknown part, before the run is loaded
    config, learner, step, state = load_trained_state(run_dir, overrides)
    split_labels = other_images_label(RunDir(run_dir), data_dir, state)  # another folder's: a file of its own
    data_given, data_dir = data_dir is not None, run_images(RunDir(run_dir), data_dir, state)
    config, own_labels = with_split(config, split_fractions, split_file, run_dir, data_dir)
    split_labels = {**split_labels, **own_labels}
    split_record = given_split(split_fractions, split_file) if own_labels else {}  # the run's own: nothing
    # the run's own split of an image folder: the folder is expected to be the one it trained on
    trained_on = (state.get("data_fingerprint") if not own_labels and reads_image_folder(config.task.dataset)
                  else None)
    if ensemble:
        ensemble_checkpoints(run_dir, config)  # refused before anything is evaluated
    if protocol is not None:  # on the run's test shape, or ``episode_shape`` (e.g. 20-way episodes)
        labels = {**evaluation_labels(config, overrides, episode_shape, episodes, seed), **split_labels,
                  "protocol": protocol}
        target, earlier = _evaluation_target(RunDir(run_dir), labels, part, step)
        if episode_shape:
            config = with_test_shape(config, episode_shape)
        world = world or init_world(device, exact_gpu_kernels=exact_gpu_kernels)
        result = _evaluate_protocol(run_dir, config, learner, step, protocol, part, episodes, seed, data_dir,
                                    progress, world, labels, split_record, announce)
        if written is not None and world.is_main:
            written(target, earlier)
        return result
    members = []
    if ensemble:
        from metalearn.evaluation import Ensemble

        # one reading of best/index.json, read again where a training run displaced a listed file meanwhile
        members = RunDir(run_dir).read_best_checkpoints(
            lambda path: load_trained(run_dir, overrides=overrides, checkpoint=path))
        learner = Ensemble([member for _, member, _ in members])
    if episode_shape:
        config = with_test_shape(config, episode_shape)
    labels = {**evaluation_labels(config, overrides, episode_shape, episodes, seed), **split_labels}
    if ensemble:
        labels["ensemble"] = len(members)
    target, earlier = _evaluation_target(RunDir(run_dir), labels, part, step)
    scored = f"an ensemble of {len(members)} checkpoints" if ensemble else f"the checkpoint of step {step}"
    world = world or init_world(device, exact_gpu_kernels=exact_gpu_kernels)
    result = _evaluate(run_dir, config, learner, step, part, episodes, seed, data_dir, progress, world,
                       overrides, per_step, labels,  # the method's options: the shape has its own fields
                       {**({"ensemble": [member_step for _, _, member_step in members]} if ensemble else {}),
                        **split_record} or None, trained_on=trained_on, data_given=data_given,
                       starting=None if announce is None else
                       lambda n: announce(f"evaluating {scored} on {n} {part} episodes..."))
    if written is not None and world.is_main:
        written(target, earlier)
    return result


def _evaluation_target(run: RunDir, labels: dict[str, Any], part: str, step: int) -> tuple[Path, str]:
    """The file an evaluation of checkpoint ``step`` goes to and the evaluation it holds, in
    words ("" for none), refused in one line where it could not be written or holds a later
    checkpoint's evaluation (see :func:`evaluate_run`)."""
    from metalearn.runs import evaluation_step_in

    try:
        target = run.writable_eval_file(labels, part)
    except WriteError as err:
        raise MetalearnError(f"{err}: copy the run folder to one you can write and evaluate the copy") from None
    held_step, held = evaluation_step_in(target)
    if held_step is not None and held_step > step:
        raise MetalearnError(f"{target} holds the evaluation of a later checkpoint ({held}) than the run's "
                             f"checkpoint.pt (step {step}), which would not replace it: move {target.name} away to "
                             "score this checkpoint")
    return target, held or ("unreadable" if target.exists() else "")


def check_protocol_or_ensemble(protocol: str | None, ensemble: bool) -> None:
    """A method's own protocol scores the latest checkpoint; an ensemble averages checkpoints on
    the standard episodes: the two do not combine."""
    if protocol is not None and ensemble:
        raise OptionError("{protocol} evaluates one checkpoint, the latest; {ensemble} averages checkpoints on the "
                          "standard episodes only: give one of the two", ensemble=ENSEMBLE,
                          protocol=(f"protocol={protocol!r}", f"--protocol {protocol}"))


def _evaluate_protocol(run_dir, config: RunConfig, learner, step: int, protocol: str, part: str,
                       episodes: int | None, seed: int, data_dir, progress: bool, world: World,
                       labels: dict[str, Any], extra: dict[str, Any] | None = None,
                       announce: Callable[[str], None] | None = None) -> dict[str, Any]:
    """``metalearn eval --protocol NAME``: the method's own protocol on the run's test (or
    validation) tasks, seeded as the standard evaluation is; rank 0 writes the result and is
    the one to ``announce`` it, as :func:`evaluate_run` says."""
    from metalearn.tasks import build_task_source

    protocols = type(learner).protocols
    if protocol not in protocols:
        known = ", ".join(protocols) if protocols else "none besides the standard episodes"
        raise MetalearnError(f"{config.method} has no evaluation protocol {protocol!r} (its protocols: {known})")
    # test-shaped, as eval names it
    source = build_task_source(config.task, part, data_dir=data_dir, progress=progress, evaluation=True)
    offset = part_seed_offset(part)
    n = config.train.eval_episodes if episodes is None else episodes
    if announce is not None and world.is_main:
        announce(f"evaluating the checkpoint of step {step} by the {protocol} protocol on {n} {part} episodes...")
    result = protocols[protocol](learner.to(world.device), source, episodes=n, seed=seed + offset)
    result.update({**recorded_seeds(seed, offset), "protocol": protocol, "part": part, "step": step, "method": config.method,
                   "dataset": config.task.dataset, **(extra or {})})
    if world.is_main:
        RunDir(run_dir).write_eval(result, labels, part)
    return result


def _evaluate(run_dir, config: RunConfig, learner, step: int, part: str, episodes: int | None, seed: int,
              data_dir, progress: bool, world: World, overrides: dict[str, Any] | None,
              per_step: bool = True, labels: dict[str, Any] | None = None,
              extra: dict[str, Any] | None = None, before_write=None,
              trained_on: str | None = None, data_given: bool = True,
              starting: Callable[[int], None] | None = None) -> dict[str, Any]:
    """Score ``learner`` on ``part`` and write the result into the run folder (rank 0), after
    ``before_write()`` where given (training's test: that the folder is still its run's).
    ``starting`` (rank 0) is told the number of episodes once everything is checked, just
    before they are scored.
    ``trained_on``: the checkpoint's data fingerprint, for a warning where ``data_dir`` holds
    other images (:func:`~metalearn.evaluation_setup.warn_of_other_images`; ``data_given``: as its ``given``)."""
    from metalearn.tasks import build_task_source

    source = build_task_source(config.task, part, data_dir=data_dir, progress=progress, evaluation=True)
    if world.is_main:
        warn_of_training_classes(run_dir, config, source, part)
        warn_of_other_images(run_dir, config, source, trained_on, data_dir, data_given)
    learner = learner.to(world.device)
    n = config.train.eval_episodes if episodes is None else episodes
    if starting is not None and world.is_main:
        starting(n)
    # the validation part is drawn as the trainer's validation draws it (the same episodes for
    # the run's seed); for regression, where val and test share one task family, that also
    # keeps --part val from scoring the test episodes
    offset = part_seed_offset(part)
    if world.is_main:
        warn_of_validation_episodes(run_dir, config, part, seed + offset)
    result = evaluate(learner, source, n, seed=seed + offset, world=world, progress=progress,
                      per_step=per_step, memory_budget=config.train.memory_budget)
    result.update(recorded_seeds(seed, offset))
    if hasattr(learner, "test_bound") and world.is_main:  # a generative method: its bound on the test sets
        # drawn as evaluate drew: the support sets of the first (up to) 100 episodes it scored
        result["lower_bound"] = learner.test_bound(source, min(n, 100), seed + offset, chunk=EPISODE_CHUNK)
    test = config.task.for_testing()
    result.update({"part": part, "step": step, "method": config.method, "dataset": config.task.dataset,
                   "ways": test.ways, "shots": test.shots, "query": test.query, "overrides": overrides or {},
                   # the images scored, where the user's folder holds them: which folder a score is of
                   **({"data_dir": str(Path(data_dir).expanduser().resolve())}
                      if data_dir is not None and reads_image_folder(config.task.dataset) else {}),
                   **(extra or {})})
    if world.is_main:
        from metalearn.evaluation import warn_of_result

        warn_of_result(result)  # diverged episodes, outlying tasks: before the file, which may be refused
        if before_write is not None:
            before_write()
        try:
            RunDir(run_dir).write_eval(result, labels, part)
        except WriteError as err:  # a full disk: the score, which took the evaluation's time, is still said
            from metalearn.evaluation import format_result

            err.args = (f"{err}; the score, not saved: {format_result(result).splitlines()[0]}",)
            raise
    return result


@keyword_only_after(1)
def plot_run(run_dir: Path | str, *, data_dir: Path | str | None = None,
             compare_with: Path | str | None = None, out_dir: Path | str | None = None,
             until_step: int | None = None) -> list[Path]:
    """Learning curves; for regression runs whose task source tells its true functions of
    single-number inputs (:func:`metalearn.tasks.true_function`: sinusoid, sine-or-line) the fits
    after 0/1/10 steps and, for a method that samples models (PLATIPUS), the sampled functions
    beside ``compare_with``'s prediction (e.g. a MAML run on the same tasks); for a
    reinforcement-learning run the returns after each policy-gradient step beside
    ``compare_with``'s (a run of the same environment and test settings) and the initial
    weights' (written to the run as ``eval-weights=initial.json``), and the trajectories (nav2d)
    or velocities (half-cheetah) before and after one step. ``run_dir``: the run's folder. The
    figures go to ``out_dir``, by default the run's ``plots/``. ``until_step``: the curves end at
    that step (export draws those of its checkpoint's step, not steps a run logged after it).
    An ``out_dir`` is refused, in one line and before anything is drawn or written, where
    :func:`export_results` refuses its folder (:func:`check_out_dir`): the run folder itself or
    inside its ``best/``, the folder of another run or inside it, inside ``data_dir`` or inside the
    image folder the run trained on; a folder inside the run folder (``plots/``, one of your own) is
    taken."""
    from metalearn.plotting import plot_learning_curves, plot_regression_fits
    from metalearn.tasks import build_task_source, check_data_dir, true_function

    check_paths(("run_dir", run_dir, RUN), ("data_dir", data_dir, FOLDER), ("compare_with", compare_with, RUN),
                ("out_dir", out_dir, FOLDER))
    run = RunDir(run_dir)
    plots = run.plots_dir if out_dir is None else user_path(out_dir, "out_dir")
    if until_step is not None:
        check_whole("plot_run", 0, until_step=until_step)
    config = run.read_config()  # first: a file of a run given as the run is named as such
    if out_dir is None:
        run.check_own_subfolders()  # plots/ linked out of the run: not written through
    check_folder_path(plots, "out_dir" if out_dir is not None else "")
    check_data_dir(config.task, data_dir)  # before any figure is written
    # the default, the run's plots/, is the run's own; export's temporary folder is checked as any.
    # The checkpoint is read only for the image folder it records: a damaged one stops no other plot
    if out_dir is not None:
        recorded = run.has_checkpoint() and reads_image_folder(config.task.dataset)
        check_out_dir(run, config, plots, "out_dir", "the figures", data_dir,
                      read_entries(run, "step", optional=("data_dir",)) if recorded else None)
    # a divergence's record (training stopped at that step) holds nothing to draw
    logged = [record for record in run.read_metrics() if "diverged" not in record]
    records = [record for record in logged if until_step is None or record.get("step", 0) <= until_step]
    if logged and not records:  # the run has curves, all of them after the step asked for
        first = min(record.get("step", 0) for record in logged)
        raise OptionError(f"{{given}} is before the first step {run.path} logged ({first}): nothing to draw; give a "
                          f"step from {first} on, or leave {{until_step}} out",
                          given=setting("until_step", until_step), until_step="until_step")
    if not records and not run.has_checkpoint():
        raise MetalearnError(f"{run.path} has not trained yet (no metrics, no checkpoint): nothing to draw")
    if not records:
        raise OptionError(f"{run.path} has no metrics yet (no step logged: a {{steps}} run, or one stopped before its "
                          "first {log_every}): nothing to draw; export still records its evaluations",
                          steps=setting("steps", 0), log_every="log_every")
    title = f"{config.method} {config.task.dataset}"
    reinforcement = get_dataset(config.task.dataset).reinforcement
    other = _comparison_run(config, compare_with) if compare_with is not None and not reinforcement else None
    labels = method_class(config.method).series_labels(config.method_config)
    if reinforcement:  # first: a --compare run or an environment it cannot use is refused before any file is written
        figures = _plot_reinforcement(run_dir, config, compare_with, plots)
        return [plot_learning_curves(records, plots / "learning_curves.png", title, labels), *figures]
    curves = plot_learning_curves(records, plots / "learning_curves.png", title, labels)
    paths = [curves]
    if config.task.classification and can(config.method, "draws images"):
        paths.append(plot_conditional_samples(run_dir, run_images(run, data_dir),
                                              out=plots / "conditional_samples.png"))
    if not config.task.classification:
        source = build_task_source(config.task, "test", data_dir=data_dir)
        function = true_function(source, config.task)
        if function is None:  # a registered dataset's tasks of other shapes, or without their functions
            warnings.warn(MetalearnWarning(
                f"{config.task.dataset}'s task source tells no true function of single-number inputs "
                "(function(task_params, x) on its class): no fits.png, the learning curves alone"),
                stacklevel=caller_level())
            return paths
        _, learner, step = load_trained(run_dir)
        x_range = getattr(source, "x_range", (-5.0, 5.0))
        batch = source.sample(4, torch.Generator().manual_seed(TEST_SEED_OFFSET))
        paths.append(plot_regression_fits(learner, batch, function, plots / "fits.png",
                                          title=f"{title}, K={config.task.shots}, step {step}", x_range=x_range))
        if can(learner, "samples models"):
            from metalearn.plotting_samples import plot_samples

            other_learner, label = other or (None, "MAML")
            paths.append(plot_samples(learner, batch, function, plots / "samples.png",
                                      other_learner=other_learner, compare_label=label, x_range=x_range,
                                      title=f"{title}: sampled adapted functions"))
    return paths


def _plot_reinforcement(run_dir: Path | str, config: RunConfig, compare_with: Path | str | None,
                        plots: Path) -> list[Path]:
    """MAML's Figure 5 for this run: the average return on the run's test tasks after 0..3
    policy-gradient steps, of the trained policy, of ``compare_with`` (a run of the same
    environment, e.g. trained with ``--inner-steps 0``: the pretrained baseline) and of the
    run's own initial weights (its seed's random initialisation). A trained policy's evaluation
    is read from its eval.json where that is the latest checkpoint's, else evaluated now (not
    written: ``metalearn eval`` owns eval.json). The initial weights' evaluation is stored as
    ``eval-weights=initial.json`` the first time and read from there after, so that the random
    row of the figure is kept with the run (and goes into ``metalearn export``'s summary). For
    nav2d also the trajectories on three test goals before and after one step, for the
    half-cheetahs the forward velocity on four test tasks before and after one step."""
    from metalearn.algorithms import build_learner
    from metalearn.plotting_rl import paper_references, plot_adaptation_curves, plot_navigation, plot_velocities
    from metalearn.tasks import build_task_source

    _, learner, step = load_trained(run_dir)
    source = build_task_source(config.task, "test")
    episodes = config.train.eval_episodes

    def reusable(saved: dict[str, Any] | None, **expected) -> bool:
        """Whether a stored evaluation scored these test tasks under ``expected``, after every
        step (one of ``metalearn eval --final-only`` holds the last step's return alone)."""
        expected.update(episodes=episodes)
        return (saved is not None and all(saved.get(key) == value for key, value in expected.items())
                and episode_seed(saved) == TEST_SEED_OFFSET and len(saved.get("per_step") or ()) > 1)

    def returns(run: Path | str, trained, at_step: int) -> dict[str, Any]:
        saved = RunDir(run).read_evaluations().get("eval")
        return saved if reusable(saved, step=at_step) else evaluate(trained, source, episodes, seed=TEST_SEED_OFFSET)

    label = "pretrained" if config.method_config.get("inner_steps") == 0 else "MAML"
    if compare_with is not None:
        other_config, other, other_step = load_trained(compare_with)
        if other_config.task.dataset != config.task.dataset or other_config.method != config.method:
            raise OptionError(f"{{compare}}: a {other_config.method} run on {other_config.task.dataset}; compare a "
                              f"{config.method} run on {config.task.dataset}", compare=valued(COMPARE, compare_with))
        # what the returns on the figure's one axis depend on besides the weights (its network may differ)
        differ = [f"{key} {config.method_config.get(key)} vs {other_config.method_config.get(key)}"
                  for key in getattr(method_class(config.method), "scored_options", ())  # a plugin's may lack it
                  if config.method_config.get(key) != other_config.method_config.get(key)]
        if differ:
            raise OptionError(f"{{compare}}: its returns are scored otherwise ({', '.join(differ)}); compare runs "
                              "with the same test settings", compare=valued(COMPARE, compare_with))
    curves = {label: returns(run_dir, learner, step)}
    if compare_with is not None:
        other_label = "pretrained" if other_config.method_config.get("inner_steps") == 0 else "MAML"
        if other_label == label:
            other_label = f"{other_label} ({Path(compare_with).name})"
        curves[other_label] = returns(compare_with, other, other_step)
    run = RunDir(run_dir)
    labels = {"weights": "initial"}
    # what the initial weights' returns depend on (a resume with other settings evaluates anew),
    # as it reads back from the file (tuples as lists)
    settings = json.loads(json.dumps({"seed": config.train.seed, "task": config.to_dict()["task"],
                                      "method_config": config.method_config}))
    saved = run.read_evaluations().get(run.eval_file(labels).stem)
    if saved is not None and isinstance(saved.get("settings"), dict) and isinstance(saved["settings"].get("task"), dict):
        # a task option added since the file was written is the default it took then (augment "")
        defaults = {f.name: f.default for f in dataclasses.fields(TaskConfig)}
        saved = {**saved, "settings": {**saved["settings"], "task": {**defaults, **saved["settings"]["task"]}}}
    if reusable(saved, settings=settings):
        curves["random"] = saved
    else:
        # random weights drawn from the run's seed as build_trainer draws them: the weights the run
        # started from, but for a run begun with --init-from, which started from another run's
        with own_random_state([]):  # as build_trainer draws them, apart from the caller's random state
            torch.manual_seed(config.train.seed)
            initial = build_learner(config.method, config.method_config, problem_of(config.task))
        curves["random"] = {"weights": "initial", "settings": settings,
                            **evaluate(initial, source, episodes, seed=TEST_SEED_OFFSET),
                            **recorded_seeds(0, TEST_SEED_OFFSET)}
        try:  # kept with the run where its folder can be written; an archived, read-only run is plotted all the same
            run.write_eval(curves["random"], labels)
        except WriteError:
            pass
    # the paper's returns of the policies drawn, where the run is scored as the paper's were (the
    # method's defaults: step size, its decay, horizon, discount; trajectories per step the default or
    # the authors'), each labelled with the step size the authors adapted that policy with
    paper = paper_references(config.task.dataset, curves, config.method_config,
                             option_defaults(method_class(config.method).Config))
    paths = [plot_adaptation_curves(curves, plots / "returns_per_step.png",
                                    f"{config.task.dataset}: {episodes} test tasks, step {step}", paper)]
    positions = getattr(source.env, "positions", False)
    # the velocity each step's reward saw where the environment reports it (the half-cheetahs), else an observation
    velocity = getattr(source.env, "forward_velocity_info", None) or getattr(source.env, "forward_velocity_index", None)
    if positions or velocity is not None:
        batch = source.sample(3 if positions else 4, torch.Generator().manual_seed(TEST_SEED_OFFSET))
        with own_random_state(cuda_devices()):  # fork_rng's default would start CUDA
            torch.manual_seed(0)
            before, after = learner.adapted_trajectories(batch, steps=1)
        what = f"{config.method}, step {step}: before and after one policy-gradient step"
        paths.append(plot_navigation(before, after, batch.params["goal"], plots / "trajectories.png", what)
                     if positions else plot_velocities(before, after, batch.params, velocity, plots / "velocities.png",
                                                       what))
    return paths


COMPARE = ("compare_with", "--compare")  # the other run of plot_run and export_results, as each caller names it


def _comparison_run(config: RunConfig, compare_with: Path | str) -> tuple[Any, str]:
    """(learner, label) of the ``--compare`` run, checked to fit beside ``config``'s samples."""
    if config.task.classification or not can(config.method, "samples models"):
        raise OptionError(f"{{compare}} draws another run beside sampled functions, which only a probabilistic "
                          f"method on regression tasks has (this run: {config.method} on {config.task.dataset})",
                          compare=COMPARE)
    other_config, other_learner, _ = load_trained(compare_with)
    if other_config.task != config.task:
        differ = task_differences(other_config.task, config.task)
        raise OptionError("{compare}: trained on other tasks than this run ({differ}); compare runs of the same "
                          "tasks", compare=valued(COMPARE, compare_with), differ=(differ, differ))
    label = other_config.method.upper()
    return other_learner, label + (" (one sample)" if can(other_learner, "samples models") else "")


CURVE_POINTS = 100  # at most this many windows in an export's training curve


def training_curve(records: list[dict[str, Any]], max_points: int = CURVE_POINTS) -> dict[str, Any]:
    """The training metrics of ``metrics.jsonl`` ``records`` in windows of equal length: the
    smallest of 1, 2, 5, 10, 20, 50, ... steps that gives at most ``max_points`` windows. Each
    point holds the window's first and last logged step, how many records it pooled, the mean
    of every numeric metric and, for ``elapsed_s``, the last value. Validation records are left
    out (the summary keeps them whole). A mean over a range of whole windows of equal record
    counts is the mean over its steps, so figures quoted from a run's training (the return after
    adaptation over iterations 111-120, say) can be checked against its committed record."""
    train = [r for r in records if "loss" in r and isinstance(r.get("step"), int)]
    if not train:
        return {"window": 0, "points": []}
    last = max(r["step"] for r in train)
    window = next(w for w in (m * 10 ** k for k in range(64) for m in (1, 2, 5)) if -(-last // w) <= max_points)
    bins: dict[int, list[dict[str, Any]]] = {}
    for record in train:
        bins.setdefault((record["step"] - 1) // window, []).append(record)
    points = []
    for index in sorted(bins):
        members = bins[index]
        point: dict[str, Any] = {"first_step": members[0]["step"], "last_step": members[-1]["step"],
                                 "records": len(members)}
        names = dict.fromkeys(k for r in members for k in r if k != "step")  # every metric, first seen first
        for name in names:
            values = [r[name] for r in members
                      if isinstance(r.get(name), (int, float)) and not isinstance(r.get(name), bool)]
            if values:
                value = values[-1] if name == "elapsed_s" else sum(values) / len(values)
                point[name] = float(f"{value:.6g}")  # a committed record, not a checkpoint: 6 digits
        points.append(point)
    return {"window": window, "points": points}


def summary_json(summary: dict[str, Any]) -> str:
    """``summary`` as indented JSON, but each point of its training curve on one line: the
    record stays short enough to read and to diff (100 lines for the curve, not 1000)."""
    summary = json_finite(summary)  # standard JSON: a diverged score's NaN is null, as status --json writes it
    points = summary["training_curve"]["points"]
    marks = [f"@point{i}@" for i in range(len(points))]
    rest = {k: v for k, v in summary.items() if k != "training_curve"}
    text = json.dumps({**rest, "training_curve": {**summary["training_curve"], "points": marks}}, indent=2,
                      allow_nan=False)
    head, key, tail = text.rpartition('"training_curve": ')  # the curve is the last entry: marks only there
    for mark, point in zip(marks, points):
        tail = tail.replace(json.dumps(mark), json.dumps(point, allow_nan=False), 1)
    return head + key + tail


OUT_DIR = ("out_dir", "OUT_DIR")  # export's folder: a parameter in Python, an argument on the command line
EXPORT_FOLDER_PREFIX = "metalearn-export-"  # + the process id: an export's folder of plots, in the temporary folder


def check_out_dir(run: RunDir, config: RunConfig, out_dir: Path, option: str | tuple[str, str], what: str,
                  data_dir: Path | str | None, state: dict[str, Any] | None) -> None:
    """Refuse, in one line naming ``option`` (as :class:`~metalearn.errors.Options` takes it:
    export's :data:`OUT_DIR`, plot's ``"out_dir"``), a folder where ``what`` (``"the record"``,
    ``"the figures"``) drawn from ``run`` would lie among files that are not its own, before
    anything is drawn or written there: the run folder itself or a folder inside its ``best/``
    (the files the run writes, keeps and deletes itself; any other folder inside the run folder,
    its ``plots/`` or one of your own, is taken), the folder of another run (a folder with a
    checkpoint) or a folder inside it, and a folder inside ``data_dir`` or inside the image folder
    the run trained on, which its checkpoint's entries ``state`` record (None: a run without a
    checkpoint), since a later training there would read the files as images. ``config``: the
    run's configuration, whose dataset says whether it reads files at all."""
    from metalearn.tasks import check_outside_data

    out, own = out_dir.resolve(), run.path.resolve()
    # among the run's own files: its top level (config.json, checkpoint.pt) or best/, whose files
    # the run keeps and deletes itself
    if out == own or out.is_relative_to(run.best_dir.resolve()):
        where = "is" if out == own else "lies inside"
        mine = "the run folder" if out == own else "the best checkpoints' folder of"
        raise OptionError(f"{{out_dir}} {where} {mine} {run.path}: {what} would lie among the run's own files; "
                          f"give another folder (e.g. results/{own.name}, or {run.plots_dir})",
                          out_dir=valued(option, out_dir))
    # a run's folder is one with a checkpoint: records under results/ hold a config.json too
    other = next((folder for folder in (out, *out.parents) if RunDir(folder).has_checkpoint()), None)
    if other is not None and not out.is_relative_to(own):  # the run's own plots/ is a place for them
        raise OptionError(f"{{out_dir}} {'is' if other == out else 'lies inside'} the folder of another run, "
                          f"{other}: {what} would lie among that run's files; give another folder (e.g. "
                          f"results/{own.name})", out_dir=valued(option, out_dir))
    check_outside_data(config.task, data_dir, option, out_dir, recorded=(state or {}).get("data_dir"))


@keyword_only_after(2)
def export_results(run_dir: Path | str, out_dir: Path | str, *, data_dir: Path | str | None = None,
                   compare_with: Path | str | None = None, notes: list[str] | None = None) -> list[Path]:
    """A small, committable record of a run: ``summary.json`` (configuration, step, training
    wall time, the machines it trained on, every evaluation without per-episode scores, the last metrics, the validation
    records and the :func:`training_curve`) and the plots. ``run_dir``: the run's folder;
    ``data_dir`` and ``compare_with``: as :func:`plot_run` takes them, for the plots.
    Everything is read and drawn (into a temporary folder: the run folder may be read-only)
    before ``out_dir`` is touched: a run that cannot be exported leaves no partial record there.
    Nor does an ``out_dir`` that cannot take the whole record: a folder, a link or a special
    file with the name of one of its files, a read-only folder, are refused in one line before
    anything is made or written there (:func:`check_record_targets`), and a write failure (a
    full disk) comes before any file is renamed into place, leaving ``out_dir`` as it was. The
    files are renamed into place together, the plots before ``summary.json``; only a kill
    between two renames leaves some new and some old.
    ``notes``, when given, receives one line for each thing a reader of the record should
    know: an evaluation of another step's model than the exported checkpoint's (the run
    trained on after it; for an ensemble, other checkpoints than the run's best now), and a plot in ``out_dir`` that this export did not write (from an
    earlier export there, left in place: nothing outside the record's own files is deleted).
    Refused with a :class:`MetalearnError` before anything is drawn: an ``out_dir`` that is
    the run folder itself or lies inside its ``best/`` (the record would lie among the files
    the run writes and deletes; any other folder inside the run folder, its ``plots/`` or a
    ``record/`` of your own, is taken), one that is or lies inside another run's folder (a folder with a
    checkpoint), and one inside ``data_dir`` or inside the image folder the run trained on,
    which its checkpoint records (a later training on that folder would read the record's
    files as images)."""
    import tempfile

    check_paths(("run_dir", run_dir, RUN), ("out_dir", out_dir, FOLDER), ("data_dir", data_dir, FOLDER),
                ("compare_with", compare_with, RUN))
    run = RunDir(run_dir)
    config = run.read_config()
    out_dir = user_path(out_dir, "out_dir")
    state = run.read_checkpoint("step", "config")
    # config.json copied from another run would put that run's configuration in the summary, beside
    # this one's evaluations: refused as eval and --resume refuse it
    check_compatible(saved_config(state, run.checkpoint_path), config, f"the checkpoint in {run.path}",
                     "Its config.json and checkpoint.pt come from different runs: put back the run's own files.")
    # among the run's own files or another run's, or inside the images: those of --data-dir or the folder
    # the run trained on, recorded by its checkpoint (export needs no --data-dir)
    check_out_dir(run, config, out_dir, OUT_DIR, "the record", data_dir, state)
    # before the drawing, which takes a while; the plots' names are known once they are drawn,
    # and every name is checked again then, just before the record is written
    check_record_targets(out_dir, [Path(out_dir) / "summary.json"])
    # the plots are drawn in a folder of this process's (named by its id) in the system's
    # temporary folder; one that a killed export left there goes once it is stale
    remove_stale_folders(Path(tempfile.gettempdir()), EXPORT_FOLDER_PREFIX)
    drawn = tempfile.TemporaryDirectory(prefix=f"{EXPORT_FOLDER_PREFIX}{os.getpid()}-")
    # a run with no logged step (--steps 0, a baseline; stopped before --log-every) has no curve
    # to draw: its record is the summary alone
    step = int(state["step"])
    with drawn:
        plots = plot_run(run_dir, data_dir=data_dir, compare_with=compare_with, out_dir=drawn.name,
                         until_step=step) if any(r["step"] <= step for r in run.iter_metrics()) else []
        return _write_record(run, config, state, plots, out_dir, notes)


def check_record_targets(out_dir: Path | str, targets: list[Path]) -> None:
    """Refuse, in one line, an export whose record could not be written whole into ``out_dir``
    (``targets``: the files it writes there), before anything is made or written there, so that
    a refusal leaves ``out_dir`` as it was: ``out_dir`` a file, a link to nothing or below a
    file; a folder, a link or a special file with a target's name (the rename would fail on a
    folder after the files before it were written, and would replace a link, not write through
    it); a folder that refuses new files (read-only, a quota; probed with the temporary file the
    record is written through, :func:`~metalearn.files.probe_writable`). A read-only file of a
    target's name is no obstacle: the rename replaces it."""
    out, given = Path(out_dir), valued(OUT_DIR, out_dir)
    if out.is_symlink() and not out.exists():
        raise OptionError("{out_dir} is a link to nothing; give a folder", out_dir=given)
    if out.exists() and not out.is_dir():
        raise OptionError("{out_dir} is a file, not a folder; give a folder", out_dir=given)
    if not out.exists():  # made when the record is written: its nearest existing folder must take it
        existing = next(p for p in out.absolute().parents if p.exists())
        if not existing.is_dir():
            raise OptionError(f"{{out_dir}}: {existing} is a file, not a folder", out_dir=given)
        if not os.access(existing, os.W_OK):
            raise OptionError(f"{{out_dir}}: cannot make it in {existing}", out_dir=given)
        return
    for path in targets:
        what = obstacle(path)
        if what is not None:
            raise MetalearnError(f"{path} is {what}, where metalearn export writes the record's {path.name}: move it "
                                 f"away (nothing was written to {out_dir})")
    probe_writable(out / "summary.json")


def _write_record(run: RunDir, config: RunConfig, state: dict[str, Any], plots: list[Path], out_dir: Path | str,
                  notes: list[str] | None) -> list[Path]:
    """:func:`export_results`' record, once its plots are drawn."""
    evaluations = run.read_evaluations()  # after the plots: an RL run's plot stores the initial weights' returns
    for result in evaluations.values():
        result.pop("scores", None)
    # the checkpoint's state: records of steps past it are of a run training now, or of one killed
    # since, whose resume drops them
    records = [record for record in run.read_metrics() if record.get("step", 0) <= int(state["step"])]
    plugins = recorded_plugins(run.config_as_it_stands())  # where a plugin's method, dataset or network came from
    summary = {
        "config": {**config.to_dict(), **({"plugins": plugins} if plugins else {})},
        "step": int(state["step"]),
        "training_wall_time_s": state.get("elapsed_s"),
        # the processor and versions of each stretch of training (none for runs saved before they were kept)
        "machines": state.get("machines", []),
        "evaluations": evaluations,
        "last_train_metrics": next((r for r in reversed(records) if "loss" in r), None),
        "validation": [r for r in records if any(k.startswith("val_") for k in r)],
        "training_curve": training_curve(records),
        **({"split": split} if (split := run.read_split()) is not None else {}),  # class folders: which were tested
    }
    out = Path(out_dir)
    written = [out / plot.name for plot in plots]
    # the plots before summary.json: a summary.json there says the record is complete
    record = [*((out / plot.name, plot.read_bytes()) for plot in plots),
              (out / "summary.json", (summary_json(summary) + "\n").encode())]
    check_record_targets(out_dir, [path for path, _ in record])  # OUT_DIR untouched until all can be written
    try:
        made = make_folders(out)
    except OSError as err:  # checked above: only a folder changed meanwhile, or one the check cannot see
        raise WriteError(out, err) from None
    try:
        remove_export_temporaries(out)  # of an export killed while writing here
        atomic_write_files(record)  # all or nothing, but for a kill between the renames
    except BaseException:
        for folder in reversed(made):  # the deepest first; only while still empty
            with contextlib.suppress(OSError):
                folder.rmdir()
        raise
    if notes is not None:
        for name, result in evaluations.items():
            if "ensemble" in result:  # fixed checkpoints: stale only when the run keeps others now
                try:
                    current = run.best_steps()
                except MetalearnError:
                    current = []
                if sorted(current) != sorted(result["ensemble"]):
                    notes.append(f"{name} averaged the checkpoints of steps {sorted(result['ensemble'])}, not the "
                                 f"run's best now ({sorted(current)}): evaluate {run.path} --ensemble again")
            elif evaluation_step(result) is not None and evaluation_step(result) != summary["step"]:
                notes.append(f"{name} scored the model of step {result['step']}, not the exported step "
                             f"{summary['step']}: evaluate {run.path} again for a record of one step")
        for other in sorted(set(out.glob("*.png")) - set(written)):
            notes.append(f"{other} was not written by this export (from another run or drawn separately?)")
    return [out / "summary.json", *written]


RATE_WINDOWS = 20  # logged training windows whose median rate ``run_status`` projects the time left by


def run_status(run_dir: Path | str) -> dict[str, Any]:
    """Where the run in ``run_dir`` stands, read without disturbing it (nothing written; its lock
    is only tried for an instant, shared, to see whether it is held): ``method``,
    ``task`` (dataset and episode shape), ``step`` of ``steps`` and ``training_time_s`` (the later
    of the last logged training step and the checkpoint's, with its training time: a live or
    killed run logs steps after its last checkpoint), ``checkpoint_step`` (the checkpoint's
    step, which a resume starts from), ``state`` (``training``: a process holds its lock, on
    this machine; ``testing``: it holds it past the last step, for the test after training;
    ``training elsewhere``: on the host the lock's note names; ``unknown``: the note names
    another host whose lock this machine sees free, a killed holder or a file system that does
    not lock between machines; ``complete``, ``stopped``, ``diverged`` (stopped by a step that
    went non-finite, which a resume repeats; ``diverged`` then holds its ``step`` and ``what``
    became non-finite, else None), ``no checkpoint`` (metrics but no
    ``checkpoint.pt``: it cannot be resumed), or ``not started``), ``resume`` (the command that
    continues a stopped run), ``test`` (the command that evaluates it), ``own`` (what the run
    was trained on from Python that its config.json does not describe: ``"network"``, a learner
    of the user's own whose network is not config.json's; ``"tasks"``, a task source of the
    user's own; empty for a run the commands can rebuild; where not empty, ``resume`` and
    ``test`` are the Python lines that continue and evaluate it with the user's own learner and
    tasks; for a run of a method, dataset or network registered in a notebook or a script, which
    no command imports, the Python lines too), ``holder`` (the lock's note while training or
    unknown), ``last_write_s`` (seconds since ``metrics.jsonl`` changed), ``last`` (the last logged training record),
    ``steps_left`` (the steps still to train: from ``step`` while a process may be training the
    run, ``training``, ``testing``, ``training elsewhere`` or ``unknown``; else from
    ``checkpoint_step``, where a resume goes on), ``seconds_left`` (those steps at the recent
    rate: the median of the last :data:`RATE_WINDOWS` logged windows' tasks per second, so that
    one window slowed by a pause or a busy machine does not skew it; plus the remaining
    validations at the median length of the recent ones where the run logs it,
    ``validation_counted``; None when done or unknown),
    ``cost_changes`` (the method's ``(steps taken, what)`` changes of a step's cost still
    ahead, which the recent rate does not include: :meth:`~metalearn.MetaLearner.cost_changes`),
    ``machines`` (the checkpoint's records of what trained which steps: :func:`metalearn.runtime.machine`
    with ``from_step``), ``validation`` (the latest and the best record, by the method's metric) and
    ``evaluations`` (each file's mean, interval, episodes and step, for an ensemble its members'
    steps, ``ensemble``, and ``outdated``: it scored an earlier checkpoint than the run's, or other
    checkpoints than its best now), and ``config``, the run's configuration (config.json's
    values, for a listing that groups runs by their options). A damaged ``config.json``, or
    a ``checkpoint.pt`` that is unreadable or whose entries read here are damaged, raises a
    one-line :class:`MetalearnError` naming the file."""
    import time

    run = RunDir(run_dir)
    config = run.read_config()
    status: dict[str, Any] = {"run": str(run.path), "method": config.method, "task": _task_label(config.task),
                              "steps": config.train.steps, "step": 0, "checkpoint_step": 0, "training_time_s": 0.0,
                              "machines": [],
                              "config": config.to_dict()}  # what a listing of a sweep's runs groups them by
    state = _read_checkpoint_status(run, status)
    own = _own_parts(run, config, state)  # what config.json does not describe: the commands cannot rebuild the run
    status["own"] = own
    checkpoint = status["checkpoint_step"]
    status["state"], status["holder"] = _holder_state(run, checkpoint, status["steps"])
    status["resume"], status["test"] = _status_commands(run, config, state, own)
    status["last_write_s"] = (time.time() - run.metrics_path.stat().st_mtime) if run.metrics_path.is_file() else None
    last, diverged, rates, validation = _read_metrics_summary(run)
    status["last"] = last
    status["diverged"] = None  # a resume repeats the step that diverged
    if status["state"] == "stopped" and diverged is not None and diverged["step"] > checkpoint:
        status["state"], status["diverged"] = "diverged", {"step": diverged["step"], "what": diverged["diverged"]}
    _add_logged_step(status, last)
    _add_time_left(status, config, rates, validation)
    status["validation"] = {"latest": validation[-1] if validation else None, "best": _best_validation(validation)}
    status["evaluations"] = _evaluation_records(run, checkpoint)
    return status


def _task_label(task: TaskConfig) -> str:
    """The dataset and episode shape of ``task`` as ``metalearn status`` shows them: "omniglot 5-way
    1-shot", "sinusoid K=10", an environment's name alone."""
    if get_dataset(task.dataset).reinforcement:
        shape = ""
    elif task.classification:
        shape = f"{task.ways}-way {task.shots}-shot"
    else:
        shape = f"K={task.shots}"
    return " ".join(part for part in (task.dataset, shape) if part)


def _read_checkpoint_status(run: RunDir, status: dict[str, Any]) -> dict[str, Any] | None:
    """The entries of ``run``'s checkpoint that status reads (None without one), with its
    ``step`` (as ``step`` and ``checkpoint_step``), ``training_time_s`` and ``machines`` set in
    ``status``. A damaged entry that status shows is one line naming checkpoint.pt (the listing
    shows it as the run's error)."""
    from metalearn.checkpoints import read_entries

    if not run.has_checkpoint():
        return None
    state = read_entries(run, "step", optional=("elapsed_s", "machines", "data_dir"))
    step = int(state["step"])
    status.update(step=step, checkpoint_step=step, training_time_s=float(state.get("elapsed_s", 0.0)),
                  machines=list(state.get("machines", [])))
    return state


def _own_parts(run: RunDir, config: RunConfig, state: dict[str, Any] | None) -> list[str]:
    """What the run in ``run`` was trained on from Python that config.json does not describe
    (``state``: its checkpoint's entries, None without one): ``"network"``, a learner of the
    user's own whose network is not config.json's; ``"tasks"``, a task source of the user's own."""
    from metalearn.checkpoints import check_entries, network_difference, own_learner, own_tasks

    own: list[str] = []
    if state is None:
        return own
    if own_learner(state) is not None:  # a learner built in Python: its network may be config.json's
        check_entries(state, run.checkpoint_path, optional=("learner",))
        try:
            differs = "learner" not in state or bool(network_difference(config, state["learner"]))
        except MetalearnError:
            differs = True
        own += ["network"] if differs else []
    own += ["tasks"] if own_tasks(state) is not None else []
    return own


def _holder_state(run: RunDir, step: int, steps: int) -> tuple[str, dict[str, Any] | None]:
    """The run's ``state`` as its lock and files say (its checkpoint at ``step`` of ``steps``),
    before its metrics are read, and the lock's note while a process holds it (or may, elsewhere)."""
    import socket

    from metalearn.files import process_running
    from metalearn.locking import lock_is_held, read_holder_note

    note = read_holder_note(run.lock_path)  # None without a lock file: its holder deletes it as it lets go
    holder = note if note is not None and isinstance(note.get("pid"), int) else None
    held = lock_is_held(run.lock_path) if holder is not None else False
    elsewhere = holder is not None and holder.get("host") != socket.gethostname()
    if elsewhere and held:
        return "training elsewhere", holder
    if elsewhere:  # free as seen from here: a killed holder, or a file system not locking between machines
        return "unknown", holder
    if holder is not None and (held if held is not None else process_running(holder["pid"])):
        # past its last step the holder is testing the run (train keeps the lock for that)
        return ("testing" if step >= steps else "training"), holder
    # no note, or one left by a killed holder (its process id perhaps reused since)
    return ("not started" if not run.holds_run() else
            "complete" if step >= steps else
            "stopped" if run.has_checkpoint() else "no checkpoint"), None


def _status_commands(run: RunDir, config: RunConfig, state: dict[str, Any] | None,
                     own: list[str]) -> tuple[str, str]:
    """The commands that continue and evaluate the run (``state``: its checkpoint's entries;
    ``own``: what it trained on that config.json does not describe), or the Python lines that do
    where no command can."""
    task = config.task
    # a folder dataset's images are not part of the run: the command needs them again, unless the
    # checkpoint records their folder and it is there (a resume then reads it)
    recorded = recorded_images(run, state) if state is not None else None
    moved = recorded is None or not recorded.is_dir()
    images = "IMAGE_FOLDER" if reads_image_folder(task.dataset) and moved else None
    resume = resume_command(config.method, run.path, images)
    try:
        split = run.read_split()
    except MetalearnError:  # a damaged split.json: eval names it
        split = None
    untested = split is not None and not split.get("test")  # it trained on every class: score another folder's
    test = (f"metalearn eval {run.path}" + (" --data-dir NEW_CLASSES_FOLDER --split-fractions 0,0,1"
                                            if untested else f" --data-dir {images}" if images else ""))
    if own:  # trained from Python on what config.json does not describe: continued and scored from Python
        return python_resume(run.path), python_test(run.path)
    if (here := registered_in_python(config, run.config_as_it_stands())) is not None:  # a notebook's method
        return registered_resume(run.path, here), registered_test(run.path, here)
    return resume, test


def _read_metrics_summary(run: RunDir) -> tuple[dict | None, dict | None, collections.deque, list[dict]]:
    """One pass over metrics.jsonl keeping what status reads: the last training record and the
    last divergence, the recent rates (tasks per second of the last :data:`RATE_WINDOWS` logged
    windows), the validations (a run logged at every step has as many lines as steps)."""
    last = diverged = None
    rates: collections.deque = collections.deque(maxlen=RATE_WINDOWS)
    validation = []
    for r in run.iter_metrics():
        if "loss" in r:
            last = r
            if isinstance(r.get("tasks_per_s"), (int, float)) and r["tasks_per_s"] > 0:
                rates.append(r["tasks_per_s"])
        if isinstance(r.get("diverged"), str):
            diverged = r  # a step that went non-finite (the trainer's record after its last checkpoint)
        if any(k.startswith("val_") and k != "val_ci95" and isinstance(v, (int, float)) for k, v in r.items()):
            validation.append(r)
    return last, diverged, rates, validation


def _add_logged_step(status: dict[str, Any], last: dict | None) -> None:
    """Move ``status``'s ``step`` and ``training_time_s`` on to ``last``, the last logged training
    record, where it lies past the checkpoint (a live run, or one killed between checkpoints):
    the one step that the text and the JSON of ``metalearn status`` show."""
    logged = last.get("step") if last is not None else None
    if not isinstance(logged, int) or isinstance(logged, bool) or logged <= status["checkpoint_step"]:
        return
    status["step"] = logged
    elapsed = last.get("elapsed_s")
    if isinstance(elapsed, (int, float)) and not isinstance(elapsed, bool) and math.isfinite(elapsed):
        status["training_time_s"] = max(status["training_time_s"], float(elapsed))


LIVE_STATES = ("training", "testing", "training elsewhere", "unknown")  # a process may be training the run now


def _add_time_left(status: dict[str, Any], config: RunConfig, rates: collections.deque,
                   validation: list[dict]) -> None:
    """Set ``steps_left``, ``seconds_left``, ``validation_counted``, ``validates`` and
    ``cost_changes`` in ``status``: the time the remaining steps take at the recent ``rates``,
    plus the remaining validations at the median length of the recent ones where the run logs
    it. A run that a process may be training goes on from its logged step; any other from its
    checkpoint's, where a resume starts (the steps it logged after it are trained again)."""
    at = status["step"] if status["state"] in LIVE_STATES else status["checkpoint_step"]
    left = max(status["steps"] - at, 0)
    status["steps_left"] = left
    status["seconds_left"] = (left * config.train.meta_batch_size / statistics.median(rates)
                              if rates and left > 0 and status["diverged"] is None else None)  # diverged: none to go
    lengths = [r["validation_s"] for r in validation if isinstance(r.get("validation_s"), (int, float))]
    every = config.train.val_every
    status["validation_counted"] = bool(status["seconds_left"] is not None and lengths and every > 0)
    status["validates"] = every > 0
    options = make_method_config(config.method, config.method_config)
    # those still ahead: the step after `at` steps is still to come, none after the last
    status["cost_changes"] = [(step, what) for step, what in method_class(config.method).cost_changes(options)
                              if at <= step < status["steps"]]
    if status["validation_counted"]:  # one after every multiple of val_every still to come
        status["seconds_left"] += (status["steps"] // every - at // every) * statistics.median(lengths[-RATE_WINDOWS:])


def _best_validation(validation: list[dict]) -> dict | None:
    """The best of the ``validation`` records by the method's metric (the latest record's), the
    earlier step among ties, as --keep-best ranks them; None without a finite score."""
    from metalearn.evaluation import HIGHER_IS_BETTER

    if not validation:
        return None
    name = next(k for k, v in validation[-1].items() if k.startswith("val_") and k != "val_ci95"
                and isinstance(v, (int, float)))
    scored = [r for r in validation if isinstance(r.get(name), (int, float)) and math.isfinite(r[name])]
    sign = 1.0 if HIGHER_IS_BETTER.get(name[len("val_"):], True) else -1.0
    return max(scored, key=lambda r: (sign * r[name], -r["step"])) if scored else None


def _evaluation_records(run: RunDir, step: int) -> dict[str, dict[str, Any]]:
    """Each evaluation file's mean, interval, episodes and step, for an ensemble its members'
    steps, and ``outdated``: it scored an earlier checkpoint than the run's (at ``step``), or
    other checkpoints than its best now."""
    records = {}
    evaluations = run.read_evaluations()
    current: list[int] = []  # the run's best checkpoints now, which an ensemble's members are compared with
    if any("ensemble" in result for result in evaluations.values()):
        with contextlib.suppress(MetalearnError):  # no best/ left: every ensemble of it is outdated
            current = sorted(run.best_steps())
    for stem, result in evaluations.items():
        record = {key: result.get(key) for key in ("metric", "mean", "ci95", "episodes", "step", "part")}
        if "ensemble" in result:  # fixed checkpoints: outdated once the run keeps others
            members = result["ensemble"]
            record["ensemble"] = members
            record["outdated"] = not (isinstance(members, list) and all(isinstance(m, int) for m in members)
                                      and sorted(members) == current)
        else:
            record["outdated"] = isinstance(result.get("step"), int) and result["step"] < step
        records[stem] = record
    return records


@keyword_only_after(3)
def predict_run(run_dir: Path | str, support: Path | str, query: Path | str | list[Path | str], *,
                json_out: Path | str | None = None, csv_out: Path | str | None = None,
                sheet: Path | str | None = None, num_samples: int | None = None,
                device: str = "cpu") -> dict[str, Any]:
    """Classify new images among new classes with the trained run in ``run_dir`` (``metalearn
    predict``).

    ``support``: a folder with one sub-folder per new class holding 1 or more images;
    ``query``: a folder of images (searched recursively) or a list of image files and folders.
    Images are prepared as the run's training images were (its ``image_size`` and
    ``channels``). A method with one output per class (MAML, PLATIPUS, Reptile) needs as many
    classes as it was trained with. Returns :func:`metalearn.prediction.predict_new_classes`'s
    result (per query: ``label``, ``probability``, for PLATIPUS the ``spread`` over sampled
    models); writes it as JSON to ``json_out``, as CSV to ``csv_out`` and a contact sheet
    PNG to ``sheet`` when given. The returned dict also holds ``run``, ``method`` and ``step``
    (the checkpoint's): plain data, as the ``json_out`` file holds it. ``device``: where the
    predictions are computed (cpu, cuda, cuda:N or auto); ``num_samples``: models sampled per
    query (PLATIPUS; default the run's ``num_samples``).

    The output paths are checked before anything is read (a folder, two outputs naming one
    file, a read-only file, an unwritable folder; one of a run folder's own files, an input
    image or a file among the support, query or training images:
    :func:`metalearn.prediction.refuse_run_files` and ``refuse_outputs_among_inputs``; each a
    :class:`MetalearnError`), and the files are written only once
    everything has been predicted, together: all to temporary files first, then all renamed
    into place, so a failure leaves none of them. Also raises :class:`MetalearnError` for a run
    that did not learn to classify, ``num_samples`` with a method that does not sample models,
    a support folder without at least 2 class folders of images, a query path that does not
    exist or holds no images, and a file that is not a readable image.
    """
    from metalearn.prediction import (OUTPUTS, as_csv, as_json, check_outputs, contact_sheet, predict_new_classes,
                                      refuse_outputs_among_inputs, refuse_run_files, write_together)
    from metalearn.uncertainty import check_samples_apply

    paths = (str, os.PathLike)  # a query is paths: one, or any iterable of them (a list, a glob)
    queries = [query] if isinstance(query, paths) else list(query) if isinstance(query, Iterable) else None
    if queries is None or not all(isinstance(q, paths) for q in queries) or not isinstance(support, paths):
        given = type(support if not isinstance(support, paths) else query).__name__
        raise MetalearnError(f"predict_run takes a support folder and query image files or folders (paths), got a "
                             f"{given}; for images in memory use learner.fit_predict(support_x, support_y, query_x) "
                             "on load_trained(run_dir)[1]")
    check_paths(("run_dir", run_dir, RUN), ("support", support, IMAGES), *(("query", q, IMAGES) for q in queries),
                ("json_out", json_out, FILE), ("csv_out", csv_out, FILE), ("sheet", sheet, FILE))
    # ~ expanded; a str kept as a str, since "out/" names a folder
    named = [(OUTPUTS[name], os.path.expanduser(path) if isinstance(path, str) else Path(path).expanduser())
             for name, path in (("json_out", json_out), ("csv_out", csv_out), ("sheet", sheet)) if path is not None]
    check_outputs(named)  # here, not only in the CLI: the Python API gets the same refusals
    refuse_run_files(named)  # before the run's checkpoint is read
    config, learner, step, state = load_trained_state(run_dir)
    if not config.task.classification:
        raise MetalearnError(f"{run_dir} learned {config.task.dataset}, a {get_dataset(config.task.dataset).kind} "
                             "task family; predict classifies images")
    inputs = problem_of(config.task).input_shape
    if len(inputs) != 3:  # a dataset of the user's whose examples are vectors, not pictures
        raise MetalearnError(f"{run_dir} learned {config.task.dataset}, whose examples are not images (inputs of shape "
                             f"{tuple(inputs)}); predict classifies image files: for examples of other kinds, give "
                             "tensors to learner.fit_predict(support_x, support_y, query_x) on load_trained(run_dir)[1]")
    check_samples_apply([config.method], num_samples)
    refuse_outputs_among_inputs(named, [("support", support)] + [("query", q) for q in queries],
                                trained_on=[(run_dir, recorded_images(RunDir(run_dir), state))])
    learner = learner.to(init_world(device).device)
    test = config.task.for_testing()  # a task's query images, in training and in testing: the fewer
    per_task = min(config.task.ways * config.task.query, test.ways * test.query)
    result = predict_new_classes(learner, support, queries, config.task.image_size, config.task.channels,
                                 num_samples, queries_per_task=per_task)
    result.update({"run": str(run_dir), "method": config.method, "step": step})
    outputs, target = [], dict(named)
    if json_out is not None:
        outputs.append((Path(target[OUTPUTS["json_out"]]), as_json(result)))
    if csv_out is not None:
        outputs.append((Path(target[OUTPUTS["csv_out"]]), as_csv(result)))
    if sheet is not None:
        title = f"{config.method} ({Path(run_dir).name}, step {step})"
        outputs.append((Path(target[OUTPUTS["sheet"]]), contact_sheet(result, title)))
    write_together(outputs)
    result.images = None  # the prepared tensors, for the contact sheet alone
    return result


# -- few-shot generation (methods with a ``sample``: the Neural Statistician) --------------------

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp")


def support_files(paths: list[Path | str]) -> list[Path]:
    """The image files named by ``support`` (``--support``): files as given, folders as every
    file in them (by name)."""
    files: list[Path] = []
    for path in (user_path(p, "support", what=IMAGES) for p in paths):  # "~/drawings" as a shell expands it
        if path.is_dir():
            files += sorted(f for f in path.iterdir() if f.is_file() and not f.name.startswith("."))
        elif path.is_file():
            files.append(path)
        else:
            raise OptionError("{support}: no such file or folder", support=valued("support", path))
    if not files:
        raise OptionError("{support}: no image files there; give PNG or JPEG drawings of one character, or a folder "
                          "of them", support=valued("support", ", ".join(map(str, paths))))
    return files


def generative_run(run_dir: Path | str) -> RunConfig:
    """The config of ``run_dir``, refused unless its method can draw new images."""
    config = RunDir(run_dir).read_config()
    if not can(config.method, "draws images"):
        raise MetalearnError(f"{run_dir} is a {config.method} run, which cannot draw new images: sampling needs a "
                             f"generative method ({methods_that('draws images')})")
    return config


@keyword_only_after(2)
def sample_run(run_dir: Path | str, support: Path | str | list[Path | str], *, num: int = 20,
               out: Path | str | None = None, seed: int = 0) -> Path:
    """Draw ``num`` new images of the character shown by the ``support`` images (files or
    folders) with the trained generative method of ``run_dir``, and save them as a PNG grid
    (the inputs in the first row, the samples beneath) at ``out`` (default
    ``RUN_DIR/plots/samples.png``; its folder is made when missing). The noise is seeded by
    ``seed``, so the same call draws the same images. Returns the path written.

    Raises :class:`MetalearnError` when ``num`` is not a whole number from 1 to 1000, when the
    run's method cannot draw images (only generative methods, the Neural Statistician, have a
    ``sample``), when the run has no checkpoint, when a support path does not exist, holds
    no files or is not an image, and when ``out`` could not be written or would damage what is
    read (one of a run folder's own files, a support image or a file among the images:
    :func:`metalearn.prediction.refuse_run_files` and ``refuse_outputs_among_inputs``)."""
    from metalearn.algorithms.base import MAX_SAMPLES
    from metalearn.plotting_samples import plot_image_rows
    from metalearn.prediction import check_output_file, refuse_outputs_among_inputs, refuse_run_files

    check_paths(("run_dir", run_dir, RUN), ("out", out, FILE))
    if isinstance(num, bool) or not isinstance(num, int) or not 1 <= num <= MAX_SAMPLES:
        raise OptionError(f"{{num}} must be a whole number from 1 to {MAX_SAMPLES}, got {num!r}", num="num")
    if out is not None:  # found out now, not after the model has drawn
        check_output_file("out", out, "samples.png", ".png")
        refuse_run_files([("out", out)])  # before the run's checkpoint is read
    config = generative_run(run_dir)
    supports = [support] if isinstance(support, (str, Path)) else list(support)
    files = support_files(supports)
    _, learner, step, state = load_trained_state(run_dir)
    if out is not None:
        refuse_outputs_among_inputs([("out", out)], [("support", s) for s in supports],
                                    trained_on=[(run_dir, recorded_images(RunDir(run_dir), state))])
    images = []
    for file in files:
        try:
            images.append(learner.prepare_images([file], config.task.image_size, config.task.channels))
        except MetalearnError:
            raise OptionError("{support} is not an image (give PNG or JPEG drawings of one character)",
                              support=valued("support", file)) from None
    images = torch.cat(images)
    samples = learner.sample(images, num, generator=torch.Generator().manual_seed(seed))[0]
    out = user_path(out, "out") if out is not None else RunDir(run_dir).checked_plots_dir() / "samples.png"
    return plot_image_rows([(images, "input"), (samples, "samples")], out,
                           title=f"{config.method}, step {step}: {num} new images of the character shown")


def _fit_picture(task: TaskConfig, data_dir, sets: int, set_size: int) -> tuple[int, int]:
    """The conditional-samples picture's rows and inputs per row for an image folder's test
    classes: at most as many sets as classes, and set_size + 1 images of each (an episode's
    query), or a clear error where no picture fits (fewer than 2 classes or 2 images)."""
    from metalearn.data.folder import folder_split, load_image_folder

    folder = load_image_folder(data_dir, task.image_size, task.channels, progress=False)
    pool = folder_split(folder, "test", task.split_fractions, task.split_file)
    smallest = int(folder.class_sizes[pool.characters.numpy()].min())
    if len(pool) < 2 or smallest < 2:
        raise MetalearnError(f"the conditional-samples picture draws sets of images of 2 or more test classes with "
                             f"2 or more images each; this folder's test part has {len(pool)} classes, the smallest "
                             f"with {smallest} images")
    return min(sets, len(pool)), min(set_size, smallest - 1)


def plot_conditional_samples(run_dir: Path | str, data_dir: Path | str | None = None, sets: int = 6,
                             set_size: int = 5, num: int = 10, seed: int = 0, out: Path | str | None = None) -> Path:
    """The paper's conditional-samples picture (figure 5): ``sets`` test-split characters, each
    a row of ``set_size`` input images with ``num`` samples beneath, at
    ``out`` (default ``RUN_DIR/plots/conditional_samples.png``). The characters are those of the test episodes
    ``metalearn eval`` draws for ``seed``, and the noise is seeded by ``seed`` too (an image
    folder's picture has as many rows as its test classes allow, and as many inputs as its
    smallest test class has images but one, where those are fewer). Returns the
    path written. Raises :class:`MetalearnError` as :func:`sample_run` does for a run that
    cannot draw images or has no checkpoint, when the data (``data_dir``) cannot be
    loaded, and for an ``out`` that sample_run refuses."""
    from metalearn.plotting_samples import plot_image_rows
    from metalearn.prediction import check_output_file, refuse_outputs_among_inputs, refuse_run_files
    from metalearn.tasks import build_task_source

    check_paths(("run_dir", run_dir, RUN), ("data_dir", data_dir, FOLDER), ("out", out, FILE))
    if out is not None:  # found out now, not after the model has drawn
        check_output_file("out", out, "conditional_samples.png", ".png")
        refuse_run_files([("out", out)])  # before the run's checkpoint is read
    config, _ = with_split(generative_run(run_dir), run_dir=run_dir, data_dir=data_dir)  # the run's test classes
    _, learner, step, state = load_trained_state(run_dir)
    if out is not None:
        refuse_outputs_among_inputs([("out", out)], [("data_dir", data_dir)] if data_dir is not None else [],
                                    trained_on=[(run_dir, recorded_images(RunDir(run_dir), state))])
    if reads_image_folder(config.task.dataset):  # a folder's test classes may be fewer, or smaller, than the picture's
        sets, set_size = _fit_picture(config.task, data_dir, sets, set_size)
    task = dataclasses.replace(config.task, test_ways=sets, test_shots=set_size, test_query=1)
    batch = build_task_source(task, "test", data_dir=data_dir).sample(
        1, torch.Generator().manual_seed(TEST_SEED_OFFSET + seed))
    inputs = learner.support_sets(batch)  # (sets, set_size, 1, H, W)
    samples = learner.sample(inputs, num, generator=torch.Generator().manual_seed(seed))
    rows = []
    for s in range(sets):
        rows += [(inputs[s], "input" if s == 0 else None), (samples[s], "samples" if s == 0 else None)]
    out = RunDir(run_dir).checked_plots_dir() / "conditional_samples.png" if out is None else user_path(out, "out")
    return plot_image_rows(rows, out, width=set_size,
                           title=f"{config.method}, step {step}: unseen {config.task.split} test characters")
