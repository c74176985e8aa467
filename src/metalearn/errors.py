"""The one exception type users see.

Anything the user can fix (a missing data directory, an impossible episode, a checkpoint from
another configuration, a diverging loss) is raised as :class:`MetalearnError` with a message
that says what is wrong and what to do. The CLI prints the message and exits non-zero instead
of showing a traceback from deep inside torch.
"""


import math
import re
from typing import Callable

FLOAT32_MAX = 3.4028234663852886e38  # the networks compute in float32: a larger value overflows


class MetalearnError(Exception):
    """A problem the user can act on; its message is shown as is."""


class MetalearnWarning(UserWarning):
    """Something the user may want to change, though the run can go on (a learning-rate
    schedule that ends far below a useful rate); the CLI shows it as one ``warning:`` line."""


def require_number(value: float, owner: str, field: str, *, zero_allowed: bool = False) -> None:
    """Refuse a learning rate, scale or standard deviation that is not a finite number above 0
    (at least 0 with ``zero_allowed``): NaN, infinity or a value beyond float32 would only
    surface later as a NaN loss whose message blames something else."""
    ok = isinstance(value, (int, float)) and math.isfinite(value) and abs(value) <= FLOAT32_MAX
    if not ok or not (value >= 0 if zero_allowed else value > 0):
        bound = ">= 0" if zero_allowed else "> 0"
        beyond = isinstance(value, (int, float)) and math.isfinite(value) and abs(value) > FLOAT32_MAX
        limit = f" and at most {FLOAT32_MAX:.4g} (float32's largest)" if beyond else ""
        raise ConfigError(owner, field, f"must be a finite number {bound}{limit}, got {value}")


class ConfigError(MetalearnError):
    """An option value a config refuses. The library's message names the field
    (``MAML.Config.inner_lr must be > 0, got -1``); the CLI shows the same problem with the flag
    (``--inner-lr must be > 0, got -1``) through :meth:`with_flags`, its one field-to-flag mapping.

    ``problem`` is the rest of the sentence; other fields it mentions are written in backticks
    (``"must be at most `memory_size` (8192)"``) and are named the same way in either form; a
    field of another config is written with its owner (```MAMLRL.Config.outer```), which the
    command line spells as the flag alone (``--outer``)."""

    def __init__(self, owner: str, field: str | tuple[str, ...], problem: str):
        self.owner, self.problem = owner, problem
        self.settings: frozenset[str] = frozenset()  # fields given as `--set NAME=VALUE`, not as their flags
        self.fields = (field,) if isinstance(field, str) else tuple(field)
        self.field = self.fields[0]
        super().__init__(self.render(lambda name, of=owner: f"{of}.{name}" if of else name))

    def render(self, name: Callable[..., str]) -> str:
        """The message with every field named by ``name(field)``, or ``name(field, owner)`` for a
        field of another config."""
        def mentioned(match: re.Match) -> str:
            owner, _, field = match.group(1).rpartition(".")
            return name(field, owner) if owner else name(field)

        text = re.sub(r"`([A-Za-z_][A-Za-z0-9_.]*)`", mentioned, self.problem)
        return f"{', '.join(name(field) for field in self.fields)} {text}"

    def with_flags(self) -> str:
        """The message as the command line spells options: ``--inner-lr must be > 0, got -1``, or
        for a field of :attr:`settings` (an evaluation's ``--set``) ``--set inner_lr``."""
        return self.render(lambda name, owner="": f"--set {name}" if name in self.settings else flag(name, owner))


def kind_of(value: object) -> str:
    """``value``'s type as a reader knows it, for a message that refuses it: ``list``,
    ``numpy.ndarray``, ``torch.utils.data.dataloader.DataLoader``."""
    module, name = type(value).__module__, type(value).__qualname__
    return name if module == "builtins" else f"{module}.{name}"


def flag(field: str, owner: str = "") -> str:
    """The command-line spelling of a config field (of any owner): ``inner_lr`` -> ``--inner-lr``."""
    return "--" + field.replace("_", "-")


TIME_LIMIT_EXIT = 75  # sysexits' EX_TEMPFAIL: not finished, try again later (with --resume)


class TrainingStopped(MetalearnError):
    """Training stopped on request (Ctrl-C or SIGTERM), at its time limit or at its ``--stop-at``
    step after saving a checkpoint of its last step; ``exit_code`` is the shell's for that signal
    (130, 143), :data:`TIME_LIMIT_EXIT` (75) for the time limit, 0 for ``--stop-at``."""

    def __init__(self, message: str, exit_code: int):
        super().__init__(message)
        self.exit_code = exit_code
