"""Every knob of a run, as frozen dataclasses saved to ``config.json`` beside the checkpoint,
so that ``eval``, ``plot`` and ``--resume`` need no flags retyped."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from metalearn.errors import MetalearnError, require_number

DATASETS = ("omniglot", "sinusoid", "sine-or-line")
MAX_SEED = 2**62 - 1  # seeds plus their offsets (validation, test episodes) stay in torch's range


def check_dataset(name: str) -> None:
    """Refuse a dataset name that is none of :data:`DATASETS`, naming them."""
    if name not in DATASETS:
        raise MetalearnError(f"unknown dataset {name!r}; valid datasets: {', '.join(DATASETS)}")


@dataclass(frozen=True)
class TaskConfig:
    """Which tasks: dataset, split, and episode shape for training and for testing.

    For classification ``query`` is query examples per class; for regression ``shots`` is the
    number of support points (the paper's K) and ``query`` the number of query points.
    ``test_*`` default to the training values (ProtoNets, e.g., trains 60-way, tests 5-way).
    """

    dataset: str = "omniglot"
    split: str = "maml"
    ways: int = 5
    shots: int = 1
    query: int = 1
    test_ways: int | None = None
    test_shots: int | None = None
    test_query: int | None = None
    image_size: int = 28
    noise_std: float | None = None

    def __post_init__(self):
        check_dataset(self.dataset)
        # checked here, before any network is built for the shape (its head has `ways` outputs)
        if self.classification:
            for option, ways in (("--ways", self.ways), ("--test-ways", self.test_ways)):
                if ways is not None and ways < 2:
                    raise MetalearnError(f"{option} must be at least 2 (a task tells classes apart), got {ways}")
        if self.noise_std is not None:
            require_number("--noise-std", self.noise_std, zero_allowed=True)
        for option in ("shots", "query", "test_shots", "test_query"):
            value = getattr(self, option)
            if value is not None and value < 1:
                raise MetalearnError(f"--{option.replace('_', '-')} must be at least 1, got {value}")

    @property
    def classification(self) -> bool:
        return self.dataset == "omniglot"

    def for_testing(self) -> "TaskConfig":
        """The tasks of evaluation time: the test shape as the shape, no ``test_*`` left, so
        that two configurations tested on the same episodes compare equal."""
        return dataclasses.replace(
            self,
            ways=self.test_ways or self.ways,
            shots=self.test_shots or self.shots,
            query=self.test_query or self.query,
            test_ways=None, test_shots=None, test_query=None,
        )


@dataclass(frozen=True)
class TrainConfig:
    """The outer loop: ``steps`` meta-updates of ``meta_batch_size`` tasks with ``meta_optimizer``
    (adam, or sgd for plain steps such as Reptile's) at ``meta_lr``, halved every
    ``lr_halve_every`` steps when > 0 and/or annealed linearly to 0 (``lr_anneal="linear"``);
    everything seeded by ``seed``. ``init_from``: a run directory whose trained network (the
    method's ``model``) gives this run's initial weights instead of a random draw, e.g. the
    prior mean of PLATIPUS from a trained MAML run; the rest of the method starts afresh."""

    steps: int = 60000
    meta_batch_size: int = 32
    meta_lr: float = 1e-3
    meta_optimizer: str = "adam"
    lr_halve_every: int = 0
    lr_anneal: str = "none"
    seed: int = 0
    log_every: int = 50
    val_every: int = 1000
    val_episodes: int = 200
    checkpoint_every: int = 500
    eval_episodes: int = 600
    init_from: str = ""

    def __post_init__(self):
        if self.steps < 0:
            raise MetalearnError(f"--steps must be >= 0, got {self.steps}")
        if self.meta_batch_size < 1:
            raise MetalearnError(f"--meta-batch-size must be at least 1, got {self.meta_batch_size}")
        require_number("--meta-lr", self.meta_lr)
        for name in ("log_every", "checkpoint_every", "val_episodes", "eval_episodes"):
            if getattr(self, name) < 1:
                raise MetalearnError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        if self.val_every < 0:
            raise MetalearnError(f"--val-every must be >= 0 (0: no validation), got {self.val_every}")
        if self.lr_halve_every < 0:
            raise MetalearnError(f"--lr-halve-every must be >= 0 (0: never), got {self.lr_halve_every}")
        if not 0 <= self.seed <= MAX_SEED:
            raise MetalearnError(f"--seed must be between 0 and {MAX_SEED}, got {self.seed}")
        if self.meta_optimizer not in ("adam", "sgd"):
            raise MetalearnError(f"--meta-optimizer must be adam or sgd, got {self.meta_optimizer!r}")
        if self.lr_anneal not in ("none", "linear"):
            raise MetalearnError(f"--lr-anneal must be none or linear, got {self.lr_anneal!r}")


# Fields that may change when a run is resumed: they do not alter what was already computed.
RESUMABLE_CHANGES = {"train.steps", "train.log_every", "train.val_every", "train.checkpoint_every",
                     "train.eval_episodes", "train.val_episodes"}


@dataclass(frozen=True)
class RunConfig:
    """One run: the tasks, the method (its name and its own config as a dict) and training."""

    algorithm: str
    task: TaskConfig = field(default_factory=TaskConfig)
    algorithm_config: dict[str, Any] = field(default_factory=dict)
    train: TrainConfig = field(default_factory=TrainConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "RunConfig":
        try:
            return cls(
                algorithm=data["algorithm"],
                task=TaskConfig(**data["task"]),
                algorithm_config=dict(data["algorithm_config"]),
                train=TrainConfig(**data["train"]),
            )
        except (KeyError, TypeError) as err:
            raise MetalearnError(f"invalid run configuration ({err}); was it written by metalearn?") from None


def config_differences(old: RunConfig, new: RunConfig) -> dict[str, tuple[Any, Any]]:
    """Flattened ``{"train.steps": (old, new), ...}`` for every field that differs."""

    def flat(d: dict, prefix: str = "") -> dict[str, Any]:
        out = {}
        for key, value in d.items():
            name = f"{prefix}{key}"
            if isinstance(value, dict):
                out.update(flat(value, name + "."))
            else:
                out[name] = value
        return out

    a, b = flat(old.to_dict()), flat(new.to_dict())
    return {k: (a.get(k), b.get(k)) for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)}


def task_differences(a: TaskConfig, b: TaskConfig) -> str:
    """What differs between two task configurations, for a message: ``"shots 5 vs 10"``."""
    first, second = dataclasses.asdict(a), dataclasses.asdict(b)
    return ", ".join(f"{key} {first[key]} vs {second[key]}" for key in first if first[key] != second[key])
