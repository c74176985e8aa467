"""Meta-learning methods, one per module, all on the :class:`MetaLearner` interface.

The code of a method is one module with a :class:`MetaLearner` subclass (its ``name``, its
``Config`` whose fields are declared with :func:`metalearn.options.option`), its import here and
one line in ``METHODS`` below; a method of your own is registered at run time with
:func:`register_method` instead. The trainer, the evaluator and every command of the CLI then
work for it unchanged. A method of the package is documented too (its page, its nav line, its
API entry, its module in the package map): "Adding a method" in ``docs/design.md`` lists each,
and ``tests/test_docs.py`` checks them.

What the built-in methods share is importable from here for a method of one's own:
:func:`check_task_batch`, :func:`check_network_fits`, :func:`check_embedding_fits` (the one-line
refusals of a malformed batch or a network that does not fit it), :func:`require_functional_model`,
:func:`embed_episodes` (one task per call, channels-last), :func:`num_ways`, :func:`task_loss` and
:func:`accuracy`.
"""

from __future__ import annotations

import dataclasses
import typing
from typing import Any

from metalearn.algorithms.base import (MetaLearner, accuracy, check_embedding_fits, check_network_fits,
                                      check_task_batch, embed_episodes, learner_network, num_ways,
                                      require_functional_model, task_loss)
from metalearn.algorithms.maml import MAML, MAMLConfig
from metalearn.algorithms.maml_rl import MAMLRL, MAMLRLConfig
from metalearn.algorithms.matchingnet import MatchingNet, MatchingNetConfig
from metalearn.algorithms.memory import MemoryConfig, MemoryModule
from metalearn.algorithms.platipus import PLATIPUS, PLATIPUSConfig
from metalearn.algorithms.protonet import ProtoNet, ProtoNetConfig
from metalearn.algorithms.reptile import Reptile, ReptileConfig
from metalearn.algorithms.statistician import NeuralStatistician, StatisticianConfig
from metalearn.errors import ConfigError, MetalearnError, first_line, size_overflow_in
from metalearn.options import is_command_name, plain_number
from metalearn.plugins import load_plugins, unknown_hint, registering
from metalearn.runtime import float32_default
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
BUILT_IN_METHODS = frozenset(METHODS)


def register_method(cls: type[MetaLearner]) -> type[MetaLearner]:
    """Make ``cls`` known under ``cls.name`` to configurations, the trainer and ``metalearn
    train``; usable as a class decorator. Returns ``cls``.

    A method of your own is one module: a :class:`MetaLearner` subclass with a ``name``, a
    ``Config`` class of its options (:func:`metalearn.options.options`, fields declared with
    :func:`metalearn.options.option`)
    and ``build``, ``meta_loss`` and ``predict``, registered with this function (see "Adding a
    method" in ``docs/design.md``). :func:`build_learner`, :func:`metalearn.resolve_config`, the
    trainer and, in a process that has registered it, the command line then take it by name;
    registered in a plugin's module (:mod:`metalearn.plugins`), every process does. A second
    registration under a name replaces the first; one that replaces a built-in method warns.

    Raises :class:`MetalearnError` when ``cls`` is not a :class:`MetaLearner` subclass, when its
    ``name`` is not a command-line name (lower-case letters, digits, ``-``, ``_``, ``+``), when
    it does not define ``build``, ``meta_loss`` and ``predict`` (``episode_scores`` for a
    reinforcement-learning method), when its ``Config`` is not a
    dataclass or has an option without a default, when an option shares its name with a task
    or training option (both would be one command-line flag), and when its ``legacy_defaults``
    name an option the ``Config`` lacks or a value it refuses."""
    if not (isinstance(cls, type) and issubclass(cls, MetaLearner)):
        raise MetalearnError(f"{cls!r} is not a MetaLearner subclass")
    name = getattr(cls, "name", None)
    if not is_command_name(name):
        raise MetalearnError(f"{cls.__name__}.name must be the method's command-line name: lower-case letters, "
                             f"digits, '-', '_' or '+' (e.g. 'support-mean'), got {name!r}")
    own = cls.__mro__[:cls.__mro__.index(MetaLearner)]  # the classes between cls and MetaLearner
    scoring = "episode_scores" if cls.reinforcement else "predict"  # a policy is scored by its returns
    missing = [m for m in ("build", "meta_loss", scoring) if not any(m in k.__dict__ for k in own)]
    if missing:
        raise MetalearnError(f"{cls.__name__} does not define {', '.join(missing)}: a method builds itself for a "
                             "problem, gives a meta-loss to train on and predicts query labels (a reinforcement-"
                             "learning method: scores its episodes)")
    if not dataclasses.is_dataclass(getattr(cls, "Config", None)):
        raise MetalearnError(f"{cls.__name__}.Config must be a dataclass of the method's options")
    required = [f.name for f in dataclasses.fields(cls.Config)
                if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
    if required:
        raise MetalearnError(f"{cls.__name__}.Config's option(s) {', '.join(required)} have no default: every "
                             "option needs one (option(default, \"help\"))")
    check_option_names(cls)
    check_option_kinds(cls)
    check_legacy_defaults(cls)
    registering("method", cls.name, BUILT_IN_METHODS, METHODS.get(cls.name) is cls)
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


def check_option_kinds(cls: type[MetaLearner]) -> None:
    """Refuse a method option of a type the command line and the checks cannot carry: an option
    is a bool, int, float or str, or one of them or None (a list would reach a run as the text
    of ``--name 2,3`` from the shell and as a list from Python: two runs of one setting)."""
    from metalearn.options import declared_types

    for name, kinds in declared_types(cls.Config).items():
        if not all(kind in (bool, int, float, str, type(None)) for kind in kinds):
            shown = " | ".join(getattr(kind, "__name__", None) if isinstance(kind, type) else str(kind)
                               for kind in kinds)
            raise MetalearnError(f"{cls.__name__}.Config's option {name} is declared {shown}: an option is a bool, "
                                 "int, float or str (or one of them or None); give a list as a str of comma-separated "
                                 "values, as --augment takes 'crop,flip', and split it in the method")


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


# What a method can do beyond MetaLearner's interface, shown by the methods it defines (the
# commands look for these, never for a method's name; "Adding a method" in docs/design.md):
ABILITIES: dict[str, tuple[str, ...]] = {
    # several models per task, ``sample_predictions(batch, num_samples)`` and, for new images,
    # ``sample_probabilities(support_x, support_y, query_x, num_samples, generator)``: --samples,
    # sampled functions in plot, coverage in compare, the spread in predict (PLATIPUS)
    "samples models": ("sample_predictions", "sample_probabilities"),
    # new examples of a class, ``sample(support_images, num, generator)`` (``num`` from 1 to
    # :data:`~metalearn.algorithms.base.MAX_SAMPLES`) and the batch's support
    # sets ``support_sets(batch)``: metalearn sample, plot's conditional samples (the statistician)
    "draws images": ("sample", "support_sets"),
}


def can(learner: MetaLearner | type[MetaLearner] | str, ability: str) -> bool:
    """Whether ``learner`` (a learner, its class or a method's name) has ``ability``, one of
    :data:`ABILITIES`: it defines every method the ability needs."""
    holder = method_class(learner) if isinstance(learner, str) else learner
    return all(callable(getattr(holder, attribute, None)) for attribute in ABILITIES[ability])


def methods_that(ability: str) -> str:
    """The registered methods with ``ability``, for a message (e.g. "platipus")."""
    return ", ".join(name for name, cls in METHODS.items() if can(cls, ability)) or "none registered"


def find_method(name: str) -> type[MetaLearner] | None:
    """The registered method called ``name``, the plugins loaded first (:mod:`metalearn.plugins`:
    a plugin may register a method, or replace a built-in one); None where none is."""
    load_plugins()  # once per process
    return METHODS.get(name)


def method_class(name: str) -> type[MetaLearner]:
    """The registered method called ``name`` (its ``name`` attribute, e.g. "protonet")."""
    if isinstance(name, type) and isinstance(getattr(name, "name", None), str):  # ProtoNet for "protonet"
        raise MetalearnError(f"a method is named by its text name: give {name.name!r}, not the class {name.__name__}")
    found = find_method(name) if isinstance(name, str) else None
    if found is None:
        raise MetalearnError(f"unknown method {name!r}; valid methods: {', '.join(METHODS)} ({unknown_hint()})")
    return found


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
    values from ``--set`` or a hand-edited config.json arrive as JSON or strings; a NumPy number
    (``np.int64(3)``, what arithmetic on arrays gives) as Python's, as every option takes it."""
    if expected in (int, float):
        value = plain_number(value, (expected,))
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


def build_learner(name: str, values: dict[str, Any] | Any | None, problem: Problem) -> MetaLearner:
    """A ready-to-train method by name (a key of ``METHODS``), with its config given as a dict
    of option values, as the method's ``Config`` or None (missing options take the ``Config``'s
    defaults, not the paper's: see
    :func:`metalearn.resolve_config` for those), built for ``problem``'s input shape and output
    size. The learner remembers ``problem`` (image size, channels, ways for
    :meth:`MetaLearner.task_batch`).

    Raises :class:`MetalearnError` for an unknown method or option name and for a value of the
    wrong type (a :class:`~metalearn.errors.ConfigError` naming the option), for sizes too large
    for torch's 64-bit size arithmetic, and whatever the method's ``build`` refuses (a
    classification-only method for a regression problem)."""
    config_class = method_class(name).Config
    if isinstance(values, config_class):  # a Config built already: its values, checked as a dict's are
        values = dataclasses.asdict(values)
    elif values is None:
        values = {}
    elif not isinstance(values, dict):
        raise MetalearnError(f"build_learner takes the options as a dict (or a {config_class.__name__}), got "
                             f"{type(values).__name__}")
    if not isinstance(problem, Problem):
        raise MetalearnError(f"build_learner takes a Problem (input_shape, output_dim, classification), got "
                             f"{type(problem).__name__}; e.g. Problem((1, 28, 28), 5, True)")
    # float32 weights whatever torch's default dtype (a notebook may have set float64): the tasks,
    # the checkpoints and the recorded results are float32
    with float32_default():
        config = make_method_config(name, values)
        try:
            learner = method_class(name).build(config, problem)
        except (RuntimeError, TypeError, OverflowError) as err:
            if size_overflow_in(err) is None:
                raise
            # 2**63 - 1 units or ways: torch's size arithmetic overflows inside a layer
            raise MetalearnError(f"{name}'s network is too large to build ({first_line(err)}): give smaller sizes "
                                 "(of its input, its output, its layers or its memory)") from None
    learner.problem = problem  # the tasks it was built for: image size, channels, ways (MetaLearner.task_batch)
    return learner


__all__ = ["METHODS", "register_method", "MAML", "MAMLConfig", "MetaLearner", "Problem", "accuracy", "task_loss",
           "method_class", "build_learner", "make_method_config", "ProtoNet", "ProtoNetConfig",
           "MatchingNet", "MatchingNetConfig", "MemoryModule", "MemoryConfig", "NeuralStatistician",
           "StatisticianConfig", "MAMLRL", "MAMLRLConfig", "PLATIPUS", "PLATIPUSConfig", "Reptile", "ReptileConfig",
           "check_task_batch", "check_network_fits", "check_embedding_fits", "require_functional_model",
           "embed_episodes", "num_ways", "learner_network"]
