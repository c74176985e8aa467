"""The run directory: everything one training run writes, and nothing else.

    config.json      every knob (RunConfig), so eval/resume/plot need no flags
    checkpoint.pt    model, optimiser, scheduler, step, RNG state; written atomically
    metrics.jsonl    one JSON object per logged step (training and validation)
    eval.json        the run's own test evaluation (others: eval-<what differs>.json)
    best/            with --keep-best N: the checkpoints of the N best validations (index.json: scores)
    split.json       a run on class folders: the classes of each part, which its evaluations keep to
    plots/*.png
    .lock            present while a training process holds the folder (see :meth:`RunDir.lock`)

One process trains in a folder at a time (it holds the folder's lock, :mod:`metalearn.locking`);
any number may read it meanwhile (``eval``, ``plot``, ``export``), since every file is replaced
whole (:mod:`metalearn.files`). A folder with ``config.json`` and no checkpoint holds a run that
never started (killed before its first checkpoint): it may be started again, with any options.
"""

from __future__ import annotations

import dataclasses
import io
import json
import math
import re
import time
import warnings
from pathlib import Path
from typing import Any, Callable, Iterator, TypeVar

import torch

from metalearn.config import RunConfig
from metalearn.data.splits import PARTS
from metalearn.errors import MetalearnError, caller_level, check_count, MetalearnWarning, OptionError, spellings
from metalearn.files import (RUN, TEMPORARY_NAME, append_line, atomic_write, atomic_write_bytes, cut_file, obstacle,
                             probe_writable, remove_temporaries, user_path)
from metalearn.locking import FolderInUse, FolderLock
from metalearn.run_files import (BEST_INDEX_NAME, BEST_NAME, CHECKPOINT_NAME, CONFIG_NAME, EVAL_NAME, EVAL_PATTERN,
                                 LOCK_NAME, METRICS_NAME, PLOTS_NAME, RUN_MARKERS, RUN_SPLIT_NAME, WRITER_FILES)

# how often a reader of best/ reads index.json again when a file it listed vanished: the
# training run replaces the index at most once per validation, so a second read nearly always
# finds a settled one; the bound only keeps a reader from spinning forever on a run that
# validates faster than the reader loads its checkpoints
BEST_READ_ATTEMPTS = 10

KEEP_BEST = ("keep_best=N", "--keep-best N")  # the option that keeps best/, as a caller gives it (errors.Options)

T = TypeVar("T")


class CheckpointMissing(MetalearnError):
    """A checkpoint file that was to be read does not exist (``path``): never trained, or, for a
    best checkpoint, dropped by the training run after the reader read ``best/index.json``."""

    def __init__(self, message: str, path: Path, result: dict[str, Any] | None = None):
        super().__init__(message)
        self.path = Path(path)
        self.result = result  # the evaluation not written, for the caller to show


RUNS_VARIABLE = "METALEARN_RUNS"


def default_runs_root() -> Path:
    """The folder of the runs started without a run folder, which ``metalearn status`` lists:
    ``$METALEARN_RUNS``, else ``runs/`` in the cache folder (``$METALEARN_CACHE``, ...; see
    :func:`~metalearn.data.omniglot.default_cache_dir`). It need not exist (the first such run
    makes it); a file where it, or a folder on its way, would be is refused in one line naming
    the variable that set it: read as a folder without runs, a mistyped variable would go unseen."""
    from metalearn.data.cache import path_variable, usable_cache_folder
    from metalearn.data.omniglot import default_cache_dir, file_in_the_way

    set_to = path_variable(RUNS_VARIABLE)
    if set_to:
        root = Path(set_to).expanduser()
        blocked = file_in_the_way(root, f"{RUNS_VARIABLE} {set_to}")
        if blocked:
            raise MetalearnError(f"{blocked}; point {RUNS_VARIABLE} at a folder of runs (the first run makes it)")
        return root
    root = usable_cache_folder(default_cache_dir()) / "runs"
    blocked = file_in_the_way(root, f"the runs folder {root}")
    if blocked:  # the cache folder is one: only runs/ in it is a file
        raise MetalearnError(f"{blocked}; move it away, or point {RUNS_VARIABLE} at a folder of runs")
    return root


def no_runs_in(root: Path) -> str:
    """What to say where ``root`` (:func:`default_runs_root`) holds no run: a folder that does
    not exist is said not to, with the variable that named it, since a mistyped
    ``METALEARN_RUNS`` is not an empty folder of runs."""
    if root.is_dir():
        return f"no runs in {root}"
    from metalearn.data.cache import path_variable

    if path_variable(RUNS_VARIABLE):
        return f"no runs: {RUNS_VARIABLE} {root} does not exist"
    return f"no runs: {root} does not exist (runs started without a run folder go there)"


def new_run_name(config: RunConfig) -> str:
    """``<method>-<dataset>-<shape>-[seed<N>-]<time>``: the seed where it is not the default 0, so
    that the runs of a seed sweep started without --run-dir tell their seeds by name."""
    task = config.task
    from metalearn.datasets import get_dataset

    shape = f"{task.ways}w{task.shots}s-" if task.classification else f"k{task.shots}-"
    if get_dataset(task.dataset).reinforcement:  # an environment: no episode shape
        shape = ""
    seed = f"seed{config.train.seed}-" if config.train.seed else ""
    return f"{config.method}-{task.dataset}-{shape}{seed}{time.strftime('%Y%m%d-%H%M%S')}"


def claim_new_run_dir(root: Path, name: str) -> Path:
    """Create and return ``root/name``, or ``root/name-2``, ``-3``, ... when taken: creating the
    folder claims it, so runs started in the same second (a seed sweep) never share one."""
    root.mkdir(parents=True, exist_ok=True)
    for attempt in range(1, 10_000):
        path = root / (name if attempt == 1 else f"{name}-{attempt}")
        try:
            path.mkdir()
            return path
        except FileExistsError:
            continue
    raise OptionError(f"no free run directory name {name}-N in {root}; give {{run_dir}}", run_dir="run_dir")


def _best_file(name: str) -> bool:
    """Whether ``name`` is one a run writes in ``best/``: a checkpoint, the index, or the
    temporary file of either."""
    match = TEMPORARY_NAME.fullmatch(name)
    name = match.group("name") if match else name
    return name == BEST_INDEX_NAME or _best_step(name) is not None


def _best_step(file: str) -> int | None:
    """The step of a best checkpoint's file name (``step-N.pt``); None for any other name."""
    match = re.fullmatch(r"step-(\d+)\.pt", file)
    return int(match.group(1)) if match else None


def save_state(path: Path, state: dict[str, Any]) -> None:
    """Write ``state`` (a checkpoint) as ``path``, whole (atomically). Serialised in memory
    first: torch's zip writer, streaming into the file, would turn a full disk into a
    ``RuntimeError`` ("enforce fail at inline_container.cc ... unexpected pos") without the
    file's name; written by :func:`~metalearn.files.atomic_write_bytes` it is a one-line
    :class:`~metalearn.files.WriteError` naming the file and the free space."""
    buffer = io.BytesIO()
    torch.save(state, buffer)
    atomic_write_bytes(path, buffer.getbuffer())


def config_from(data: Any, path: Path) -> RunConfig:
    """The run configuration ``data`` read from ``path`` (config.json, or a checkpoint's
    ``config`` entry); a damaged one is one line naming that file, with the field as the file
    spells it, never as a command-line flag nobody typed."""
    from metalearn.algorithms import find_method, make_method_config
    from metalearn.datasets import DATASETS
    from metalearn.errors import ConfigError
    from metalearn.models import NETWORKS
    from metalearn.plugins import load_plugins, remedy

    def not_known(kind: str, name: str, how: str) -> MetalearnError:
        # most likely one the training process registered, not a typo: a plugin not named here
        known = (remedy(recorded_entry(data, kind, name))
                 or f"one registered in Python ({how}) is known to every process when its module is a plugin "
                    f"(METALEARN_PLUGINS=./my_module.py)")
        return MetalearnError(f"{path}: the run's {kind} {name!r} is not known to this process: {known}")

    task = data.get("task") if isinstance(data, dict) else None
    dataset = task.get("dataset") if isinstance(task, dict) else None
    method = data.get("method", data.get("algorithm")) if isinstance(data, dict) else None
    load_plugins()
    if isinstance(method, str) and find_method(method) is None:
        raise not_known("method", method, "metalearn.register_method")
    if isinstance(dataset, str) and dataset not in DATASETS:
        raise not_known("dataset", dataset, "metalearn.register_dataset or register_environment")
    try:
        config = RunConfig.from_dict(data)
        make_method_config(config.method, config.method_config)  # a value edited by hand: named here
    except ConfigError as err:
        network = data.get("method_config", {}).get("model") if isinstance(data, dict) else None
        if err.field == "model" and isinstance(network, str) and network not in NETWORKS:
            raise not_known("network", network, "metalearn.models.register_network") from None
        raise MetalearnError(f"{path}: invalid run configuration: {err}") from None
    except MetalearnError as err:
        raise MetalearnError(f"{path}: {err}") from None
    warn_replaced_built_ins(data, path)
    return config


def recorded_plugins(data: Any) -> list[dict[str, Any]]:
    """The entries of config.json's ``plugins`` (:func:`run_plugins`) in ``data``, the file's JSON:
    none where it has no such list, and an entry that is no object (a hand edit) is skipped, so
    that a damaged record only costs its advice, never the run."""
    recorded = data.get("plugins") if isinstance(data, dict) else None
    return [entry for entry in recorded if isinstance(entry, dict)] if isinstance(recorded, list) else []


def recorded_entry(data: Any, kind: str, name: str) -> dict[str, Any] | None:
    """The entry of config.json's ``plugins`` in ``data`` (the file's JSON) for the run's ``kind``
    ("method", "dataset", "network") ``name``: where its registration came from; None where the
    file records none (the first, should a hand edit list it twice)."""
    return next((entry for entry in recorded_plugins(data)
                 if entry.get("kind") == kind and entry.get("name") == name), None)


def warn_replaced_built_ins(data: Any, path: Path) -> None:
    """Warn where the run ``data`` (config.json) records a registration of its own under a
    built-in's name (a plugin replaced metalearn's ``maml``) that this process does not have: it
    reads the run with the built-in, which is not what trained it."""
    from metalearn.plugins import remedy, source_of

    for entry in recorded_plugins(data):
        kind, name = entry.get("kind"), entry.get("name")
        if isinstance(kind, str) and isinstance(name, str) and source_of(kind, name) is None:
            load = remedy(entry) or "load what registered it"
            warnings.warn(f"{path}: the run's {kind} {name!r} was registered in Python, replacing metalearn's own, and "
                          f"this process reads it as metalearn's built-in {kind}: {load}", MetalearnWarning, stacklevel=caller_level())


def run_plugins(config: RunConfig, recorded: Any = None) -> list[dict[str, Any]]:
    """The parts of ``config`` (its method, dataset and network) that this process registered in
    Python, a built-in replaced included, each ``{"kind", "name"}`` and where its registration
    came from (:func:`metalearn.plugins.source_of`); config.json's ``plugins``. A part this
    process has no registration of keeps its entry in ``recorded`` (the JSON of the run's
    config.json as it stands): a ``--resume`` without the plugin does not erase what trained the run."""
    from metalearn.plugins import source_of

    parts = (("method", config.method), ("dataset", config.task.dataset),
             ("network", config.method_config.get("model")))
    entries = []
    for kind, name in parts:
        source = source_of(kind, name) if isinstance(name, str) else None
        if source is not None:
            entries.append({"kind": kind, "name": name, **source})
        elif (entry := recorded_entry(recorded, kind, name)) is not None:
            entries.append(entry)
    return entries


def registered_in_python(config: RunConfig, recorded: Any = None) -> str | None:
    """For a run whose method, dataset or network was registered outside a plugin (a notebook's
    or a script's ``register_method``), by this process or, as ``recorded`` (the JSON of its
    config.json) says, by the one that trained it: no ``metalearn`` command imports it, so this
    is what would let one load it (:func:`metalearn.plugins.remedy`), for the end of a hint that
    gives the Python line instead. None where every part is built in or a plugin's."""
    from metalearn.plugins import remedy

    for entry in run_plugins(config, recorded):
        if "module" in entry:
            return "for the command line, " + remedy(entry)
    return None


def unreadable_checkpoint(path: Path, why: str) -> OptionError:
    """The refusal of the checkpoint file ``path`` for ``why`` (what is wrong, a few words): a
    file that does not load, lacks an entry, or holds a damaged one where it is read
    (:func:`metalearn.checkpoints.check_entries`), all the same damage to the user."""
    return OptionError(f"{path} is unreadable ({{why}}): it is truncated, corrupt or not a metalearn checkpoint. "
                       "Put back the run's own checkpoint.pt, or train the run again in a new {run_dir}.",
                       why=(why, why), run_dir="run_dir")


class RunDir:
    """The files of one run folder, ``path`` (see the module's docstring for its layout), read
    and written whole. Making a ``RunDir`` touches nothing: the folder need not exist yet. Only
    the process holding :meth:`lock` writes the run's files; reading needs no lock."""

    def __init__(self, path: Path | str):
        # named as every public function's run folder is: RunDir(path) is where each reads it
        self.path = user_path(path, "run_dir", what=RUN)
        """The run folder."""

    config_path = property(lambda self: self.path / CONFIG_NAME)
    """``config.json``: the run's :class:`~metalearn.config.RunConfig`."""
    checkpoint_path = property(lambda self: self.path / CHECKPOINT_NAME)
    """``checkpoint.pt``: the latest checkpoint."""
    metrics_path = property(lambda self: self.path / METRICS_NAME)
    """``metrics.jsonl``: one JSON object per logged step."""
    eval_path = property(lambda self: self.path / EVAL_NAME)
    """``eval.json``: the run's own test evaluation (others: :meth:`eval_file`)."""
    plots_dir = property(lambda self: self.path / PLOTS_NAME)
    """``plots/``: the PNGs of ``metalearn plot`` and ``sample``."""
    best_dir = property(lambda self: self.path / BEST_NAME)
    """``best/``: the checkpoints :meth:`keep_best` kept, and their ``index.json``."""
    split_path = property(lambda self: self.path / RUN_SPLIT_NAME)
    """``split.json``: for a run on class folders split by fractions or a split file, the
    class names of each part as it trained (a ``--split-file``); evaluations use it."""

    lock_path = property(lambda self: self.path / LOCK_NAME)
    """``.lock``: the file :meth:`lock` holds while a process trains here."""

    def exists(self) -> bool:
        """Whether the folder holds a run's ``config.json`` (a run set up, started or not)."""
        return self.config_path.is_file()

    def holds_run(self) -> bool:
        """Whether a run has started here (a checkpoint or metrics): a new run must not write
        over it. ``config.json`` alone is not one: it is written just before the first
        checkpoint, so a folder with only it holds a run killed before it started."""
        return self.has_checkpoint() or self.metrics_path.exists()

    def never_started(self) -> bool:
        """Whether the run here was set up and killed before its first checkpoint (a config,
        nothing else): starting it again, with the same options or others, loses nothing."""
        return self.exists() and not self.holds_run()

    def lock(self, purpose: str = "training") -> FolderLock:
        """Take this folder for writing (creating it if needed): raises :class:`FolderInUse`,
        naming the process, while another holds it. The lock goes when the holder releases it
        or ends in any way (SIGKILL too). Then removes the temporary files that a killed
        writer left (``checkpoint.pt.tmp<pid>``, ``best/step-N.pt.tmp<pid>``, ...; in
        ``plots/``, which ``plot`` and ``export`` write without this lock, those of writers no
        longer running). Readers never take it."""
        lock = FolderLock.take(self.lock_path, purpose, refusal=lambda holder: FolderInUse(
            "{folder} is in use by {holder}: one run folder has one writer. Wait for it to finish (or stop it), or "
            "choose another {run_dir}", folder=(str(self.path),) * 2, holder=(holder, holder), run_dir="run_dir"))
        try:
            self.check_own_subfolders(plots=False)  # training writes no plot: a plots/ link is plot's to refuse
        except MetalearnError:
            lock.release()
            raise
        remove_temporaries(self.path, owned=WRITER_FILES)
        remove_temporaries(self.best_dir, all_owned=True)  # kept checkpoints: written only under this lock
        self._remove_unlisted_best()
        if self._linked_out(self.plots_dir) is None:  # no sweep through a link out of the run
            remove_temporaries(self.plots_dir)
        return lock

    def checked_plots_dir(self) -> Path:
        """``plots/``, once :meth:`check_own_subfolders` found it the run's own."""
        self.check_own_subfolders()
        return self.plots_dir

    def _linked_out(self, folder: Path) -> Path | None:
        """Where ``folder`` (a subfolder of the run) leads when it is a link to a folder outside
        the run folder; None otherwise."""
        if not (folder.is_symlink() and folder.is_dir()):
            return None
        target = folder.resolve()
        return None if target.is_relative_to(self.path.resolve()) else target

    def check_own_subfolders(self, plots: bool = True) -> None:
        """Refuse, in one line, a ``best/`` or ``plots/`` that is a link through which this run
        would write or delete what is not its own. ``plots/`` linked out of the run folder (its
        plots are written there, and the temporary files of dead writers deleted; ``plots``
        False: not judged, for a writer that writes none); ``best/`` linked into another run's
        folder (its best checkpoints, listed in its index) or to a folder that holds other
        files than best checkpoints (the writer deletes unlisted checkpoints and temporary files
        there). A ``best/`` linked to a folder of the run's own elsewhere (another disk) is
        fine. Run folders come from others too: a received run must not reach out of its
        folder."""
        for folder in (self.best_dir, self.plots_dir) if plots else (self.best_dir,):
            target = self._linked_out(folder)
            if target is None:
                continue
            if folder == self.plots_dir:
                raise MetalearnError(f"{folder} is a link to {target}, outside the run folder, where the run would "
                                     f"write its plots: remove the link")
            if any((target.parent / name).exists() for name in RUN_MARKERS):
                raise MetalearnError(f"{folder} is a link into another run's folder ({target}), where this run "
                                     f"would keep its best checkpoints: remove the link, or copy what it holds there")
            try:
                foreign = next((entry.name for entry in target.iterdir() if not _best_file(entry.name)), None)
            except OSError:
                foreign = None  # unreadable: the writer's own access says so
            if foreign is not None:
                raise MetalearnError(f"{folder} is a link to {target}, which holds other files than best checkpoints "
                                     f"({foreign}); the run deletes unlisted checkpoints and temporary files there: "
                                     f"link a folder of its own")

    # -- config --------------------------------------------------------------------------------

    def write_config(self, config: RunConfig, resumed: bool = False) -> None:
        """Write ``config`` as ``config.json``, whole (atomically), making the folder if needed.
        Where the run's method, dataset or network was registered in Python (a plugin, or code
        of the user's own), ``plugins`` records where from (:func:`run_plugins`), so that a
        process without it can name what to load; ``resumed`` (the run's own config.json is
        rewritten) keeps what it recorded of the parts this process has no registration of."""
        self.path.mkdir(parents=True, exist_ok=True)
        plugins = run_plugins(config, self.config_as_it_stands() if resumed else None)
        record = {**config.to_dict(), **({"plugins": plugins} if plugins else {})}
        atomic_write_bytes(self.config_path, (json.dumps(record, indent=2) + "\n").encode())

    def config_as_it_stands(self) -> Any:
        """The JSON of config.json as it stands, for what it records (None: no config.json, or
        one unreadable; the file is checked where it is read as the run's configuration)."""
        try:
            return json.loads(self.config_path.read_text())
        except (OSError, ValueError, RecursionError):  # RecursionError: arrays nested thousands deep
            return None

    def write_split(self, split: dict[str, list[str]]) -> None:
        """Write the run's class-folder ``split`` as ``split.json``, whole (atomically): class names
        as they read (UTF-8); where a name is not UTF-8 (bytes Python holds as surrogates, which
        UTF-8 cannot carry), the whole file in JSON's ``\\u`` escapes, which read back the same."""
        try:
            text = (json.dumps(split, indent=2, ensure_ascii=False) + "\n").encode()
        except UnicodeEncodeError:
            text = (json.dumps(split, indent=2) + "\n").encode()
        atomic_write_bytes(self.split_path, text)

    def read_split(self) -> dict[str, list[str]] | None:
        """The run's ``split.json``, or None where it has none (not a run on class folders, or
        one that has not saved since split.json was introduced). A damaged one (not JSON, or not
        the parts metalearn writes: each of train, val, test a list of class names) is one line
        naming it and saying to delete it: metalearn wrote it, so no option of the user's is to
        blame, and a resume writes it again from the run's class folders."""
        if not self.split_path.is_file():
            return None
        delete = "delete it: the next resume writes it again"
        split = read_json_object(self.split_path, delete)
        if set(split) != set(PARTS) or not all(isinstance(names, list) and all(isinstance(name, str) for name in names)
                                               for names in split.values()):  # metalearn writes all three parts
            raise MetalearnError(f"{self.split_path} is damaged: it is not the split metalearn writes (train, val "
                                 f"and test, each a list of class names); {delete}")
        return split

    def with_own_split(self, config: RunConfig, data_dir: Path | str | None = None) -> RunConfig:
        """``config`` with its class-folder split set to the one this run recorded
        (``split.json`` as its ``split_file``), where it has one: evaluations, plots and
        comparisons score the run's own test classes even after its folder changed (classes
        added, removed or renamed reshuffle a split by fractions). Where ``data_dir`` sets its
        own split (train/ val/ test/ folders, CSV files), that split, with neither fractions nor
        a file. Without split.json, ``config``."""
        from metalearn.data.folder import sets_own_split

        if not self.split_path.is_file():
            return config
        if sets_own_split(data_dir):
            own = ""
        else:  # checked here: passed on as a split file, a damaged one would be blamed on a --split-file never given
            self.read_split()
            own = str(self.split_path.absolute())
        task = dataclasses.replace(config.task, split_fractions="", split_file=own)
        return dataclasses.replace(config, task=task)

    def read_config(self) -> RunConfig:
        """The run's configuration. Raises :class:`MetalearnError` when there is no
        ``config.json`` (not a run folder) or it is not valid JSON or not a valid configuration."""
        if not self.config_path.is_file():
            if self.path.is_file() and RunDir(self.path.parent).exists():  # RUN/config.json, a file of the run
                raise MetalearnError(f"{self.path} is a file of the run in {self.path.parent}: give the run's folder, "
                                     f"{self.path.parent}")
            if not self.path.exists():
                raise MetalearnError(f"{self.path} does not exist: give a run folder (one holding config.json)")
            raise MetalearnError(f"{self.path} is not a metalearn run directory (no config.json)")
        return config_from(read_json_object(self.config_path, "put back the run's own config.json"), self.config_path)

    # -- checkpoint ----------------------------------------------------------------------------

    def write_checkpoint(self, state: dict[str, Any]) -> None:
        """Write to a temporary file, flush to disk, then rename over the old checkpoint: a
        kill at any moment leaves either the old or the new checkpoint, never half of one. A
        full disk is a one-line :class:`~metalearn.files.WriteError` (see :func:`save_state`)."""
        save_state(self.checkpoint_path, state)

    def has_checkpoint(self) -> bool:
        """Whether ``checkpoint.pt`` exists (the run can be resumed, evaluated and plotted)."""
        return self.checkpoint_path.is_file()

    def read_checkpoint(self, *needed: str, path: Path | None = None) -> dict[str, Any]:
        """The state :meth:`write_checkpoint` saved (or the checkpoint at ``path``, one of
        :meth:`best_checkpoints`). ``needed``: the entries the caller reads
        (``"step"``, ``"config"``, ``"learner"``, ...); a file that lacks one, or that holds no
        dict at all, is refused as not a metalearn checkpoint instead of failing where it is read."""
        checkpoint_path = self.checkpoint_path if path is None else Path(path)

        def missing() -> CheckpointMissing:
            if path is None:
                return CheckpointMissing(f"no checkpoint in {self.path}: train first (metalearn train ...)",
                                         checkpoint_path)
            if checkpoint_path.parent == self.best_dir:  # listed by best/index.json when the caller read it
                return CheckpointMissing(f"{checkpoint_path} is gone: the run dropped it from its best checkpoints "
                                         "after best/index.json was read (it is training): evaluate again",
                                         checkpoint_path)
            return CheckpointMissing(f"checkpoint {checkpoint_path} does not exist", checkpoint_path)

        if not checkpoint_path.is_file():
            raise missing()

        def unreadable(why: str) -> MetalearnError:
            # torch's own message spans lines and suggests weights_only=False: never for a file of unknown origin
            return unreadable_checkpoint(checkpoint_path, why)

        try:
            # tensors and plain values only: opening someone else's run runs no pickled code
            state = torch.load(checkpoint_path, map_location="cpu", weights_only=True)
        except PermissionError:
            raise  # not the file's content: the CLI names the file and the refusal
        except FileNotFoundError:  # deleted since is_file (a best checkpoint its run displaced)
            raise missing() from None
        except Exception as err:  # torch raises many kinds for a damaged file
            raise unreadable(type(err).__name__) from None
        if not isinstance(state, dict):
            raise unreadable(f"it holds a {type(state).__name__}, not a dict")
        absent = [repr(key) for key in needed if key not in state]
        if absent:
            others = ", ".join(absent[:-1]) + " or " if absent[:-1] else ""
            raise unreadable(f"it has no {others}{absent[-1]}")
        if "step" in state:  # as Python's int: a NumPy integer or a 0-d tensor would be kept as given
            state["step"] = check_count(state["step"], "step", 0, error=unreadable,
                                        message="its step is {value!r}, not a count of meta-steps")
        return state

    def keep_best(self, state: dict[str, Any], score: float, keep: int, higher_is_better: bool) -> None:
        """Keep ``state`` as ``best/step-N.pt`` while its validation ``score`` is among the ``keep``
        best (ties: the earlier step), dropping the checkpoint it displaces; ``best/index.json``
        maps each kept file to its score. A step validated again (after a resume) replaces its
        entry. A non-finite score is never kept."""
        if not math.isfinite(score):
            return
        index = self.read_best_index()  # a damaged index is refused before best/ is made
        self.best_dir.mkdir(parents=True, exist_ok=True)
        name = f"step-{int(state['step'])}.pt"
        # an entry whose file is gone (deleted by hand: the order below never leaves one) would
        # outrank, and so delete, a checkpoint that is there: it is forgotten
        index = {file: value for file, value in index.items() if (self.best_dir / file).is_file()}
        index[name] = score
        ranked = sorted((file for file in index if _best_step(file) is not None),
                        key=lambda file: (-index[file] if higher_is_better else index[file], _best_step(file)))
        kept = {file: index[file] for file in ranked[:keep]}
        # the order makes every moment of a kill safe: the checkpoint is in place before the
        # index lists it, and a file is deleted only once the index no longer lists it, so
        # best/index.json never names a missing file; what a kill in between leaves (a file not
        # listed) is deleted by the next holder of the lock (:meth:`_remove_unlisted_best`)
        if name in kept:
            save_state(self.best_dir / name, state)
        self._replace_best_index(index, kept)

    def check_best_writable(self) -> None:
        """Refuse, in one line, a ``best/`` the next :meth:`keep_best` could not write: ``best`` a
        file or a link to nothing (a link to a folder is a folder), ``best/index.json`` a folder,
        a link to nothing or a special file, a folder that refuses new files (read-only,
        immutable, a quota: :func:`~metalearn.files.probe_writable`). For a resume, before it
        trains: the first validation would otherwise fail after the steps up to it, which no
        checkpoint kept."""
        best = self.best_dir
        if (best.exists() or best.is_symlink()) and not best.is_dir():  # a link to a folder is one (another disk)
            what = "a link to nothing" if best.is_symlink() and not best.exists() else "a file"
            raise MetalearnError(f"{best} is {what}, where the run keeps its best checkpoints: move it away")
        index = best / BEST_INDEX_NAME
        what = obstacle(index, reading=True)
        if what is not None:
            raise MetalearnError(f"{index} is {what}, where the run lists its best checkpoints: move it away")
        probe_writable(index if best.is_dir() else best)

    def drop_best_after(self, step: int) -> None:
        """Forget the best checkpoints of steps after ``step`` (kept by a run killed after its
        last checkpoint: the resumed run validates those steps again, or ends before them)."""
        index = self.read_best_index()
        kept = {file: score for file, score in index.items()
                if _best_step(file) is not None and _best_step(file) <= step}
        if kept != index:
            self._replace_best_index(index, kept)

    def read_best_index(self) -> dict[str, float]:
        """``best/index.json``: the file name of each kept checkpoint and its validation score;
        ``{}`` where there is none. The one reader of the index, for the trainer that keeps the
        checkpoints (:meth:`keep_best`, :meth:`drop_best_after`; a resume reads it before it
        trains, in :meth:`~metalearn.training.Trainer.restore`) and for their readers
        (:meth:`best_checkpoints`): an index that is not a JSON object of finite scores is
        refused in one line naming it and the repair, instead of failing in keep_best's ranking
        at the first validation after steps were trained. Names are left to each user:
        :meth:`best_checkpoints` refuses one that is no ``step-N.pt``, :meth:`keep_best` drops it."""
        index_path = self.best_dir / BEST_INDEX_NAME
        if not index_path.is_file():
            return {}
        advice = self._rebuild_best_advice()
        index = read_json_object(index_path, advice)
        for file, score in index.items():
            if isinstance(score, bool) or not isinstance(score, (int, float)) or not math.isfinite(score):
                raise OptionError(f"{index_path} gives {file} the score {{score}}, not a finite number (it was edited "
                                  "or damaged); {advice}", score=(json.dumps(score)[:40],) * 2, advice=advice)
        return index

    def _remove_unlisted_best(self) -> list[Path]:
        """Delete the ``best/step-N.pt`` files that ``best/index.json`` does not list (all of them
        where there is no index), and return them: what a writer killed inside :meth:`keep_best`
        or :meth:`drop_best_after` left (a checkpoint written but not yet listed, or no longer
        listed but not yet deleted). Only the holder of the run's lock writes best/ and it calls
        this before writing, so no such file is a write in progress; readers only open listed
        files. An index that cannot be read, or something else in its place (a folder: read as
        no index, it would have every file deleted), leaves every file alone (its next reader
        says so)."""
        if obstacle(self.best_dir / BEST_INDEX_NAME, reading=True) is not None:
            return []
        try:
            index = self.read_best_index()
            entries = list(self.best_dir.iterdir())
        except (MetalearnError, OSError):
            return []
        removed = []
        for entry in entries:
            if _best_step(entry.name) is not None and entry.name not in index:
                try:
                    if entry.is_file() or entry.is_symlink():
                        entry.unlink()
                        removed.append(entry)
                except OSError:
                    continue  # gone already, or not ours to delete: the next holder tries again
        return removed

    def _replace_best_index(self, index: dict[str, Any], kept: dict[str, Any]) -> None:
        """Write ``kept`` as ``best/index.json``, then delete the checkpoints of ``index`` it leaves
        out. Index first: a kill in between leaves an unlisted file, never a listed missing one.
        Only ``step-N.pt`` names are deleted, whatever else an edited index names."""
        atomic_write_bytes(self.best_dir / BEST_INDEX_NAME, (json.dumps(kept, indent=2) + "\n").encode())
        for file in set(index) - set(kept):
            if _best_step(file) is not None:
                (self.best_dir / file).unlink(missing_ok=True)

    def best_checkpoints(self) -> list[Path]:
        """The checkpoints :meth:`keep_best` kept, best first. A training run may replace them
        meanwhile (it lists a new file, then deletes the one displaced): a listed file found
        missing is a damaged best/ only when a fresh read of the index still lists it; else the
        fresh index is used. A caller that loads the files can still find one gone by then:
        :meth:`read_best_checkpoints` loads them and reads the index again when it does."""
        index_path = self.best_dir / BEST_INDEX_NAME

        def read_index() -> dict[str, Any]:
            what = obstacle(index_path, reading=True)
            if what is not None:  # not "kept none yet": the index is there in a form no reader takes
                raise MetalearnError(f"{index_path} is {what}, not the list of {self.path}'s best checkpoints: "
                                     f"put the file back, or delete {self.best_dir} and train on to keep new ones")
            if not index_path.is_file():
                raise OptionError(f"{self.path} kept no best checkpoints: train with {{keep_best}} (and validation) "
                                  "to evaluate an ensemble", keep_best=KEEP_BEST)
            return self.read_best_index()

        index = read_index()
        for _ in range(BEST_READ_ATTEMPTS):
            if not index:  # validation kept none yet, or a resume forgot those after the last checkpoint
                raise MetalearnError(f"{self.path} holds no best checkpoints yet ({index_path} lists none): train "
                                     "on until it validates, then evaluate the ensemble")
            for file in index:
                if _best_step(file) is None:
                    raise OptionError(f"{index_path} lists {file}, which is not a best checkpoint in "
                                      f"{self.best_dir}: delete best/ and train with {{keep_best}} again",
                                      keep_best=KEEP_BEST)
            gone = [file for file in index if not (self.best_dir / file).is_file()]
            if not gone:
                return [self.best_dir / file for file in index]
            again = read_index()
            if again == index:  # not a replacement under way: the file is missing for good
                raise OptionError(f"{index_path} lists {gone[0]}, which is not a best checkpoint in "
                                  f"{self.best_dir}: delete best/ and train with {{keep_best}} again",
                                  keep_best=KEEP_BEST)
            index = again
        raise self._best_kept_changing()

    def _best_kept_changing(self) -> MetalearnError:
        return MetalearnError(f"the best checkpoints of {self.path} changed {BEST_READ_ATTEMPTS} times while they "
                              "were read (its training validates faster than they load): evaluate again, or "
                              "once the run has finished")

    def read_best_checkpoints(self, load: Callable[[Path], T] | None = None) -> list[T]:
        """``load(path)`` of each of :meth:`best_checkpoints`, best first, all from one reading
        of ``best/index.json``: where a listed file vanished before ``load`` opened it (the
        training run displaced it by a better one), the index is read again and every file
        loaded anew, so the result never mixes two indexes or misses a member. A file is never
        changed in place (``step-N.pt`` always holds step N), so what was loaded stays valid.
        ``load`` (default: :meth:`read_checkpoint` of the file, the state dict, refused by
        :meth:`check_best_step` where it holds another step) must let the
        :class:`CheckpointMissing` of :meth:`read_checkpoint` through, and check the step itself
        (:func:`~metalearn.checkpoints.load_trained` does)."""
        def read_best(path: Path) -> dict[str, Any]:
            state = self.read_checkpoint("step", path=path)
            self.check_best_step(path, state["step"])
            return state

        load = load if load is not None else read_best
        for _ in range(BEST_READ_ATTEMPTS):
            paths = self.best_checkpoints()
            try:
                return [load(path) for path in paths]
            except CheckpointMissing as err:
                if err.path not in paths:
                    raise  # not one of the best checkpoints: the caller's own matter
        raise self._best_kept_changing()

    def best_steps(self) -> list[int]:
        """The steps of :meth:`best_checkpoints`, best first."""
        return [_best_step(path.name) for path in self.best_checkpoints()]

    def check_best_step(self, path: Path, step: int) -> None:
        """Refuse, in one line, the best checkpoint ``path`` (``step-N.pt``) where the state it
        holds is of ``step``, not N: the ensemble's steps, and the ranking by score that the
        index gives N, are read from the name, so another step's state (a file copied over it)
        would be scored under N's name. Paths of other names are not best checkpoints: no check."""
        named = _best_step(Path(path).name)
        if named is not None and step != named:
            raise OptionError(f"{path} holds the state of step {step}, not of step {named} as its name says: it was "
                              "replaced by another checkpoint; put back the run's own file, or {advice}",
                              advice=self._rebuild_best_advice())

    def _rebuild_best_advice(self) -> tuple[str, str]:
        """How to recover from a damaged ``best/``: without it, a resumed run's validations keep
        best checkpoints anew (a missing index reads as none kept; :meth:`keep_best` makes the
        folder); as Python and the command line name the options."""
        options = {"resume": ("resume=True", "--resume"), "steps": ("steps", "--steps")}
        return spellings(OptionError(f"delete {self.best_dir}: the validations after a {{resume}} (with more "
                                     "{steps}, for a complete run) keep best checkpoints anew", **options))

    # -- metrics -------------------------------------------------------------------------------

    def append_metrics(self, record: dict[str, Any]) -> None:
        """Append ``record`` to ``metrics.jsonl`` as one JSON line (the folder must exist). A
        failure is a :class:`~metalearn.files.WriteError` naming the file, after cutting off
        what part of the line was written (a full disk); a line cut short by a kill is skipped
        by :meth:`read_metrics`, so ``record`` needs an integer ``step`` to be read back."""
        append_line(self.metrics_path, json.dumps(record) + "\n")

    def read_metrics(self) -> list[dict[str, Any]]:
        """The records of ``metrics.jsonl``, in file order; ``[]`` when there is none. A line that
        is not a JSON object with an integer ``step`` (cut short by a kill, edited by hand) is
        skipped, never an error."""
        return list(self.iter_metrics())

    def iter_metrics(self) -> Iterator[dict[str, Any]]:
        """:meth:`read_metrics` one record at a time, for a reader that keeps only some: the
        file is read line by line (a run logged at every step has as many lines as steps, which
        as Python dicts take far more memory than the file)."""
        if not self.metrics_path.is_file():
            return
        # undecodable bytes only spoil their own line, which is then skipped
        with open(self.metrics_path, encoding="utf-8", errors="replace") as lines:
            for line in lines:
                record = _metrics_record(line)
                if record is not None:
                    yield record

    def truncate_metrics(self, step: int) -> None:
        """Drop the records after ``step`` (written after the checkpoint a resume starts from)
        and a last line cut short by a kill (so that the next record starts a line of its own
        instead of being glued to it), cutting ``metrics.jsonl`` in place: the same file (its
        inode) stays, so that ``tail -f`` goes on following it. Nothing is written where no line
        must go (a resume after a pause at ``--stop-at`` or ``--time-limit``), nor where there is
        no file.

        The file is cut at the first record past ``step``: the trainer writes records in step
        order (a validation after its step's training line), so everything after that record
        is of later steps too. A line that is no record before it (a hand edit) stays, and is
        skipped when read as before. A last line without its newline is cut off, but for one
        that holds a whole record of ``step`` or before (a write cut just before its newline),
        which is kept and given its newline. The cut is one ``ftruncate`` (the newline one
        byte), then flushed to disk: a kill leaves the file as it was or cut, never anything
        between. For the holder of the folder's lock, the file's one writer
        (:meth:`lock`); a failure is a :class:`~metalearn.files.WriteError`, a link at the
        file's name is refused as :meth:`append_metrics` refuses it."""
        try:
            handle = open(self.metrics_path, "rb")
        except FileNotFoundError:
            return
        cut, end, newline = None, 0, False
        with handle:
            for line in handle:  # split at b"\n" alone, as the trainer ends its lines
                record = _metrics_record(line.decode("utf-8", errors="replace"))
                whole = line.endswith(b"\n")
                if (record is not None and record["step"] > step) or (not whole and record is None):
                    cut = end
                    break
                newline = not whole  # a whole record at the end, without its newline
                end += len(line)
        if cut is not None:
            cut_file(self.metrics_path, cut)
        elif newline:
            cut_file(self.metrics_path, end, newline=True)

    def eval_file(self, labels: dict[str, Any] | None = None, part: str = "test") -> Path:
        """Where an evaluation is written: ``eval.json``, the run's own evaluation (test part,
        its episode shape, method options and number of episodes, seed 0). Evaluations on
        another part or shape, with changed options, episodes or seed (``labels``) get a file
        of their own, named by what differs (``eval-part=val.json``, ``eval-ways=20.json``,
        ``eval-transductive=false.json``), and leave ``eval.json`` alone."""
        labels = {**(labels or {}), **({"part": part} if part != "test" else {})}
        spell = lambda value: json.dumps(value) if isinstance(value, bool) else value  # true, as typed
        suffix = "".join(f"-{k}={spell(v)}" for k, v in sorted(labels.items()))
        return self.eval_path.with_stem(self.eval_path.stem + suffix)

    def read_evaluations(self) -> dict[str, dict[str, Any]]:
        """Every evaluation written here (``eval.json``, ``eval-*.json``), by file stem."""
        def advice(path: Path) -> str:
            options = "" if path.name == EVAL_NAME else " with the options its name lists"
            return f"delete it or rerun `metalearn eval {self.path}`{options}"

        return {path.stem: read_json_object(path, advice(path)) for path in sorted(self.path.glob(EVAL_PATTERN))}

    def writable_eval_file(self, labels: dict[str, Any] | None = None, part: str = "test") -> Path:
        """:meth:`eval_file`, after making sure it can be written: refused (a one-line
        :class:`MetalearnError`) when a folder, a link or a special file has its name (the
        rename would replace it), and when the run folder refuses the temporary file it is
        written through (a read-only folder or mount, a quota: a
        :class:`~metalearn.files.WriteError` from :func:`~metalearn.files.probe_writable`). A
        read-only file of that name is no obstacle: the rename replaces it. For a caller about
        to evaluate, which can take long, before it starts."""
        path = self.eval_file(labels, part)
        what = obstacle(path)
        if what is not None:
            raise MetalearnError(f"{path} is {what}, where metalearn eval writes this evaluation: move it away")
        probe_writable(path)
        return path

    def write_eval(self, result: dict[str, Any], overrides: dict[str, Any] | None = None,
                   part: str = "test") -> Path:
        """Write ``result`` to :meth:`eval_file`, whole (atomically), unless that file holds the
        evaluation of a later checkpoint than ``result``'s ``step``: then nothing is written and
        :class:`EvaluationSuperseded` says so in one line (the run trained on while this one was
        evaluated, and its newer score stays). Every writer of an evaluation file comes through
        here: ``metalearn eval`` (also ``--ensemble``, ``--protocol``), the test after training,
        and a ``maml-rl`` run's ``eval-weights=initial.json`` (no ``step``: the initial weights
        are no checkpoint, so nothing to compare). A file holding the same or an earlier step,
        none, or one that cannot be read as an evaluation is replaced."""
        path = self.eval_file(overrides, part)
        step = evaluation_step(result)

        def refuse_if_superseded() -> None:
            # Read as late as the write allows: after the new file is on disk, just before the
            # rename. A race remains: a later checkpoint's evaluation that another writer renames
            # into place between this read and our rename (the time of one read of the file) is
            # replaced. No lock closes it: writers of evaluation files take none (`metalearn
            # eval` may run on another machine sharing the folder, beside a training run that
            # holds the folder's lock).
            held = _read_evaluation(path)
            held_step = evaluation_step(held) if held is not None else None
            if step is not None and held_step is not None and held_step > step:
                raise EvaluationSuperseded(
                    f"not written: {path} holds the evaluation of a later checkpoint ({evaluation_in_words(held)}) "
                    f"than this one of step {step}: the run trained on while this evaluation ran (evaluate again "
                    f"to score its newer checkpoint), or an older checkpoint was put back (move {path.name} away "
                    "to keep this score)", path, result)

        refuse_if_superseded()  # before the file is written too: no temporary file for nothing
        atomic_write(path, lambda f: f.write((json.dumps(result, indent=2) + "\n").encode()),
                     before_replace=refuse_if_superseded)
        return path


def _metrics_record(line: str) -> dict[str, Any] | None:
    """The record a line of ``metrics.jsonl`` holds, or None where it holds none: a line cut
    short by a kill, a bare number or list, a dict without an integer step (a hand edit, or
    garbage). Every record the trainer writes names its step."""
    try:
        record = json.loads(line)
    except (ValueError, RecursionError):
        return None
    if isinstance(record, dict) and isinstance(record.get("step"), int) and not isinstance(record["step"], bool):
        return record
    return None


class EvaluationSuperseded(MetalearnError):
    """An evaluation (``result``) was not written: its file (``path``) holds one of a later
    checkpoint (:meth:`RunDir.write_eval`)."""

    def __init__(self, message: str, path: Path, result: dict[str, Any] | None = None):
        super().__init__(message)
        self.path = Path(path)
        self.result = result  # the evaluation not written, for the caller to show


def evaluation_step_in(path: Path) -> tuple[int | None, str]:
    """The checkpoint step of the evaluation in ``path`` and the evaluation in words (None and
    "" where there is none, or none that can be read as one)."""
    held = _read_evaluation(Path(path))
    return (None, "") if held is None else (evaluation_step(held), evaluation_in_words(held))


def json_finite(value: Any) -> Any:
    """``value`` (JSON-like: dicts, lists, numbers) with every float that is not finite as None,
    for ``json.dumps(..., allow_nan=False)``: NaN and Infinity are no JSON, and a strict reader
    (JavaScript's ``JSON.parse``) stops at them. For what metalearn writes for other programs to
    read (status --json, compare --json, an export's summary.json); the run's own files keep
    NaN, which its readers take as a number."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {key: json_finite(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_finite(item) for item in value]
    return value


def evaluation_step(result: dict[str, Any]) -> int | None:
    """The checkpoint step an evaluation scored, None where it names none (the initial
    weights' returns) or not as a whole number."""
    step = result.get("step")
    return step if isinstance(step, int) and not isinstance(step, bool) else None


def _read_evaluation(path: Path) -> dict[str, Any] | None:
    """The evaluation in ``path``, None where there is none or it cannot be read as one (cut
    short or damaged: no score to keep, so the write replaces it)."""
    try:
        held = json.loads(path.read_bytes())
    except (OSError, ValueError, RecursionError):
        return None
    return held if isinstance(held, dict) else None


def evaluation_in_words(result: dict[str, Any]) -> str:
    """An evaluation in a few words, as ``metalearn eval`` names the one it replaces:
    ``"mse 0.41 at step 70000"``, ``"the lifelong protocol at step 300"``."""
    at = f" at step {result['step']}" if evaluation_step(result) is not None else ""
    if "protocol" in result:
        return f"the {result['protocol']} protocol{at}"
    try:
        return f"{result['metric']} {float(result['mean']):.4g}{at}"
    except (KeyError, TypeError, ValueError):
        return f"an evaluation{at}"


def read_json_object(path: Path, advice: str | tuple[str, str]) -> dict[str, Any]:
    """The JSON object in ``path``; a file cut short, damaged or holding another JSON value is one
    line naming it and ``advice``, what to do (where it names options, as Python and the command
    line spell it)."""
    advice = (advice, advice) if isinstance(advice, str) else advice
    try:
        data = json.loads(path.read_bytes())
    except (ValueError, RecursionError) as err:  # JSONDecodeError, bytes that are no text, nesting beyond Python's
        detail = "nested too deeply" if isinstance(err, RecursionError) else \
            str(err).splitlines()[0][:120] if str(err) else type(err).__name__
        raise OptionError(f"{path} is not valid JSON ({{detail}}): it was cut short or damaged; {{advice}}",
                          detail=(detail, detail), advice=advice) from None
    if not isinstance(data, dict):
        kind = {list: "array", str: "string", bool: "boolean"}.get(type(data), "number" if data is not None else "null")
        raise OptionError(f"{path} holds a JSON {kind}, not the object metalearn writes; {{advice}}", advice=advice)
    return data


def lock_for_training(run: RunDir, world, check: Callable[[], Any] | None = None) -> FolderLock:
    """Rank 0 takes the run folder's lock (the other ranks of a torchrun job write nothing
    there), then makes ``check()`` where given (training's: that its test result can be
    written); every rank learns whether it could, so that a job refused because another holds
    the folder, or by the check, ends on all its ranks at once instead of waiting at the next
    collective. ``world``: a :class:`~metalearn.distributed.World`. Every rank gets a lock to
    release (on the other ranks one that holds nothing)."""
    lock, failure = FolderLock(run.lock_path, None), None  # the other ranks hold nothing
    if world.is_main:
        try:
            lock = run.lock()
            if check is not None:
                check()
        except (MetalearnError, OSError) as err:
            failure = err
            if lock.held:
                lock.release()
    if world.distributed:
        failed = float(world.sum(torch.tensor(float(failure is not None), device=world.device)))
        if failed and failure is None:
            raise FolderInUse("rank 0 could not take {folder} for this job, or refused it (its message says why)",
                              folder=(str(run.path),) * 2)
    if failure is not None:
        raise failure
    return lock
