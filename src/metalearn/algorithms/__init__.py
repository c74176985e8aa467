"""Meta-learning methods, one per module, all on the :class:`MetaLearner` interface."""

from __future__ import annotations

import dataclasses
import typing
from typing import Any

from metalearn.algorithms.base import MetaLearner, accuracy, task_loss
from metalearn.algorithms.maml import MAML, MAMLConfig
from metalearn.algorithms.matchingnet import MatchingNet, MatchingNetConfig
from metalearn.algorithms.platipus import PLATIPUS, PLATIPUSConfig
from metalearn.algorithms.protonet import ProtoNet, ProtoNetConfig
from metalearn.algorithms.reptile import Reptile, ReptileConfig
from metalearn.algorithms.statistician import NeuralStatistician, StatisticianConfig
from metalearn.errors import MetalearnError
from metalearn.tasks.batch import Problem

ALGORITHMS: dict[str, type[MetaLearner]] = {cls.name: cls for cls in (MAML, ProtoNet, MatchingNet, PLATIPUS, Reptile,
                                                                   NeuralStatistician)}


def algorithm_class(name: str) -> type[MetaLearner]:
    if name not in ALGORITHMS:
        raise MetalearnError(f"unknown algorithm {name!r}; valid algorithms: {', '.join(ALGORITHMS)}")
    return ALGORITHMS[name]


def make_algorithm_config(name: str, values: dict[str, Any]) -> Any:
    """The algorithm's config dataclass from a plain dict (e.g. read from config.json)."""
    config_class = algorithm_class(name).Config
    known = {f.name for f in dataclasses.fields(config_class)}
    unknown = set(values) - known
    if unknown:
        raise MetalearnError(f"{name} has no option(s) {', '.join(sorted(unknown))}; known: {', '.join(sorted(known))}")
    types = typing.get_type_hints(config_class)
    return config_class(**{key: _coerce(name, key, value, types[key]) for key, value in values.items()})


def _coerce(algorithm: str, option: str, value: Any, expected: Any) -> Any:
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
        raise MetalearnError(f"{algorithm} option {option} must be {getattr(expected, '__name__', expected)}"
                             f"{spelled}, got {value!r}")
    return value


def build_learner(name: str, values: dict[str, Any], problem: Problem) -> MetaLearner:
    """A ready-to-train method by name, with its config given as a dict."""
    return algorithm_class(name).build(make_algorithm_config(name, values), problem)


__all__ = ["ALGORITHMS", "MAML", "MAMLConfig", "MetaLearner", "Problem", "accuracy", "task_loss",
           "algorithm_class", "build_learner", "make_algorithm_config", "ProtoNet", "ProtoNetConfig",
           "MatchingNet", "MatchingNetConfig", "PLATIPUS", "PLATIPUSConfig", "Reptile", "ReptileConfig",
           "NeuralStatistician", "StatisticianConfig"]
