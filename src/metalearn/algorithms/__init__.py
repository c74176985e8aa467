"""Meta-learning methods, one per module, all on the :class:`MetaLearner` interface.

Adding a method is one module with a :class:`MetaLearner` subclass (its ``name``, its ``Config``
whose fields are declared with :func:`metalearn.options.option`) and one line in ``METHODS``
below; a method of your own can be registered at run time with :func:`register_method`. The
trainer, the evaluator and every command of the CLI then work for it unchanged.
"""

from __future__ import annotations

import dataclasses
import typing
from typing import Any

from metalearn.algorithms.base import MetaLearner, accuracy, task_loss
from metalearn.algorithms.maml import MAML, MAMLConfig
from metalearn.algorithms.maml_rl import MAMLRL, MAMLRLConfig
from metalearn.algorithms.matchingnet import MatchingNet, MatchingNetConfig
from metalearn.algorithms.memory import MemoryConfig, MemoryModule
from metalearn.algorithms.platipus import PLATIPUS, PLATIPUSConfig
from metalearn.algorithms.protonet import ProtoNet, ProtoNetConfig
from metalearn.algorithms.reptile import Reptile, ReptileConfig
from metalearn.algorithms.statistician import NeuralStatistician, StatisticianConfig
from metalearn.errors import ConfigError, MetalearnError
from metalearn.tasks.batch import Problem

METHODS: dict[str, type[MetaLearner]] = {
    "maml": MAML,
    "protonet": ProtoNet,
    "matchingnet": MatchingNet,
    "platipus": PLATIPUS,
    "reptile": Reptile,
    "memory": MemoryModule,
    "statistician": NeuralStatistician,
    "maml-rl": MAMLRL,
}
"""Every method by its command-line name (``metalearn train NAME``, ``RunConfig.method``); the
registry :func:`register_method` adds to and :func:`build_learner` reads."""


def register_method(cls: type[MetaLearner]) -> type[MetaLearner]:
    """Make ``cls`` known under ``cls.name`` to configurations, the trainer and ``metalearn
    train``; usable as a class decorator. Returns ``cls``.

    A method of your own is one module: a :class:`MetaLearner` subclass with a ``name``, a
    frozen ``Config`` dataclass of its options (declared with :func:`metalearn.options.option`)
    and ``build``, ``meta_loss`` and ``predict``, registered with this function (see "Adding a
    method" in ``docs/design.md``). :func:`build_learner`, :func:`metalearn.resolve_config`, the
    trainer and, in a process that has registered it, the command line then take it by name. A
    second registration under a name replaces the first, a built-in method's too.

    Raises :class:`MetalearnError` when ``cls`` is not a :class:`MetaLearner` subclass, when its
    ``Config`` is not a dataclass, when an option shares its name with a task or training
    option (both would be one command-line flag), and when its ``legacy_defaults`` name an
    option the ``Config`` lacks or a value it refuses."""
    if not (isinstance(cls, type) and issubclass(cls, MetaLearner)):
        raise MetalearnError(f"{cls!r} is not a MetaLearner subclass")
    if not dataclasses.is_dataclass(getattr(cls, "Config", None)):
        raise MetalearnError(f"{cls.__name__}.Config must be a dataclass of the method's options")
    check_option_names(cls)
    check_legacy_defaults(cls)
    METHODS[cls.name] = cls
    return cls


def check_option_names(cls: type[MetaLearner]) -> None:
    """Refuse a method option named like a task or training option: both would be the same
    command-line flag."""
    from metalearn.config import TaskConfig, TrainConfig

    shared = {f.name for f in dataclasses.fields(cls.Config)} & {
        f.name for config in (TaskConfig, TrainConfig) for f in dataclasses.fields(config)}
    if shared:
        raise MetalearnError(f"{cls.__name__}.Config has option(s) named like task or training options, which "
                             f"would share a flag: {', '.join(sorted(shared))}; rename them")


def check_legacy_defaults(cls: type[MetaLearner]) -> None:
    """Refuse ``legacy_defaults`` naming an option the Config lacks, or a value the Config
    refuses: a stored configuration would otherwise fail to load with a message about an
    option its user never set."""
    known = {f.name for f in dataclasses.fields(cls.Config)}
    unknown = set(cls.legacy_defaults) - known
    if unknown:
        raise MetalearnError(f"{cls.__name__}.legacy_defaults names option(s) its Config lacks: "
                             f"{', '.join(sorted(unknown))}")
    try:
        cls.Config(**cls.legacy_defaults)
    except (MetalearnError, ValueError, TypeError) as err:
        raise MetalearnError(f"{cls.__name__}.legacy_defaults is not a valid configuration: {err}") from None


def method_class(name: str) -> type[MetaLearner]:
    if name not in METHODS:
        raise MetalearnError(f"unknown method {name!r}; valid methods: {', '.join(METHODS)}")
    return METHODS[name]


def make_method_config(name: str, values: dict[str, Any]) -> Any:
    """The method's config dataclass from a plain dict (e.g. read from config.json)."""
    config_class = method_class(name).Config
    known = {f.name for f in dataclasses.fields(config_class)}
    unknown = set(values) - known
    if unknown:
        raise MetalearnError(f"{name} has no option(s) {', '.join(sorted(unknown))}; known: {', '.join(sorted(known))}")
    types = typing.get_type_hints(config_class)
    owner = f"{method_class(name).__name__}.Config"
    return config_class(**{key: _coerce(owner, key, value, types[key]) for key, value in values.items()})


def _coerce(owner: str, option: str, value: Any, expected: Any) -> Any:
    """``value`` as the option's declared type (bool, int, float or str), or a clear error:
    values from ``--set`` or a hand-edited config.json arrive as JSON or strings."""
    if expected is bool:
        if isinstance(value, str) and value.lower() in ("true", "false"):
            return value.lower() == "true"
        ok = isinstance(value, bool)
    elif expected is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif expected is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        value = float(value) if ok else value
    elif expected is str:
        ok = isinstance(value, str)
    else:
        ok = True
    if not ok:
        spelled = " (true or false)" if expected is bool else ""
        raise ConfigError(owner, option, f"must be {getattr(expected, '__name__', expected)}{spelled}, "
                                         f"got {value!r}")
    return value


def build_learner(name: str, values: dict[str, Any], problem: Problem) -> MetaLearner:
    """A ready-to-train method by name (a key of ``METHODS``), with its config given as a dict
    of option values (missing options take the ``Config``'s defaults, not the paper's: see
    :func:`metalearn.resolve_config` for those), built for ``problem``'s input shape and output
    size. The learner remembers ``problem`` (image size, channels, ways for
    :meth:`MetaLearner.task_batch`).

    Raises :class:`MetalearnError` for an unknown method or option name and for a value of the
    wrong type (a :class:`~metalearn.errors.ConfigError` naming the option), and whatever the
    method's ``build`` refuses (a classification-only method for a regression problem)."""
    learner = method_class(name).build(make_method_config(name, values), problem)
    learner.problem = problem  # the tasks it was built for: image size, channels, ways (MetaLearner.task_batch)
    return learner


__all__ = ["METHODS", "register_method", "MAML", "MAMLConfig", "MetaLearner", "Problem", "accuracy", "task_loss",
           "method_class", "build_learner", "make_method_config", "ProtoNet", "ProtoNetConfig",
           "MatchingNet", "MatchingNetConfig", "MemoryModule", "MemoryConfig", "NeuralStatistician",
           "StatisticianConfig", "MAMLRL", "MAMLRLConfig", "PLATIPUS", "PLATIPUSConfig", "Reptile", "ReptileConfig"]
