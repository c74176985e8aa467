"""The run directory: everything one training run writes, and nothing else.

    config.json      every knob (RunConfig), so eval/resume/plot need no flags
    checkpoint.pt    model, optimiser, scheduler, step, RNG state; written atomically
    metrics.jsonl    one JSON object per logged step (training and validation)
    eval.json        the last evaluation
    best/            with --keep-best N: the checkpoints of the N best validations (index.json: scores)
    plots/*.png
"""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path
from typing import Any, BinaryIO, Callable

import torch

from metalearn.config import RunConfig
from metalearn.errors import MetalearnError


def default_runs_root() -> Path:
    from metalearn.data.omniglot import default_cache_dir

    root = os.environ.get("METALEARN_RUNS")
    return Path(root).expanduser() if root else default_cache_dir() / "runs"


def new_run_name(config: RunConfig) -> str:
    task = config.task
    shape = f"{task.ways}w{task.shots}s" if task.classification else f"k{task.shots}"
    return f"{config.method}-{task.dataset}-{shape}-{time.strftime('%Y%m%d-%H%M%S')}"


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
    raise MetalearnError(f"no free run directory name {name}-N in {root}; give --run-dir")


class RunDir:
    def __init__(self, path: Path | str):
        self.path = Path(path)

    config_path = property(lambda self: self.path / "config.json")
    checkpoint_path = property(lambda self: self.path / "checkpoint.pt")
    metrics_path = property(lambda self: self.path / "metrics.jsonl")
    eval_path = property(lambda self: self.path / "eval.json")
    plots_dir = property(lambda self: self.path / "plots")
    best_dir = property(lambda self: self.path / "best")

    def exists(self) -> bool:
        return self.config_path.is_file()

    def holds_run(self) -> bool:
        """Whether any trace of a run is here (config, checkpoint or metrics): a new run must
        not write over it."""
        return self.exists() or self.has_checkpoint() or self.metrics_path.exists()

    # -- config --------------------------------------------------------------------------------

    def write_config(self, config: RunConfig) -> None:
        self.path.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(self.config_path, (json.dumps(config.to_dict(), indent=2) + "\n").encode())

    def read_config(self) -> RunConfig:
        if not self.config_path.is_file():
            raise MetalearnError(f"{self.path} is not a metalearn run directory (no config.json)")
        data = read_json_object(self.config_path, "put back the run's own config.json")
        return RunConfig.from_dict(data)

    # -- checkpoint ----------------------------------------------------------------------------

    def write_checkpoint(self, state: dict[str, Any]) -> None:
        """Write to a temporary file, flush to disk, then rename over the old checkpoint: a
        kill at any moment leaves either the old or the new checkpoint, never half of one."""
        atomic_write(self.checkpoint_path, lambda f: torch.save(state, f))

    def has_checkpoint(self) -> bool:
        return self.checkpoint_path.is_file()

    def read_checkpoint(self, *needed: str, path: Path | None = None) -> dict[str, Any]:
        """The state :meth:`write_checkpoint` saved (or the checkpoint at ``path``, one of
        :meth:`best_checkpoints`). ``needed``: the entries the caller reads
        (``"step"``, ``"config"``, ``"learner"``, ...); a file that lacks one, or that holds no
        dict at all, is refused as not a metalearn checkpoint instead of failing where it is read."""
        checkpoint_path = self.checkpoint_path if path is None else Path(path)
        if not checkpoint_path.is_file():
            raise MetalearnError(f"no checkpoint in {self.path}: train first (metalearn train ...)")

        def unreadable(why: str) -> MetalearnError:
            # torch's own message spans lines and suggests weights_only=False: never for a file of unknown origin
            return MetalearnError(f"{checkpoint_path} is unreadable ({why}): it is truncated, corrupt or not "
                                  "a metalearn checkpoint. Put back the run's own checkpoint.pt, or train the run "
                                  "again in a new --run-dir.")

        try:
            # tensors and plain values only: opening someone else's run runs no pickled code
            state = torch.load(checkpoint_path, map_location="cpu", weights_only=True)
        except PermissionError:
            raise  # not the file's content: the CLI names the file and the refusal
        except Exception as err:  # torch raises many kinds for a damaged file
            raise unreadable(type(err).__name__) from None
        if not isinstance(state, dict):
            raise unreadable(f"it holds a {type(state).__name__}, not a dict")
        missing = [repr(key) for key in needed if key not in state]
        if missing:
            others = ", ".join(missing[:-1]) + " or " if missing[:-1] else ""
            raise unreadable(f"it has no {others}{missing[-1]}")
        return state

    def keep_best(self, state: dict[str, Any], score: float, keep: int, higher_is_better: bool) -> None:
        """Keep ``state`` as ``best/step-N.pt`` while its validation ``score`` is among the ``keep``
        best (ties: the earlier step), dropping the checkpoint it displaces; ``best/index.json``
        maps each kept file to its score. A step validated again (after a resume) replaces its
        entry. A non-finite score is never kept."""
        if not math.isfinite(score):
            return
        self.best_dir.mkdir(parents=True, exist_ok=True)
        index_path = self.best_dir / "index.json"
        index = read_json_object(index_path, "delete best/ to start it afresh") if index_path.is_file() else {}
        name = f"step-{int(state['step'])}.pt"
        index[name] = score
        step_of = lambda file: int(file[len("step-"):-len(".pt")])
        ranked = sorted(index, key=lambda file: (-index[file] if higher_is_better else index[file], step_of(file)))
        kept = {file: index[file] for file in ranked[:keep]}
        if name in kept:
            atomic_write(self.best_dir / name, lambda f: torch.save(state, f))
        atomic_write_bytes(index_path, (json.dumps(kept, indent=2) + "\n").encode())
        for file in set(index) - set(kept):
            (self.best_dir / file).unlink(missing_ok=True)

    def best_checkpoints(self) -> list[Path]:
        """The checkpoints :meth:`keep_best` kept, best first."""
        index_path = self.best_dir / "index.json"
        if not index_path.is_file():
            raise MetalearnError(f"{self.path} kept no best checkpoints: train with --keep-best N (and validation) "
                                 "to evaluate an ensemble")
        index = read_json_object(index_path, "train the run again with --keep-best N")
        return [self.best_dir / file for file in index]

    # -- metrics -------------------------------------------------------------------------------

    def append_metrics(self, record: dict[str, Any]) -> None:
        with open(self.metrics_path, "a") as f:
            f.write(json.dumps(record) + "\n")

    def read_metrics(self) -> list[dict[str, Any]]:
        if not self.metrics_path.is_file():
            return []
        records = []
        # undecodable bytes only spoil their own line, which is then skipped
        for line in self.metrics_path.read_text(errors="replace").splitlines():
            try:
                record = json.loads(line)
            except ValueError:
                continue  # a line cut short by a kill
            if isinstance(record, dict):  # a bare number or list is no record (an edit, or garbage)
                records.append(record)
        return records

    def truncate_metrics(self, step: int) -> None:
        """Drop records after ``step`` (written after the checkpoint a resume starts from)."""
        kept = [r for r in self.read_metrics() if r.get("step", 0) <= step]
        atomic_write_bytes(self.metrics_path, "".join(json.dumps(r) + "\n" for r in kept).encode())

    def eval_file(self, labels: dict[str, Any] | None = None, part: str = "test") -> Path:
        """Where an evaluation is written: ``eval.json``, the run's own evaluation (test part,
        its episode shape, method options and number of episodes, seed 0). Evaluations on
        another part or shape, with changed options, episodes or seed (``labels``) get a file
        of their own, named by what differs (``eval-part=val.json``, ``eval-ways=20.json``,
        ``eval-transductive=false.json``), and leave ``eval.json`` alone."""
        labels = {**(labels or {}), **({"part": part} if part != "test" else {})}
        spell = lambda value: json.dumps(value) if isinstance(value, bool) else value  # true, as typed
        suffix = "".join(f"-{k}={spell(v)}" for k, v in sorted(labels.items()))
        return self.eval_path.with_name(f"eval{suffix}.json")

    def read_evaluations(self) -> dict[str, dict[str, Any]]:
        """Every evaluation written here (``eval.json``, ``eval-*.json``), by file stem."""
        def advice(path: Path) -> str:
            options = "" if path.stem == "eval" else " with the options its name lists"
            return f"delete it or rerun `metalearn eval {self.path}`{options}"

        return {path.stem: read_json_object(path, advice(path)) for path in sorted(self.path.glob("eval*.json"))}

    def write_eval(self, result: dict[str, Any], overrides: dict[str, Any] | None = None,
                   part: str = "test") -> Path:
        """Write ``result`` to :meth:`eval_file`."""
        path = self.eval_file(overrides, part)
        atomic_write_bytes(path, (json.dumps(result, indent=2) + "\n").encode())
        return path


def read_json_object(path: Path, advice: str) -> dict[str, Any]:
    """The JSON object in ``path``; a file cut short, damaged or holding another JSON value is one
    line naming it and ``advice``, what to do."""
    try:
        data = json.loads(path.read_bytes())
    except ValueError as err:  # JSONDecodeError, or bytes that are no text at all
        detail = str(err).splitlines()[0][:120] if str(err) else type(err).__name__
        raise MetalearnError(f"{path} is not valid JSON ({detail}): it was cut short or damaged; {advice}") from None
    if not isinstance(data, dict):
        kind = {list: "array", str: "string", bool: "boolean"}.get(type(data), "number" if data is not None else "null")
        raise MetalearnError(f"{path} holds a JSON {kind}, not the object metalearn writes; {advice}")
    return data


def atomic_write_bytes(path: Path, data: bytes) -> None:
    atomic_write(path, lambda f: f.write(data))


def atomic_write(path: Path, write: Callable[[BinaryIO], Any]) -> None:
    """``write`` into a temporary file beside ``path``, flush it to disk, rename it over
    ``path`` and flush the folder: a kill or power loss leaves the old or the new file, never
    half of one."""
    tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        fsync_directory(path.parent)
    finally:
        tmp.unlink(missing_ok=True)


def fsync_directory(path: Path) -> None:
    """Flush a folder's entries (a rename) to disk, where the platform allows it."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
