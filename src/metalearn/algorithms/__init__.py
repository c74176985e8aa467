"""Meta-learning methods, one per module, all on the :class:`MetaLearner` interface."""

from __future__ import annotations

import dataclasses
from typing import Any

from metalearn.algorithms.base import MetaLearner, accuracy, task_loss
from metalearn.algorithms.maml import MAML, MAMLConfig
from metalearn.algorithms.matchingnet import MatchingNet, MatchingNetConfig
from metalearn.algorithms.platipus import PLATIPUS, PLATIPUSConfig
from metalearn.algorithms.protonet import ProtoNet, ProtoNetConfig
from metalearn.algorithms.reptile import Reptile, ReptileConfig
from metalearn.errors import MetalearnError
from metalearn.tasks.batch import Problem

ALGORITHMS: dict[str, type[MetaLearner]] = {cls.name: cls for cls in (MAML, ProtoNet, MatchingNet, PLATIPUS, Reptile)}


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
    return config_class(**values)


def build_learner(name: str, values: dict[str, Any], problem: Problem) -> MetaLearner:
    """A ready-to-train method by name, with its config given as a dict."""
    return algorithm_class(name).build(make_algorithm_config(name, values), problem)


__all__ = ["ALGORITHMS", "MAML", "MAMLConfig", "MetaLearner", "Problem", "accuracy", "task_loss",
           "algorithm_class", "build_learner", "make_algorithm_config", "ProtoNet", "ProtoNetConfig",
           "MatchingNet", "MatchingNetConfig", "PLATIPUS", "PLATIPUSConfig", "Reptile", "ReptileConfig"]
