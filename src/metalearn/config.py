"""Every knob of a run, as frozen dataclasses saved to ``config.json`` beside the checkpoint,
so that ``eval``, ``plot`` and ``--resume`` need no flags retyped."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from metalearn.errors import FLOAT32_TINY, ConfigError, MetalearnError, require_number
from metalearn.datasets import get_dataset
from metalearn.options import option, options

MAX_SEED = 2**62 - 1  # seeds plus their offsets (validation, test episodes) stay in torch's range
# the most episodes one evaluation or validation scores: each episode's scores are held for the
# interval and the episodes are drawn a few thousand a second at best, so ten million is hours of
# scoring, and a typed extra digit or two would otherwise run for days while its memory grows
# (the papers' intervals come from 600 to 10,000 episodes)
MAX_EPISODES = 10_000_000


@options
class TaskConfig:
    """Which tasks: dataset, split, and episode shape for training and for testing.

    For classification ``query`` is query examples per class; for regression ``shots`` is the
    number of support points (the paper's K) and ``query`` the number of query points.
    ``test_*`` default to the training values (ProtoNets, e.g., trains 60-way, tests 5-way).
    """

    dataset: str = option("omniglot", "omniglot, folder (your own class folders, --data-dir), mini-imagenet, "
                                      "sinusoid or sine-or-line (default omniglot); for maml-rl an environment, "
                                      "also named --env: nav2d (its default), cheetah-vel or cheetah-dir",
                          aliases=("env",))
    split: str = option("maml", "omniglot's class split: maml, vinyals, vinyals-trainval (vinyals' train and val "
                                "classes together, no validation) or lake (default maml)")
    ways: int = option(5, "classes per task (default 5; classification only)")
    shots: int = option(1, "support examples per class, or support points K for regression "
                           "(default 1; 5 for regression)")
    query: int = option(1, "query examples per class, or query points for regression (default: as many as "
                           "--shots, unless the dataset or method sets its own: see --print-config)")
    test_ways: int | None = option(None, "classes per test and validation task (default: --ways)")
    test_shots: int | None = option(None, "support examples per class in test and validation tasks (default: --shots)")
    test_query: int | None = option(None, "query examples per class in test and validation tasks (default: "
                                          "--query; 100 points for regression)")
    image_size: int = option(28, "images are resized to this many pixels square (default 28; 84 for folder and "
                                 "mini-imagenet)")
    channels: int = option(1, "colour channels the images are converted to: 1 (grey) or 3 (RGB) (default 1; 3 "
                              "for folder and mini-imagenet)")
    split_fractions: str = option("", "train,val,test fractions of an image folder's classes, split by a seeded "
                                      "shuffle (default 0.64,0.16,0.2; refused where the folder's train/ val/ "
                                      "test/ folders or CSV files set the split)")
    split_file: str = option("", 'a JSON file {"train": [class, ...], "val": [...], "test": [...]} that splits '
                                 "an image folder's classes (default: --split-fractions)")
    noise_std: float | None = option(None, "standard deviation of the noise on regression targets (default 0 for "
                                           "sinusoid, 0.3 for sine-or-line)")
    augment: str = option("", "random changes to each training image, comma-separated parts: crop (a random "
                              "crop after zero padding a tenth of the side), flip (horizontal, half of the "
                              "images), color (brightness, contrast and saturation jitter of 0.4); e.g. "
                              "crop,flip,color (default none: \"\" or none; training episodes only, never validation or test)")

    def __post_init__(self):
        get_dataset(self.dataset)  # a known name
        if self.split_fractions and self.split_file:  # two splits of one folder: which one is meant?
            raise ConfigError("TaskConfig", ("split_fractions", "split_file"), "both split the classes; give one of them")
        if isinstance(self.split_file, str) and self.split_file and not self.split_file.strip():
            # "" is none; a blank name would be read as a file in the current folder
            raise ConfigError("TaskConfig", "split_file", f'is blank (give a JSON file, or "" for none), got '
                                                          f"{self.split_file!r}")
        if self.split_file:  # as an absolute path: a resume, eval or plot from another folder finds it
            object.__setattr__(self, "split_file", str(Path(self.split_file).expanduser().absolute()))
        # checked here, before any network is built for the shape (its head has `ways` outputs)
        if self.classification:
            for name in ("ways", "test_ways"):
                ways = getattr(self, name)
                if ways is not None and ways < 2:
                    raise ConfigError("TaskConfig", name, f"must be at least 2 (a task tells classes apart), got {ways}")
        if isinstance(self.image_size, int) and self.image_size < 4:
            raise ConfigError("TaskConfig", "image_size", f"must be at least 4 pixels, got {self.image_size}")
        if self.channels not in (1, 3):
            raise ConfigError("TaskConfig", "channels", f"must be 1 (grey) or 3 (RGB), got {self.channels}")
        if self.noise_std is not None:
            require_number(self.noise_std, "TaskConfig", "noise_std", zero_allowed=True)
        for name in ("shots", "query", "test_shots", "test_query"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ConfigError("TaskConfig", name, f"must be at least 1, got {value}")
        # in the order they apply, whatever the order given: "flip,crop" and "crop,flip" are one run
        object.__setattr__(self, "augment", ",".join(augment_parts(self.augment)))

    @property
    def classification(self) -> bool:
        """Whether the dataset's tasks are classification (class labels), not regression or MDPs."""
        return get_dataset(self.dataset).classification

    def for_testing(self) -> "TaskConfig":
        """The tasks of evaluation time: the test shape as the shape, no ``test_*`` left, so
        that two configurations tested on the same episodes compare equal."""
        return dataclasses.replace(
            self,
            ways=self.test_ways or self.ways,
            shots=self.test_shots or self.shots,
            query=self.test_query or self.query,
            test_ways=None, test_shots=None, test_query=None,
            augment="",  # evaluation episodes are never augmented
        )


# the parts of TaskConfig.augment, in the order they apply to an image (crop and flip move pixels,
# colour changes their values); see metalearn.tasks.episodes.Augmentation
AUGMENT_PARTS = ("crop", "flip", "color")


def augment_parts(value: str, owner: str = "TaskConfig", field: str = "augment") -> tuple[str, ...]:
    """The parts a ``--augment`` value names, in :data:`AUGMENT_PARTS` order (none for ""); an
    unknown part, a part named twice or an empty one between commas is refused in one line
    naming the parts there are."""
    if not isinstance(value, str):
        raise ConfigError(owner, field, f"takes parts among crop, flip and color as one string, comma-separated "
                                        f"(e.g. \"crop,flip,color\"; \"\" for none), got {value!r}")
    text = value.strip()
    given = [part.strip() for part in text.split(",")] if text and text != "none" else []  # "none": the default
    problem = next((f"unknown part {part!r}" for part in given if part and part not in AUGMENT_PARTS), None)
    problem = problem or next((f"{part!r} given twice" for i, part in enumerate(given) if part in given[:i]), None)
    problem = problem or ("an empty part between commas" if "" in given else None)
    if problem:
        raise ConfigError(owner, field, f"takes parts among crop, flip and color, comma-separated, each at most once "
                                        f"(e.g. crop,flip,color; empty for none), got {value!r}: {problem}")
    return tuple(part for part in AUGMENT_PARTS if part in given)


def sets_task_option(name: str, value) -> bool:
    """Whether a task option given as ``value`` asks for something: neither left out (None) nor
    the option's word for none ("" for the text options; "none" too for ``augment``). A dataset
    refuses only what asks for something it cannot do, so ``--augment none`` passes everywhere."""
    if value is None or value == "":
        return False
    if name == "augment":
        try:
            return bool(augment_parts(value))  # "none", "  ": no part
        except ConfigError:  # a bad value asks for something all the same: refused where it cannot apply
            return True
    return True


# the commands whose --ways/--shots/--query replace a run's test episode shape (train's --test-*):
# named beside the train options in the errors about that shape
TEST_SHAPE_COMMANDS = "metalearn eval and compare"
# those options as an evaluation's own errors name them (it has no --test-*), from Python (evaluate_run's and
# compare_learners' episode_shape) and on the command line, as errors.Options takes an option
EVALUATION_SHAPE = {key: (f"episode_shape's {key}", f"--{key}") for key in ("ways", "shots", "query")}


LOG_EVERY = 50  # steps between metrics lines where the user sets none, for runs of 500 steps or more


def default_log_every(steps: int) -> int:
    """The steps between metrics lines of a run of ``steps`` that sets none: ``LOG_EVERY``, or a
    tenth of a shorter run (at least 1), so that its learning curve has about ten points, not one."""
    return min(LOG_EVERY, max(1, steps // 10))


@options
class TrainConfig:
    """The outer loop: ``steps`` meta-updates of ``meta_batch_size`` tasks with ``meta_optimizer``
    (adam, or sgd for plain steps such as Reptile's) at ``meta_lr``, halved every
    ``lr_halve_every`` steps when > 0 and/or annealed linearly to 0 (``lr_anneal="linear"``);
    everything seeded by ``seed``; each element of the meta-gradient clipped to ``grad_clip`` when
    > 0 (the Neural Statistician's re-implementation does). ``init_from``: a run directory whose trained network (the
    method's ``model``) gives this run's initial weights instead of a random draw, e.g. the
    prior mean of PLATIPUS from a trained MAML run; the rest of the method starts afresh."""

    steps: int = option(60000, "meta-updates to train for")
    meta_batch_size: int = option(32, "tasks per meta-update")
    meta_lr: float = option(1e-3, "the meta-optimiser's learning rate (MAML's beta)")
    meta_optimizer: str = option("adam", "the meta-optimiser: adam or sgd")
    lr_halve_every: int = option(0, "halve the meta learning rate every this many steps (0: never)")
    lr_anneal: str = option("none", "none; linear: the meta learning rate falls linearly to 0 over --steps "
                                    "(Reptile); cosine: it follows half a cosine down to --min-meta-lr over "
                                    "--steps (MAML++)")
    min_meta_lr: float = option(0.0, "with --lr-anneal cosine: the meta learning rate at the last step")
    grad_clip: float = option(0.0, "clip every element of the meta-gradient to [-v, v] before the meta-optimiser's "
                                   "step (0: no clipping)")
    seed: int = option(0, "seeds the initial weights and every task drawn; the same seed repeats a run exactly "
                          "on the same machine and versions with the same torch threads (OMP_NUM_THREADS) and "
                          "--task-chunk")
    # None: resolved by steps (default_log_every) when the config is built, so a saved or resumed
    # run holds the number it logged by
    log_every: int | None = option(None, f"steps between lines of metrics.jsonl ({LOG_EVERY}, or a tenth of a run "
                                         f"under {10 * LOG_EVERY} steps; a resumed run keeps its own, or where that was the "
                                         "default of its length and --steps extends it, takes the new length's)")
    val_every: int = option(1000, "steps between validations on the validation split (0: none)")
    val_episodes: int = option(200, "episodes per validation")
    checkpoint_every: int = option(500, "steps between checkpoints (one is also written at the end and on Ctrl-C)")
    eval_episodes: int = option(600, "test episodes of the evaluation after training")
    keep_best: int = option(0, "keep the checkpoints of this many best validations in best/, for eval --ensemble "
                               "(MAML++'s model selection; 0: none)")
    init_from: str = option("", "a trained run directory whose network gives the initial weights (default none)")
    # `str | int`: the command line reads it as text ("auto" or a number), normalised below
    task_chunk: str | int = option(0, "tasks per forward and backward pass within a meta-batch, gradients "
                                      "accumulated (the same meta-gradient to float rounding, less memory; a "
                                      "method that draws random numbers in a step, PLATIPUS or Reptile, draws "
                                      "them chunk by chunk): 0 for the whole batch at once, or auto: of the sizes "
                                      "whose step fits in --memory-budget, the fastest measured (timed, so not "
                                      "the same choice every time)")
    memory_budget: float = option(0.8, "the fraction of the memory available (RAM, or the GPU's) that one "
                                       "scoring call of validation and test may use, and with --task-chunk "
                                       "auto one training step (measured when training starts)")

    def __post_init__(self):
        def refuse(name: str, problem: str) -> None:
            raise ConfigError("TrainConfig", name, f"{problem}, got {getattr(self, name)!r}")

        if self.steps < 0:
            refuse("steps", "must be >= 0")
        if isinstance(self.init_from, str) and self.init_from and not self.init_from.strip():
            refuse("init_from", 'is blank (give a run folder, or "" for none)')  # "": none; blank: the current folder
        if self.log_every is None:
            object.__setattr__(self, "log_every", default_log_every(self.steps))
        if self.meta_batch_size < 1:
            refuse("meta_batch_size", "must be at least 1")
        require_number(self.meta_lr, "TrainConfig", "meta_lr")
        for name in ("log_every", "checkpoint_every", "val_episodes", "eval_episodes"):
            if getattr(self, name) < 1:
                refuse(name, "must be at least 1")
        for name in ("val_episodes", "eval_episodes"):
            if getattr(self, name) > MAX_EPISODES:
                refuse(name, f"must be at most {MAX_EPISODES:,} (the intervals of papers use 600 to 10,000)")
        if self.keep_best < 0:
            refuse("keep_best", "must be >= 0 (0: none)")
        if self.val_every < 0:
            refuse("val_every", "must be >= 0 (0: no validation)")
        if self.lr_halve_every < 0:
            refuse("lr_halve_every", "must be >= 0 (0: never)")
        if not 0 <= self.seed <= MAX_SEED:
            refuse("seed", f"must be between 0 and {MAX_SEED}")
        if self.meta_optimizer not in ("adam", "sgd"):
            refuse("meta_optimizer", "must be adam or sgd")
        if self.lr_anneal not in ("none", "linear", "cosine"):
            refuse("lr_anneal", "must be none, linear or cosine")
        require_number(self.min_meta_lr, "TrainConfig", "min_meta_lr", zero_allowed=True)
        if self.min_meta_lr > self.meta_lr:
            refuse("min_meta_lr", "must be at most `meta_lr`")
        require_number(self.grad_clip, "TrainConfig", "grad_clip", zero_allowed=True)
        if self.min_meta_lr and self.lr_anneal != "cosine":
            refuse("min_meta_lr", "applies only with `lr_anneal` cosine")
        chunk = self.task_chunk
        if isinstance(chunk, str) and chunk.strip().isdigit():
            object.__setattr__(self, "task_chunk", chunk := int(chunk))
        if chunk != "auto" and not (isinstance(chunk, int) and not isinstance(chunk, bool) and chunk >= 0):
            refuse("task_chunk", "must be a number of tasks >= 0 (0: the whole meta-batch) or auto")
        problem = budget_problem(self.memory_budget)
        if problem is not None:
            refuse("memory_budget", f"must be {problem}")


FRACTION = "a fraction in (0, 1]"


def budget_problem(value: Any) -> str | None:
    """What a memory budget (the fraction of the available memory a step or a scoring call may
    use) fails, as "a fraction in (0, 1]" (:data:`FRACTION`) or "at least ..." (1e-320: a budget
    of no byte, below float32's normal range); None for a good one."""
    if not (isinstance(value, (int, float)) and 0 < value <= 1):
        return FRACTION
    if value < FLOAT32_TINY:
        return f"at least {FLOAT32_TINY:.4g} (float32's smallest normal number)"
    return None


# Fields that may change when a run is resumed: they do not alter what was already computed.
# task_chunk and memory_budget change only how a step is computed (to float rounding; the random
# draws of a sampling method), so that a run resumed on a machine with less memory still fits.
RESUMABLE_CHANGES = {"train.steps", "train.log_every", "train.val_every", "train.checkpoint_every",
                     "train.eval_episodes", "train.val_episodes", "train.keep_best", "train.task_chunk",
                     "train.memory_budget"}


@dataclass(frozen=True)
class RunConfig:
    """One run: the tasks, the method (its name and its own config as a dict) and training."""

    method: str
    task: TaskConfig = field(default_factory=TaskConfig)
    method_config: dict[str, Any] = field(default_factory=dict)
    train: TrainConfig = field(default_factory=TrainConfig)

    def __post_init__(self) -> None:
        # each part of its own type: a dict for task or train, or a method's Config dataclass for
        # method_config, would fail later, deep in training, as an AttributeError
        if not isinstance(self.method, str):
            raise MetalearnError(f"RunConfig's method is a method's name (e.g. \"maml\"), got {self.method!r}")
        for name, kind in (("task", TaskConfig), ("train", TrainConfig)):
            value = getattr(self, name)
            if not isinstance(value, kind):
                raise MetalearnError(f"RunConfig's {name} is a {kind.__name__}, got {type(value).__name__}: give "
                                     f"{kind.__name__}(**...), or resolve_config(method, {name}={{...}}), which fills "
                                     "in the rest")
        if not isinstance(self.method_config, dict):
            hint = " (dataclasses.asdict(config) of a method's Config)" if dataclasses.is_dataclass(
                self.method_config) else ""
            raise MetalearnError(f"RunConfig's method_config is a dict of the method's options{hint}, got "
                                 f"{type(self.method_config).__name__}")

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready values (what ``config.json`` and a checkpoint hold)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "RunConfig":
        """The configuration :meth:`to_dict` wrote, also one written by an older metalearn
        (``algorithm`` for ``method``; a method option added since takes the value such runs
        had, ``MetaLearner.legacy_defaults``). Raises
        :class:`MetalearnError` for a dict that is not a valid configuration."""
        if "method" not in data and "algorithm" in data:  # written before "algorithm" became "method"
            data = {**data, "method": data["algorithm"], "method_config": data.get("algorithm_config", {})}
        unknown = _unknown_options(data)
        if unknown:  # options of a later version: refused by name, not as a TypeError of __init__
            raise MetalearnError(f"the run's configuration has options that this metalearn does not know "
                                 f"({', '.join(unknown)}): it was written by a newer version (upgrade metalearn to "
                                 "read it), or by an older one whose option was renamed or removed since")
        try:
            return cls(
                method=data["method"],
                task=TaskConfig(**data["task"]),
                method_config={**legacy_defaults(data["method"]), **data["method_config"]},
                train=TrainConfig(**data["train"]),
            )
        except ConfigError as err:  # a value edited by hand: named as the file spells it, never as a flag
            raise MetalearnError(f"invalid run configuration: {err}") from None
        except (KeyError, TypeError) as err:
            raise MetalearnError(f"invalid run configuration ({err}); was it written by metalearn?") from None


def _unknown_options(data: Any) -> list[str]:
    """The options in a stored configuration that this version has no field for ("train.x";
    none where the parts are missing or malformed: that is refused as such)."""
    from metalearn.algorithms import find_method  # the registry imports this module

    if not isinstance(data, dict):
        return []
    method = find_method(data.get("method")) if isinstance(data.get("method"), str) else None
    parts = (("task", TaskConfig), ("train", TrainConfig), ("method_config", method.Config if method else None))
    return [f"{part}.{key}" for part, kind in parts if kind is not None and isinstance(data.get(part), dict)
            for key in data[part] if key not in {f.name for f in dataclasses.fields(kind)}]


def legacy_defaults(method: str) -> dict[str, Any]:
    """The values that options added after a run was saved take in its stored configuration:
    the method's ``MetaLearner.legacy_defaults`` (none for an unknown method: reading the
    configuration then fails where the method is looked up, with its own message)."""
    from metalearn.algorithms import find_method  # the registry imports this module

    learner = find_method(method) if isinstance(method, str) else None
    return dict(getattr(learner, "legacy_defaults", {}))


def flat_options(config: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"task.ways": 5, "method_config.inner_lr": 0.01, ...}`` of a configuration's dict
    (:meth:`RunConfig.to_dict`, config.json's)."""
    flat: dict[str, Any] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flat_options(value, name + "."))
        else:
            flat[name] = value
    return flat


def config_differences(old: RunConfig, new: RunConfig) -> dict[str, tuple[Any, Any]]:
    """Flattened ``{"train.steps": (old, new), ...}`` for every field that differs."""
    a, b = flat_options(old.to_dict()), flat_options(new.to_dict())
    return {k: (a.get(k), b.get(k)) for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)}


def task_differences(a: TaskConfig, b: TaskConfig) -> str:
    """What differs between two task configurations, for a message: ``"shots 5 vs 10"``."""
    first, second = dataclasses.asdict(a), dataclasses.asdict(b)
    shown = lambda value: "(default)" if value in ("", None) else value  # noqa: E731
    return ", ".join(f"{key} {shown(first[key])} vs {shown(second[key])}" for key in first
                     if first[key] != second[key])
