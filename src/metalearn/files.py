"""Writing files so that a kill, a full disk or a second process never leaves half a file:
atomic replacement, a write failure as one line naming the file and the free space, and the
removal of the temporary files a killed writer left behind.

Every file is written to ``<name>.tmp<pid>`` beside it, flushed to disk and renamed over
``<name>``; a kill at any moment leaves the old or the new file, plus at most that temporary
file, which :func:`remove_temporaries` deletes on the next start.
"""

from __future__ import annotations

import contextlib
import errno
import fnmatch
import glob
import os
import re
import shutil
import time
from pathlib import Path
from typing import Any, BinaryIO, Callable, Iterable

from metalearn.errors import MetalearnError

# a temporary file of a file that others read without taking the folder's lock (eval.json,
# written by `metalearn eval` beside a training run) is only removed once it is this old and
# its process is gone from this machine: the writer may be on another machine, and no write of
# such a file takes this long
UNOWNED_TEMPORARY_AGE_S = 600.0


class WriteError(MetalearnError):
    """A file could not be written (full disk, quota, read-only or vanished folder). The
    message is one line naming the file and the reason, with the free space where the reason
    is space (a full disk, a quota, a file too large); the file as it was before (if any) is
    unchanged. ``errno`` is the operating system's code.

    ``kept``: what the message says of the file there before; by default "the previous
    <name> is unchanged" where a plain file (or a link to one) of that name is there, and
    nothing where there is none or something else has the name (a folder, a device): the
    message then claims no earlier file. A writer that may have changed part of the file
    (an append) says what is still whole instead."""

    def __init__(self, path: Path, err: OSError, kept: str | None = None):
        self.path, self.errno = Path(path), err.errno
        reason = err.strerror or str(err) or type(err).__name__
        # a file-size limit (ulimit -f, a scheduler's) is no want of space: the free space would mislead
        space = (" (beyond this process's file-size limit: ulimit -f)" if err.errno == errno.EFBIG else
                 f" ({free_space(self.path.parent)} free there)" if err.errno in SPACE_ERRORS else "")
        if kept is None:
            kept = f"the previous {self.path.name} is unchanged" if _is_plain_file(self.path) else ""
        super().__init__(f"cannot write {self.path}: {reason}{space}" + (f"; {kept}" if kept else ""))


def _is_plain_file(path: Path) -> bool:
    try:
        return path.is_file()
    except OSError:  # a path the system cannot even look at (too long, a loop of links)
        return False


# the operating system's codes for a write refused for want of space (EDQUOT: a quota)
SPACE_ERRORS = {errno.ENOSPC, errno.EFBIG, getattr(errno, "EDQUOT", errno.ENOSPC)}


# what a path names, in the refusal of an empty one: "run_dir is empty; give a run folder"
FOLDER, RUN, FILE = "a folder path", "a run folder", "a file path"
IMAGES = "an image file or folder"  # predict's and sample's support and query


def user_path(value: Any, name: str, optional: bool = False, what: str = FOLDER) -> Path | None:
    """``value``, a path as a user gives it (``str`` or ``os.PathLike``), as a :class:`Path`
    with ``~`` expanded, as a shell would have done for the command line: unexpanded, a run
    folder ``~/runs/x`` would be made as ``./~/runs/x``. ``optional``: None stays None (no
    path given). Anything else is refused in one line naming ``name``, and so is an empty (or
    blank) string, saying to give ``what`` instead: ``Path("")`` is the current folder, which
    the caller did not name, so that a run, an export or a read would land there unasked (the
    command line refuses it as ``--run-dir is empty``)."""
    if value is None and optional:
        return None
    if isinstance(value, str) and not value.strip():
        raise MetalearnError(f"{name} is empty; give {what}")
    if isinstance(value, (str, os.PathLike)):
        return Path(value).expanduser()
    raise MetalearnError(f"{name} is a path (a str or pathlib.Path), got {type(value).__name__} {value!r}")


def check_paths(*given: tuple[str, Any, str]) -> None:
    """Refuse, each in one line naming its keyword, the paths of ``given`` (keyword, value, what
    it names: :data:`FOLDER`, :data:`RUN`, :data:`FILE`) that :func:`user_path` refuses: not a
    path, or empty. A value of None is a path not given, left to its default. For a public
    function's path arguments, checked before anything is read or written."""
    for name, value, what in given:
        user_path(value, name, optional=True, what=what)


def check_folder_path(path: Path | str, name: str = "") -> None:
    """Refuse, in one line, a folder path that cannot become a folder: a file, or a path below a
    file (``notes.txt/run``), which making it would fail on with the system's words."""
    path, named = Path(path), f"{name} " if name else ""
    if path.exists() and not path.is_dir():
        raise MetalearnError(f"{named}{path} is a file, not a folder; give a folder path")
    existing = next((p for p in path.absolute().parents if p.exists()), None)
    if existing is not None and not existing.is_dir():
        raise MetalearnError(f"{named}{path}: {existing} is a file, not a folder")


def same_path(a: Path | str, b: Path | str) -> bool:
    """Whether two paths name one file or folder (``~`` expanded, links and ``..`` resolved),
    also where it does not exist (yet)."""
    return Path(a).expanduser().resolve() == Path(b).expanduser().resolve()


def format_bytes(n: int) -> str:
    """``1536`` -> ``"1.5 KB"`` (powers of 1000, as ``df -H``)."""
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n} B" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    raise AssertionError("unreachable")


def free_space(folder: Path) -> str:
    """The space this user can still write in ``folder`` (its nearest existing ancestor), or
    ``"unknown"`` where the file system does not say."""
    folder = Path(folder).absolute()
    existing = next((p for p in (folder, *folder.parents) if p.exists()), folder)
    try:
        return format_bytes(shutil.disk_usage(existing).free)
    except OSError:
        return "unknown space"


def temporary_path(path: Path) -> Path:
    """Where this process writes ``path`` before renaming it into place."""
    return path.with_name(f"{path.name}.tmp{os.getpid()}")


def atomic_write_bytes(path: Path, data: bytes | memoryview) -> None:
    atomic_write(path, lambda f: f.write(data))


def atomic_write(path: Path, write: Callable[[BinaryIO], Any],
                 before_replace: Callable[[], None] | None = None) -> None:
    """``write`` into a temporary file beside ``path``, flush it to disk, rename it over
    ``path`` and flush the folder: a kill or power loss leaves the old or the new file, never
    half of one. A failure of the file system (full disk, quota, the folder gone; also when it
    only shows at the flush or the close, as on network file systems) raises :class:`WriteError`
    and leaves the old file and no temporary one. ``write`` must only write to the file object:
    a serialiser that can hide the ``OSError`` (torch's zip writer turns it into a
    ``RuntimeError``) serialises into memory first and passes the bytes.

    ``before_replace``: called once the new file is on disk, just before the rename, for a
    check of the file there now that must be as late as possible (an evaluation that a
    concurrent writer may have replaced meanwhile, :meth:`metalearn.runs.RunDir.write_eval`);
    what it raises propagates and leaves the old file and no temporary one. It must turn its
    own ``OSError`` into something else: one reaching here reads as a failure to write ``path``."""
    path = Path(path)
    tmp = temporary_path(path)
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        if before_replace is not None:
            before_replace()
        os.replace(tmp, path)
        fsync_directory(path.parent)
    except BaseException as err:
        # the temporary file goes before the error is made: on a full disk it holds the space
        # the write took, and the message names the free space there is once it is gone
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
        if isinstance(err, OSError):
            raise WriteError(path, err) from None
        raise
    remove_stale_temporaries_of(path)


def atomic_write_files(files: Iterable[tuple[Path, bytes | memoryview]]) -> None:
    """Write several files whole, as one record: every one into its temporary file beside it
    (:func:`temporary_path`), each flushed to disk, and only then each renamed over its name,
    in the order given, and their folders flushed. A failure while the temporary files are
    written (a full disk, a quota) raises :class:`WriteError` for that file and leaves every
    file as it was and no temporary file: the record is written whole or not at all. A rename
    that fails (the folder replaced meanwhile) raises for its file, with those before it
    already replaced. A kill between two renames leaves the first ones new, the rest old and
    their temporary files, which :func:`remove_temporaries` deletes on a later start: put last
    the file whose presence says the record is complete."""
    files = [(Path(path), data) for path, data in files]
    staged: list[tuple[Path, Path]] = []
    try:
        for path, data in files:
            tmp = temporary_path(path)
            staged.append((path, tmp))
            try:
                with open(tmp, "wb") as f:
                    f.write(data)
                    f.flush()
                    os.fsync(f.fileno())
            except OSError as err:
                # the temporary files go before the error is made: on a full disk they hold the
                # space the record took, and the message names the free space there is without them
                for _, partial in staged:
                    with contextlib.suppress(OSError):
                        partial.unlink(missing_ok=True)
                raise WriteError(path, err) from None
        for path, tmp in staged:
            try:
                os.replace(tmp, path)
            except OSError as err:
                raise WriteError(path, err) from None
        for folder in dict.fromkeys(path.parent for path, _ in staged):
            fsync_directory(folder)
    finally:
        for _, tmp in staged:  # none after a success; after a failure, those not renamed
            with contextlib.suppress(OSError):
                tmp.unlink(missing_ok=True)
    remove_stale_temporaries_of(*(path for path, _ in staged))


def obstacle(path: Path, reading: bool = False) -> str | None:
    """What stands at ``path`` that an atomic write must not replace, in a few words: ``"a
    link"`` (the rename would replace the link, not the file it points at), ``"a folder"``
    (the rename fails on it, after all the work), ``"a special file"`` (a FIFO, a device);
    None for a plain file or nothing there. A read-only plain file is no obstacle: the rename
    replaces it. ``reading``: what stands there in place of a file that is read instead, where
    a link to a file is the file (a git-annex or DVC layout) and one to nothing is ``"a link
    to nothing"``."""
    path = Path(path)
    if path.is_symlink() and (not reading or not path.exists()):
        return "a link to nothing" if reading else "a link"
    if path.is_dir():
        return "a folder"
    if path.exists() and not path.is_file():
        return "a special file"
    return None


def probe_writable(path: Path) -> None:
    """Create this process's temporary file for ``path`` (:func:`temporary_path`, the one
    :func:`atomic_write` would write) and delete it again: raises :class:`WriteError` where the
    file system refuses. The surest answer to whether ``path`` can be written (``os.access``
    does not see everything: a superuser on a folder without write permission of a file
    system that refuses it anyway, some network and FUSE file systems); it leaves nothing and
    touches no existing file. For a check before long work, after :func:`check_writable_file`."""
    path = Path(path)
    tmp = temporary_path(path)
    try:
        # O_EXCL and O_NOFOLLOW: never opens (or truncates) anything that is there already
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), 0o644)
    except FileExistsError:
        return  # our own temporary file, left by a write of this process cut short: the folder takes files
    except OSError as err:
        raise WriteError(path, err) from None
    try:
        os.close(fd)
    finally:  # also when a Ctrl-C or a stop signal's exception lands here: the probe leaves nothing
        with contextlib.suppress(OSError):
            tmp.unlink()


def _open_unfollowed(path: Path, flags: int, mode: int = 0o666) -> int:
    """``os.open(path, flags)``, refusing a symbolic link at ``path`` (where the system has
    ``O_NOFOLLOW``): the file it points at is not the run's. A failure is a :class:`WriteError`."""
    try:
        return os.open(path, flags | getattr(os, "O_NOFOLLOW", 0), mode)
    except OSError as err:
        # ELOOP: Linux and macOS; EMLINK: FreeBSD's answer to O_NOFOLLOW on a link
        if getattr(os, "O_NOFOLLOW", 0) and err.errno in (errno.ELOOP, errno.EMLINK):
            err = OSError(errno.ELOOP, "it is a symbolic link, which metalearn does not write through")
        raise WriteError(path, err) from None


def append_line(path: Path, line: str) -> None:
    """Append ``line`` (with its newline) to ``path``; a failure is a :class:`WriteError`.
    A write that fails (a full disk, a quota, ``ulimit -f``) cuts the file back to its size
    before it, so that no part of the line stays; only a kill in the middle of the write can
    leave one, for the reader to skip. A symbolic link at ``path`` is refused, never written
    through (where the system has ``O_NOFOLLOW``). One writer at a time (the run folder's
    lock): the size before the write is the file's size when it is opened."""
    # 0o666 as open(path, "a") uses: the umask decides the mode
    fd = _open_unfollowed(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT)
    try:
        size = os.fstat(fd).st_size
        try:
            # closefd=False: the file stays open to be cut back, also after a failed flush on close
            with open(fd, "a", closefd=False) as f:
                f.write(line)
        except OSError as err:
            with contextlib.suppress(OSError):  # where even that fails, the reader skips the part line
                os.ftruncate(fd, size)
            raise WriteError(path, err, kept=f"the lines before it in {Path(path).name} are unchanged") from None
    finally:
        os.close(fd)


def cut_file(path: Path, size: int, newline: bool = False) -> None:
    """Cut ``path`` in place to its first ``size`` bytes (with ``newline``: then end it with a
    newline, for a last line that lacks one) and flush it to disk. The same file stays (its
    inode), so that a reader following it (``tail -f``) goes on reading it. The cut is one
    ``ftruncate`` and the newline one byte: a kill leaves the file whole or cut, never anything
    between. A symbolic link at ``path`` is refused, as by :func:`append_line`; a failure is a
    :class:`WriteError`. For a file that only the caller writes (its folder's lock)."""
    fd = _open_unfollowed(path, os.O_WRONLY)
    try:
        os.ftruncate(fd, size)
        if newline:
            os.lseek(fd, size, os.SEEK_SET)
            os.write(fd, b"\n")  # one byte: written whole or not at all
        os.fsync(fd)
    except OSError as err:
        raise WriteError(path, err, kept=f"the lines before the cut in {Path(path).name} are unchanged") from None
    finally:
        os.close(fd)


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


TEMPORARY_NAME = re.compile(r"(?P<name>.+)\.tmp(?P<pid>\d+)")


def process_running(pid: int) -> bool:
    """Whether process ``pid`` exists on this machine (one of another user counts)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except (ProcessLookupError, OverflowError):  # OverflowError: a number no process id can be (a .tmp<date>)
        return False
    except PermissionError:
        return True
    return True


def remove_temporaries(folder: Path, owned: Iterable[str] = (), unowned_age_s: float = UNOWNED_TEMPORARY_AGE_S,
                       now: float | None = None, all_owned: bool = False,
                       among: Iterable[str] | None = None) -> list[Path]:
    """Delete the temporary files (``<name>.tmp<pid>``) that writers killed mid-write left in
    ``folder``; returns the paths deleted.

    ``owned``: names whose writers all hold a lock the caller now holds (a run folder's
    ``checkpoint.pt``, ``config.json``, ``metrics.jsonl`` while training holds the run's lock):
    their temporary files belong to no live writer and all go; ``all_owned``: so do those of
    every name (a folder only the lock's holder writes, a run's ``best/``). Any other temporary file goes
    only when its process is not running on this machine and it has not been written to for
    ``unowned_age_s`` seconds (its writer might be on another machine sharing the folder).
    ``among``: where given, only the temporary files of names matching one of these patterns
    (``fnmatch``, e.g. ``("summary.json", "*.png")``) are considered at all: in a folder the
    user chose, other programs' ``<name>.tmp<N>`` files are theirs. The caller's own temporary
    files are never touched."""
    owned = set(owned)
    patterns = None if among is None else tuple(among)
    now = time.time() if now is None else now
    removed = []
    try:
        entries = list(Path(folder).iterdir())
    except OSError:
        return removed
    for entry in entries:
        match = TEMPORARY_NAME.fullmatch(entry.name)
        if match is None or int(match["pid"]) == os.getpid():
            continue
        if patterns is not None and not any(fnmatch.fnmatchcase(match["name"], p) for p in patterns):
            continue
        unowned = not all_owned and match["name"] not in owned
        if unowned and not _abandoned(entry, int(match["pid"]), now, unowned_age_s):
            continue
        try:
            if entry.is_file() or entry.is_symlink():
                entry.unlink()
                removed.append(entry)
        except OSError:
            continue  # gone already (another cleaner was first), or not ours to delete
    return removed


def _abandoned(entry: Path, pid: int, now: float, age_s: float) -> bool:
    """Whether ``entry``, made by process ``pid``, was left by it: the process is gone from this
    machine and ``entry`` has not changed for ``age_s`` seconds (its maker might be on another
    machine sharing the folder, or another process namespace sharing it)."""
    try:
        old = now - entry.lstat().st_mtime >= age_s
    except OSError:
        return False
    return old and not process_running(pid)


def remove_stale_temporaries_of(*paths: Path) -> list[Path]:
    """Once ``paths`` are written: delete the temporary files of their names that writers killed
    mid-write left beside them (an evaluation, a plot, predict's or summarize's output killed
    with SIGKILL), once their process is gone from this machine and they are
    :data:`UNOWNED_TEMPORARY_AGE_S` old (:func:`remove_temporaries`, one listing per folder);
    returns them. Every atomic write calls it, so such litter lasts until the file is next
    written, wherever it is. Best effort: the write has succeeded, and nothing here may fail it."""
    folders: dict[Path, list[str]] = {}
    for path in map(Path, paths):
        folders.setdefault(path.parent, []).append(glob.escape(path.name))
    removed: list[Path] = []
    for folder, names in folders.items():
        try:
            removed += remove_temporaries(folder, among=names)
        except Exception:  # noqa: BLE001 -- tidying only
            continue
    return removed


def remove_stale_folders(parent: Path, prefix: str) -> list[Path]:
    """Delete the folders ``<prefix><pid>-...`` in ``parent`` (temporary folders a process made
    for its own use, e.g. an export's plots in the system's temporary folder) that a killed
    process left: its process gone from this machine and the folder unchanged for
    :data:`UNOWNED_TEMPORARY_AGE_S`; returns them. Nothing else is touched."""
    pattern = re.compile(re.escape(prefix) + r"(?P<pid>\d+)-")
    removed = []
    try:
        entries = list(Path(parent).iterdir())
    except OSError:
        return removed
    now = time.time()
    for entry in entries:
        match = pattern.match(entry.name)
        if (match is None or int(match["pid"]) == os.getpid() or entry.is_symlink() or not entry.is_dir()
                or not _abandoned(entry, int(match["pid"]), now, UNOWNED_TEMPORARY_AGE_S)):
            continue
        try:
            shutil.rmtree(entry)
            removed.append(entry)
        except OSError:
            continue
    return removed


def remove_export_temporaries(out_dir: Path) -> list[Path]:
    """Delete, in an export's ``out_dir``, the temporary files of ``summary.json`` and of the
    plots (``*.png``) that a killed export left; returns them. No lock guards ``out_dir``, so a
    temporary file goes only once its process is gone from this machine and it is
    :data:`UNOWNED_TEMPORARY_AGE_S` old (an export on another machine sharing the folder may be
    writing it); other files, ``.tmp<N>`` ones of other programs included, are never touched."""
    return remove_temporaries(out_dir, among=("summary.json", "*.png"))


def check_writable_file(option: str, path: Path | str, example: str, suffix: str | None = None) -> None:
    """Refuse an output file named by ``option`` that could not be written: a folder, also one
    not made yet (a name ending in ``/``, as typed: ``Path`` drops the slash; the message
    suggests ``example`` in it), a name without ``suffix`` (e.g. ``".png"``, for a file whose
    format is fixed: ``sheet.jpg`` would hold PNG bytes), a file this user may not write
    (read-only: the atomic rename would replace it regardless), a path below a file, or one in
    a folder this user cannot write to (missing folders are made when it is written). Called
    before the work whose result it receives, so that a bad path is found out at once."""
    if isinstance(path, str) and path.endswith(("/", os.sep)):
        raise MetalearnError(f"{option} {path} names a folder; give a file name, e.g. {Path(path) / example}")
    path = Path(path)
    if suffix is not None and path.suffix.lower() != suffix and not path.is_dir():
        raise MetalearnError(f"{option} {path}: the file is written as {suffix[1:].upper()}; give a name ending in "
                             f"{suffix}, e.g. {path.with_suffix(suffix) if path.suffix else path.parent / example}")
    if path.is_dir():
        raise MetalearnError(f"{option} {path} is a folder; give a file name, e.g. {path / example}")
    if path.is_symlink() or (path.exists() and not path.is_file()):  # renaming into place would replace it
        raise MetalearnError(f"{option} {path} is a link or a special file, not a plain file; give a plain file's "
                             "name")
    if path.is_file() and not os.access(path, os.W_OK):
        raise MetalearnError(f"{option} {path} is read-only; make it writable (chmod u+w) or give another file")
    existing = next(p for p in path.absolute().parents if p.exists())
    if not existing.is_dir():
        raise MetalearnError(f"{option} {path}: {existing} is a file, not a folder")
    if not os.access(existing, os.W_OK):
        raise MetalearnError(f"{option} {path}: cannot write in {existing}")
