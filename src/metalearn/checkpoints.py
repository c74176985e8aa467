"""Reading a run back: checkpoints and the checks that decide whether they fit.

Whether a run folder can be trained into (:func:`check_run_dir`), whether a saved run may be
continued with a configuration (:func:`check_compatible`), whether a checkpoint's weights are
usable and fit a learner, and :func:`load_trained` for evaluation. The trainer writes run
folders; everything here only reads them.
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from pathlib import Path
from typing import Any, Callable, Iterable

import torch

from metalearn.algorithms import MetaLearner, build_learner, make_method_config, method_class
from metalearn.algorithms.base import floating_dtype
from metalearn.config import RESUMABLE_CHANGES, RunConfig, config_differences
from metalearn.errors import (ConfigError, MetalearnError, OptionError, OptionWarning, caller_level, flag,
                              keyword_only_after, valued)
from metalearn.options import option_defaults
from metalearn.run_files import RUN_OWN_FILES
from metalearn.runs import RunDir, config_from, unreadable_checkpoint
from metalearn.runtime import own_random_state
from metalearn.tasks import problem_of
from metalearn.tasks.batch import data_fix

RESUME_ENTRIES = ("step", "config", "learner", "optimizer", "scheduler", "torch_rng")  # what a resume reads
# what a resume reads where the checkpoint has it (runs saved before an entry lack it)
RESUME_OPTIONAL_ENTRIES = ("elapsed_s", "machines", "validation_pending", "data_fingerprint")


def _real(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


# what each entry holds, as Trainer.state writes it: (test, the words for it). Its readers check
# the entries they use (check_entries) where they read them, so that a hand-edited or foreign
# value is one line naming the file and the entry, never a TypeError deep inside torch; an entry
# a reader does not use never refuses the file it is in
ENTRY_TYPES: dict[str, tuple[Callable[[Any], bool], str]] = {
    "step": (lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 0, "a count of meta-steps"),
    "config": (lambda v: isinstance(v, dict), "a run configuration (a dict)"),
    "learner": (lambda v: isinstance(v, dict) and all(isinstance(k, str) and isinstance(t, torch.Tensor)
                                                      for k, t in v.items()), "a state dict of tensors"),
    "optimizer": (lambda v: isinstance(v, dict), "an optimiser's state (a dict)"),
    # the schedule's position; torch versions add other keys, which its load_state_dict takes as they come
    "scheduler": (lambda v: isinstance(v, dict) and isinstance(v.get("last_epoch"), int)
                  and not isinstance(v["last_epoch"], bool), "a schedule's state (a dict with last_epoch)"),
    "torch_rng": (lambda v: isinstance(v, torch.Tensor) and v.dtype == torch.uint8 and v.dim() == 1,
                  "a random generator's state (a uint8 tensor)"),
    "elapsed_s": (lambda v: _real(v) and v >= 0, "a number of seconds"),
    "machines": (lambda v: isinstance(v, list) and all(isinstance(record, dict) for record in v),
                 "a list of machine records"),
    "validation_pending": (lambda v: isinstance(v, bool), "true or false"),
    "data_fingerprint": (lambda v: isinstance(v, str), "a fingerprint (a string)"),
    "data_dir": (lambda v: isinstance(v, str), "a folder's path (a string)"),
}


def _described(value: Any) -> str:
    """``value`` as a few words: itself where short (``'abc'``, ``None``), else its kind."""
    if isinstance(value, torch.Tensor):
        return f"a {str(value.dtype).removeprefix('torch.')} tensor of shape {tuple(value.shape)}"
    text = repr(value)
    return text if len(text) <= 40 else f"a {type(value).__name__}"


def check_entries(state: dict[str, Any], path: Path, needed: Iterable[str] = (),
                  optional: Iterable[str] = ()) -> None:
    """Refuse the checkpoint ``state`` (read from ``path``) in one line where it lacks one of the
    ``needed`` entries, or where one of those or of the ``optional`` ones that it has does not
    hold what :data:`ENTRY_TYPES` says. For a reader, with the entries it uses."""
    for name in needed:
        if name not in state:
            raise unreadable_checkpoint(path, f"it has no {name!r}")
    for name in (*needed, *optional):
        if name in state and name in ENTRY_TYPES:
            test, what = ENTRY_TYPES[name]
            if not test(state[name]):
                raise unreadable_checkpoint(path, f"its {name} is {_described(state[name])}, not {what}")


def read_entries(run: RunDir, *needed: str, optional: Iterable[str] = (), path: Path | None = None) -> dict[str, Any]:
    """:meth:`RunDir.read_checkpoint` (of ``path``, else the run's checkpoint.pt), with the
    ``needed`` entries and the ``optional`` ones it has checked by :func:`check_entries`."""
    state = run.read_checkpoint(*needed, path=path)
    check_entries(state, run.checkpoint_path if path is None else Path(path), needed, optional)
    return state


def saved_config(state: dict[str, Any], path: Path) -> RunConfig:
    """The run configuration saved in the checkpoint ``state`` read from ``path``; a damaged one
    is one line naming that file: the user would otherwise look for it in config.json."""
    check_entries(state, path, ("config",))
    return config_from(state["config"], path)


def on_cpu(value: Any) -> Any:
    """``value`` with every tensor in it (through dicts, lists and tuples) moved to the CPU."""
    if isinstance(value, torch.Tensor):
        return value.cpu()
    if isinstance(value, dict):  # a module's state dict is an OrderedDict with version metadata
        moved = type(value)((k, on_cpu(v)) for k, v in value.items())
        if hasattr(value, "_metadata"):
            moved._metadata = value._metadata
        return moved
    if isinstance(value, (list, tuple)):
        return type(value)(on_cpu(v) for v in value)
    return value


def all_finite(tensors: Iterable[torch.Tensor]) -> bool:
    """Whether every element of ``tensors`` is finite, with one synchronisation for all of them.

    Each element times zero is 0 when it is finite and NaN when it is inf or NaN, and a sum
    with a NaN in it is NaN: so the check is that the L1 norms of the products add up to 0.
    Not the norm of the tensors themselves: the norm of large finite weights overflows to inf.
    On a GPU the foreach operations take the tensors of one dtype in
    multi-tensor kernels, where a per-tensor ``isfinite().all()`` launches several kernels a
    tensor, and the trainer calls this twice a step. Integer and boolean tensors are always finite; the temporary products
    take as much memory as the tensors."""
    floating = [t.detach() for t in tensors if t.is_floating_point() or t.is_complex()]
    if not floating:
        return True
    zeros = torch._foreach_mul(floating, 0.0)
    return bool(torch.stack(torch._foreach_norm(zeros, 1)).sum() == 0)


def check_weights_finite(weights: dict[str, Any], where: Path) -> None:
    """Refuse a checkpoint whose learner holds a NaN or inf weight (one saved before training
    checked its updates): evaluating it only prints NaN scores, resuming it a NaN loss."""
    for name, value in weights.items():
        if isinstance(value, torch.Tensor) and value.is_floating_point() and not all_finite([value]):
            raise OptionError(
                f"the checkpoint in {where} holds non-finite weights ({name}): the run diverged before it "
                "was saved. Train it again in a new {run_dir} with a smaller {meta_lr}.", run_dir="run_dir",
                meta_lr="meta_lr")


def check_same_method(saved: RunConfig, method: str, run_path: Path | str) -> None:
    """Refuse to continue a run of one method as another: its saved options are the other
    method's, which this one would only call unknown."""
    from metalearn.datasets import reads_image_folder

    if saved.method != method:
        # the images' folder, where the checkpoint records none (or it is gone): a resume needs it
        recorded = recorded_images(RunDir(run_path)) if reads_image_folder(saved.task.dataset) else None
        folder = reads_image_folder(saved.task.dataset) and (recorded is None or not recorded.is_dir())
        path = repr(str(run_path))
        resume = (f"metalearn.train(metalearn.resolve_config({saved.method!r}, resume_from={path}), run_dir={path}"
                  + (", data_dir=FOLDER" if folder else "") + ", resume=True)",
                  f"metalearn train {saved.method} --resume --run-dir {run_path}" + (" --data-dir FOLDER" if folder
                                                                                       else ""))
        raise OptionError(  # the call that continues it, as the caller's: Python's, or the shell's command
            f"{run_path} is a {saved.method} run, not {method}: continue it with `{{resume}}`, or train {method} in "
            "another {run_dir}", resume=resume, run_dir="run_dir")


RESUME_ADVICE = "Resume with the same options, or start a new run directory."
# the same on the command line, where a new run may start from the run's weights
RESUME_ADVICE_FLAGS = "Resume with the same options, or start a new --run-dir (--init-from RUN keeps its weights)."


def configuration_conflict(what: str, conflicts: dict[str, tuple[Any, Any]], why: str = "",
                           advice: str = RESUME_ADVICE) -> OptionError:
    """The error for ``what`` (a run, a checkpoint) made with other values: ``conflicts`` maps
    ``part.option`` to (saved value, requested value). ``why`` may name ``{steps}``, the
    option, as :class:`~metalearn.errors.Options` spells it. With the resume's ``advice``, the
    command line reads each option as its flag (``--inner-lr``), as the user gave it."""
    def lines(name: Any) -> str:
        return "; ".join(f"{name(k)}: {old!r} there, {new!r} requested" for k, (old, new) in conflicts.items())

    resuming = advice == RESUME_ADVICE
    as_flag = (lambda key: flag(key.split(".", 1)[1]) if key.split(".")[0] in ("task", "train", "method_config")
               else key) if resuming else str
    # the values as they are, whatever braces their reprs hold: fields, whose spellings are never read
    return OptionError(f"{{what}} was made with another configuration ({{lines}}).{why} {{advice}}",
                       what=(what, what), lines=(lines(str), lines(as_flag)), steps="steps",
                       advice=(advice, RESUME_ADVICE_FLAGS if resuming else advice))


def check_compatible(saved: RunConfig, requested: RunConfig, what: str, advice: str = RESUME_ADVICE) -> None:
    """Refuse to continue ``saved`` with a configuration that changes what it computes. An
    option that ``saved`` lacks (the run is older than the option) counts as its default."""
    if saved.method != requested.method:  # the options of one method are unknown to the other
        raise configuration_conflict(what, {"method": (saved.method, requested.method)}, "", advice)
    saved, requested = with_all_options(saved), with_all_options(requested)
    resumable = set(RESUMABLE_CHANGES)
    if saved.train.lr_anneal != "none":
        resumable.discard("train.steps")  # the anneal's horizon: changing it rewrites the schedule
    cls = method_class(saved.method)
    for option in cls.option_requires:
        if not cls.option_acts(option, saved.method_config) and not cls.option_acts(option, requested.method_config):
            resumable.add(f"method_config.{option}")  # acts in neither: a difference changes nothing
    conflicts = {k: v for k, v in config_differences(saved, requested).items() if k not in resumable}
    if conflicts:
        why = (f" Its learning rate is annealed ({saved.train.lr_anneal}) over {{steps}}, so the step count "
               "cannot change."
               if "train.steps" in conflicts else "")
        raise configuration_conflict(what, conflicts, why, advice)


def with_all_options(config: RunConfig) -> RunConfig:
    """``config`` with every option of its method spelled out, defaults included."""
    options = make_method_config(config.method, config.method_config)
    return dataclasses.replace(config, method_config=dataclasses.asdict(options))


def load_learner_state(learner: MetaLearner, state: dict[str, Any], where: Path,
                       changed: str | tuple[str, str] = "") -> None:
    """Load ``state`` into ``learner``; a mismatch is one line naming what does not fit (and
    ``changed``, the options a caller altered, as the likely cause: as Python and the command
    line spell them, ``("overrides['hidden']", "--set hidden")``). Weights of another
    floating-point type than the learner's (a float64 run, a float32 learner) are refused:
    ``load_state_dict`` would cast them, and a resume would go on in another precision
    than the run's without a word."""
    saved, mine = saved_dtype(learner, state), floating_dtype(learner)
    if saved is not None and saved != mine:
        raise MetalearnError(f"the checkpoint in {where}: the run's weights are {saved} and this learner's {mine}: "
                             f"convert the learner first (learner.to({saved}))")
    try:
        learner.load_state_dict(state)
    except RuntimeError as err:
        # torch's first line is a header ("Error(s) in loading state_dict for MAML:"); the next says what
        lines = [line.strip() for line in str(err).splitlines() if line.strip()]
        detail = (lines[1] if len(lines) > 1 else lines[0])[:200]
        cause = "{changed} changes the trained network; " if changed else ""
        raise OptionError(f"the checkpoint in {where} does not fit this model: {cause}{{detail}}",
                          changed=(changed, changed) if isinstance(changed, str) else changed,
                          detail=(detail, detail)) from None


def in_run_type(learner: MetaLearner, state: dict[str, Any]) -> MetaLearner:
    """``learner`` (built float32) in the floating-point type of the weights ``state`` holds:
    a run trained in float64 or bfloat16 is loaded and resumed as it trained, not rounded (or
    widened) into float32 weights that are not the run's, which :func:`load_learner_state`
    would refuse."""
    saved = saved_dtype(learner, state)
    return learner.to(saved) if saved is not None and saved != floating_dtype(learner) else learner


def saved_dtype(learner: MetaLearner, state: dict[str, Any]) -> torch.dtype | None:
    """The floating-point type of ``state``'s copy of ``learner``'s first floating-point
    parameter (what :func:`~metalearn.algorithms.base.floating_dtype` reads of a learner), or
    None where ``state`` has no such tensor (a mismatch that loading names)."""
    name = next((name for name, p in learner.named_parameters() if p.is_floating_point()), None)
    value = state.get(name) if name is not None else None
    return value.dtype if isinstance(value, torch.Tensor) and value.is_floating_point() else None


def own_learner(state: dict[str, Any]) -> str | None:
    """The class of the learner a checkpoint's run was trained with where the user built it
    (``Trainer(config, MAML(my_network), ...)``): its network need not be the one config.json
    describes. None for a learner that :func:`~metalearn.training.build_trainer` built from
    config.json (``"method:NAME"``), and for checkpoints from before the entry, whose learners
    were always built so by metalearn's commands."""
    source = state.get("learner_source")
    return source if isinstance(source, str) and not source.startswith("method:") else None


def recorded_images(run: RunDir, state: dict[str, Any] | None = None) -> Path | None:
    """The image folder ``run`` trained on, as its checkpoint records it (absolute), for a run
    on an image folder of the user's (``folder``, ``mini-imagenet``); None for other datasets
    (Omniglot's location is the environment's) and for a checkpoint that records none.
    ``state``: the checkpoint's entries where the caller has read them already."""
    from metalearn.datasets import reads_image_folder

    if not reads_image_folder(run.read_config().task.dataset):
        return None
    if state is None:
        if not run.has_checkpoint():
            return None
        state = read_entries(run, "step", optional=("data_dir",))
    recorded = state.get("data_dir")
    return Path(recorded) if recorded is not None else None


def run_images(run: RunDir, data_dir: Path | str | None, state: dict[str, Any] | None = None) -> Path | str | None:
    """The image folder a command on ``run`` reads: ``data_dir`` where given, else the folder the
    run trained on (:func:`recorded_images`), so that eval, plot, compare and a resume need no
    --data-dir for the run's own images; refused in one line where that folder is gone. None
    where neither says (the command then asks for --data-dir). ``state``: as for
    :func:`recorded_images`."""
    if data_dir is not None:
        return data_dir
    recorded = recorded_images(run, state)
    if recorded is not None and not recorded.is_dir():
        raise OptionError(f"{run.path} trained on the images in {recorded}, which is not a folder now: give "
                          "{data_dir}, the folder that holds its images", data_dir="data_dir")
    return recorded


def own_tasks(state: dict[str, Any]) -> str | None:
    """The class of the task source a checkpoint's run was trained on where it was the user's
    own, which config.json's dataset does not describe; None for tasks the registry built
    (``"dataset:NAME"``; ``"metalearn.*"``, a built-in source, in older checkpoints; absent in
    the oldest, whose tasks were always the library's)."""
    source = state.get("task_source", "metalearn.")
    return None if not isinstance(source, str) or source.startswith(("dataset:", "metalearn.")) else source


def network_difference(config: RunConfig, weights: dict[str, Any]) -> str:
    """Where the learner that ``config`` describes differs from ``weights`` (a checkpoint's
    learner state), by the names and shapes of their tensors: the first missing, unexpected
    or reshaped one, as a few words; "" where they match, so that the weights load. Builds
    the learner without touching the random streams."""
    with own_random_state([]):
        built = build_learner(config.method, config.method_config, problem_of(config.task)).state_dict()
    missing = [name for name in built if name not in weights]
    if missing:
        return f"{len(missing)} tensor(s) of config.json's network missing, e.g. {missing[0]}"
    unexpected = [name for name in weights if name not in built]
    if unexpected:
        return f"{len(unexpected)} tensor(s) that config.json's network lacks, e.g. {unexpected[0]}"
    for name, tensor in built.items():
        saved = weights[name]
        if isinstance(saved, torch.Tensor) and saved.shape != tensor.shape:
            return f"{name} of shape {tuple(saved.shape)}, config.json's network's {tuple(tensor.shape)}"
    return ""


OWN_NETWORK_ROUTE = ("build your learner again, load the weights with learner.load_state_dict(RunDir(run_dir)"
                     ".read_checkpoint()['learner']) and score them with metalearn.evaluate(learner, your_tasks)")


def override(key: str, value: Any) -> tuple[str, str]:
    """An evaluation's override of a method option, as the Python API (``overrides={'first_order':
    True}``) and the command line (``--set first_order=True``) give it."""
    return f"overrides={{{key!r}: {value!r}}}", f"--set {key}={value}"


def check_overrides_apply(config: RunConfig, overrides: dict[str, Any]) -> None:
    """Refuse an override that an evaluation would not use, so that no result is filed under a
    change that did not happen: an option that acts only in meta-training (declared with
    ``option(..., training_only=True)``: MAML's ``first_order``, its multi-step loss), or one
    that acts only beside another option's value that the run, with the overrides, lacks
    (``MetaLearner.option_requires``: ``processing_steps`` without full context embeddings)."""
    cls = method_class(config.method)
    fields = {field.name: field for field in dataclasses.fields(cls.Config)}
    options = {**option_defaults(cls.Config), **config.method_config, **overrides}
    for key, value in overrides.items():
        field = fields.get(key)
        if field is not None and field.metadata.get("training_only"):
            raise OptionError(f"{{given}}: {key} is an option of meta-training, which an evaluation does not change; "
                              "leave it out", given=override(key, value))
        if not cls.option_acts(key, options):
            other, needed = cls.option_requires[key]
            raise OptionError(f"{{given}} applies only with {other} {needed}; the run has {other} "
                              f"{options.get(other)}", given=override(key, value))


def check_overrides_leave_weights(config: RunConfig, overrides: dict[str, Any]) -> None:
    """Refuse an override that only sets where a trained tensor starts (MAML's ``inner_lr``
    under ``learn_inner_lr``, PLATIPUS's ``std_init``): the checkpoint's learned value replaces
    it, so the evaluation would score the run as it is under a name that says otherwise. Found
    by building the learner with and without the override from the same seed: the same tensors
    (names and shapes) with other values. An override that changes the network's tensors
    themselves is left to :func:`load_learner_state`, which names the mismatch."""
    if not overrides:
        return

    def initial(options: dict[str, Any]) -> dict[str, torch.Tensor]:
        with own_random_state():
            torch.manual_seed(0)
            return build_learner(config.method, options, problem_of(config.task)).state_dict()

    # each override with all the others applied, so that one is seen with the user's other (memory_size, choose_k)
    other = initial({**config.method_config, **overrides})
    for key, value in overrides.items():
        try:
            base = initial({**config.method_config, **{k: v for k, v in overrides.items() if k != key}})
        except MetalearnError:  # the others need it (a memory_size under the user's choose_k): more than a start
            continue
        same_tensors = other.keys() == base.keys() and all(other[k].shape == base[k].shape for k in base)
        if same_tensors and any(not torch.equal(other[k], base[k]) for k in base):
            raise OptionError(f"{{given}}: {key} only sets the starting value of a tensor that the run trained, and "
                              "the checkpoint's trained value replaces it; leave it out", given=override(key, value))


def initialise_from_run(learner: MetaLearner, run_dir: Path | str, config: RunConfig | None = None) -> int:
    """Copy the network weights (``model.*``, or the method's ``network_attribute``) of the
    checkpoint in ``run_dir`` into ``learner``; everything else of ``learner`` (a method's own
    parameters) keeps its initial value. The networks must be the same (names and shapes);
    where they are not, the refusal names the options of ``config`` (the new run's) that
    differ from the other run's. Returns the number of tensors copied."""
    source = RunDir(run_dir)
    if not source.has_checkpoint():
        raise OptionError("{init_from}: no checkpoint there; give a run directory of a trained run",
                          init_from=valued("init_from", source.path))
    if untrained_attempt(source):  # its weights are a random initialisation, not a trained network
        raise OptionError("{init_from}: it holds no trained step (its training stopped or failed in the first "
                          "step); give a run directory of a trained run", init_from=valued("init_from", source.path))
    saved = read_entries(source, "learner")["learner"]
    check_weights_finite(saved, source.path)
    prefix = f"{learner.network_attribute}."
    own = {name: p for name, p in learner.state_dict(keep_vars=True).items() if name.startswith(prefix)}
    if not own:  # a copy of nothing would train from scratch under the name of an initialised run
        raise OptionError(f"{{init_from}}: {type(learner).__name__} has no network weights under {prefix}* to copy "
                          "into", init_from="init_from")
    mismatched = [name for name, p in own.items() if name not in saved or saved[name].shape != p.shape]
    if mismatched:
        raise _network_mismatch(source, config, saved, mismatched[0])
    with torch.no_grad():
        for name, p in own.items():
            p.copy_(saved[name])
    return len(own)


def warn_of_seen_classes(source: RunDir, config: RunConfig, class_split: dict[str, list[str]] | None,
                         data_dir: Path | None) -> None:
    """Warn where the classes a run started ``--init-from`` the run in ``source`` validates and
    tests on include classes its starting weights trained or validated on, which would overstate
    its scores (the source's training classes among this run's validation and test classes, its
    validation classes, which chose its weights, among this run's test classes): Omniglot runs
    of two splits that share such characters
    (:data:`~metalearn.data.splits.SHARED_CHARACTERS`), class folders split two ways on one
    folder (by name, ``class_split`` against the source's ``split.json``). Other data, or a
    source that cannot be read as a run, is not judged."""
    try:
        theirs = source.read_config()
    except MetalearnError:
        return
    if theirs.task.dataset != config.task.dataset:  # other data: a transfer, not a leak
        return
    if config.task.dataset == "omniglot":
        from metalearn.data.splits import SHARED_CHARACTERS

        shared = SHARED_CHARACTERS.get((theirs.task.split, config.task.split), 0)
        seen = f"{shared} of its validation and test characters were seen by {{init_from}}, a run of the " \
               f"{theirs.task.split} split"
    else:
        try:
            trained = source.read_split() if class_split is not None else None
            there = recorded_images(source)
        except MetalearnError:
            return
        if trained is None or there is None or data_dir is None or there.resolve() != Path(data_dir).resolve():
            return
        shared = len(set(trained.get("train", [])) & set(class_split.get("val", []) + class_split.get("test", []))
                     | set(trained.get("val", [])) & set(class_split.get("test", [])))
        seen = f"{shared} of its validation and test classes were seen by {{init_from}} (its split.json)"
    if shared:
        warnings.warn(OptionWarning(
            f"this run starts from weights that have seen classes it will be scored on: {seen} (in training, or in "
            "the validation that chose them), which would overstate its scores; start from a run of the same split",
            init_from=valued("init_from", source.path)), stacklevel=caller_level())


def _network_mismatch(source: RunDir, config: RunConfig | None, saved: dict[str, Any], at: str) -> OptionError:
    """The refusal of ``--init-from`` the run in ``source`` (its learner's weights ``saved``) for
    a run of ``config`` whose network differs from it (``at``: its first tensor that does), with
    a fix that works, or none where none does. On the same dataset the fix is a ``model`` of
    this method that takes the weights where the episode shape is the other run's, found by
    building each; a network that only serves as a classifier (MAML++'s, the reference conv4) is
    no embedding's ``model``, and a network of other tensor names takes nothing. A network with
    an output layer (MAML, PLATIPUS, Reptile) cannot start from a run whose method trains an
    embedding without one (ProtoNets, Matching Nets, the Memory Module) on any dataset: no
    option gives those weights the missing layer."""
    init_from = valued("init_from", source.path)
    differ = _network_options_differ(source, config) if config is not None else None
    where = f"at {at}" + ("; {differ}" if differ else "")
    try:
        theirs = source.read_config() if config is not None else None
    except MetalearnError:
        theirs = None
    fits = _networks_taking(saved, theirs, config) if theirs is not None else None
    no_output_layer = theirs is not None and _lacks_output_layer(theirs.method, config.method, at, saved)
    if fits == [] or no_output_layer:
        why = (f"{theirs.method} trains a network without an output layer, and {config.method}'s needs one"
               if no_output_layer else
               f"no network of {config.method} takes the weights of its {theirs.method} network")
        return OptionError(f"{{init_from}}: its weights cannot carry over: {why} ({where}); train without {{init}}",
                           differ=differ or ("", ""), init="init_from", init_from=init_from)
    if fits:
        mine, own = config.method_config.get("model"), theirs.method_config.get("model")
        named = [own] if own in fits else fits  # the other run's network where it serves, else every one that does
        models = "" if mine in fits else "{model} " + named[0] + (f" (or {', '.join(named[1:])})" if named[1:] else "")
        need = (f"{models} with " if models else "") + "the same image size, channels and number of ways"
    else:
        need = "the same {model} (or {hidden}), image size, channels and number of ways, or the same environment"
    return OptionError(f"{{init_from}}: its network differs from this one ({where}); both runs need the same "
                       f"network: {need}", differ=differ or ("", ""), model="model", hidden="hidden",
                       init_from=init_from)


def _lacks_output_layer(theirs: str, mine: str, at: str, saved: dict[str, Any]) -> bool:
    """Whether the run of method ``theirs`` misses the tensor ``at`` of a network of method
    ``mine`` because it trains an embedding without an output layer and ``mine`` a network with
    one (a method with one output per class: ``fixed_ways``)."""
    try:
        embedding, classifier = method_class(theirs), method_class(mine)
    except MetalearnError:  # a method no longer registered: nothing known of its network
        return False
    return (at not in saved and classifier.fixed_ways and not embedding.fixed_ways
            and not (embedding.reinforcement or classifier.reinforcement))


def _networks_taking(saved: dict[str, Any], theirs: RunConfig, config: RunConfig) -> list[str] | None:
    """The ``model`` values with which a run of ``config`` (with the episode shape of the run
    ``theirs``) takes the learner weights ``saved`` of ``theirs``, that run's own first: each
    network this method accepts is built and its tensors (names and shapes) compared. None where
    that is not the fix to look for: another dataset (the dataset is), or a method without a
    ``model`` option (``hidden`` of maml-rl: the generic advice names it)."""
    from metalearn.models import NETWORKS

    cls = method_class(config.method)
    if theirs.task.dataset != config.task.dataset or "model" not in {f.name for f in dataclasses.fields(cls.Config)}:
        return None
    try:
        problem = problem_of(theirs.task)
    except MetalearnError:
        return None
    own = theirs.method_config.get("model")
    fits = []
    for name in dict.fromkeys([own, *NETWORKS] if isinstance(own, str) else NETWORKS):
        try:
            with own_random_state(), warnings.catch_warnings():
                warnings.simplefilter("ignore")
                learner = build_learner(config.method, {**config.method_config, "model": name}, problem)
        except MetalearnError:  # a network this method does not take, or not for these inputs
            continue
        prefix = f"{learner.network_attribute}."
        network = {key: value for key, value in learner.state_dict().items() if key.startswith(prefix)}
        if network and all(key in saved and saved[key].shape == value.shape for key, value in network.items()):
            fits.append(name)
    return fits


def _network_options_differ(source: RunDir, config: RunConfig) -> tuple[str, str] | None:
    """The options that shape a network in which ``config`` differs from the run in ``source``,
    as Python and the command line name them ("channels 3 there, 1 here", "--channels 3 there,
    1 here"); None where none does, or its config.json cannot be read."""
    try:
        theirs = source.read_config()
    except MetalearnError:
        return None
    if theirs.task.dataset != config.task.dataset:  # the other options may not apply to both
        pairs = [("dataset", theirs.task.dataset, config.task.dataset)]
    else:
        pairs = [("model", theirs.method_config.get("model"), config.method_config.get("model")),
                 ("hidden", theirs.method_config.get("hidden"), config.method_config.get("hidden")),
                 ("image_size", theirs.task.image_size, config.task.image_size),
                 ("channels", theirs.task.channels, config.task.channels),
                 ("ways", theirs.task.ways, config.task.ways)]
    differ = [(name, there, here) for name, there, here in pairs if there != here]
    if not differ:
        return None
    return tuple(", ".join(f"{spell(name)} {there} there, {here} here" for name, there, here in differ)
                 for spell in (str, flag))


def check_test_ways(config: RunConfig) -> None:
    """A method with one output per class (MAML, PLATIPUS, Reptile) can only be tested with as
    many ways as it was trained with; the others (ProtoNets, Matching Nets) with any number."""
    test_ways = config.task.for_testing().ways
    if method_class(config.method).fixed_ways and test_ways != config.task.ways:
        raise MetalearnError(
            f"{config.method} has one output per class: it is tested with as many ways as it is "
            f"trained with ({config.task.ways}), not {test_ways}."
        )


def check_run_dir(config: RunConfig, run: RunDir, resume: bool) -> None:
    """Refuse a run folder that ``config`` cannot train into: with ``resume``, one without a
    run of the same method and options to continue; without, one that already holds a run (a
    run that cannot be resumed either, for a file removed, is named as such: both ways are shut)."""
    broken = _broken_run(run)
    if resume:
        if broken:
            raise OptionError(f"cannot resume: {run.path} {broken}", run_dir="run_dir")
        if not run.exists():
            raise MetalearnError(f"cannot resume: {run.path} holds no run (no config.json)")
        if not run.has_checkpoint():
            return  # killed between config.json and its first checkpoint: it starts now
        check_compatible(run.read_config(), config, f"the run in {run.path}")  # the method too
    elif broken:
        raise OptionError(f"{run.path} already holds a run, which cannot be resumed either: it {broken}",
                          run_dir="run_dir")
    elif run.holds_run():
        try:
            method = run.read_config().method
        except MetalearnError:  # damaged config.json: the resume names that
            method = config.method
        if method != config.method:  # a resume would be refused for the method: not worth advising
            raise OptionError(f"{run.path} already holds a {method} run; choose another {{run_dir}} for this "
                              f"{config.method} run", run_dir="run_dir")
        diverged = last_divergence(run)
        if diverged is not None:  # a resume repeats that step: advised as metalearn status advises it
            step, what = diverged
            fix = data_fix(what)
            advice = (f"{fix}, then train in another {{run_dir}}" if fix is not None else
                      "train anew in another {run_dir} with other options (a smaller learning rate)")
            raise OptionError(f"{run.path} already holds a run that diverged at step {step} ({what}), which a resume "
                              f"repeats: {advice}, or with {{init_from}} to keep its last good weights",
                              run_dir="run_dir", init_from=valued("init_from", run.path))
        raise OptionError(f"{run.path} already holds a run; continue it ({{resume}}) or choose another {{run_dir}}",
                          resume=("resume=True", "--resume; in Python, resume=True"), run_dir="run_dir")


def last_divergence(run: RunDir) -> tuple[int, str] | None:
    """The step and what went non-finite where ``run``'s ``metrics.jsonl`` ends in the record of
    a divergence (training stopped before saving that step, which a resume repeats); else None."""
    try:
        records = run.read_metrics() if run.metrics_path.is_file() else []
    except MetalearnError:  # a damaged file: the run is named as holding a run, as before
        return None
    last = records[-1] if records else {}
    return (last["step"], last["diverged"]) if isinstance(last.get("diverged"), str) else None


def untrained_attempt(run: RunDir) -> bool:
    """Whether ``run`` holds only what a training attempt writes before its first step
    (config.json, the step-0 checkpoint, split.json) from an attempt that failed or was killed in
    that step: a new run may start there, as in a folder whose run never started, since nothing
    trained is lost. Its ``metrics.jsonl``, where it has one, holds only the record of that
    step's divergence. A run of ``steps`` 0 (the initial weights are the whole run), a damaged
    checkpoint, and a folder with anything else in it (other metrics, best/, eval or plot
    files) are not such an attempt."""
    if not (run.exists() and run.has_checkpoint()):
        return False
    if run.metrics_path.exists():
        records = run.read_metrics() if run.metrics_path.is_file() else []
        if not records or any(set(record) != {"step", "diverged"} or record["step"] != 1 for record in records):
            return False
    if any(entry.name not in RUN_OWN_FILES for entry in run.path.iterdir()):
        return False
    try:
        state = run.read_checkpoint("step", "config")
        return state["step"] == 0 and saved_config(state, run.checkpoint_path).train.steps > 0
    except MetalearnError:  # damaged: check_run_dir names it as it would any run
        return False


def _broken_run(run: RunDir) -> str:
    """What keeps the started run in ``run`` from resuming and what to do, as the rest of a
    sentence about the folder ("" for a folder without a started run, or with one that resumes),
    naming the option ``{run_dir}`` as :class:`~metalearn.errors.Options` does."""
    if not run.holds_run():
        return ""
    if not run.exists():
        what = (run.checkpoint_path if run.has_checkpoint() else run.metrics_path).name
        return (f"has a {what} but no config.json (removed): put the run's config.json back, or start afresh "
                "in another {run_dir}")
    if not run.has_checkpoint():
        return "has no checkpoint.pt (removed; its metrics.jsonl remains): start afresh in another {run_dir}"
    return ""


@keyword_only_after(1)
def load_trained(run_dir: Path | str, *, overrides: dict[str, Any] | None = None,
                 checkpoint: Path | None = None) -> tuple[RunConfig, MetaLearner, int]:
    """The trained run in ``run_dir``, ready to predict: returns ``(config, learner, step)``.

    - ``config``: the run's :class:`RunConfig` (``config.task.image_size`` and
      ``config.task.channels`` are how its images were prepared; ``config.task.ways`` the ways
      it trained on);
    - ``learner``: the method (a :class:`MetaLearner`, in training mode, on the CPU) with the
      checkpoint's weights, in their floating-point type (float32, or the float64 or bfloat16 of
      a run trained so); ``learner.problem`` records the tasks it was built for, so
      ``learner.fit_predict(support_x, support_y, query_x)`` prepares new images as training did;
    - ``step``: the number of meta-updates the checkpoint holds.

    ``overrides`` changes options of the method that do not touch its weights (for instance
    the number of test-time steps) for this evaluation only. ``checkpoint``: another of the
    run's checkpoints than its latest (one of ``RunDir.best_checkpoints``).

    A run that :class:`~metalearn.training.Trainer` trained from Python on a task source of the
    user's own is refused (config.json names a dataset it did not learn), and so is one trained
    with a learner of the user's own whose network is not the one config.json describes (by the
    names and shapes of its weights): both in one line that gives the route from Python. A
    learner of the user's own with config.json's network loads as any run's."""
    return load_trained_state(run_dir, overrides, checkpoint)[:3]


def load_trained_state(run_dir: Path | str, overrides: dict[str, Any] | None = None,
                       checkpoint: Path | None = None) -> tuple[RunConfig, MetaLearner, int, dict[str, Any]]:
    """:func:`load_trained`'s ``(config, learner, step)`` and the checkpoint's small entries (all
    but the weights and the optimiser's state, which are not kept in memory for the caller), so
    that the data fingerprint and folder a caller reads belong to the checkpoint loaded: a second
    reading could find a newer one written meanwhile by a run that trains on."""
    if overrides is not None and not isinstance(overrides, dict):
        raise MetalearnError(f"overrides are a dict of method options, e.g. {{\"test_inner_steps\": 10}}, got "
                             f"{type(overrides).__name__}")
    run = RunDir(run_dir)
    config = run.read_config()
    if checkpoint is None and untrained_attempt(run):  # its weights are the initial ones: no model to score
        raise MetalearnError(f"{run.path} holds no trained step: its training stopped or failed in the first step "
                             "(or is starting now); train it again into this folder, which starts it over")
    if checkpoint is not None and Path(checkpoint).is_dir():
        raise MetalearnError(f"checkpoint is one of the run's checkpoint files, got the folder {checkpoint}; the "
                             f"run's best: RunDir({str(run.path)!r}).best_checkpoints()")
    state = read_entries(run, "config", "learner", "step", optional=("data_fingerprint", "data_dir"), path=checkpoint)
    where = run.checkpoint_path if checkpoint is None else Path(checkpoint)
    if checkpoint is not None:
        run.check_best_step(where, state["step"])
    source = own_tasks(state)
    if source is not None:
        raise MetalearnError(
            f"{run.path} was trained on a task source of your own ({source}): its config.json names a built-in "
            "dataset that is not what it learned. Load the weights with learner.load_state_dict(RunDir(run_dir)"
            ".read_checkpoint()['learner']) and score them with metalearn.evaluate(learner, your_source)."
        )
    check_compatible(saved_config(state, where), config, f"the checkpoint in {run.path}",
                     "Its config.json and checkpoint.pt come from different runs: put back the run's own files.")
    learner_class = own_learner(state)
    # a learner the user built (Trainer(config, MAML(my_network), ...)) loads where its network is
    # config.json's; where it is not, the mismatch is the user's network, not a damaged run
    difference = network_difference(config, state["learner"]) if learner_class is not None else ""
    if difference:
        raise MetalearnError(
            f"{run.path} was trained with a network of your own (in a {learner_class}) that its config.json does "
            f"not describe ({difference}): load_trained and metalearn eval rebuild only the library's networks; "
            f"{OWN_NETWORK_ROUTE}.")
    if "model" in (overrides or {}) and overrides["model"] != config.method_config.get("model"):
        # same-shaped weights would load into another architecture without complaint
        raise OptionError(f"{{given}}: the run trained {config.method_config.get('model')}; a network cannot change "
                          "at evaluation", given=override("model", overrides["model"]))
    check_weights_finite(state["learner"], run.path)
    # the commands that change a run's method options (metalearn eval and compare) do so with --set alone:
    # a refusal names every option of the method so on the command line, the run's own values beside the
    # ones given too (its choose_k above a memory_size given), never as train's flags (--choose-k)
    settable = (frozenset({*option_defaults(method_class(config.method).Config), *config.method_config, *overrides})
                if overrides else frozenset())
    changed = tuple(", ".join(spell.format(key) for key in overrides) for spell in ("overrides[{!r}]", "--set {}")
                    ) if overrides else ""
    try:
        check_overrides_apply(config, overrides or {})
        check_overrides_leave_weights(config, overrides or {})
        options = {**config.method_config, **(overrides or {})}
        with own_random_state([]):  # its initial weights, replaced by the checkpoint's, drawn apart from the caller's
            learner = build_learner(config.method, options, problem_of(config.task))
        learner = in_run_type(learner, state["learner"])
        load_learner_state(learner, state["learner"], run.path, changed)  # a memory of other size: a ConfigError
    except ConfigError as err:  # --set NAME on the command line, overrides['NAME'] from Python
        err.name_overrides(settable, overrides or {})
        raise
    return config, learner, int(state["step"]), {key: value for key, value in state.items()
                                                  if key not in ("learner", "optimizer")}
