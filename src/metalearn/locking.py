"""One writer per folder: an operating-system lock on a file in it, held while writing.

A :class:`FolderLock` is an exclusive ``flock`` on ``<folder>/<name>`` (a run folder's
``.lock``). The lock belongs to the open file, not to the file's existence: the kernel drops it
when its holder exits in any way, SIGKILL included, so a killed run never blocks the next one
and there is no stale lock to detect or break by hand. The file itself holds who took it
(process id, host, command, time) so that a refused process can name the holder; a file left
by a killed holder is only that note, and the next holder overwrites it. The holder deletes
the file when it lets go.

Where this holds:

* Local file systems (ext4, xfs, btrfs, tmpfs, APFS): always, between any processes of the
  machine.
* NFS on Linux: the kernel emulates ``flock`` with an NFS byte-range lock over the whole file
  (since Linux 2.6.12), so the lock holds between machines: through the NLM lock manager
  (``lockd``/``statd``) for NFSv3, within the protocol for NFSv4. A holder whose machine
  crashes or loses the network keeps the lock until the server notices: when that machine
  reboots (NFSv3) or when its lease runs out (NFSv4, typically 90 s). A mount with ``nolock``
  or ``local_lock=flock``/``all`` keeps locks on one machine: two machines are then not kept
  apart.
* Lustre locks between clients with its ``flock`` mount option, within one machine with
  ``localflock``, not at all with ``noflock``; CIFS/SMB, GPFS and BeeGFS lock between machines
  as their servers allow; sshfs and other FUSE file systems usually only within one machine.
* A file system that refuses locks altogether (``ENOLCK``, ``EOPNOTSUPP``): the folder is used
  unlocked, with a warning.

A process that forks (``multiprocessing`` with the fork start method, a data loader's workers)
does not pass its locks on: every forked child closes the lock files it inherited at once
(:func:`_let_go_in_child`), so a child that outlives its parent (a SIGKILL to the parent alone)
holds no run folder. The parent's lock is unaffected: an ``flock`` belongs to the open file,
which the parent still holds.
"""

from __future__ import annotations

import contextlib
import datetime
import errno
import fcntl
import itertools
import json
import os
import socket
import stat
import sys
import warnings
import weakref
from pathlib import Path
from typing import Callable

from metalearn.errors import MetalearnError, caller_level, MetalearnWarning, Options
from metalearn.files import process_running

UNSUPPORTED = {errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL, errno.ENOTSUP}

# the lock file is opened without following a link: it is written (its holder's note) and
# deleted, so a link there would have the note written over the file it points to
NO_FOLLOW = getattr(os, "O_NOFOLLOW", 0)

# the locks this process holds, for a forked child to let go of (_let_go_in_child)
_HELD: "weakref.WeakSet[FolderLock]" = weakref.WeakSet()


def _let_go_in_child() -> None:
    """In a forked child: close the inherited lock files and forget them (the lock objects hold
    nothing there, so the child neither deletes the parent's lock file nor closes another file
    under the old number); the parent's locks hold as before."""
    for lock in list(_HELD):
        fd, lock._fd, lock._made_folders = lock._fd, None, ()
        if fd is not None:
            with contextlib.suppress(OSError):
                os.close(fd)
    _HELD.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_let_go_in_child)


def lock_is_held(path: Path | str) -> bool | None:
    """Whether a process holds the lock at ``path`` now: True, False (free, or no file), or
    None where the file system refuses locks. It tries a shared lock without waiting and drops
    it at once, so a note left by a killed holder (or by a holder whose process id was since
    reused) reads as free; a holder taking the lock in that same instant would be refused as if
    the folder were in use, and can simply try again."""
    try:
        # not through a link, and never waiting on a FIFO put there: no holder locks either
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | NO_FOLLOW | getattr(os, "O_CLOEXEC", 0))
    except FileNotFoundError:
        return False
    except OSError as err:
        if err.errno == errno.ELOOP:  # a link: FolderLock.take refuses it, so no process holds it
            return False
        raise
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return False  # FolderLock.take refuses anything else: no process holds it
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    except OSError as err:
        if err.errno in UNSUPPORTED:
            return None
        raise
    finally:
        os.close(fd)  # closing drops the shared lock if it was taken
    return False


class FolderInUse(Options, MetalearnError):
    """Another process holds the folder's lock; the message names it, and any options it names
    as the caller spells them (:class:`~metalearn.errors.Options`: ``choose another {run_dir}``)."""


class NotALockFile(MetalearnError):
    """The lock's path holds something other than a plain file (a link, a folder, a device...),
    or its folder is a link to nowhere: nothing there is taken, written or deleted."""


def _kind(mode: int) -> str:
    return ("a symbolic link" if stat.S_ISLNK(mode) else "a folder" if stat.S_ISDIR(mode) else
            "a FIFO" if stat.S_ISFIFO(mode) else "a socket" if stat.S_ISSOCK(mode) else
            "a device" if stat.S_ISCHR(mode) or stat.S_ISBLK(mode) else "not a plain file")


def _not_a_lock_file(path: Path, mode: int) -> NotALockFile:
    return NotALockFile(f"{path} is {_kind(mode)}, not the lock file metalearn keeps there (a plain file it writes "
                        f"while a process holds {path.parent}): move it away or delete it, then try again")


def _broken_link(folder: Path) -> NotALockFile | None:
    """The refusal for a ``folder`` that is, or lies below, a symbolic link to nowhere (no lock
    file can be made there, and making the link's target is not ours to do); None if none is."""
    for f in (folder, *folder.parents):
        if f.is_symlink() and not f.exists():
            target = os.readlink(f)
            return NotALockFile(f"{f} is a broken link (to {target}, which does not exist): create {target} "
                                f"or remove the link, or give another folder than {folder}")
    return None


def holder_note(purpose: str) -> dict:
    program = Path(sys.argv[0]) if sys.argv and sys.argv[0] else Path("python")
    name = program.parent.name if program.name == "__main__.py" else program.name  # python -m metalearn
    return {"pid": os.getpid(), "host": socket.gethostname(), "purpose": purpose,
            "command": " ".join([name, *sys.argv[1:]])[:200],
            "since": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")}


def read_holder_note(lock_path: Path | str) -> dict | None:
    """The note the holder of ``lock_path`` wrote (:func:`holder_note`: ``pid``, ``host``, ...),
    or None where there is none to read: no file, one cut short or edited, or something other
    than a plain file (read neither through a link nor from a FIFO, which would block). The
    note says who took the lock last; :func:`lock_is_held` says whether it is held now."""
    try:
        fd = os.open(lock_path, os.O_RDONLY | os.O_NONBLOCK | NO_FOLLOW | getattr(os, "O_CLOEXEC", 0))
    except OSError:
        return None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return None
        with os.fdopen(os.dup(fd), "rb") as f:
            note = json.loads(f.read(64 * 1024))
    except (OSError, ValueError, RecursionError):
        return None
    finally:
        os.close(fd)
    return note if isinstance(note, dict) else None


def describe_holder(lock_path: Path) -> str:
    """Who holds ``lock_path``, from the note its holder wrote, for a message."""
    try:
        note = read_holder_note(lock_path)
        pid, host = int(note["pid"]), str(note["host"])
    except (ValueError, KeyError, TypeError):
        return "another process (it has not written its name yet)"
    where = "this machine" if host == socket.gethostname() else f"host {host}"
    if host == socket.gethostname() and pid == os.getpid():  # a lock of one's own, taken by another object
        return (f"this process ({pid}), through a lock it holds elsewhere (a Trainer not yet fitted: call its "
                "release(), or build it with lock=False)")
    ended = ", which has ended (a process it started still holds the lock)" if (
        host == socket.gethostname() and not process_running(pid)) else ""
    doing = f" ({note.get('command')})" if note.get("command") else ""
    return f"process {pid} on {where}{doing}, since {note.get('since', '?')}{ended}"


def make_folders(folder: Path) -> list[Path]:
    """Make ``folder`` and its missing parents, one at a time, and return those this call made:
    a folder another process makes in between is found existing and is not counted ours (its
    removal is not ours to do). Where one cannot be made, those made before it are removed
    (while empty) and the error raised: a failed call leaves no folder behind."""
    missing = [f for f in (folder, *folder.parents) if not f.exists()]
    made = []
    try:
        for f in reversed(missing):  # the topmost first
            try:
                os.mkdir(f)
            except FileExistsError:
                continue
            made.append(f)
    except OSError:  # a name too long, no permission: the folders made so far go again, deepest first
        for f in reversed(made):
            with contextlib.suppress(OSError):
                f.rmdir()
        raise
    return made


class FolderLock:
    """The exclusive lock on ``path`` (a file in the folder it guards), taken by :meth:`take`
    and let go by :meth:`release` (also on exit from a ``with`` block, when the object is
    collected, and by the kernel when the process ends)."""

    def __init__(self, path: Path, fd: int | None, made_folders: tuple[Path, ...] = ()):
        """``made_folders``: the folders :meth:`take` created for the lock file, the deepest
        first; :meth:`release` removes those still empty."""
        self.path, self._fd, self._made_folders = path, fd, tuple(made_folders)

    @property
    def held(self) -> bool:
        return self._fd is not None

    @classmethod
    def take(cls, path: Path | str, purpose: str, refusal: Callable[[str], FolderInUse] | None = None,
             wait: Callable[[str], None] | None = None) -> "FolderLock":
        """Lock ``path``, creating its folder if needed. When another process holds it: with
        ``wait`` None, raise ``refusal(holder)``, a :class:`FolderInUse` (default: the
        folder is in use by the holder); else call ``wait(holder)`` once and block until it
        is free. On a file system without locks, warn and return a lock that holds nothing."""
        path = Path(path)
        made: list[Path] = []
        for attempt in itertools.count():
            try:
                made += make_folders(path.parent)
            except FileNotFoundError:  # a folder on the way is a link to nowhere, or went meanwhile
                broken = _broken_link(path.parent)
                if broken is not None:
                    raise broken from None
                if attempt < 100:
                    continue
                raise
            try:
                # a link or special file in place of the lock file is refused, never followed
                # or opened: the holder writes its note into the file and deletes it at the end
                mode = os.lstat(path).st_mode
            except FileNotFoundError:
                mode = None
            if mode is not None and not stat.S_ISREG(mode):
                raise _not_a_lock_file(path, mode)
            try:
                fd = os.open(path, os.O_RDWR | os.O_CREAT | NO_FOLLOW | getattr(os, "O_CLOEXEC", 0), 0o644)
            except FileNotFoundError:  # the holder we waited for removed the folder as it let go
                broken = _broken_link(path.parent)
                if broken is not None:  # fails every time: say why at once
                    raise broken from None
                if attempt < 100:
                    continue
                raise
            except OSError as err:  # replaced by a link or a folder since the lstat
                if err.errno in (errno.ELOOP, errno.EISDIR):
                    mode = os.lstat(path).st_mode if os.path.lexists(path) else stat.S_IFLNK
                    raise _not_a_lock_file(path, mode) from None
                raise
            mode = os.fstat(fd).st_mode
            if not stat.S_ISREG(mode):  # a FIFO or device put there since the lstat
                os.close(fd)
                raise _not_a_lock_file(path, mode)
            made_folders = tuple(sorted(dict.fromkeys(made), key=lambda f: len(f.parts), reverse=True))
            try:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    holder = describe_holder(path)
                    if wait is None:
                        raise (refusal(holder) if refusal else
                               FolderInUse("{folder} is in use by {holder}", folder=(str(path.parent),) * 2,
                                           holder=(holder, holder))) from None
                    wait(holder)
                    fcntl.flock(fd, fcntl.LOCK_EX)
            except OSError as err:
                os.close(fd)
                if err.errno not in UNSUPPORTED:
                    raise
                with contextlib.suppress(OSError):
                    path.unlink()  # no one can hold it here: it would only be litter
                warnings.warn(MetalearnWarning(
                    f"the file system of {path.parent} refuses file locks ({err.strerror}): nothing keeps "
                    "a second process from writing there at the same time"), stacklevel=caller_level())
                return cls(path, None, made_folders)
            except BaseException:
                os.close(fd)
                raise
            # the holder before us deletes the file as it lets go: a lock on that deleted file
            # guards nothing, so take the one now at the path
            try:
                same = os.path.samestat(os.fstat(fd), os.stat(path))
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        try:
            note = (json.dumps(holder_note(purpose)) + "\n").encode()
            os.ftruncate(fd, 0)
            os.pwrite(fd, note, 0)
        except OSError:
            pass  # a full disk: the lock holds all the same, only its note is missing
        lock = cls(path, fd, made_folders)
        _HELD.add(lock)
        return lock

    def still_ours(self) -> bool:
        """Whether the file at :attr:`path` is still the one this lock holds: False once the
        folder (or the file) was deleted, moved or replaced, e.g. ``rm -rf`` of a run folder that a new
        run then took. A lock that holds nothing (released, another rank's, a file system without
        locks) has nothing to compare and answers True."""
        if self._fd is None:
            return True
        try:
            return os.path.samestat(os.fstat(self._fd), os.stat(self.path))
        except OSError:  # gone (ENOENT, NFS's ESTALE) or no longer reachable: not to be written to
            return False

    def release(self) -> None:
        """Let go: delete the lock file (under the lock, so no one else takes a lock on it in
        between) and close it; the folders this lock created (the run folder, and its parents
        that did not exist) are removed too where nothing else was written there."""
        if self._fd is None:
            return
        ours = self.still_ours()  # a replaced file is another holder's: leave it
        fd, self._fd = self._fd, None
        _HELD.discard(self)
        if ours:
            with contextlib.suppress(OSError):
                self.path.unlink()
        os.close(fd)
        for folder in self._made_folders:  # deepest first; a folder written to stops the walk
            try:
                folder.rmdir()
            except OSError:
                break

    def __enter__(self) -> "FolderLock":
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    def __del__(self):
        with contextlib.suppress(Exception):
            self.release()
