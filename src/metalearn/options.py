"""Declaring a configuration field once: its default and its help text, side by side.

Every option of a method (its ``Config`` dataclass) and of a run (``TaskConfig``,
``TrainConfig``) is declared with :func:`option`; the command line builds its flags from these
fields (``inner_lr`` -> ``--inner-lr`` with this help), so a new method needs no CLI edit::

    @dataclass(frozen=True)
    class Config:
        inner_lr: float = option(0.4, "step size of the inner-loop gradient steps (MAML's alpha)")
"""

from __future__ import annotations

import dataclasses
from typing import Any


def option(default: Any, help: str, aliases: tuple[str, ...] = ()) -> Any:
    """A dataclass field with ``default`` and the ``help`` the CLI shows for it; ``aliases``:
    other names of its flag (``("env",)`` gives ``--dataset`` the second name ``--env``)."""
    return dataclasses.field(default=default, metadata={"help": help, "aliases": tuple(aliases)})


def help_of(field: dataclasses.Field) -> str:
    """The help text declared with :func:`option` ("" when none was)."""
    return field.metadata.get("help", "")
