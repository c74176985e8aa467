"""Declaring a configuration field once: its default and its help text, side by side.

Every option of a method (its ``Config`` dataclass) and of a run (``TaskConfig``,
``TrainConfig``) is declared with :func:`option`; the command line builds its flags from these
fields (``inner_lr`` -> ``--inner-lr`` with this help), so a new method needs no CLI edit.
:func:`options` makes the class a frozen dataclass whose values are checked against their
declared types when it is built::

    @options
    class Config:
        inner_lr: float = option(0.4, "step size of the inner-loop gradient steps (MAML's alpha)")
"""

from __future__ import annotations

import dataclasses
import numbers
import re
import types
import typing
from typing import Any

from metalearn.errors import ConfigError

_CHECKED = (bool, int, float, str, type(None))  # the declared types checked; others are the class's own affair


def options(cls: type) -> type:
    """``@dataclass(frozen=True)`` for a configuration class, whose ``__post_init__`` (if it
    has one) runs after :func:`check_option_types`: a value of the wrong type is refused by
    name before any check compares it (``first_order="false"`` would otherwise be a true value,
    ``steps=2.5`` trains 3 steps, ``ways="5"`` fails inside a comparison)."""
    own = cls.__dict__.get("__post_init__") or getattr(cls, "__post_init__", None)  # its own, else inherited

    def __post_init__(self) -> None:
        check_option_types(self)
        if own is not None:
            own(self)

    cls.__post_init__ = __post_init__
    return dataclasses.dataclass(frozen=True)(cls)


def declared_types(cls: type) -> dict[str, tuple[Any, ...]]:
    """Each field of the dataclass ``cls`` with the types its annotation allows (a union's
    members, ``int | None`` as ``(int, NoneType)``)."""
    hints = typing.get_type_hints(cls)
    return {field.name: (typing.get_args(hints[field.name]) if isinstance(hints[field.name], types.UnionType)
                         or typing.get_origin(hints[field.name]) is typing.Union else (hints[field.name],))
            for field in dataclasses.fields(cls)}


def check_option_types(config: Any) -> None:
    """Refuse a field whose value is not of its declared type, where that type is bool, int,
    float, str or a union of them with None (an int is a float; a bool is neither)."""
    declared = declared_types(type(config))
    for field in dataclasses.fields(config):
        allowed = declared[field.name]
        if not all(t in _CHECKED for t in allowed):
            continue
        value = getattr(config, field.name)
        value = plain_number(value, allowed)
        object.__setattr__(config, field.name, value)  # a NumPy number as the int or float it stands for
        if not any(_is(value, t) for t in allowed):
            names = " or ".join("None" if t is type(None) else t.__name__ for t in allowed)
            spelled = " (true or false)" if allowed == (bool,) else ""
            # a method's Config is named as its own checks name it (MAML.Config), others by their class
            owner = getattr(type(config), "owner_name", type(config).__name__)
            raise ConfigError(owner, field.name, f"must be {names}{spelled}, got {value!r}")


def plain_number(value: Any, allowed: tuple[type, ...]) -> Any:
    """A NumPy integer or float (``np.int64(5)``, what arithmetic on arrays gives) as Python's
    int or float where the field takes one: it compares, prints and saves to JSON as the user
    meant. Anything else as it is."""
    if isinstance(value, bool) or type(value) in (int, float):
        return value
    if int in allowed and isinstance(value, numbers.Integral):
        return int(value)
    if float in allowed and isinstance(value, numbers.Real):
        return float(value)
    return value


def _is(value: Any, expected: type) -> bool:
    if expected is type(None):
        return value is None
    if expected is bool:
        return isinstance(value, bool)
    if isinstance(value, bool):  # True is an int to Python, not a count or a rate to a user
        return False
    return isinstance(value, (int, float) if expected is float else expected)


# the words that turn down an option setting how much is held at once: those of the groups of
# the out-of-memory advice (cli.MEMORY_OPTIONS), which a method's option joins
MEMORY_WORDS = ("fewer", "a smaller", "a shorter")


def option(default: Any, help: str, aliases: tuple[str, ...] = (), training_only: bool = False,
           schedule_step: bool = False, memory: str = "") -> Any:
    """A dataclass field with ``default`` and the ``help`` the CLI shows for it; ``aliases``:
    other names of its flag (``("env",)`` gives ``--dataset`` the second name ``--env``).
    ``training_only``: the option acts only in meta-training (the meta-loss, the meta-update), so
    an evaluation refuses it as an override (``metalearn eval --set``) instead of scoring the run
    unchanged under its name. ``schedule_step``: the option is a meta-step of the training
    schedule where something happens (0: never); a run whose ``--steps`` end before it is warned.
    ``memory``: the option sets how much a meta-step holds at once, and these words turn it down
    ("fewer", "a smaller", "a shorter"): metalearn train's advice after running out of memory
    names it so."""
    if memory not in ("", *MEMORY_WORDS):
        raise ValueError(f"option(memory=...) takes {', '.join(map(repr, MEMORY_WORDS))}, got {memory!r}")
    return dataclasses.field(default=default, metadata={"help": help, "aliases": tuple(aliases),
                                                        "training_only": training_only,
                                                        "schedule_step": schedule_step, "memory": memory})


def is_command_name(name: object) -> bool:
    """Whether ``name`` can name a method, network, dataset or environment on the command line:
    lower-case letters, digits, ``-``, ``_`` or ``+``, beginning with a letter or digit."""
    return isinstance(name, str) and re.fullmatch(r"[a-z0-9][a-z0-9_+-]*", name) is not None


def option_defaults(config_class: type) -> dict[str, Any]:
    """Every option of ``config_class`` (a class made with :func:`options`) at its declared default."""
    return {field.name: field.default for field in dataclasses.fields(config_class)}


def help_of(field: dataclasses.Field) -> str:
    """The help text declared with :func:`option` ("" when none was)."""
    return field.metadata.get("help", "")
