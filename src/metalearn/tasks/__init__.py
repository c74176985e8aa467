"""Task sources: objects with ``sample(num_tasks, generator, tasks=None) -> TaskBatch``."""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Any, Callable, Protocol

import torch

from metalearn.config import TaskConfig
from metalearn.datasets import get_dataset
from metalearn.errors import (ConfigError, MetalearnError, OptionError, check_flags, keyword_only_after, kind_of,
                              valued)
from metalearn.files import user_path
from metalearn.runtime import show_progress
from metalearn.tasks.batch import Problem, TaskBatch
from metalearn.tasks.episodes import EpisodeSampler
from metalearn.tasks.sinusoid import SineOrLineTasks, SinusoidTasks


class TaskSource(Protocol):
    def sample(self, num_tasks: int, generator: torch.Generator, tasks: slice | None = None) -> TaskBatch: ...


# what a task source is, for the messages that refuse something else
TASK_SOURCE = ("a task source is an object with sample(num_tasks, generator, tasks=None) returning a TaskBatch "
               "(for tensors of images: metalearn.EpisodeSampler; see docs/data.md, 'Your own tasks')")


def _batch_types() -> tuple[type, ...]:
    """What a task source's ``sample`` returns: a TaskBatch, or the reinforcement-learning tasks'
    MDPBatch (imported here: envs lies above tasks in docs/design.md's layering)."""
    from metalearn.envs.base import MDPBatch

    return TaskBatch, MDPBatch


def require_task_source(source: Any, role: str) -> None:
    """Refuse, with a one-line :class:`MetalearnError`, what cannot serve as a task source: an
    object whose ``sample`` is called as ``sample(num_tasks, generator, tasks=slice)`` (the
    evaluator and the trainer pass ``tasks``, the share of a distributed rank, by keyword).
    ``role`` names the argument as the caller wrote it (``"evaluate's source"``, ``"Trainer's
    train_tasks"``) and starts the message. Checked once, before any draw, from ``sample``'s
    signature (``inspect.signature``; a ``sample`` whose signature cannot be read is accepted):
    without it, a list, a DataLoader or a batch already drawn fails inside the loop as
    ``AttributeError: ... has no attribute 'sample'``, and a ``sample(n, generator)`` as a
    ``TypeError`` about an unexpected keyword. What ``sample`` returns is checked at each draw
    (:func:`require_sampled_batch`)."""
    if isinstance(source, _batch_types()):
        raise MetalearnError(f"{role} is a {type(source).__name__}, one batch already drawn; {TASK_SOURCE}")
    if isinstance(source, type):  # the class, e.g. EpisodeSampler: its sample would take num_tasks as self
        raise MetalearnError(f"{role} is the class {source.__name__}, not an object of it: create one "
                             f"({source.__name__}(...)); {TASK_SOURCE}")
    if isinstance(source, (str, bytes)) or source is None:
        raise MetalearnError(f"{role} is {source!r}; {TASK_SOURCE}, and metalearn.tasks.build_task_source(task, part) "
                             "builds one for a dataset by name")
    sample = getattr(source, "sample", None)
    if not callable(sample):
        iterable = hasattr(source, "__iter__") or hasattr(source, "__getitem__")
        what = f"an iterable ({kind_of(source)}), which yields batches but cannot draw them from a seed" if iterable \
            else f"of type {kind_of(source)}" + ("" if sample is None else ", whose sample is not a method")
        raise MetalearnError(f"{role} is {what}; {TASK_SOURCE}")
    try:
        signature = inspect.signature(sample)
    except (TypeError, ValueError):  # a builtin or extension method: nothing to read, so trust it
        return
    try:
        signature.bind(1, None, tasks=None)
    except TypeError:
        raise MetalearnError(f"{role}'s sample{signature} must take (num_tasks, generator, tasks=None): tasks, "
                             "passed by keyword, is the slice of the batch a distributed rank keeps (None: all of "
                             "it; batch.select(tasks) cuts it from the whole batch, drawn as without it)") from None


def require_sampled_batch(batch: Any, source: Any, role: str) -> None:
    """Refuse, in one line naming the type returned, a ``source.sample(...)`` result that is not a
    :class:`TaskBatch` (or the reinforcement-learning tasks' :class:`~metalearn.envs.MDPBatch`):
    a tuple of tensors, a dict or a list would fail at the next line, ``batch.to(device)``, as an
    ``AttributeError``. One ``isinstance`` per draw."""
    if not isinstance(batch, _batch_types()):
        raise MetalearnError(f"{role} ({kind_of(source)}): its sample returned a {kind_of(batch)}; it must return a "
                             "TaskBatch: give the tensors as TaskBatch(support_x, support_y, query_x, query_y, ways=N) "
                             "(ways=0 for regression)")


def problem_of(task: TaskConfig) -> Problem:
    """The input shape and output size a network needs for these tasks."""
    return get_dataset(task.dataset).problem(task)


def true_function(source: Any, task: TaskConfig) -> Callable[..., torch.Tensor] | None:
    """The noiseless task functions of a regression task source, ``function(task_params, x)`` on
    its class (see :class:`~metalearn.datasets.Dataset`), where ``task``'s inputs and targets are
    single numbers: the fits figures and compare's coverage draw them on a grid of one input.
    None for classification, for a source without ``function`` and for other shapes."""
    function = getattr(type(source), "function", None)
    if function is None or task.classification:
        return None
    problem = problem_of(task)
    return function if tuple(problem.input_shape) == (1,) and problem.output_dim == 1 else None


@keyword_only_after(2)
def build_task_source(task: TaskConfig, part: str, *, data_dir: Path | str | None = None,
                      progress: bool | None = None, evaluation: bool = False) -> TaskSource:
    """The sampler of ``part`` (train/val/test) for ``task``; val and test use the ``test_*``
    shape, and so does train with ``evaluation`` (``metalearn eval --part train``: the test
    episodes' shape on the training classes). ``data_dir``: where the dataset's images are
    (Omniglot's default: ``$METALEARN_DATA`` or the cache folder; required for ``folder`` and
    ``mini-imagenet``). ``progress``: show a bar while a dataset is preprocessed (first use
    only); None (the default): only when the error output is a terminal, not into a log file.

    Returns a task source: an object whose ``sample(num_tasks, generator, tasks=None)`` returns
    a :class:`TaskBatch` (an :class:`~metalearn.envs.MDPBatch` for a reinforcement-learning
    environment). Raises :class:`MetalearnError` for an unknown dataset, a split without
    ``part``, data that is missing or cannot be read, and an episode shape the classes
    cannot fill (more ways than the part has classes, more shots and queries than a class has
    images).

    ``evaluation`` also says that the episodes are an evaluation's (``metalearn eval`` and
    ``compare``; ``evaluate_run`` and ``compare_learners``), whose test shape their own options
    set: a dataset whose builder takes ``evaluation`` (the built-in ones) names those options
    (``--ways``, ``episode_shape's ways``) where the shape cannot be drawn, not train's
    (``--test-ways``).

    ``task.augment`` changes the images of the training episodes only (``part`` train without
    ``evaluation``): the validation and test shapes (:meth:`TaskConfig.for_testing`) have none.
    A dataset that does not take it, or whose task source is no :class:`EpisodeSampler`, refuses
    it."""
    check_flags("build_task_source", evaluation=evaluation)
    progress = show_progress(progress, "build_task_source")  # a registered builder is given True or False
    shape = task.for_testing() if part in ("val", "test") or evaluation else task
    data_dir = user_path(data_dir, "data_dir", optional=True)
    check_data_dir(task, data_dir)
    dataset = get_dataset(task.dataset)
    if shape.augment and "augment" in dataset.inapplicable:  # resolve_config refuses it for a run
        raise dataset.refuse(["augment"])
    told = {"evaluation": True} if evaluation and takes_keyword(dataset.build, "evaluation") else {}
    source = dataset.build(task, shape, part, data_dir, progress, **told)
    if not shape.augment:
        return source
    if not isinstance(source, EpisodeSampler):
        raise ConfigError("TaskConfig", "augment", f"changes images of the episodes an EpisodeSampler draws; "
                                                   f"{task.dataset}'s task source is a {kind_of(source)}")
    return source.augmented(shape.augment)


def takes_keyword(function: Callable[..., Any], name: str) -> bool:
    """Whether ``function`` takes the keyword argument ``name`` (a registered builder may not:
    the keyword is an addition to the builders' arguments)."""
    try:
        parameters = inspect.signature(function).parameters
    except (TypeError, ValueError):  # a builtin or extension: nothing to read, so nothing passed
        return False
    return name in parameters or any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values())


def check_task_source(task: TaskConfig, part: str, data_dir: Path | str | None = None,
                      progress: bool = True) -> None:
    """Refuse what :func:`build_task_source` would refuse for ``part``'s episode shape, where the
    dataset can tell without reading its data (an image folder: from its file names), so that a
    run whose test episodes cannot be drawn fails before the training images are decoded."""
    data_dir = user_path(data_dir, "data_dir", optional=True)
    check_data_dir(task, data_dir)
    dataset = get_dataset(task.dataset)
    if dataset.check is not None:
        dataset.check(task, task.for_testing() if part in ("val", "test") else task, part, data_dir, progress)


def check_data_dir(task: TaskConfig, data_dir: Path | str | None) -> None:
    """Refuse a ``data_dir`` for tasks that are generated (a formula, a simulator), where it would
    be silently unused."""
    if data_dir is not None and get_dataset(task.dataset).generated:
        raise OptionError(f"{{given}}: {task.dataset} tasks are generated, not read from files; leave {{data_dir}} "
                          "out", given=valued("data_dir", data_dir), data_dir="data_dir")


def check_outside_data(task: TaskConfig, data_dir: Path | str | None, option: str | tuple[str, str],
                       path: Path | str, recorded: str | None = None) -> None:
    """Refuse a folder that metalearn writes into (``option`` names it, as an option of
    :class:`~metalearn.errors.Options`: ``"run_dir"``, export's ``("out_dir", "OUT_DIR")``)
    inside ``data_dir``, the images a run reads: its files would join the data (a
    class folder of checkpoints and plots, a plot among a class's images), and the next read
    would see another dataset. ``recorded``: the absolute path of the image folder a run
    trained on, from its checkpoint (``data_dir``), checked too, since a command that reads no
    images (export) is given no ``--data-dir``; a run's training on that folder would still see
    the files."""
    if get_dataset(task.dataset).generated:
        return
    target = Path(path).resolve()
    given = valued(option, path)  # the folder, as the caller names it
    if data_dir is not None and target.is_relative_to(Path(data_dir).resolve()):
        raise OptionError(f"{{given}} lies inside {{data_dir}}: its files would be read as images of the dataset; "
                          f"give a folder outside {data_dir}", given=given, data_dir=valued("data_dir", data_dir))
    if isinstance(recorded, str) and recorded and target.is_relative_to(Path(recorded)):
        raise OptionError(f"{{given}} lies inside {recorded}, the image folder the run trained on (its checkpoint "
                          f"records it): its files would be read as images of the dataset; give a folder outside "
                          f"{recorded}", given=given)


def has_validation(task: TaskConfig) -> bool:
    """Whether ``task``'s data has a validation part: its split's (Omniglot's background and
    evaluation split has none), or for an image folder split by ``split_fractions`` or
    ``split_file``, classes for validation (0,0.2,0.8 leaves none, as a file without "val"
    classes does)."""
    return no_validation_reason(task) is None


def no_validation_reason(task: TaskConfig) -> str | None:
    """Why ``task`` has no validation part (see :func:`has_validation`), or None."""
    if not get_dataset(task.dataset).has_part(task.split, "val"):
        return f"the {task.split} split has no validation part (the maml and vinyals splits have one)"
    if task.split_fractions:
        from metalearn.data.folder import parse_fractions

        if parse_fractions(task.split_fractions)[1] == 0:
            return f"`TaskConfig.split_fractions` {task.split_fractions} gives validation no classes"
    if task.split_file:
        from metalearn.data.folder import read_split_file

        try:
            listed = read_split_file(Path(task.split_file)).get("val")
        except MetalearnError:  # refused where the folder is split by it, with the folder's classes at hand
            return None
        if not listed:
            return f"`TaskConfig.split_file` {task.split_file} lists no validation (\"val\") classes"
    return None


__all__ = ["TaskBatch", "TaskSource", "EpisodeSampler", "SinusoidTasks", "SineOrLineTasks",
           "require_task_source", "require_sampled_batch", "build_task_source", "true_function", "check_task_source",
           "check_data_dir", "check_outside_data", "problem_of", "has_validation", "MetalearnError"]
