"""TaskBatch: the one batch type every method consumes."""

from __future__ import annotations

import operator
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import Tensor

from metalearn.errors import MetalearnError, check_count, check_whole, kind_of


@dataclass(frozen=True)
class TaskBatch:
    """A batch of tasks, each tensor with a leading task axis.

    Classification (e.g. N-way K-shot Omniglot, C = 1; image folders, C = 3)::

        support_x: (tasks, ways*shots, C, H, W) float in [0, 1]
        support_y: (tasks, ways*shots)          long, class ids in [0, ways)
        query_x:   (tasks, ways*query, C, H, W)
        query_y:   (tasks, ways*query)          long (-1: unknown, for prediction only)

    Regression (e.g. sinusoids): ``x`` is ``(tasks, n, in_dim)`` and ``y`` is
    ``(tasks, n, out_dim)`` float, shaped like the model's output.

    ``task_params`` carries what generated each task (e.g. amplitude and phase of a sinusoid,
    each ``(tasks,)``) for plots and for measures against the true function; methods never
    read it. ``ways`` is the number of classes (0 for regression): a batch with ``ways`` takes
    integer labels, and one with float labels is refused (it would pass for regression, and a
    method would fit the class ids by squared error).
    """

    support_x: Tensor
    support_y: Tensor
    query_x: Tensor
    query_y: Tensor
    ways: int = 0
    task_params: dict[str, Tensor] = field(default_factory=dict)

    def __post_init__(self):
        # tensors first: the dtype checks below (and every method) read them as tensors, and a
        # NumPy array or a list would fail inside torch with a message about its arguments
        for name in ("support_x", "support_y", "query_x", "query_y"):
            value = getattr(self, name)
            if not isinstance(value, Tensor):
                raise MetalearnError(f"TaskBatch's {name} is a {kind_of(value)}; a TaskBatch holds tensors "
                                     "(torch.as_tensor(...), or torch.from_numpy(...) for a NumPy array)")
        if not isinstance(self.task_params, dict):
            raise MetalearnError(f"TaskBatch's task_params is a dict of name -> tensor (tasks, ...), got "
                                 f"{kind_of(self.task_params)}")
        check_whole("TaskBatch", ways=self.ways)
        if self.ways < 0:
            raise MetalearnError(f"TaskBatch's ways is the number of classes (0 for regression), got {self.ways}")
        floating = [name for name in ("support_y", "query_y") if torch.is_floating_point(getattr(self, name))]
        if self.ways and floating:
            raise MetalearnError(
                f"a classification TaskBatch (ways={self.ways}) takes integer class ids as labels, but "
                f"{' and '.join(floating)} {'are' if len(floating) > 1 else 'is'} {getattr(self, floating[0]).dtype}: "
                "give them as long (y.long()); TaskBatch.to(dtype) converts only the floating-point tensors")

    @property
    def num_tasks(self) -> int:
        """The number of tasks: the length of the leading axis."""
        return self.support_x.shape[0]

    @property
    def is_classification(self) -> bool:
        """Whether the labels are class ids (integer ``query_y``), not regression targets."""
        return not torch.is_floating_point(self.query_y)

    def to(self, device: torch.device | str | torch.dtype | None = None,
           dtype: torch.dtype | None = None) -> "TaskBatch":
        """This batch on ``device`` and/or with its floating-point tensors (inputs, regression
        targets, ``task_params``) in ``dtype``; integer class labels stay integers.
        ``batch.to("cuda")``, ``batch.to(torch.float64)`` and ``batch.to("cuda", torch.float64)``
        read as for a tensor."""
        if isinstance(device, torch.dtype):
            device, dtype = None, device
        if dtype is not None and not dtype.is_floating_point:
            raise MetalearnError(f"TaskBatch.to converts the floating-point tensors; {dtype} is not a floating-point type")

        def move(t: Tensor) -> Tensor:
            return t.to(device=device, dtype=dtype if torch.is_floating_point(t) else None)

        return TaskBatch(move(self.support_x), move(self.support_y), move(self.query_x), move(self.query_y),
                         self.ways, {k: move(v) for k, v in self.task_params.items()})

    def select(self, tasks: slice | Tensor) -> "TaskBatch":
        """The sub-batch of the given tasks (a slice or an index tensor)."""
        return TaskBatch(
            self.support_x[tasks],
            self.support_y[tasks],
            self.query_x[tasks],
            self.query_y[tasks],
            self.ways,
            {k: v[tasks] for k, v in self.task_params.items()},
        )

    def data_problem(self, first_task: int = 0) -> str | None:
        """What makes this batch's data unusable whatever the learner does, in words, or None: NaN
        or infinite values (``"NaN or infinite values in support_y (2 tasks, the first task 3)"``),
        else finite values whose squares overflow their dtype (beyond 1.8e19 in float32: ``"values
        too large to square: query_y (2 tasks, the first task 0) holds values as large as
        3e+30"``), each named in the first such tensor. A meta-loss or a score that is not finite
        on such data is the data's doing, not a learning rate's. ``first_task``: the number of
        this batch's first task in a larger one (a distributed rank's share). Tensors without a
        task axis (a malformed batch, which the learner refuses) are passed over. One pass over
        each floating-point tensor: its largest magnitude per task, NaN or infinite where the
        task holds such a value."""
        largest = []  # (name, (tasks,) largest magnitudes)
        for name in ("support_x", "support_y", "query_x", "query_y"):
            t = getattr(self, name)
            if isinstance(t, Tensor) and torch.is_floating_point(t) and t.dim() >= 1 and t.numel():
                largest.append((name, t.reshape(t.shape[0], -1).abs().amax(1)))
        for name, most in largest:
            if (where := _tasks_where(~most.isfinite(), first_task)) is not None:
                return f"NaN or infinite values in {name} ({where})"
        for name, most in largest:  # all finite: a square beyond the dtype's largest value overflows
            if (where := _tasks_where(most > torch.finfo(most.dtype).max ** 0.5, first_task)) is not None:
                return f"values too large to square: {name} ({where}) holds values as large as {float(most.max()):.2g}"
        return None


def _tasks_where(bad: Tensor, first_task: int) -> str | None:
    """``"2 tasks, the first task 3"`` for a per-task mask ``bad`` (True at tasks 3 and 5 of a
    batch whose first task is 0), None where it holds no True."""
    count = int(bad.sum())
    if not count:
        return None
    return f"{count} task{'s' if count > 1 else ''}, the first task {first_task + int(bad.nonzero()[0])}"


def data_fix(what: str) -> str | None:
    """What to do where a divergence record's ``what`` is the data's doing (the trainer's record
    of a batch that held NaN, infinite or overflowing values), which a smaller learning rate
    would not mend; None where it is not."""
    if "NaN or infinite values" in what:
        return "clean the data, or drop such examples"
    if "values too large to square" in what:
        return "rescale the data, or lower its noise"
    if "unusable data into another rank's share" in what:  # that rank's message says which of the two
        return "clean or rescale the data, as the message of the rank that drew it says"
    return None


@dataclass(frozen=True)
class Problem:
    """What a method must know of the tasks to build its network.

    input_shape: one example's shape, e.g. (1, 28, 28), (3, 84, 84) or (1,)
    output_dim:  classes per task (ways) for classification, target size for regression
    classification: whether targets are class ids
    prepare:        how new images become inputs like the training ones (the dataset's; see
                    :class:`metalearn.datasets.Dataset`)
    """

    input_shape: tuple[int, ...]
    output_dim: int
    classification: bool
    # how new images (files, PIL images, tensors) become inputs like the training ones:
    # ``prepare(images, image_size, channels)``; None: metalearn.data.images.prepare_images
    prepare: Callable[[Any, int, int], Tensor] | None = field(default=None, compare=False, repr=False)

    def __post_init__(self):
        try:  # a list or NumPy integers as the tuple of ints it stands for
            shape = tuple(operator.index(n) for n in self.input_shape if not isinstance(n, bool))
        except TypeError:
            shape = ()
        if not shape or len(shape) != len(self.input_shape) or min(shape) < 1:
            raise MetalearnError(f"Problem.input_shape is one example's shape, sizes of at least 1 "
                                 f"(e.g. (1, 28, 28)), got {self.input_shape!r}")
        object.__setattr__(self, "input_shape", shape)
        least = 2 if self.classification else 1
        what = "classes per task (at least 2)" if self.classification else "the target's size (at least 1)"
        object.__setattr__(self, "output_dim", check_count(self.output_dim, "Problem.output_dim", least,
                                                           message="{name} is " + what + ", got {value!r}"))


def check_dtype(owner: str, what: str, dtype: Any) -> None:
    """A task source's ``dtype``, the floating-point type it draws ``what`` as ("images"), or a
    one-line refusal (an integer type would truncate them, and torch's own error comes later)."""
    if not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise MetalearnError(f"{owner} draws {what} as floats: dtype must be a floating-point type, got {dtype!r}")


def check_draw(owner: str, num_tasks: Any, generator: Any) -> None:
    """The arguments of a task source's ``sample``: at least one task, drawn from a
    ``torch.Generator`` (the seed is what makes a draw repeatable)."""
    check_whole(f"{owner}.sample", num_tasks=num_tasks)
    if num_tasks < 1:
        raise MetalearnError(f"{owner}.sample draws at least one task, got num_tasks={num_tasks}")
    if not isinstance(generator, torch.Generator):
        raise MetalearnError(f"{owner}.sample draws from a torch.Generator, e.g. torch.Generator().manual_seed(0), "
                             f"got {kind_of(generator)}")
