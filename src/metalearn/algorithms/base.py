"""The interface every meta-learning method implements.

The trainer, evaluator, CLI and distributed runner only ever call these methods, so none of
them knows which method it runs. A method whose meta-update is not a gradient (Reptile) still
fits: its ``meta_loss`` is a surrogate whose gradient is the update.
"""

from __future__ import annotations

import contextlib
import contextvars
import copy
import dataclasses
import functools
import inspect
import itertools
import math
import threading
from collections.abc import Callable, Iterator
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call

from metalearn.errors import MetalearnError, OptionError
from metalearn.models.norm import first_order_batch_norm
from metalearn.tasks.batch import Problem, TaskBatch

# new images a method that draws images (``sample(support_images, num, generator)``) is asked
# for per set, at most: `metalearn sample` puts them in one picture, and 1000 already make 100
# rows of 10, a PNG some 9,000 pixels tall that nobody looks through; the limit bounds the output
# (3 MB a set of 28x28 images)
MAX_SAMPLES = 1000


def device_of(module: nn.Module) -> torch.device:
    """Where ``module`` computes: the device of its first parameter or buffer, else the CPU. The
    trainer and the evaluator put each task batch there, so ``learner.cuda()`` is all a GPU needs."""
    for tensor in itertools.chain(module.parameters(), module.buffers()):
        return tensor.device
    return torch.device("cpu")


def floating_dtype(module: nn.Module) -> torch.dtype:
    """The floating-point type ``module`` computes in: its first floating-point parameter's,
    else float32 (what metalearn's tasks and prepared images are). Batches that metalearn
    builds for a learner (``task_batch``) are converted to it, so that
    ``learner.to(torch.float64)`` takes them as they come; MAML-RL's environments keep their
    own type, and its policy converts at its boundary."""
    return next((p.dtype for p in module.parameters() if p.is_floating_point()), torch.float32)


@contextlib.contextmanager
def evaluating(module: nn.Module) -> Iterator[None]:
    """``module`` in eval mode inside the block (running batch-norm statistics, no dropout),
    its former mode restored after it, also when the block raises. The mode is restored module
    by module: a submodule the user had put in eval mode inside a training network (a frozen
    batch norm) stays so, which ``module.train(was_training)`` would undo."""
    with _in_mode(module, False):
        yield


@contextlib.contextmanager
def training_mode(module: nn.Module) -> Iterator[None]:
    """``module`` in training mode inside the block, its former mode restored after it as by
    :func:`evaluating`."""
    with _in_mode(module, True):
        yield


@contextlib.contextmanager
def _in_mode(module: nn.Module, training: bool) -> Iterator[None]:
    modes = [(sub, sub.training) for sub in module.modules()]
    module.train(training)
    try:
        yield
    finally:
        for sub, was in modes:
            sub.training = was


# where a learner keeps the lock that serialises its calls (made on first use, never copied)
_CALL_LOCK = "_call_lock"
# public methods that never run the network (they prepare inputs or word a message): left unlocked,
# so that one thread prepares its images while another's pass runs
UNSERIALISED = frozenset({"task_batch", "prepare_images", "trained_ways_refusal"})


def call_lock(learner: nn.Module) -> threading.RLock:
    """``learner``'s own re-entrant lock, which its public methods hold while they run
    (:meth:`MetaLearner.__init_subclass__`). Made on first use: ``dict.setdefault`` is atomic,
    so two threads' first calls get one lock. Kept out of pickles and copies (a copy makes its
    own) and out of ``state_dict`` (it is no parameter or buffer)."""
    lock = learner.__dict__.get(_CALL_LOCK)
    return lock if lock is not None else learner.__dict__.setdefault(_CALL_LOCK, threading.RLock())


# what torch says where a tensor made under torch.inference_mode() meets autograd: a gradient
# asked of it, or it saved for a backward pass
_INFERENCE_MODE_SIGNS = ("does not require grad and does not have a grad_fn", "Inference tensors cannot be saved",
                         "Inplace update to inference tensor")


def serialised(method: Callable) -> Callable:
    """``method`` (of a learner) run while holding the learner's :func:`call_lock`: concurrent
    calls from threads run one at a time. Its methods swap the network's parameters in place
    while they run (``torch.func.functional_call``) and put it in eval or training mode and
    back: two calls at once would run on each other's parameters, or leave them swapped (plain
    tensors without gradients) or in the wrong mode for good. An error of torch's autograd under
    ``torch.inference_mode()`` (a method that adapts by gradients, which inference mode forbids
    and ``torch.enable_grad()`` cannot lift) becomes one line naming the remedy."""
    if getattr(method, "serialised", False):
        return method

    @functools.wraps(method)
    def locked(self, *args, **kwargs):
        with call_lock(self):
            try:
                return method(self, *args, **kwargs)
            except RuntimeError as err:
                if not (torch.is_inference_mode_enabled() and any(sign in str(err) for sign in _INFERENCE_MODE_SIGNS)):
                    raise
                name = getattr(self, "name", type(self).__name__)
                raise MetalearnError(f"{name} adapts to the support set by gradient steps, which "
                                     "torch.inference_mode() forbids (torch.enable_grad() cannot lift it): call it "
                                     "under torch.no_grad() instead, or under neither") from None

    locked.serialised = True
    return locked


def _serialise_methods(cls: type, skip: frozenset[str] = frozenset()) -> None:
    """Wrap every public method ``cls`` itself defines (a plain function in its body, whose name
    does not start with ``_``) in :func:`serialised`, except :data:`UNSERIALISED` and ``skip``."""
    for attribute, value in list(cls.__dict__.items()):
        if inspect.isfunction(value) and not attribute.startswith("_") and attribute not in UNSERIALISED | skip:
            setattr(cls, attribute, serialised(value))


class MetaLearner(nn.Module):
    """Base class of all methods. A subclass sets :attr:`name` and :attr:`Config` (a frozen
    dataclass of its hyper-parameters, made with :func:`metalearn.options.options`) and defines
    :meth:`build`, :meth:`meta_loss` and :meth:`predict`; :func:`~metalearn.algorithms.register_method`
    refuses a class that lacks one of the three (a reinforcement-learning method defines
    :meth:`episode_scores` instead of :meth:`predict`). The other class attributes below say
    what the method can take; each has a default that suits most methods.

    The network is held in the attribute :attr:`network_attribute` names, ``self.model`` unless
    the subclass sets another: ``--init-from`` copies the weights under it, and the checks of
    :func:`check_network_fits` and :func:`check_embedding_fits` read it. An option of the
    ``Config`` that names a network of :data:`metalearn.models.NETWORKS` is called ``model``: the
    command line lists a plugin's networks under it, a dataset of vectors gets ``mlp`` through
    it, a run's config.json records a plugin's network by it, and evaluation refuses to change
    it.

    Adding an option to ``Config``, or changing a default, leaves runs saved before without it
    or with the old value; when a new default computes something else, list the old behaviour's
    value in :attr:`legacy_defaults` so those runs still load, evaluate and resume as they trained.

    A learner runs one call at a time: its public methods (every one a subclass defines, and
    ``predict``, ``fit_predict``'s passes, ``state_dict``, ``load_state_dict`` and
    ``copy.deepcopy``) hold the learner's own re-entrant lock while they run, so threads that
    share a learner take turns, each getting what it would alone. The methods swap the network's
    parameters while they run (``torch.func.functional_call``) and switch its mode: unserialised,
    concurrent calls would compute with each other's weights and could leave the network broken.
    For calls in parallel, give each thread its own copy (``copy.deepcopy(learner)``) or use
    processes. The lock is in no pickle, copy or ``state_dict``."""

    name: ClassVar[str]
    """The method's command-line name (``metalearn train NAME``, ``RunConfig.method``): lower-case
    letters, digits, ``-``, ``_`` and ``+``."""
    Config: ClassVar[type]
    """The dataclass of the method's options (:func:`metalearn.options.options`, each field an
    :func:`metalearn.options.option` with a default); the command line makes one flag of each."""

    def __init_subclass__(cls, **kwargs):
        """A method's constructor takes its ``config`` as its ``Config`` or as a dict of options
        (``MAML(model, {"inner_steps": 5})``), checked by :meth:`own_config` before the
        constructor runs: anything else is one clear error, not an ``AttributeError`` from
        inside the method. Applies to every subclass that defines ``__init__(..., config, ...)``.

        Every public method the subclass defines (a function in its body whose name does not
        start with ``_``; not ``task_batch``, ``prepare_images`` or ``trained_ways_refusal``,
        which never run the network) is wrapped in :func:`serialised`: one call at a time per
        learner, also for a method or a helper added later."""
        super().__init_subclass__(**kwargs)
        # one call at a time per learner (serialised): every public method, so that a method's
        # own (predict, meta_loss, sample_probabilities, a plugin's helpers) needs nothing more
        _serialise_methods(cls)
        # its errors say MAML.Config.inner_lr; a subclass's Config that extends the parent's says
        # ANIL.Config.inner_lr; one that reuses the parent's own class leaves its name as it was
        own = cls.__dict__.get("Config")
        if dataclasses.is_dataclass(own) and "owner_name" not in own.__dict__:
            own.owner_name = f"{cls.__name__}.Config"
        init = cls.__dict__.get("__init__")
        if init is None or "config" not in inspect.signature(init).parameters:
            return
        signature = inspect.signature(init)

        @functools.wraps(init)
        def checked_init(self, *args, **kwargs):
            try:
                bound = signature.bind(self, *args, **kwargs)
            except TypeError:  # wrong arguments: the constructor's own error
                return init(self, *args, **kwargs)
            if "config" in bound.arguments:  # this class's Config, or (a subclass's) type(self)'s
                bound.arguments["config"] = type(self).own_config(bound.arguments["config"], cls)
            init(*bound.args, **bound.kwargs)

        cls.__init__ = checked_init

    @classmethod
    def own_config(cls, config: Any, defined_by: type | None = None) -> Any:
        """``config`` as this method's ``Config``: one already (or the ``Config`` of
        ``defined_by``, the class whose constructor receives it: a subclass may pass its
        parent's), None (a constructor's own default), or built from a dict of its options (each
        type-checked by the ``Config``); a dict naming an option the method lacks, or another
        type, raises :class:`MetalearnError` naming it."""
        config_class = getattr(cls, "Config", None)
        accepted = tuple(c for c in (config_class, getattr(defined_by, "Config", None)) if dataclasses.is_dataclass(c))
        if not accepted or config is None or isinstance(config, accepted):
            return config
        if isinstance(config, dict):
            known = {f.name for f in dataclasses.fields(config_class)}
            unknown = sorted(str(key) for key in set(config) - known)
            if unknown:
                raise MetalearnError(f"{cls.__name__} has no option(s) {', '.join(unknown)}; known: "
                                     f"{', '.join(sorted(known))}")
            return config_class(**config)
        raise MetalearnError(f"{cls.__name__} takes its options as a {config_class.__name__} (or a dict of them), "
                             f"got {type(config).__name__}")

    fixed_ways: ClassVar[bool] = False
    """True for a method whose network has one output per class (MAML, PLATIPUS, Reptile): it
    cannot be tested with another number of ways than it was trained with, and a task of
    another number is refused in one line naming the trained ways (:meth:`trained_ways_refusal`)."""
    network_attribute: ClassVar[str] = "model"
    """The attribute holding the method's network (an ``nn.Module``): ``--init-from`` copies the
    weights under this name, and :func:`check_network_fits` / :func:`check_embedding_fits`
    check it. Set it where the network is not ``self.model`` (MAML-RL's ``policy``)."""
    option_requires: ClassVar[dict[str, tuple[str, Any]]] = {}
    """Options that act only beside another option's value: ``{option: (other option, its
    value)}``. Giving one (other than at its default) without the other is refused, in training
    and in an evaluation's overrides (it would be stored and silently unused); a preset's value
    for one is dropped when the user's own options turn the other off; resuming ignores a
    difference in one that acts in neither configuration."""

    @classmethod
    def option_acts(cls, option: str, options: dict[str, Any]) -> bool:
        """Whether ``option`` acts beside ``options`` (the method's options, by name): it needs no
        other option (:attr:`option_requires`), or that one has the value it needs."""
        if option not in cls.option_requires:
            return True
        other, needed = cls.option_requires[option]
        return options.get(other) == needed

    legacy_defaults: ClassVar[dict[str, Any]] = {}
    """Options added, or whose default changed, after runs were saved without them: ``{option:
    the value that reproduces what such a run computed}``. A stored configuration that lacks one
    (config.json, a checkpoint's copy) gets this value when it is read
    (``RunConfig.from_dict``); a new run gets the current default. :func:`register_method`
    refuses an option the ``Config`` lacks or a value it refuses."""

    presets: ClassVar[dict[str, str]] = {}
    """Named sets of defaults a user picks with ``--preset NAME`` (``resolve_config(preset=)``):
    ``{name: one line saying what it is}``; the values come from :meth:`preset_defaults` and
    :meth:`preset_task_defaults`."""
    protocols: ClassVar[dict[str, Any]] = {}
    """Evaluation protocols besides the standard N-way K-shot episodes, picked with ``metalearn
    eval --protocol NAME`` (``evaluate_run(protocol=)``): ``{name: function(learner, source,
    episodes, seed) -> result dict}``, where ``source`` is the task source of the evaluated
    part."""
    reinforcement: ClassVar[bool] = False
    """True for a method of reinforcement-learning tasks (MDPs: ``--env``, a dataset registered
    with ``reinforcement=True``), which gets an ``MDPBatch`` instead of a TaskBatch and defines
    :meth:`episode_scores` instead of :meth:`predict`; the two kinds of method and of dataset
    never meet."""
    classification_only: ClassVar[bool] = False
    """True for a method of classification tasks alone (it compares examples of classes:
    ProtoNets, Matching Nets, the Memory Module, the Neural Statistician): a regression dataset
    is refused when the run is configured, naming the classification datasets, and by
    :meth:`build`, which calls :meth:`require_classification`."""
    default_dataset: ClassVar[str | None] = None
    """The dataset (or environment) a run of this method takes when none is named (None:
    omniglot)."""
    task_defaults: ClassVar[dict[str, Any]] = {}
    """The episode shape this method trains on, where it differs from TaskConfig's and the user
    sets nothing (the Neural Statistician learns from sets of 5 images, not of 1): task options
    such as ``shots``, ``query``, ``test_shots``; they come before the dataset's own defaults.
    On every dataset, unless :meth:`dataset_task_defaults` says otherwise."""

    @classmethod
    def dataset_task_defaults(cls, dataset: str) -> dict[str, Any]:
        """The episode shape on ``dataset``, as :attr:`task_defaults`: those by default; a method
        whose paper's episodes belong to its dataset (the Memory Module's, to Omniglot) gives
        them there alone."""
        return dict(cls.task_defaults)

    @classmethod
    def preset_task_defaults(cls, name: str, dataset: str) -> dict[str, Any]:
        """Preset ``name``'s episode shape on ``dataset`` (task options such as ``query``, as
        :meth:`dataset_task_defaults`, before which they come), only where the user sets nothing. Called
        only with a name in :attr:`presets`; none by default."""
        return {}

    @classmethod
    def preset_defaults(cls, name: str, task: Any) -> tuple[dict[str, Any], dict[str, Any]]:
        """Preset ``name``'s overrides of this method's Config and of TrainConfig for ``task``:
        used instead of :meth:`paper_defaults`, and, like them, only where the user sets nothing.
        Called only with a name in :attr:`presets`."""
        raise NotImplementedError

    @classmethod
    def require_classification(cls, problem: Problem) -> None:
        """For :meth:`build` of a :attr:`classification_only` method: refuse a regression problem."""
        if not problem.classification:
            raise MetalearnError(f"{cls.name} is a classification method: it needs tasks of classes of examples "
                                 "(a classification dataset such as omniglot or an image folder), not regression")

    @classmethod
    def build(cls, config: Any, problem: Problem) -> "MetaLearner":
        """The method with its network for tasks described by ``problem``."""
        raise NotImplementedError

    @classmethod
    def paper_defaults(cls, task: Any, given: dict[str, Any] | None = None) -> tuple[dict[str, Any], dict[str, Any]]:
        """The paper's hyper-parameters for ``task`` (a TaskConfig): overrides of this method's
        Config and of TrainConfig, used where the user sets nothing. ``given``: the method
        options the user set, for defaults that follow one of them (maml-rl's meta-optimiser
        follows its ``outer``)."""
        return {}, {}

    @classmethod
    def cost_changes(cls, config: Any) -> list[tuple[int, str]]:
        """Where this method's own schedule changes what a meta-step costs (time, memory) over a
        run with Config ``config``: ``[(steps taken, what changes for the steps after them)]``.
        ``metalearn status`` names them (its time left projects the recent rate, which cannot
        see them coming), and the trainer measures ``--task-chunk auto`` again there (a chunk
        chosen for cheaper steps could exhaust the memory after). The default: none."""
        return []

    def check_run(self, config: Any) -> None:
        """Refuse, before anything is written, a run (a RunConfig: task shape, training
        options) that this learner cannot train or test, which the options alone do not show
        (the Memory Module's memory must hold a round of the meta-batch's writes). Called by
        the trainer's builder, also for ``--print-config``. The default accepts every run."""

    @classmethod
    def series_labels(cls, config: dict[str, Any]) -> dict[str, str]:
        """Panel titles of ``metalearn plot``'s learning curves for metrics this method logs under
        a common name with another meaning (``config``: the run's method options), e.g. a
        ``loss`` that is not a training loss. The default: none, the common titles."""
        return {}

    def start_step(self, step: int) -> None:
        """Told by the trainer before each meta-step how many steps were taken so far, for a
        method whose loss follows a schedule over training (MAML++'s multi-step loss weights).
        The default ignores it. A pure function of ``step``, so a resumed run matches; it also
        drops what passes of the step before it left for :meth:`end_step` (the trainer calls it
        again after the trial passes of ``--task-chunk auto``), so that ``end_step`` sees the
        meta-batch's tasks once, whether in one :meth:`meta_loss` call or one per chunk."""

    def end_step(self, world: Any) -> None:
        """Told by the trainer after each meta-update, with its ``World``, for a method that keeps
        state besides its parameters which every rank must agree on (Reptile's carried inner
        Adam state, advanced by every rank's tasks). The default does nothing."""

    def chunking_refused(self) -> str | None:
        """Why this method's meta-batch cannot be split into chunks of tasks, each with its own
        :meth:`meta_loss` and backward pass (``TrainConfig.task_chunk``), or None when it can:
        the tasks of a meta-batch must be independent, so that the chunks' losses weighted by
        their share of tasks have the whole batch's gradient. The default: they are."""
        return None

    def meta_loss(self, batch: TaskBatch) -> tuple[Tensor, dict[str, Tensor]]:
        """Scalar loss averaged over the batch's tasks, whose gradient is the meta-gradient,
        and metrics (scalars, e.g. ``accuracy``) for logging. Batched over tasks (``vmap``),
        unless one call per task is measurably faster (the embedding methods' CNN)."""
        raise NotImplementedError

    def predict(self, batch: TaskBatch) -> Tensor:
        """Adapt to each task's support set, return query predictions:
        logits (tasks, n_query, ways) or regression outputs (tasks, n_query, out_dim). Leaves the
        learner as it found it (its weights, buffers and any state of its own): evaluation calls
        it episode after episode, and ``metalearn predict`` may call it on parts of the support
        set first, to measure the memory a pass takes."""
        raise NotImplementedError

    def predict_per_step(self, batch: TaskBatch) -> Tensor:
        """Predictions after each adaptation step, (steps + 1, tasks, n_query, ...); methods
        without steps return their single prediction with a leading axis of 1."""
        return self.predict(batch).unsqueeze(0)

    def episode_scores(self, batch: TaskBatch, per_step: bool = True) -> Tensor:
        """Per-step, per-task score, what evaluation averages: (steps + 1, tasks), or (1, tasks)
        for the final predictions alone (``per_step`` False). By default
        :func:`prediction_scores` (accuracy or MSE of the predictions); a reinforcement-learning
        method scores the average return."""
        return prediction_scores(self, batch, per_step)

    # -- one task, no TaskBatch --------------------------------------------------------------

    problem: Problem | None = None
    """The tasks the network was built for, set by :func:`~metalearn.algorithms.build_learner`
    (and so by ``load_trained``): new images are prepared at the training size, and a
    :attr:`fixed_ways` method names its ways. None for a learner constructed directly."""

    def task_batch(self, support_x: Any, support_y: Any, query_x: Any, *, image_size: int | None = None,
                   channels: int | None = None) -> TaskBatch:
        """One classification task as a TaskBatch of one task, without query labels (they are
        -1, which no ``predict`` reads).

        support_x, query_x: images as :func:`metalearn.data.images.prepare_images` takes them
        (files, PIL images, uint8 or [0, 1] float tensors ``(n, C, H, W)``), prepared at
        ``image_size`` with ``channels``, by default the training run's (``self.problem``), and
        as the training dataset's images were (Omniglot: strokes bright on dark);
        support_y: ``(n_support,)`` class ids in [0, ways), every class present. The batch is on
        the learner's device and in its floating-point type (:func:`floating_dtype`).
        """
        if self.problem is not None and not self.problem.classification:
            # a regression run's targets are numbers, which the class-id checks below would misname
            raise MetalearnError(f"{self.name}: this learner was built for regression; task_batch and fit_predict "
                                 "classify: build TaskBatch(support_x, support_y, query_x, query_y) with float targets "
                                 "(tasks, n, 1) (query_y: zeros where unknown) and call learner.predict(batch)")
        prepare = self._input_preparer(image_size, channels)
        device, dtype = device_of(self), floating_dtype(self)
        support, query = prepare(support_x), prepare(query_x)
        labels = class_ids(support_y)
        if labels.numel() != support.shape[0]:
            raise MetalearnError(f"{labels.numel()} support labels for {support.shape[0]} support images")
        ways = int(labels.max()) + 1 if labels.numel() else 0
        if labels.numel() == 0 or int(labels.min()) < 0 or set(labels.tolist()) != set(range(ways)):
            raise MetalearnError(f"support labels must be class ids 0..ways-1 with every class present, got "
                                 f"{sorted(set(labels.tolist()))}")
        if ways < 2:  # one class: every query is "classified" into it with certainty
            raise MetalearnError("support images of at least 2 classes are needed to tell classes apart, got 1 class")
        if self.fixed_ways and self.problem is not None and ways != self.problem.output_dim:
            raise MetalearnError(self.trained_ways_refusal(ways))
        query_y = torch.full((1, query.shape[0]), -1, dtype=torch.long)
        return TaskBatch(support[None], labels[None], query[None], query_y, ways=ways).to(device, dtype)

    def _input_preparer(self, image_size: int | None, channels: int | None) -> Callable[[Any], Tensor]:
        """How :meth:`task_batch` prepares a set of inputs: images at ``image_size`` with
        ``channels`` (by default the training run's, ``self.problem``) through
        :meth:`prepare_images`; without a size (a learner of vectors, or one built directly),
        tensors as they are (uint8 scaled to [0, 1]) in the learner's floating-point type."""
        shape = self.problem.input_shape if self.problem is not None else None
        if len(shape or ()) == 3:
            channels = channels or shape[0]
            image_size = image_size or shape[-1]
        # the batch is in the learner's floating-point type: a float64 (bfloat16) learner takes its
        # own tensors and the float32 images prepare_images makes, as a float32 one does
        dtype = floating_dtype(self)

        def prepare(images: Any) -> Tensor:
            if image_size is None or channels is None:  # tensors as they are: the caller's network knows
                images = torch.as_tensor(images)
                return images.to(dtype).div(255.0) if images.dtype == torch.uint8 else images.to(dtype)
            return self.prepare_images(images, image_size, channels)

        return prepare

    def trained_ways_refusal(self, ways: int) -> str:
        """Why this :attr:`fixed_ways` learner, built for ``self.problem``'s ways (by
        ``build_learner``, so also by ``load_trained``), cannot classify ``ways`` classes: the one
        wording of :meth:`task_batch` (and so :meth:`fit_predict`) and of ``predict``'s check
        (:func:`check_network_fits`). Its network is built and trained: the remedy is tasks of its
        ways or another method, not another network."""
        from metalearn.algorithms import METHODS

        trained = self.problem.output_dim
        any_ways = ", ".join(name for name, cls in METHODS.items() if not (cls.fixed_ways or cls.reinforcement))
        return (f"{self.name} was trained for {trained}-way tasks (one output per class) and cannot classify "
                f"{ways} classes: give it {trained} classes, or use a method without a per-class output layer "
                f"({any_ways})")

    def prepare_images(self, images: Any, image_size: int, channels: int) -> Tensor:
        """New images (files, PIL images, tensors) as inputs prepared the way this learner's
        training images were: the training dataset's own preparation (``problem.prepare``,
        Omniglot: strokes bright on dark), else :func:`metalearn.data.images.prepare_images`."""
        from metalearn.data.images import prepare_images

        prepare = getattr(self.problem, "prepare", None) or prepare_images
        return prepare(images, image_size, channels)

    def fit_predict(self, support_x: Any, support_y: Any, query_x: Any, *, generator: torch.Generator | None = None,
                    **prepare: Any) -> Tensor:
        """Adapt to one task's support set and classify its query images: class probabilities
        ``(n_query, ways)``, in the order of the class ids of ``support_y`` (float32, float64 for a
        float64 learner). Images and labels as
        :meth:`task_batch` takes them; no query labels are needed. Files and PIL images are
        prepared as the run's training files were (transparency laid on white; Omniglot: dark ink
        on white inverted to bright strokes on dark, :func:`~metalearn.data.images.prepare_drawings`);
        tensors and arrays are never inverted, they are taken as the network's input (Omniglot:
        strokes bright, ``255 - x`` for a uint8 tensor of scans). A tensor ``(3, H, W)`` or
        ``(4, H, W)`` is refused, as it reads two ways (``x[:, None]``: grey images; ``x[None]``:
        one colour image). For a method that samples
        models (PLATIPUS) this is the mean over the samples (``sample_probabilities`` gives
        them all), drawn from ``generator`` (keyword only; default: one seeded as ``metalearn
        predict`` seeds it, so that a call repeats and equals the command's, and torch's global
        random state is left alone). Runs in eval mode (no dropout, batch norm as the method
        evaluates), whatever the learner's mode, which it keeps.

        The queries are classified in the chunks ``metalearn predict`` uses
        (:func:`~metalearn.prediction.query_chunks`: 256 at most, a list of files read chunk by
        chunk), so memory follows the chunk and a method that normalises its queries together
        answers as the command does. Calls on one learner run one at a time (its lock, see
        :class:`MetaLearner`); for calls in parallel give each thread its own ``copy.deepcopy``.

        >>> config, learner, step = metalearn.load_trained("runs/protonet-folder-...")
        >>> probs = learner.fit_predict(["a1.jpg", "b1.jpg"], [0, 1], ["new.jpg"])   # (1, 2)
        """
        from metalearn.prediction import query_chunks, warn_of_few_queries

        generator = prediction_generator(generator)
        if isinstance(query_x, (list, tuple)) and query_x:
            # one image per entry: prepared chunk by chunk, so that memory follows the chunk, not the list
            count, bounds = len(query_x), query_chunks(len(query_x))
            batch = self.task_batch(support_x, support_y, query_x[:bounds[0][1]], **prepare)
            prepare_query = self._input_preparer(prepare.get("image_size"), prepare.get("channels"))

            def chunk(start: int, stop: int) -> TaskBatch:
                if start == 0:
                    return batch
                query = prepare_query(query_x[start:stop]).to(batch.query_x.device, batch.query_x.dtype)
                query_y = torch.full((1, query.shape[0]), -1, dtype=torch.long, device=batch.query_y.device)
                return dataclasses.replace(batch, query_x=query[None], query_y=query_y)
        else:
            batch = self.task_batch(support_x, support_y, query_x, **prepare)
            count = batch.query_x.shape[1]
            bounds = query_chunks(count)

            def chunk(start: int, stop: int) -> TaskBatch:
                return dataclasses.replace(batch, query_x=batch.query_x[:, start:stop],
                                           query_y=batch.query_y[:, start:stop])

        warn_of_few_queries(self, count, None)  # fewer queries than classes: a warning
        return torch.cat([self._chunk_probabilities(chunk(start, stop), generator) for start, stop in bounds])

    @serialised
    def _chunk_probabilities(self, batch: TaskBatch, generator: torch.Generator) -> Tensor:
        """One pass of :meth:`fit_predict` (``metalearn predict`` calls fit_predict chunk by chunk,
        each chunk one pass): the class probabilities ``(n_query, ways)`` of the batch's one task, without
        gradients, in eval mode. A learner that samples models (``sample_predictions`` and
        ``sample_probabilities``: the ability "samples models") gives the mean of its samples'
        probabilities (``sample_probabilities``'s, computed as it computes them), the samples
        drawn from ``generator``."""
        with torch.no_grad(), evaluating(self):
            if all(callable(getattr(self, name, None)) for name in ("sample_predictions", "sample_probabilities")):
                return probabilities(self.sample_predictions(batch, None, generator)[:, 0]).mean(0)
            return probabilities(self.predict(batch)[0])

    def __getstate__(self) -> dict[str, Any]:
        state = super().__getstate__()
        state.pop(_CALL_LOCK, None)  # a copy or an unpickled learner makes its own on first use
        return state

    def __deepcopy__(self, memo: dict[int, Any]) -> "MetaLearner":
        """The default deep copy, taken while holding the learner's lock: never of the
        parameters a call in another thread has swapped in."""
        with call_lock(self):
            copied = type(self).__new__(type(self))
            memo[id(self)] = copied
            copied.__setstate__(copy.deepcopy(self.__getstate__(), memo))
            return copied

    def state_dict(self, *args: Any, **kwargs: Any) -> dict[str, Any]:
        """:meth:`torch.nn.Module.state_dict`, read while no other thread's call runs (which would
        have swapped its own tensors in for the parameters)."""
        return super().state_dict(*args, **kwargs)

    def load_state_dict(self, state_dict: Any, strict: bool = True, assign: bool = False) -> Any:
        """:meth:`torch.nn.Module.load_state_dict`, written while no other thread's call runs."""
        return super().load_state_dict(state_dict, strict=strict, assign=assign)


# the base class's own public methods too (fit_predict serialises each pass, _chunk_probabilities)
_serialise_methods(MetaLearner, skip=frozenset({"fit_predict"}))

# the seed of the models a method that samples them (PLATIPUS) draws in fit_predict and metalearn
# predict: a fixed one, so that two calls, and the command line and Python, give the same answer
PREDICTION_SEED = 0


def prediction_generator(generator: torch.Generator | None = None) -> torch.Generator:
    """``generator``, or where it is None a new CPU generator seeded with
    :data:`PREDICTION_SEED`: the random stream of ``fit_predict`` and ``metalearn predict``,
    which leave torch's global random state alone."""
    if generator is None:
        return torch.Generator().manual_seed(PREDICTION_SEED)
    if not isinstance(generator, torch.Generator):
        raise MetalearnError(f"generator must be a torch.Generator (torch.Generator().manual_seed(seed)) or None, got "
                             f"{type(generator).__name__}")
    return generator


def probabilities(logits: Tensor) -> Tensor:
    """The softmax of ``logits`` over their last axis, in float32 at least (bfloat16's 3 digits
    would round the probabilities), float64 kept: what :meth:`MetaLearner.fit_predict` returns."""
    return logits.to(torch.promote_types(logits.dtype, torch.float32)).softmax(dim=-1)


def class_ids(labels: Any) -> Tensor:
    """``labels`` (a sequence, NumPy array or tensor of whole numbers) as a flat long tensor, or a
    one-line error: torch would fail on strings with its own message and silently truncate
    fractional labels (1.5 -> 1) to another class."""
    try:
        values = torch.as_tensor(labels)
    except (TypeError, ValueError, RuntimeError):
        raise MetalearnError("support labels must be class ids, whole numbers 0..ways-1; got "
                             f"{_shown(labels)} (map class names to ids first, e.g. with "
                             "{name: i for i, name in enumerate(sorted(set(names)))})") from None
    wanted = "support labels must be class ids, whole numbers 0..ways-1; got"
    fractional = values.is_floating_point() and not bool((torch.isfinite(values) & (values == values.round())).all())
    if values.is_complex() or fractional:
        raise MetalearnError(f"{wanted} {_shown(labels)}")  # 1.5, NaN and inf alike: no class id
    if values.dtype == torch.bool:
        raise MetalearnError(f"{wanted} booleans {_shown(labels)}")
    return values.to(torch.long).reshape(-1)


def class_without_support(method: str, support_y: Tensor, missing: Tensor, ways_given: bool) -> MetalearnError:
    """The one-line error of a method that needs support examples of every class (ProtoNets'
    prototypes, Matching Nets' label attention) for a batch with a class of none: ``missing``
    (tasks, ways) marks them. Names the first such task and class, the ids its support has, and
    the ways they were counted against; where the batch gives no ``ways`` they are implied by
    the largest support label, so labels 1..N (not 0..N-1) leave class 0 without examples, which
    only the rule "class ids run 0..N-1" explains. Keeps the words of the methods' own check."""
    task, missing_class = (int(i) for i in missing.nonzero()[0])
    ways = missing.shape[1]
    if ways_given:
        why = f"the tasks being {ways}-way (class ids 0..{ways - 1})"
    else:
        why = (f"class ids run 0..N-1 for N-way tasks, and without TaskBatch(..., ways=N) the largest support label, "
               f"{ways - 1}, makes them {ways}-way: label each task's classes 0..N-1")
    return MetalearnError(f"{method}: a task has a class without support examples; every class needs at least one "
                          f"shot: task {task}'s support_y has no class {missing_class} (it has "
                          f"{_shown(support_y[task].unique())}); {why}")


def _shown(values: Any, limit: int = 6) -> str:
    items = values.tolist() if hasattr(values, "tolist") else list(values) if not isinstance(values, str) else [values]
    items = items if isinstance(items, list) else [items]
    return repr(items[:limit])[:-1] + (", ...]" if len(items) > limit else "]")


def average_prediction(samples: Tensor, classification: bool, dim: int = 0) -> Tensor:
    """The mixture's prediction from sampled models stacked along ``dim``: the mean output, or
    for classification ``log(mean_s softmax(logits_s))``."""
    if classification:
        return torch.logsumexp(samples.log_softmax(-1), dim) - math.log(samples.shape[dim])
    return samples.mean(dim)


def prediction_scores(learner: Any, batch: TaskBatch, per_step: bool = True) -> Tensor:
    """Accuracy for classification, MSE for regression, of ``learner.predict_per_step(batch)``
    (or, without ``per_step``, of ``learner.predict(batch)``): (steps + 1, tasks) or (1, tasks).
    A task whose predictions are not all finite scores NaN (a diverged adaptation), also for
    classification, where ``argmax`` would turn NaN logits into a class. A learner with only
    one of the two (an object of the user's) is scored by the one it has: ``predict`` alone gives
    the final row only, ``predict_per_step`` alone its last row without ``per_step``."""
    has_steps, has_final = hasattr(learner, "predict_per_step"), hasattr(learner, "predict")
    if has_steps and (per_step or not has_final):
        predictions = learner.predict_per_step(batch)  # (steps+1, tasks, n_query, ...)
        predictions = predictions if per_step else predictions[-1:]
    else:
        predictions = learner.predict(batch).unsqueeze(0)
    if batch.is_classification:
        correct = (predictions.argmax(-1) == batch.query_y).float().mean(-1)
        finite = torch.isfinite(predictions).flatten(2).all(-1)
        return torch.where(finite, correct, torch.full_like(correct, math.nan))
    return ((predictions - batch.query_y) ** 2).flatten(2).mean(-1)


# the task source the Trainer or evaluate draws the batches from (drawing_from), for the refusal of
# a batch of another floating-point type than the network's: its remedy depends on the source
_DRAWING_FROM: contextvars.ContextVar[Any] = contextvars.ContextVar("metalearn_drawing_from", default=None)


@contextlib.contextmanager
def drawing_from(source: Any) -> Iterator[None]:
    """Within the block the batches that methods check come from ``source`` (the Trainer's
    training tasks, evaluate's source): :func:`check_input_dtype` then names the remedy that
    fits it. The source outside the block is restored after it (a validation inside training)."""
    token = _DRAWING_FROM.set(source)
    try:
        yield
    finally:
        _DRAWING_FROM.reset(token)


def check_input_dtype(method: str, model: nn.Module, batch: TaskBatch) -> None:
    """Refuse a batch whose inputs are another floating-point type than the network's weights
    (a float32 batch for a float64 model): torch would fail deep inside the first layer. Where
    the Trainer or evaluate draws the batch from a source with a ``dtype`` of the batch's type
    (EpisodeSampler, SinusoidTasks, SineOrLineTasks), the remedy named is that source's
    ``dtype``, as the caller cannot convert the batch there; elsewhere, the batch's or the learner's."""
    weights = next((p.dtype for p in model.parameters() if p.is_floating_point()), None)
    inputs = batch.support_x.dtype
    if weights is not None and torch.is_floating_point(batch.support_x) and inputs != weights:
        source = _DRAWING_FROM.get()
        drawn_as = getattr(source, "dtype", None)  # None: no source (a batch given directly), or one without dtype
        if isinstance(drawn_as, torch.dtype) and drawn_as == inputs:
            raise MetalearnError(f"{method}: the batch's inputs are {inputs} and the network's weights {weights}; "
                                 f"{type(source).__name__}(..., dtype={weights}) draws it so, or convert the "
                                 f"learner (learner.to({inputs}))")
        # the Trainer and evaluate draw under torch's float32 default (runtime.float32_default),
        # whatever a notebook set: a source of one's own drawing with the default dtype gives float32
        drawn = (f"; the Trainer and evaluate draw under torch's float32 default, so a task source of your own "
                 f"draws {weights} there only where it names the dtype" if inputs == torch.float32 else "")
        raise MetalearnError(f"{method}: the batch's inputs are {inputs} and the network's weights {weights}; "
                             f"convert the batch (batch.to({weights}); EpisodeSampler(..., dtype={weights}) draws "
                             f"it so) or the learner (learner.to({inputs})){drawn}")


def require_task_batch(method: str, batch: Any) -> None:
    """A TaskBatch of tensors, or a one-line error naming what is wanted (a tensor of images
    passed to ``predict``, a batch of NumPy arrays)."""
    if not isinstance(batch, TaskBatch):
        raise MetalearnError(f"{method}: takes a TaskBatch (support_x, support_y, query_x, query_y), got "
                             f"{type(batch).__name__}; for images and labels of your own use "
                             "learner.fit_predict(support_x, support_y, query_x) or learner.task_batch(...)")
    for name in ("support_x", "support_y", "query_x", "query_y"):
        value = getattr(batch, name)
        if not isinstance(value, torch.Tensor):
            raise MetalearnError(f"{method}: the batch's {name} is a {type(value).__name__}; a TaskBatch holds "
                                 "tensors (torch.as_tensor(...))")


def check_task_batch(method: str, batch: TaskBatch, *, training: bool = False) -> None:
    """Refuse, with a one-line :class:`MetalearnError`, a TaskBatch given through the Python API
    that is not shaped as :class:`~metalearn.tasks.batch.TaskBatch` says, before torch fails on it
    deep inside a network, ``vmap``, ``one_hot`` or the loss:

    - inputs that are not floating point (uint8 images: ``x.float() / 255``), or of two types;
    - tensors on two devices, with different numbers of tasks, support and query examples of
      different shapes, labels not one per example, or no support examples;
    - class labels that are not ``long``, or outside ``0..ways-1`` (``ways``: the batch's; where
      it is 0, the largest support label + 1). Query labels may also be -1
      (unknown, what :meth:`MetaLearner.task_batch` gives) unless ``training``, when a loss reads them.

    Regression targets (float) need one row per example, support and query shaped alike. Costs
    one device synchronisation for the class labels' range."""
    require_task_batch(method, batch)
    sx, sy, qx, qy = batch.support_x, batch.support_y, batch.query_x, batch.query_y
    tensors = {"support_x": sx, "support_y": sy, "query_x": qx, "query_y": qy}
    for name in ("support_x", "query_x"):
        x = tensors[name]
        if not torch.is_floating_point(x):
            hint = (" (images as 0..255: give x.float() / 255, or let learner.task_batch(...) prepare them)"
                    if x.dtype == torch.uint8 else "")
            raise MetalearnError(f"{method}: the batch's {name} is {x.dtype}; inputs must be floating point{hint}")
    if sx.dtype != qx.dtype:
        raise MetalearnError(f"{method}: the batch's support_x is {sx.dtype} and its query_x {qx.dtype}; give both "
                             f"one floating-point type (batch.to({sx.dtype}))")
    devices = {name: t.device for name, t in tensors.items()}
    if len(set(devices.values())) > 1:
        shown = ", ".join(f"{name} on {device}" for name, device in devices.items())
        raise MetalearnError(f"{method}: the batch's tensors lie on different devices ({shown}); batch.to(device) "
                             "moves them together")
    if sx.dim() < 3 or qx.dim() < 3:
        # (tasks, examples) is a batch of one-number examples as often as one task of vectors
        scalar = " examples of one number each need a last axis of 1 (x.unsqueeze(-1));" if min(sx.dim(),
                                                                                               qx.dim()) == 2 else ""
        raise MetalearnError(f"{method}: support_x and query_x must be (tasks, examples, *example_shape), got shapes "
                             f"{tuple(sx.shape)} and {tuple(qx.shape)};{scalar} a single task needs a leading axis "
                             "of 1 (x.unsqueeze(0))")
    classification = not torch.is_floating_point(qy)
    if torch.is_floating_point(sy) == classification:
        raise MetalearnError(f"{method}: support_y is {sy.dtype} and query_y {qy.dtype}; give both class ids (long) "
                             "or both regression targets (float)")
    for name, y in (("support_y", sy), ("query_y", qy)):
        if (y.dim() != 2) if classification else (y.dim() < 3):
            shape = "(tasks, examples)" if classification else "(tasks, examples, *target_shape)"
            scalar = " targets of one number each need a last axis of 1 (y.unsqueeze(-1));" if (
                not classification and y.dim() == 2) else ""
            raise MetalearnError(f"{method}: {name} must be {shape}, got shape {tuple(y.shape)};{scalar} a single task "
                                 "needs a leading axis of 1 (unsqueeze(0)) on every tensor")
    if len({t.shape[0] for t in tensors.values()}) > 1:
        shown = ", ".join(f"{name} {t.shape[0]}" for name, t in tensors.items())
        raise MetalearnError(f"{method}: the batch's tensors have different numbers of tasks (first axis: {shown})")
    if sx.shape[2:] != qx.shape[2:]:
        raise MetalearnError(f"{method}: support examples have shape {tuple(sx.shape[2:])} and query examples "
                             f"{tuple(qx.shape[2:])}; a task's examples must all have one shape")
    if sx.shape[0] == 0 or sx.shape[1] == 0:
        raise MetalearnError(f"{method}: the batch has {'no tasks' if sx.shape[0] == 0 else 'no support examples'}")
    for name, x, y in (("support", sx, sy), ("query", qx, qy)):
        if (y.shape if classification else y.shape[:2]) != x.shape[:2]:
            wanted = "one class id per example" if classification else "one target row per example"
            raise MetalearnError(f"{method}: {name}_y has shape {tuple(y.shape)} for {name}_x of shape "
                                 f"{tuple(x.shape)}; it needs {wanted}")
    if not classification:
        if sy.shape[2:] != qy.shape[2:]:
            raise MetalearnError(f"{method}: support targets have shape {tuple(sy.shape[2:])} and query targets "
                                 f"{tuple(qy.shape[2:])}; they must have one shape")
        return
    for name, y in (("support_y", sy), ("query_y", qy)):
        if y.dtype != torch.long:
            raise MetalearnError(f"{method}: the batch's {name} is {y.dtype}; class ids must be long (y.long())")
    ways = batch.ways  # 0: bounded by the largest support label (ProtoNets' ways without batch.ways)
    lowest = 0 if training else -1
    bad_support, bad_query = sy < 0, qy < lowest
    if ways:
        bad_support, bad_query = bad_support | (sy >= ways), bad_query | (qy >= ways)
    problems = torch.stack([bad_support.any(), bad_query.any()]).tolist()  # the one synchronisation
    if problems[0] and not ways:
        raise MetalearnError(f"{method}: support_y has negative class ids {_shown(sy[bad_support].unique())}; "
                             "label each task's classes 0..ways-1")
    implied = ""
    if not ways:
        ways = int(sy.max()) + 1
        bad_query = bad_query | (qy >= ways)
        problems[1] = bool(bad_query.any())
        implied = ", as the support labels imply"
    for (name, y, bad), problem in zip((("support_y", sy, bad_support), ("query_y", qy, bad_query)), problems):
        if problem:
            unknown = " (or -1: unknown)" if name == "query_y" and not training else ""
            raise MetalearnError(f"{method}: {name} has class ids {_shown(y[bad].unique())} outside 0..{ways - 1}"
                                 f"{unknown}, the tasks being {ways}-way{implied}; label each task's classes "
                                 "0..ways-1")


def _output_shape(learner: MetaLearner, network: nn.Module, examples: Tensor) -> tuple[int, ...]:
    """The shape per example of ``network``'s output (``learner``'s) for ``examples``, from a forward pass
    without gradients in eval mode (a dropout layer would otherwise draw from the random streams
    the trainer seeded for this step, and a resumed run's first step would differ from the
    uninterrupted one's); a network that cannot take them, lies on another device than them, or
    returns something other than one tensor (a tuple of logits and extras) is refused with a
    one-line message: every method reads the output as one tensor."""
    try:
        with torch.no_grad(), first_order_batch_norm(), evaluating(network):
            outputs = network(examples)
    except RuntimeError as err:
        mismatch = device_mismatch(learner.name, err, device_of(network), examples.device)
        if mismatch is not None:
            raise mismatch from None
        given, built = tuple(examples.shape[1:]), getattr(learner.problem, "input_shape", None)
        if built is not None and tuple(built) != given:  # inputs of another shape than the network's Problem
            built = tuple(built)
            if len(built) == len(given) + 1 and built[1:] == given and built[0] == 1:  # grey images (n, H, W)
                fix = ": add the channel axis (x.unsqueeze(-3): (tasks, n, H, W) becomes (tasks, n, 1, H, W))"
            elif len(built) == len(given) == 3 and built[1:] == given[1:]:  # images (C, H, W)
                fix = f": the network takes {built[0]} channels"
            else:
                fix = ""
            raise MetalearnError(f"{learner.name}: the tasks' inputs have shape {given} per example, but the network "
                                 f"was built for {built}{fix} (for a dataset of your own: its problem(task) gives the "
                                 "shape of the examples its task source draws)") from None
        raise MetalearnError(f"{learner.name}: the network cannot take these tasks' inputs, of shape "
                             f"{given} ({str(err).splitlines()[0]})") from None
    if not isinstance(outputs, Tensor):
        raise MetalearnError(f"{learner.name}: the network's forward returned a {type(outputs).__name__}; it must "
                             "return one tensor of outputs, (examples, *output_shape) (return the logits alone)")
    return tuple(outputs.shape[1:])


# what torch says where tensors on two devices meet (a CUDA kernel's, the meta device's)
DEVICE_MISMATCH = ("is not on the expected device", "Expected all tensors to be on the same device")


def device_mismatch(method: str, error: BaseException, network: torch.device | None,
                    batch: torch.device) -> MetalearnError | None:
    """The one-line error for torch's ``error`` where its text shows tensors on two devices
    (:data:`DEVICE_MISMATCH`), naming where the network (``network``; None: not known, a learner
    of one's own) and the batch are and how to bring them together; None for another error, to
    be reported as it is. Torch's own words name the kernel's expected device and blame no
    argument, so that a message built around them would blame the inputs' shape."""
    text = str(error).splitlines()[0] if str(error) else ""
    if not any(sign in text for sign in DEVICE_MISMATCH):
        return None
    if network is None or network == batch:  # the network's parameters or buffers themselves lie apart
        return MetalearnError(f"{method}: the batch is on device {batch}, where the learner's first parameter is, "
                              f"but part of the learner is on another ({text}); put all of it on one device "
                              f"(learner.to(\"{batch}\"))")
    return MetalearnError(f"{method}: the network is on device {network} and the batch on {batch}; move one to the "
                          f"other's device (batch.to(\"{network}\") or learner.to(\"{batch}\"))")


def learner_network(learner: MetaLearner, network: nn.Module | None = None) -> nn.Module:
    """``network``, or where it is None the learner's own: the attribute its
    :attr:`~MetaLearner.network_attribute` names (``learner.model`` by default); a learner without
    one is refused in one line naming the attribute."""
    if network is not None:
        return network
    attribute = getattr(learner, "network_attribute", "model")
    found = getattr(learner, attribute, None)
    if not isinstance(found, nn.Module):
        raise MetalearnError(f"{learner.name}: the learner has no network in self.{attribute} (an nn.Module); store it "
                             f"there, set network_attribute to the attribute that holds it, or pass network=")
    return found


def check_network_fits(learner: MetaLearner, batch: TaskBatch, *, training: bool = False,
                       network: nn.Module | None = None) -> None:
    """Refuse, with a one-line :class:`MetalearnError` that starts with ``learner.name``, a
    network that does not fit the batch's tasks, for the methods that adapt the network's own
    outputs (MAML, PLATIPUS, Reptile): a malformed batch (:func:`check_task_batch`; ``training``:
    the query labels are read, so -1 is refused too; a batch of class labels must give
    ``ways``), inputs of another floating-point type than the network's weights or that it
    cannot take (torch would fail deep inside ``vmap``), or outputs of another size than one
    per class (too few: cross-entropy fails inside torch; too many: a prediction could name a
    class the task lacks) or than the regression targets (the squared error would broadcast
    silently).

    ``network``: the module to check, by default the learner's (:func:`learner_network`: the
    attribute :attr:`~MetaLearner.network_attribute` names). The network is checked once per
    input and target shape and device (remembered on ``learner``), with a forward pass of two
    support examples without gradients in eval mode; the batch, every call (one device
    synchronisation for the labels' range). Call it at the top of ``meta_loss`` (``training=True``)
    and ``predict``."""
    require_task_batch(learner.name, batch)
    network = learner_network(learner, network)
    if not batch.ways and not torch.is_floating_point(batch.query_y):
        if batch.query_y.dim() >= 3:  # (tasks, examples, 1): regression targets given as integers
            raise MetalearnError(f"{learner.name}: this TaskBatch's targets are {batch.query_y.dtype} of shape "
                                 f"{tuple(batch.query_y.shape)}: regression targets are floating point (y.float()); "
                                 "class labels are (tasks, examples) with TaskBatch(..., ways=N)")
        raise MetalearnError(f"{learner.name}: this TaskBatch has class labels but ways=0; give TaskBatch(..., "
                             "ways=N), the number of classes per task")
    check_task_batch(learner.name, batch, training=training)
    check_input_dtype(learner.name, network, batch)
    per_example = (batch.ways,) if batch.ways else tuple(batch.query_y.shape[2:])
    # the devices too: a learner moved since its last check is checked again, and refused in one
    # line if the batch did not follow it; the network's identity, for a network passed in
    key = (id(network), per_example, tuple(batch.support_x.shape[2:]), device_of(network), batch.support_x.device)
    checked = learner.__dict__.setdefault("_fitting_shapes", set())
    if key in checked:
        return
    outputs = _output_shape(learner, network, batch.support_x[0, :2])
    if outputs != per_example:
        trained = learner.problem if learner.fixed_ways else None  # set by build_learner: load_trained's too
        if batch.ways and trained is not None and trained.classification and trained.output_dim != batch.ways:
            raise MetalearnError(learner.trained_ways_refusal(batch.ways))  # built and trained: no network advice
        if batch.ways:
            need = (f"the tasks are {batch.ways}-way; it needs one output per class (e.g. "
                    f"Conv4(in_channels, {batch.ways}), or build_model(..., out_features={batch.ways}))")
        else:
            need = f"the regression targets have shape {per_example} per example"
        raise MetalearnError(f"{learner.name}: the network has outputs of shape {outputs} (per example) "
                             f"but {need}")
    _check_functional(learner, network, batch.support_x[0, :2])
    checked.add(key)


def _check_functional(learner: MetaLearner, network: nn.Module, examples: Tensor) -> None:
    """Refuse in one line a network that cannot run as the methods of :func:`check_network_fits`
    run it: as a pure function of its parameters (``functional_call``), differentiated
    (``torch.func.grad``) and batched over tasks (``vmap``), in training mode. A forward that
    changes a buffer or attribute in place (a counter, a running normaliser) or an operation
    without a batching rule (``spectral_norm``'s power iteration, torch 2.13) otherwise fails
    inside torch with dozens of frames. One small forward and backward per input shape, under
    a fork of the random streams (a dropout draw would change the step's), for a network with a
    module of another class than torch's layers and the library's (one of the user's, a
    parametrization)."""
    from torch.func import grad, vmap

    from metalearn.runtime import cuda_devices, own_random_state

    if all(type(m).__module__.startswith(("torch.nn.modules.", "metalearn.models.")) for m in network.modules()):
        return  # torch's layers and the library's networks: tested to run so (and a probe would run their kernels)
    parameters = {name: p.detach() for name, p in network.named_parameters() if p.is_floating_point()}

    def total(params: dict[str, Tensor], x: Tensor) -> Tensor:
        return functional_call(network, params, (x,)).sum()

    try:
        with own_random_state(cuda_devices()), training_mode(network):
            # the parameters batched too: after an inner step each task has its own
            vmap(grad(total), randomness="different")({k: v[None] for k, v in parameters.items()}, examples[None])
    except RuntimeError as err:
        text = str(err).splitlines()[0] if str(err) else type(err).__name__
        text = text.split(". ")[0].rstrip(".;")  # torch's first sentence: the rest advises its own API
        why = ("its forward changes a buffer or attribute in place (a counter, a running statistic): keep such "
               "state out of forward" if "mutate a captured Tensor" in str(err) or "in-place operation" in text
               else "an operation in its forward cannot run so; replace that layer")
        raise MetalearnError(f"{learner.name}: the network cannot run as a function of its parameters, differentiated "
                             f"and batched over tasks (torch.func.grad and vmap), as {learner.name} runs it: {why} "
                             f"(torch: {text})") from None


def check_embedding_fits(learner: MetaLearner, batch: TaskBatch, *, training: bool = False,
                         width: int | None = None, network: nn.Module | None = None) -> None:
    """The check of :func:`check_network_fits` for the methods that compare embeddings
    (ProtoNets, Matching Nets, the Memory Module), whose tasks may have any number of ways: a
    well-formed batch of class labels (:func:`check_task_batch`, the ways the batch gives or
    its support labels imply: uint8 images, labels outside ``0..ways-1`` and regression targets
    are refused in one line that starts with ``learner.name``), inputs of the network's
    floating-point type, and a network that takes them and embeds each example as one vector,
    of ``width`` features when given (the size Matching Nets' LSTMs were built for).

    ``network``: the embedding network, by default the learner's (:func:`learner_network`). It
    is checked once per input shape and device; the batch, every call. Call it before
    :func:`embed_episodes` in ``meta_loss`` (``training=True``: query labels of -1 are refused
    too) and ``predict``."""
    require_task_batch(learner.name, batch)
    network = learner_network(learner, network)
    if torch.is_floating_point(batch.query_y) or torch.is_floating_point(batch.support_y):
        raise MetalearnError(f"{learner.name} classifies: the batch's labels must be class ids (long), got "
                             f"{batch.support_y.dtype} and {batch.query_y.dtype}")
    check_task_batch(learner.name, batch, training=training)
    check_input_dtype(learner.name, network, batch)
    key = ("embedding", id(network), width, tuple(batch.support_x.shape[2:]), device_of(network),
           batch.support_x.device)
    checked = learner.__dict__.setdefault("_fitting_shapes", set())
    if key in checked:
        return
    outputs = _output_shape(learner, network, batch.support_x[0, :2])
    if len(outputs) != 1:
        raise MetalearnError(f"{learner.name}: the embedding network's output per example has shape {outputs}; it "
                             "must be one vector (flatten it, as Conv4(in_channels, None) does)")
    if width is not None and outputs[0] != width:
        raise MetalearnError(f"{learner.name}: the embedding network's output has {outputs[0]} features but "
                             f"embedding_dim is {width}; give embedding_dim={outputs[0]} "
                             "(metalearn.models.output_size(model, input_shape))")
    checked.add(key)


def embed_episodes(model: nn.Module, batch: TaskBatch) -> tuple[Tensor, Tensor]:
    """Embed each task's support and query examples together, one task per call of ``model``,
    so that batch-norm statistics are those of the task alone: an episode's embeddings do not
    depend on the other episodes of its batch (the evaluator's chunking, the meta-batch size,
    the number of distributed ranks), and training and testing normalise alike.

    batch: a TaskBatch with inputs ``(tasks, n, *example_shape)`` of the network's floating-point
    type (a float32 batch for a float64 network is refused in one line); model: an embedding
    network, ``(n, *example_shape) -> (n, dim)``
    -> support embeddings ``(tasks, n_support, dim)`` and query embeddings ``(tasks, n_query, dim)``,
    differentiable with respect to the network's parameters.

    A loop over tasks, not ``vmap``: images ``(tasks, n, C, H, W)`` go through the network in
    channels-last layout, whose CPU kernels are faster than the default layout's (the
    performance docs give the measurement), and ``vmap`` cannot carry that layout. Each task is a
    batch of tens to hundreds of images, so the loop's own cost is negligible. The values equal
    ``model(task)`` of each task alone up to float rounding (another kernel). Run it inside
    :func:`metalearn.models.first_order_batch_norm` where nothing is differentiated twice."""
    check_input_dtype("the embedding network", model, batch)
    n_support = batch.support_x.shape[1]
    images = torch.cat([batch.support_x, batch.query_x], dim=1)  # (tasks, n_support + n_query, ...)
    params, layout = dict(model.named_parameters()), torch.contiguous_format
    if images.dim() == 5:  # (tasks, n, C, H, W): images, for which channels-last is faster
        layout = torch.channels_last
        # clone, not contiguous: a single-channel conv weight counts as contiguous in both layouts,
        # and only explicit channels-last strides make the first convolution's output channels-last
        params = {name: p.clone(memory_format=layout) if p.dim() == 4 else p for name, p in params.items()}
    embeddings = torch.stack([functional_call(model, params, (task.contiguous(memory_format=layout),))
                              for task in images])
    return embeddings[:, :n_support], embeddings[:, n_support:]


def num_ways(batch: TaskBatch) -> int:
    """Classes per task of a batch of class labels: ``batch.ways``, or where it is 0 (a TaskBatch
    built without ``ways=``) one more than the largest support label. Reads the labels once (a
    device synchronisation) only in the second case; :func:`check_task_batch` has refused labels
    outside that range before."""
    return batch.ways or int(batch.support_y.max()) + 1


def require_module(model: Any, method: str) -> None:
    """Refuse a network that is not an ``nn.Module`` instance: the class itself (``MAML(Conv4)``)
    or a function (``MAML(lambda x: x)``) has no parameters to adapt or train, and would fail
    at its first ``named_modules()`` or ``parameters()`` call with a TypeError or AttributeError."""
    if isinstance(model, nn.Module):
        return
    if isinstance(model, type):
        got = f"the class {model.__name__}: call it, {model.__name__}(...)"
    elif callable(model):
        got = (f"the function {getattr(model, '__name__', type(model).__name__)}: wrap its computation in an "
               "nn.Module (its forward), whose parameters are what is learned")
    else:
        got = "None" if model is None else f"an object of type {type(model).__name__}"
    raise MetalearnError(f"{method}: the network must be an nn.Module instance (got {got})")


def require_functional_model(model: nn.Module, method: str, second_order: bool) -> None:
    """Refuse a network that cannot be applied as a pure function of its parameters under
    ``vmap`` or ``functional_call``: one that is not an ``nn.Module`` instance (a class, a
    function); running-statistics buffers, which would be mutated (other buffers, constants,
    are fine); and where ``second_order`` (second derivatives are taken through the network),
    torch's native batch norm, whose second derivative under ``vmap`` is wrong (torch 2.13; use
    :class:`metalearn.models.BatchStatNorm`). ``method`` starts each message (the method's
    ``name`` or class name). Call it in the constructor, before the network is stored."""
    require_module(model, method)
    running = [f"its {type(m).__name__}" + (f" at {name}" if name else "") for name, m in model.named_modules()
               if isinstance(m, nn.modules.batchnorm._NormBase) and m.track_running_stats]
    if running:
        raise MetalearnError(
            f"{method} needs a model without running-statistics buffers (found them in {running[0]}): it "
            "applies the network as a pure function of its parameters, and running statistics are state "
            "that every forward pass would change. Use metalearn.models.BatchStatNorm (the statistics of "
            "the current batch, as in the MAML reference code): metalearn.models.batch_stat_norms(model) "
            "swaps them in."
        )
    native = [name for name, m in model.named_modules() if isinstance(m, nn.modules.batchnorm._NormBase)]
    if native and second_order:
        raise OptionError(
            f"second-order {method} cannot use torch's native batch or instance norm ({native[0]}): its second "
            "derivative under vmap is wrong in torch. Use metalearn.models.BatchStatNorm (same "
            "parameters, batch statistics; metalearn.models.batch_stat_norms(model) swaps them in) or "
            "{first_order}.", first_order=("first_order=True", "--first-order")
        )


def task_loss(prediction: Tensor, target: Tensor) -> Tensor:
    """The mean loss of ``prediction`` against ``target``, for one task or a batch of them:
    cross-entropy where ``target`` holds class ids (logits ``(..., n, ways)``, targets
    ``(..., n)`` long), mean squared error where it holds real targets (both ``(..., n,
    out_dim)``). Differentiable twice and usable under ``vmap``, as an inner loop needs."""
    if torch.is_floating_point(target):
        # written out: in torch 2.13 F.mse_loss fails inside a vmap nested in another vmap when
        # only the prediction carries the inner axis (PLATIPUS's samples within tasks)
        return (prediction - target).square().mean()
    return F.cross_entropy(prediction.reshape(-1, prediction.shape[-1]), target.reshape(-1))


def task_losses(prediction: Tensor, target: Tensor) -> Tensor:
    """:func:`task_loss` of every task of a batch at once: prediction ``(tasks, n, ...)``,
    target ``(tasks, n, ...)`` -> ``(tasks,)``, each task's loss as :func:`task_loss` gives it."""
    tasks = prediction.shape[0]
    if torch.is_floating_point(target):
        return (prediction - target).square().reshape(tasks, -1).mean(1)
    losses = F.cross_entropy(prediction.reshape(-1, prediction.shape[-1]), target.reshape(-1), reduction="none")
    return losses.view(tasks, -1).mean(1)


def accuracy(logits: Tensor, target: Tensor) -> Tensor:
    """Fraction of correct argmax predictions along the last axis of ``logits``: logits
    ``(..., n, ways)``, target ``(..., n)`` class ids -> a scalar float tensor (no gradient flows
    through ``argmax``), the metric ``accuracy`` that ``meta_loss`` returns for logging."""
    return (logits.argmax(dim=-1) == target).float().mean()
