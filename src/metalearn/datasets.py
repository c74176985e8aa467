"""The datasets a run can name: one registry, consulted by the configuration (is the name known,
is it classification), the task layer (which sampler) and the API (which options apply).

Adding a dataset is one :class:`Dataset` entry with a function that builds its task source;
nothing else names datasets. The builders import their modules when called, so that this
registry sits below the configuration and the task layer without importing either.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

from metalearn.errors import ConfigError, MetalearnError, check_count, fill, spelled
from metalearn.options import is_command_name
from metalearn.plugins import load_plugins, unknown_hint, registering
from metalearn.runtime import own_random_state


@dataclass(frozen=True)
class Dataset:
    """One dataset: ``build(task, shape, part, data_dir, progress)`` returns the task source of
    ``part`` (train, val or test), where ``shape`` is ``task`` or, for val and test and for
    ``metalearn eval --part train``, ``task.for_testing()`` (:func:`testing` tells which); a
    ``build`` that takes the keyword ``evaluation`` is told whether the episodes are an
    evaluation's (:func:`metalearn.tasks.build_task_source`), whose refusals of the shape then
    name the evaluation's options (``--ways``) rather than train's (``--test-ways``);
    ``problem(task)`` is the input shape and output size a network
    needs; ``has_part(split, part)`` whether the split has that part (no validation part: the
    run trains without validation). ``defaults`` fill task options the user left unset;
    ``fixed`` are values the tasks always take; ``inapplicable`` options are refused, each for
    its reason in ``reasons`` (the rest of "--split-fractions does not apply to mini-imagenet:
    ...", with other options in backticks and an option with a value as a ``{name}`` field of
    :data:`REASON_OPTIONS`) where the dataset's kind is not the reason (see :meth:`refuse`).
    ``prepare(images, image_size, channels)`` turns new images (files, PIL images, tensors) into
    inputs as the dataset's own were made, for ``predict``, ``fit_predict`` and ``sample``
    (None: :func:`metalearn.data.images.prepare_images`). ``reinforcement``: the tasks are MDPs
    (an environment, ``--env``), whose source samples :class:`~metalearn.envs.MDPBatch` es for a
    reinforcement-learning method (``maml-rl``). ``generated``: the tasks come from a formula or
    a simulator, not from files, so a ``data_dir`` given for them is refused (it would be
    silently unused). ``augments``: its training task source is an
    :class:`~metalearn.tasks.episodes.EpisodeSampler` of images that ``augment`` may change
    (``--augment``); for every other dataset ``augment`` is one of its ``inapplicable`` options,
    with its reason in ``reasons`` where it has one. ``check(task, shape, part, data_dir, progress)``, where given, refuses an
    episode shape the part cannot fill as ``build`` would, without reading the data (a folder's
    class and image counts come from its file names), so that setup fails before decoding: it is
    ``metalearn train``'s look at every part it will use before it reads any
    (:func:`metalearn.tasks.check_task_source`), so its messages name train's remedies.
    ``photographs``: its images are photographs, where the methods' paper defaults are their
    mini-ImageNet settings (:func:`of_photographs`). ``image_folder``: its images are read from a
    folder the user names (``--data-dir``), whose fingerprint and path a run records so that a
    resume, an evaluation or a comparison on other images is named (:func:`reads_image_folder`).

    A regression dataset (neither ``classification`` nor ``reinforcement``) refuses ``split``,
    ``ways`` and ``test_ways``, as ``sinusoid`` does, unless its ``defaults`` or ``fixed`` name
    them. Its task source may also tell the true functions: ``function(task_params, x)`` on its
    class, the noiseless targets of the tasks a :class:`~metalearn.tasks.TaskBatch`'s
    ``task_params`` describe at inputs ``x`` ``(tasks, n, 1)``, with ``x_range`` (the inputs'
    ``(low, high)``, default (-5, 5)) and ``noise_std`` on the source. Where it has
    ``function`` and its inputs and targets are single numbers, ``metalearn plot`` draws
    ``fits.png`` (and ``samples.png`` for a method that samples models) and ``metalearn compare``
    adds the log-likelihood and coverage of the true function; otherwise the plot has the
    learning curves alone and compare the mean squared error."""

    name: str
    classification: bool
    build: Callable[..., Any]
    problem: Callable[[Any], Any]
    has_part: Callable[[str, str], bool] = lambda split, part: True
    defaults: Mapping[str, Any] = field(default_factory=dict)
    fixed: Mapping[str, Any] = field(default_factory=dict)
    inapplicable: tuple[str, ...] = ()
    reasons: Mapping[str, str] = field(default_factory=dict)
    prepare: Callable[[Any, int, int], Any] | None = None
    reinforcement: bool = False
    generated: bool = False
    check: Callable[..., Any] | None = None
    augments: bool = False
    photographs: bool = False
    image_folder: bool = False

    def __post_init__(self):
        if not self.augments and "augment" not in self.inapplicable:  # opt-in: a new dataset refuses it
            object.__setattr__(self, "inapplicable", (*self.inapplicable, "augment"))
        if not self.classification and not self.reinforcement:
            # regression tasks have no classes and no Omniglot split: a registered regression
            # dataset refuses them as the built-in ones do (given, they would be recorded in
            # config.json and mean nothing), unless its own defaults or fixed values name them
            unset = [name for name in ("split", "ways", "test_ways") if name not in {*self.defaults, *self.fixed}]
            values = {"split": "none", "ways": 0}
            object.__setattr__(self, "fixed", {**{name: values[name] for name in unset if name in values}, **self.fixed})
            object.__setattr__(self, "inapplicable",
                               (*self.inapplicable, *(name for name in unset if name not in self.inapplicable)))

    @property
    def kind(self) -> str:
        if self.reinforcement:
            return "reinforcement-learning"
        return "classification" if self.classification else "regression"

    def refuse(self, given: list[str] | tuple[str, ...]) -> ConfigError:
        """The error for ``given`` options of ``inapplicable``: one line that names each with its
        reason, the dataset's kind where ``reasons`` gives none (``--noise-std does not apply to
        omniglot, a classification dataset``), options of one reason together."""
        groups: dict[str, list[str]] = {}
        for name in given:
            groups.setdefault(self.reasons.get(name, ""), []).append(name)
        clauses = []
        for reason, names in groups.items():
            verb = "does" if len(names) == 1 else "do"
            if not clauses:
                clauses.append(f"{verb} not apply to {self.name}" + (f": {reason}" if reason else
                                                                      f", a {self.kind} dataset"))
            else:
                listed = ", ".join(f"`{name}`" for name in names)
                clauses.append(f"{listed} {verb} not apply either: "
                               + (reason or f"{self.name} is a {self.kind} dataset"))
        return ConfigError("TaskConfig", tuple(next(iter(groups.values()))), "; ".join(clauses), **REASON_OPTIONS)


DATASETS: dict[str, Dataset] = {}
# options with a value that a reason of Dataset.reasons names as a {name} field, spelled as the caller gives them
REASON_OPTIONS = {"folder_dataset": ("dataset='folder'", "--dataset folder")}


def of_photographs(name: str) -> bool:
    """Whether the registered dataset ``name`` holds photographs (``Dataset.photographs``): the
    methods' paper defaults there are their mini-ImageNet settings. False for a name not
    registered (refused elsewhere, by :func:`get_dataset`)."""
    return bool(getattr(DATASETS.get(name), "photographs", False))


def reads_image_folder(name: str) -> bool:
    """Whether the registered dataset ``name`` reads its images from a folder the user names
    (``Dataset.image_folder``): a run records that folder and its fingerprint."""
    return bool(getattr(DATASETS.get(name), "image_folder", False))


BUILT_IN_DATASETS: frozenset[str] = frozenset()  # set below the built-in registrations


def register_dataset(dataset: Dataset) -> Dataset:
    """Make ``dataset`` known to configurations, ``--dataset`` and the task layer; registered in
    a plugin's module (:mod:`metalearn.plugins`), to every process. A second registration under
    a name replaces the first; one that replaces a built-in dataset warns. Raises
    :class:`MetalearnError` for a name that is not a command-line name."""
    if not isinstance(dataset, Dataset):
        raise MetalearnError(f"register_dataset takes a metalearn.datasets.Dataset, got {type(dataset).__name__}")
    if not is_command_name(dataset.name):
        raise MetalearnError(f"a dataset's name must be a command-line name: lower-case letters, digits, '-', '_' "
                             f"or '+', got {dataset.name!r}")
    registering("dataset", dataset.name, BUILT_IN_DATASETS, DATASETS.get(dataset.name) is dataset)
    DATASETS[dataset.name] = dataset
    return dataset


def testing(task, shape, part: str) -> bool:
    """Whether a builder's ``shape`` is the test episodes' (``task.for_testing()``): for the
    val and test parts, and for the train part where an evaluation draws test-shaped episodes
    from it (``metalearn eval --part train``); an :class:`~metalearn.tasks.episodes.EpisodeSampler`
    built with ``test=testing(...)`` names the test options where the shape cannot be drawn."""
    return part != "train" or shape is not task


def get_dataset(name: str) -> Dataset:
    load_plugins()  # once per process: a plugin may register a dataset, or replace a built-in one
    if name not in DATASETS:
        raise ConfigError("TaskConfig", "dataset", f"must be one of {', '.join(DATASETS)}, got {name!r} "
                                                   f"({unknown_hint()})")
    return DATASETS[name]


# -- the built-in datasets -------------------------------------------------------------------


def _omniglot(task, shape, part: str, data_dir: Path | str | None, progress: bool, evaluation: bool = False):
    import torch

    from metalearn.data.omniglot import load_omniglot
    from metalearn.data.splits import omniglot_split
    from metalearn.tasks.episodes import EpisodeSampler

    omniglot = load_omniglot(data_dir, task.image_size, progress=progress)
    pool = omniglot_split(omniglot, task.split, part)
    return EpisodeSampler(torch.from_numpy(omniglot.images), pool, shape.ways, shape.shots, shape.query,
                          dataset="omniglot", test=testing(task, shape, part), ways_follow=task.test_ways is None,
                          evaluation=evaluation)


def _omniglot_has_part(split: str, part: str) -> bool:
    from metalearn.data.splits import has_part

    return has_part(split, part)


def _image_problem(task):
    from metalearn.tasks.batch import Problem

    return Problem((task.channels, task.image_size, task.image_size), task.ways, True,
                   prepare=get_dataset(task.dataset).prepare)


def _drawings(images, image_size: int, channels: int):
    from metalearn.data.images import prepare_drawings

    return prepare_drawings(images, image_size, channels)


def _folder_checked(task, shape, part: str, data_dir: Path | str | None, progress: bool, command: str = "train",
                    evaluation: bool = False):
    """The folder (its images not decoded yet) and ``part``'s classes, once the episode shape is
    known to fit them. ``command``: whose remedies the refusals name (see
    :func:`metalearn.data.folder.folder_split`): as the registry's ``check``, metalearn
    train's, which checks every part it uses before it builds any. ``evaluation``: the episodes
    of an evaluation (see :func:`metalearn.tasks.build_task_source`), whose shape the refusals
    name as it sets it (``--ways``, not train's ``--test-ways``)."""
    from metalearn.config import EVALUATION_SHAPE, TEST_SHAPE_COMMANDS
    from metalearn.data.folder import check_class_sizes, check_part_classes, folder_split, load_image_folder

    folder = load_image_folder(data_dir, task.image_size, task.channels, progress=progress)
    if task.dataset == "mini-imagenet" and folder.layout == "classes":
        raise ConfigError("TaskConfig", "dataset", f"mini-imagenet reads images/ with train.csv, val.csv and "
                                                   f"test.csv, or train/ val/ test/ folders; {data_dir} has neither "
                                                   "(for class folders of your own use folder)")
    pool = folder_split(folder, part, task.split_fractions, task.split_file, command)
    test = testing(task, shape, part)
    # The refusals name the options as the caller spells them (errors.Options): the TaskConfig
    # fields from Python (test_ways=5, "it defaults to ways"), the flags on the command line
    # (--test-ways 5); for validation and test episodes also where an evaluation sets the shape
    # (evaluate_run's episode_shape; metalearn eval's and compare's --ways, --shots, --query).
    # Which test options follow the training ones: a method's own test defaults (the Neural
    # Statistician's test query) and the user's settings do not.
    follows = [key for key in ("ways", "shots", "query") if getattr(task, f"test_{key}") is None]
    names = {name: name for key in ("ways", "shots", "query") for name in (key, f"test_{key}")}
    evaluated = {"evaluate": ("evaluate_run", TEST_SHAPE_COMMANDS), "ways_shape": EVALUATION_SHAPE["ways"],
                 "shape": ("episode_shape's shots, query", "--shots, --query")}
    if test and evaluation:  # an evaluation's own options set the shape, the run's where not given
        if folder.layout == "classes":
            check_part_classes(folder, pool, part, shape.ways, task, EVALUATION_SHAPE["ways"], command,
                               " (the run's)" if "ways" in follows else "")
        check_class_sizes(folder, pool, shape.shots, shape.query, test, options=EVALUATION_SHAPE)
        return folder, pool
    if folder.layout == "classes":  # too few classes: named with the split's options, which the sampler cannot
        defaulted = "it defaults to {ways}; " if "ways" in follows else ""
        ways_note = _spellings(f" ({defaulted}in {{evaluate}}: {{ways_shape}})", **names, **evaluated) if test else ""
        check_part_classes(folder, pool, part, shape.ways, task, "test_ways" if test else "ways", command, ways_note)
    following = [key for key in ("shots", "query") if key in follows]
    default_note = (" and ".join(f"{{test_{key}}}" for key in following) + (" default to " if len(following) > 1 else
                    " defaults to ") + " and ".join(f"{{{key}}}" for key in following) + "; " if following else "")
    if test:
        defaults = _spellings(f" ({default_note}in {{evaluate}}: {{shape}})", **names, **evaluated)
    else:  # said where query has the default's value: whether it was given is not in the TaskConfig, and the
        # rule holds either way
        dataset_query = get_dataset(task.dataset).defaults.get("query")
        defaults = (_spellings(f" ({{query}} defaults to {dataset_query} for {task.dataset})", **names)
                    if shape.query == dataset_query else
                    _spellings(" ({query} defaults to {shots})", **names)
                    if dataset_query is None and shape.query == shape.shots else "")
    check_class_sizes(folder, pool, shape.shots, shape.query, test, defaults)
    return folder, pool


def _spellings(template: str, **options: str | tuple[str, str]) -> tuple[str, str]:
    """``template`` with its ``{name}`` fields of ``options`` (as :class:`~metalearn.errors.Options`
    takes them) spelled as Python and as the command line name them."""
    given = spelled(options)
    return fill(template, given, flags=False), fill(template, given, flags=True)


def _folder(task, shape, part: str, data_dir: Path | str | None, progress: bool, evaluation: bool = False):
    import torch

    from metalearn.data.folder import class_split, data_fingerprint
    from metalearn.tasks.episodes import EpisodeSampler

    # metalearn train has checked the parts it builds (``check``): a refusal here is met by eval,
    # compare and plot, which score or draw one part, and by the Python API
    folder, pool = _folder_checked(task, shape, part, data_dir, progress, command="eval", evaluation=evaluation)
    sampler = EpisodeSampler(torch.from_numpy(folder.images), pool, shape.ways, shape.shots, shape.query,
                             dataset=f"image folder {data_dir}", test=testing(task, shape, part),
                             ways_follow=task.test_ways is None, evaluation=evaluation,
                             class_sizes=torch.from_numpy(folder.class_sizes))
    sampler.data_fingerprint = data_fingerprint(folder, task.split_fractions, task.split_file)  # images and parts
    if folder.layout == "classes":  # the split a run records: its evaluations keep to it if the folder changes
        sampler.class_split = class_split(folder, task.split_fractions, task.split_file)
    return sampler


def _regression_problem(task):
    from metalearn.tasks.batch import Problem

    return Problem((1,), 1, False)


def _sinusoid(task, shape, part, data_dir, progress):
    from metalearn.tasks.sinusoid import SinusoidTasks

    return SinusoidTasks(shots=shape.shots, query=shape.query, noise_std=task.noise_std or 0.0)


def _sine_or_line(task, shape, part, data_dir, progress):
    from metalearn.tasks.sinusoid import SineOrLineTasks

    noise = 0.3 if task.noise_std is None else task.noise_std
    return SineOrLineTasks(shots=shape.shots, query=shape.query, noise_std=noise)


# regression: K = 5 support points; 100 test points, a finer estimate of the same expected MSE
_REGRESSION = dict(classification=False, problem=_regression_problem, generated=True,
                   defaults={"shots": 5, "test_query": 100},
                   fixed={"split": "none", "ways": 0},
                   inapplicable=("split", "ways", "test_ways", "image_size", "channels", "split_fractions",
                                 "split_file"))
# images of your own: class folders (split by folders, fractions or a file), RGB 84x84 as the
# mini-ImageNet papers; mini-imagenet is the same reader with the papers' 15 queries per class
# (Finn et al. 2017, section 5.2) and its release's train/val/test split only
_FOLDER = dict(classification=True, build=_folder, check=_folder_checked, problem=_image_problem,
               fixed={"split": "folder"}, augments=True, photographs=True, image_folder=True)

# why an option does not apply where a dataset's kind is not the reason: folder is a
# classification dataset that takes --channels and --split-fractions
_OMNIGLOT_SPLIT = ("its classes are split by one of the published splits, chosen with `split` (maml, vinyals, "
                   "vinyals-trainval or lake)")
_RELEASE_SPLIT = "its split is the release's own, its train.csv, val.csv and test.csv or its train/ val/ test/ folders"
_OMNIGLOT_AUGMENT = ("its papers train on the drawings as they are (a mirrored character can be another, b "
                     "and d; in the maml and vinyals splits each quarter turn of a character is a class of its own)")
_FOLDER_SPLIT = ("`split` chooses one of Omniglot's published splits; an image folder is split by its train/ val/ "
                 "test/ folders or CSV files, else by `split_fractions` or `split_file`")
register_dataset(Dataset("omniglot", True, _omniglot, _image_problem, _omniglot_has_part,
                         inapplicable=("noise_std", "channels", "split_fractions", "split_file"),
                         reasons={"channels": "its images are black-and-white drawings, always read as 1 (grey) "
                                              "channel",
                                  "augment": _OMNIGLOT_AUGMENT,
                                  "split_fractions": _OMNIGLOT_SPLIT, "split_file": _OMNIGLOT_SPLIT},
                         prepare=_drawings))
register_dataset(Dataset("folder", defaults={"image_size": 84, "channels": 3},
                         inapplicable=("noise_std", "split"), reasons={"split": _FOLDER_SPLIT}, **_FOLDER))
register_dataset(Dataset("mini-imagenet", defaults={"image_size": 84, "channels": 3, "query": 15},
                         inapplicable=("noise_std", "split", "split_fractions", "split_file"),
                         reasons={"split": f"{_RELEASE_SPLIT} (`split` chooses among Omniglot's published splits)",
                                  **dict.fromkeys(("split_fractions", "split_file"), f"{_RELEASE_SPLIT} (to split "
                                                  "class folders of your own, use {folder_dataset})")},
                         **_FOLDER))
register_dataset(Dataset("sinusoid", build=_sinusoid, **_REGRESSION))
register_dataset(Dataset("sine-or-line", build=_sine_or_line, **_REGRESSION))


# reinforcement learning: MDPs that differ by a goal, one environment per name; no task option
# applies (the method's options say how many trajectories, and how long)
def _environment(make):
    def build(task, shape, part, data_dir, progress):
        from metalearn.envs import MDPTasks

        return MDPTasks(make())
    return build


def _nav2d():
    from metalearn.envs.nav2d import Nav2D

    return Nav2D()


def _cheetah(goal: str):
    def make():
        from metalearn.envs.cheetah import HalfCheetah

        return HalfCheetah(goal)
    return make


def _environment_problem(observation_dim: int, action_dim: int):
    def problem(task):
        from metalearn.tasks.batch import Problem

        return Problem((observation_dim,), action_dim, False)
    return problem


_RL = dict(classification=False, reinforcement=True, generated=True, fixed={"split": "none", "ways": 0},
           inapplicable=("split", "ways", "shots", "query", "test_ways", "test_shots", "test_query", "image_size",
                         "channels", "split_fractions", "split_file", "noise_std"))
register_dataset(Dataset("nav2d", build=_environment(_nav2d), problem=_environment_problem(2, 2), **_RL))
# gymnasium's HalfCheetah-v5: 17 observations, 6 actions (metalearn.envs.cheetah)
register_dataset(Dataset("cheetah-vel", build=_environment(_cheetah("velocity")), problem=_environment_problem(17, 6),
                         **_RL))
register_dataset(Dataset("cheetah-dir", build=_environment(_cheetah("direction")),
                         problem=_environment_problem(17, 6), **_RL))
BUILT_IN_DATASETS = frozenset(DATASETS)


def register_environment(name: str, make: Callable[[], Any]) -> Dataset:
    """Make an environment of your own known under ``name`` to ``--env`` (``--dataset``),
    configurations and the task layer, for a reinforcement-learning method (``maml-rl``).

    ``make()`` returns a new :class:`~metalearn.envs.Environment`: ``observation_dim``,
    ``action_dim`` and ``horizon`` (whole numbers), ``sample_tasks``, ``reset`` and ``step``,
    batched over tasks and trajectories. It is called once per task source (train, val, test)
    and once, at the first look, for the two sizes a policy needs. Registered in a plugin's module
    (:mod:`metalearn.plugins`), the environment is known to every process, ``metalearn eval``
    and torchrun's ranks included. Returns the registered :class:`Dataset`.

    Raises :class:`MetalearnError` for a name that is not a command-line name. What ``make``
    returns is checked at its first call, each a one-line :class:`MetalearnError`: a missing
    method or size, and the shapes of a first draw of tasks, reset and step
    (:func:`check_environment`)."""
    if not is_command_name(name):
        raise MetalearnError(f"an environment's name must be a command-line name: lower-case letters, digits, '-', "
                             f"'_' or '+', got {name!r}")
    if not callable(make):
        raise MetalearnError(f"register_environment({name!r}, make): make must be a function that returns a new "
                             f"environment, got {make!r}")
    sizes: list[tuple[int, int]] = []  # the policy's input and output sizes, from the first environment made

    def made():
        env = make()
        missing = [method for method in ("sample_tasks", "reset", "step") if not callable(getattr(env, method, None))]
        missing += [size for size in ("observation_dim", "action_dim", "horizon") if not hasattr(env, size)]
        if missing:
            raise MetalearnError(f"environment {name}: what make() returned ({type(env).__name__}) lacks "
                                 f"{', '.join(missing)} (methods sample_tasks, reset, step; sizes observation_dim, "
                                 "action_dim, horizon: see metalearn.envs.Environment)")
        counts = {size: check_count(getattr(env, size), f"environment {name}: {size}",
                                    message="{name} must be a whole number >= 1, got {value!r}")
                  for size in ("observation_dim", "action_dim", "horizon")}
        if not sizes:
            check_environment(name, env)
            sizes.append((counts["observation_dim"], counts["action_dim"]))
        return env

    def problem(task):
        from metalearn.tasks.batch import Problem

        if not sizes:
            made()
        return Problem((sizes[0][0],), sizes[0][1], False)

    return register_dataset(Dataset(name, build=_environment(made), problem=problem, **_RL))


def check_environment(name: str, env: Any, tasks: int = 2, trajectories: int = 3) -> None:
    """Refuse, in one line, an environment whose first steps do not have the shapes a policy and
    the rollout need: ``tasks`` tasks drawn, ``trajectories`` reset, one step of zero actions
    (torch's random state left as it was). Otherwise a wrong size surfaces as a shape error from
    inside torch, or as returns of the wrong tasks."""
    import torch

    def shape(value) -> str:
        return str(tuple(value.shape)) if isinstance(value, torch.Tensor) else type(value).__name__

    def check(what: str, value, expected: tuple[int, ...], kind: str) -> None:
        ok = isinstance(value, torch.Tensor) and tuple(value.shape) == expected and (
            value.dtype == torch.bool if kind == "bool" else value.is_floating_point())
        if not ok:
            dtype = f", {value.dtype}" if isinstance(value, torch.Tensor) else ""
            raise MetalearnError(f"environment {name}: {what} should be a {kind} tensor of shape {expected}, got "
                                 f"{shape(value)}{dtype} (with {tasks} tasks, {trajectories} trajectories each: "
                                 "see metalearn.envs.Environment)")

    with own_random_state([]):
        try:
            params = env.sample_tasks(tasks, torch.Generator().manual_seed(0))
            if not isinstance(params, dict) or not all(isinstance(v, torch.Tensor) and v.dim() >= 1
                                                        and v.shape[0] == tasks for v in params.values()) or not params:
                raise MetalearnError(f"environment {name}: sample_tasks({tasks}, generator) should return a dict of "
                                     f"tensors with a leading axis of {tasks} tasks, got "
                                     + (", ".join(f"{k}: {shape(v)}" for k, v in params.items())
                                        if isinstance(params, dict) and params else type(params).__name__))
            first = env.reset(params, trajectories)
            if not (isinstance(first, tuple) and len(first) == 2):
                raise MetalearnError(f"environment {name}: reset should return (state, observations), got "
                                     f"{type(first).__name__}")
            state, observations = first
            check("reset's observations", observations, (tasks, trajectories, env.observation_dim), "float")
            after = env.step(state, torch.zeros(tasks, trajectories, env.action_dim, dtype=observations.dtype))
            if not (isinstance(after, tuple) and len(after) == 4):
                raise MetalearnError(f"environment {name}: step should return (state, observations, rewards, done), "
                                     f"got {type(after).__name__}")
            _, observations, rewards, done = after
        except MetalearnError:
            raise
        except Exception as err:  # the environment's own code, named with it
            raise MetalearnError(f"environment {name}: its first tasks, reset and step failed: "
                                 f"{type(err).__name__}: {err}") from err
    check("step's observations", observations, (tasks, trajectories, env.observation_dim), "float")
    check("step's rewards", rewards, (tasks, trajectories), "float")
    check("step's done", done, (tasks, trajectories), "bool")
