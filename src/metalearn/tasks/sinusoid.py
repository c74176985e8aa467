"""Regression tasks: sinusoids (MAML, Finn et al. 2017, section 5.1) and the ambiguous
sinusoid-or-line mixture of Probabilistic MAML (Finn, Xu & Levine 2018, section 6)."""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from metalearn.errors import MetalearnError, OptionError
from metalearn.tasks.batch import TaskBatch, check_draw, check_dtype, check_whole


# the random draws are float32 whatever torch's default dtype (a notebook's float64 would draw other
# numbers from the same seed) and whatever the source's dtype: a float64 source draws the float32
# source's tasks, cast, and computes its targets from them in float64
DRAW_DTYPE = torch.float32


def _uniform(shape, bounds, generator, dtype: torch.dtype) -> Tensor:
    low, high = bounds
    return (torch.rand(shape, generator=generator, dtype=DRAW_DTYPE) * (high - low) + low).to(dtype)


def _noise(shape, std: float, generator, dtype: torch.dtype) -> Tensor:
    return torch.randn(shape, generator=generator, dtype=DRAW_DTYPE).to(dtype) * std


def _check_counts(source: Any) -> None:
    """A regression task source's counts and noise, refused in one line: torch would fail on a
    float count in a draw, and a negative noise scale flips the noise's sign unnoticed."""
    check_whole(type(source).__name__, shots=source.shots, query=source.query)
    if source.shots < 1 or source.query < 1:
        raise OptionError(f"{{shots}} and {{query}} must be at least 1, got {source.shots} and {source.query}",
                          shots="shots", query="query")
    noise = source.noise_std
    if isinstance(noise, bool) or not isinstance(noise, numbers.Real) or not (math.isfinite(noise) and noise >= 0):
        raise MetalearnError(f"{type(source).__name__}'s noise_std is a standard deviation, 0 or more, got "
                             f"{source.noise_std!r}")
    object.__setattr__(source, "noise_std", float(noise))  # a NumPy or Fraction scale multiplies tensors as a float
    check_dtype(type(source).__name__, "inputs and targets", source.dtype)


@dataclass(frozen=True)
class SinusoidTasks:
    """y = amplitude * sin(x - phase), amplitude ~ U[0.1, 5], phase ~ U[0, pi], x ~ U[-5, 5].

    ``shots`` support points (the paper's K) and ``query`` query points per task; x and y are
    ``(tasks, n, 1)``. ``amplitude``, ``phase`` and ``x_range`` are the ``(low, high)`` bounds
    of the uniform draws; ``noise_std`` is the standard deviation of Gaussian noise added to
    every target (0: none, as in the paper). ``task_params`` holds ``amplitude``, ``phase``
    (each ``(tasks,)``). ``dtype`` (keyword only): the floating-point type of x, y and
    ``task_params`` (``torch.float64`` for a float64 model). The random draws are float32 whatever
    ``dtype`` and torch's default dtype: a float64 source draws, from the same generator state,
    the float32 source's amplitudes, phases, x and standard-normal noise, cast, and computes y
    from them (the noise scaled by ``noise_std``) in float64. Raises :class:`MetalearnError` when
    ``shots`` or ``query`` is below 1 or ``dtype`` is not a floating-point type.
    """

    shots: int = 5
    query: int = 10
    amplitude: tuple[float, float] = (0.1, 5.0)
    phase: tuple[float, float] = (0.0, math.pi)
    x_range: tuple[float, float] = (-5.0, 5.0)
    noise_std: float = 0.0
    dtype: torch.dtype = field(default=torch.float32, kw_only=True)

    def __post_init__(self):
        _check_counts(self)

    def sample(self, num_tasks: int, generator: torch.Generator, tasks: slice | None = None) -> TaskBatch:
        """``num_tasks`` new tasks drawn from ``generator`` alone (the same generator state gives
        the same tasks), as a regression :class:`TaskBatch` (``ways`` 0). ``tasks``: return only
        that slice of them, drawn as the whole batch would be, so that a meta-batch split into
        chunks sees the tasks of the unsplit one."""
        check_draw(type(self).__name__, num_tasks, generator)
        amplitude = _uniform((num_tasks,), self.amplitude, generator, self.dtype)
        phase = _uniform((num_tasks,), self.phase, generator, self.dtype)
        x = _uniform((num_tasks, self.shots + self.query, 1), self.x_range, generator, self.dtype)
        noise = _noise(x.shape, self.noise_std, generator, self.dtype)
        params = {"amplitude": amplitude, "phase": phase}
        return _split(x, self.function(params, x) + noise, params, self.shots, tasks)

    @staticmethod
    def function(params: dict[str, Tensor], x: Tensor) -> Tensor:
        """The noiseless task functions at x (tasks, n, 1)."""
        return params["amplitude"][:, None, None] * torch.sin(x - params["phase"][:, None, None])


@dataclass(frozen=True)
class SineOrLineTasks:
    """Ambiguous regression: each task is a sinusoid (as :class:`SinusoidTasks`) or a line
    y = slope * x + intercept (slope, intercept ~ U[-3, 3]) with equal probability, observed
    through Gaussian noise of standard deviation ``noise_std``. ``shots``, ``query``,
    ``amplitude``, ``phase`` and ``x_range`` are as for :class:`SinusoidTasks`; ``slope`` and
    ``intercept`` are the ``(low, high)`` bounds of the lines' draws. ``task_params``:
    ``is_line`` (0/1), ``amplitude``, ``phase``, ``slope``, ``intercept``, each ``(tasks,)``.
    ``dtype`` (keyword only) is as for :class:`SinusoidTasks`: the type of x, y and
    ``task_params``, with the random draws float32 and cast. Raises :class:`MetalearnError`
    when ``shots`` or ``query`` is below 1 or ``dtype`` is not a floating-point type."""

    shots: int = 5
    query: int = 10
    amplitude: tuple[float, float] = (0.1, 5.0)
    phase: tuple[float, float] = (0.0, math.pi)
    slope: tuple[float, float] = (-3.0, 3.0)
    intercept: tuple[float, float] = (-3.0, 3.0)
    x_range: tuple[float, float] = (-5.0, 5.0)
    noise_std: float = 0.3
    dtype: torch.dtype = field(default=torch.float32, kw_only=True)

    def __post_init__(self):
        _check_counts(self)

    def sample(self, num_tasks: int, generator: torch.Generator, tasks: slice | None = None) -> TaskBatch:
        """``num_tasks`` new tasks, half lines and half sinusoids in expectation, as
        :meth:`SinusoidTasks.sample` draws them (``generator`` alone decides; ``tasks`` a slice
        of the whole batch)."""
        check_draw(type(self).__name__, num_tasks, generator)
        params = {
            "is_line": (torch.rand(num_tasks, generator=generator, dtype=DRAW_DTYPE) < 0.5).to(self.dtype),
            "amplitude": _uniform((num_tasks,), self.amplitude, generator, self.dtype),
            "phase": _uniform((num_tasks,), self.phase, generator, self.dtype),
            "slope": _uniform((num_tasks,), self.slope, generator, self.dtype),
            "intercept": _uniform((num_tasks,), self.intercept, generator, self.dtype),
        }
        x = _uniform((num_tasks, self.shots + self.query, 1), self.x_range, generator, self.dtype)
        noise = _noise(x.shape, self.noise_std, generator, self.dtype)
        return _split(x, self.function(params, x) + noise, params, self.shots, tasks)

    @staticmethod
    def function(params: dict[str, Tensor], x: Tensor) -> Tensor:
        """The noiseless task functions at x (tasks, n, 1): the line where ``is_line`` is 1,
        else the sinusoid."""
        sine = params["amplitude"][:, None, None] * torch.sin(x - params["phase"][:, None, None])
        line = params["slope"][:, None, None] * x + params["intercept"][:, None, None]
        is_line = params["is_line"][:, None, None]
        return is_line * line + (1 - is_line) * sine


def _split(x: Tensor, y: Tensor, params: dict[str, Tensor], shots: int, tasks: slice | None) -> TaskBatch:
    batch = TaskBatch(x[:, :shots], y[:, :shots], x[:, shots:], y[:, shots:], 0, params)
    return batch if tasks is None else batch.select(tasks)
