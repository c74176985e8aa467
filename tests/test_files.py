"""Writing files: a failure of the file system is one line naming the file and the free
space, the old file stays whole; temporary files of killed writers are removed, and only those."""

from __future__ import annotations

import errno
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from metalearn.errors import MetalearnError
from metalearn.files import (WriteError, append_line, atomic_write, atomic_write_bytes, atomic_write_files,
                             check_writable_file, format_bytes, remove_stale_folders, remove_temporaries)

FULL = "/dev/full"  # every write to it fails with ENOSPC, from the kernel
needs_dev_full = pytest.mark.skipif(not os.path.exists(FULL), reason="no /dev/full on this system")
ONE_LINE = re.compile(r"cannot write (?P<path>\S+): No space left on device \(\d+(\.\d)? [KMGT]?B free there\)"
                      r"(?P<kept>; the previous \S+ is unchanged)?")


def test_sizes_read_as_df_writes_them():
    assert [format_bytes(n) for n in (0, 999, 1000, 1_400_000, 27 * 10**9)] == ["0 B", "999 B", "1.0 KB", "1.4 MB",
                                                                                   "27.0 GB"]


@needs_dev_full
def test_a_full_disk_while_writing_is_one_line_and_the_old_file_stays(tmp_path):
    path = tmp_path / "eval.json"
    atomic_write_bytes(path, b"old\n")
    (tmp_path / f"eval.json.tmp{os.getpid()}").symlink_to(FULL)  # the temporary file lands on a full disk
    with pytest.raises(WriteError) as caught:
        atomic_write_bytes(path, b"new\n" * 10_000)
    message = str(caught.value)
    assert ONE_LINE.fullmatch(message) and ONE_LINE.fullmatch(message)["path"] == str(path), message
    assert caught.value.errno == errno.ENOSPC
    assert path.read_bytes() == b"old\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["eval.json"]


def test_a_failure_only_at_the_flush_is_caught_too(tmp_path, monkeypatch):
    """Network file systems may report a full disk only when the data is flushed or closed."""
    def full(fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(WriteError, match=r"cannot write .*config.json: No space left on device \(.* free there\)$"):
        atomic_write(tmp_path / "config.json", lambda f: f.write(b"{}"))
    assert list(tmp_path.iterdir()) == []


def test_the_free_space_is_named_only_where_space_is_the_reason(tmp_path, monkeypatch):
    """A folder that vanished or cannot be written is no matter of space: its message does not
    point at the disk's free space."""
    for code in (errno.ENOENT, errno.EACCES, errno.EROFS):
        def refuse(fd, code=code):
            raise OSError(code, os.strerror(code))

        monkeypatch.setattr(os, "fsync", refuse)
        with pytest.raises(WriteError) as caught:
            atomic_write(tmp_path / "out.csv", lambda f: f.write(b"x"))
        assert str(caught.value) == f"cannot write {tmp_path / 'out.csv'}: {os.strerror(code)}"
        assert caught.value.errno == code


def test_an_output_file_that_is_read_only_is_refused_before_the_work(tmp_path, monkeypatch):
    """Renaming a temporary file into place would replace a read-only file without a word;
    the output check refuses it instead. (os.access by the permission bits alone, as for a
    user other than root, who may write any file.)"""
    monkeypatch.setattr(os, "access", lambda path, mode: not mode & os.W_OK or bool(os.stat(path).st_mode & 0o200))
    kept = tmp_path / "p.csv"
    kept.write_text("the previous predictions")
    kept.chmod(0o444)
    with pytest.raises(MetalearnError, match=rf"^--csv {re.escape(str(kept))} is read-only; make it writable"):
        check_writable_file("--csv", kept, "predictions.csv")
    kept.chmod(0o644)
    check_writable_file("--csv", kept, "predictions.csv")
    check_writable_file("--csv", tmp_path / "new" / "p.csv", "predictions.csv")  # a missing folder is made later
    (tmp_path / "link.json").symlink_to(tmp_path / "target.json")
    for special in (tmp_path / "link.json", "/dev/null"):  # the rename would replace the link, the device
        with pytest.raises(MetalearnError, match="is a link or a special file, not a plain file"):
            check_writable_file("--json", Path(special), "predictions.json")


@needs_dev_full
def test_a_full_disk_while_appending_a_line_is_one_line():
    with pytest.raises(WriteError, match=r"cannot write /dev/full: No space left on device \(.* free there\)"):
        append_line(Path(FULL), '{"step": 1}\n')


def test_a_line_is_never_appended_through_a_link(tmp_path):
    target = tmp_path / "elsewhere.txt"
    target.write_text("someone else's file\n")
    (tmp_path / "metrics.jsonl").symlink_to(target)
    with pytest.raises(WriteError, match=r"metrics.jsonl: it is a symbolic link, which metalearn does not write through"):
        append_line(tmp_path / "metrics.jsonl", '{"step": 1}\n')
    assert target.read_text() == "someone else's file\n"
    append_line(tmp_path / "plain.jsonl", '{"step": 1}\n')
    append_line(tmp_path / "plain.jsonl", '{"step": 2}\n')
    assert (tmp_path / "plain.jsonl").read_text() == '{"step": 1}\n{"step": 2}\n'


def test_temporary_files_of_killed_writers_are_removed_and_no_others(tmp_path):
    alive = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        dead = subprocess.Popen([sys.executable, "-c", "pass"])
        dead.wait()
        names = {
            f"checkpoint.pt.tmp{alive.pid}": "owned: the lock holder's alone, whoever made it",
            f"metrics.jsonl.tmp{dead.pid}": "owned",
            f"eval.json.tmp{dead.pid}": "another file's, dead process, old",
            f"eval-part=val.json.tmp{alive.pid}": "another file's, live process: kept",
            f"eval-ways=20.json.tmp{dead.pid}": "another file's, dead process, just written: kept",
            f"checkpoint.pt.tmp{os.getpid()}": "this process's own: kept",
            "checkpoint.pt": "not temporary", "notes.tmp.txt": "not temporary",
        }
        for name in names:
            (tmp_path / name).write_text(name)
        hour_ago = time.time() - 3600
        for name in (f"eval.json.tmp{dead.pid}", f"eval-part=val.json.tmp{alive.pid}"):
            os.utime(tmp_path / name, (hour_ago, hour_ago))
        removed = remove_temporaries(tmp_path, owned=("checkpoint.pt", "metrics.jsonl"))
    finally:
        alive.kill()
        alive.wait()
    gone = {f"checkpoint.pt.tmp{alive.pid}", f"metrics.jsonl.tmp{dead.pid}", f"eval.json.tmp{dead.pid}"}
    assert {p.name for p in removed} == gone
    assert {p.name for p in tmp_path.iterdir()} == set(names) - gone


def test_a_write_removes_the_stale_temporary_files_of_its_name(tmp_path):
    """Outside a run's lock (an evaluation, a plot, predict's or summarize's output), the next
    atomic write of a file deletes the temporary files of that name that a killed writer left:
    its process gone and the file 10 minutes old; a live writer's, a young one and those of
    other names stay."""
    alive = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        dead = subprocess.Popen([sys.executable, "-c", "pass"])
        dead.wait()
        names = [f"eval[1].json.tmp{dead.pid}", f"eval[1].json.tmp{alive.pid}", f"eval[1].json.tmp{dead.pid}0",
                 f"other.json.tmp{dead.pid}", f"a.png.tmp{dead.pid}", f"b.csv.tmp{dead.pid}"]
        for name in names:
            (tmp_path / name).write_text(name)
        hour_ago = time.time() - 3600
        for name in names[:2] + names[3:]:  # all but the third old
            os.utime(tmp_path / name, (hour_ago, hour_ago))
        (tmp_path / "eval[1].json.tmp20240101120000").write_text("no process has such an id")
        os.utime(tmp_path / "eval[1].json.tmp20240101120000", (hour_ago, hour_ago))
        names.append("eval[1].json.tmp20240101120000")
        atomic_write_bytes(tmp_path / "eval[1].json", b"{}")  # a glob character in the name: taken as it is
        atomic_write_files([(tmp_path / "a.png", b"png"), (tmp_path / "b.csv", b"csv")])
    finally:
        alive.kill()
        alive.wait()
    gone = {names[0], names[4], names[5], names[6]}
    assert {p.name for p in tmp_path.iterdir()} == set(names) - gone | {"eval[1].json", "a.png", "b.csv"}


def test_a_killed_processs_old_folder_of_its_own_is_removed(tmp_path):
    """An export draws its plots in a folder named by its process id in the system's temporary
    folder; a SIGKILL leaves it there. The folders of a process gone and 10 minutes old go; a
    live process's, this process's, a young one, a file and other names stay."""
    alive = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        dead = subprocess.Popen([sys.executable, "-c", "pass"])
        dead.wait()
        names = [f"metalearn-export-{dead.pid}-abc", f"metalearn-export-{alive.pid}-abc",
                 f"metalearn-export-{os.getpid()}-abc", f"metalearn-export-{dead.pid}-young",
                 f"metalearn-exports-{dead.pid}-abc", f"other-{dead.pid}-abc"]
        for name in names:
            (tmp_path / name).mkdir()
            (tmp_path / name / "plot.png").write_bytes(b"png")
        (tmp_path / f"metalearn-export-{dead.pid}-file").write_text("a file")
        hour_ago = time.time() - 3600
        for name in [n for n in names if not n.endswith("young")] + [f"metalearn-export-{dead.pid}-file"]:
            os.utime(tmp_path / name, (hour_ago, hour_ago))
        removed = remove_stale_folders(tmp_path, "metalearn-export-")
    finally:
        alive.kill()
        alive.wait()
    assert [p.name for p in removed] == [names[0]]
    assert not (tmp_path / names[0]).exists() and all((tmp_path / name).exists() for name in names[1:])


def test_taking_a_run_folder_cleans_best_and_plots_too(tmp_path):
    """A run folder's lock also clears ``best/`` (written only by its holder: every temporary
    file goes, a live process's too) and, in ``plots/``, a dead writer's old temporary file;
    a plot being written now by a live process stays."""
    from metalearn.runs import RunDir

    alive = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        dead = subprocess.Popen([sys.executable, "-c", "pass"])
        dead.wait()
        for folder, name in (("best", f"step-2.pt.tmp{alive.pid}"), ("best", f"index.json.tmp{dead.pid}"),
                             ("plots", f"curves.png.tmp{dead.pid}"), ("plots", f"loss.png.tmp{alive.pid}")):
            (tmp_path / folder).mkdir(exist_ok=True)
            (tmp_path / folder / name).write_text(name)
            hour_ago = time.time() - 3600
            os.utime(tmp_path / folder / name, (hour_ago, hour_ago))
        with RunDir(tmp_path).lock():
            pass
    finally:
        alive.kill()
        alive.wait()
    assert not list((tmp_path / "best").iterdir())
    assert [p.name for p in (tmp_path / "plots").iterdir()] == [f"loss.png.tmp{alive.pid}"]


def test_a_cache_write_removes_the_temporary_files_of_killed_cache_writers(tmp_path):
    """A folder cache's writer killed mid-write leaves a temporary file as large as the cache;
    the next cache written there removes it (dead process, untouched for long), and no other."""
    import numpy as np

    from metalearn.data.cache import read_arrays, write_arrays

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale, fresh = tmp_path / f"folder-photos-1-84x84x3-v1.npz.tmp{dead.pid}", tmp_path / f"other.npz.tmp{dead.pid}"
    for path in (stale, fresh):
        path.write_bytes(b"half a cache")
    hour_ago = time.time() - 3600
    os.utime(stale, (hour_ago, hour_ago))
    path = tmp_path / "folder-photos-1-84x84x3-v1.npz"
    write_arrays(path, {"images": np.zeros((2, 3), np.uint8)}, {"size": 84}, "abc")
    assert not stale.exists() and fresh.exists()
    arrays, meta = read_arrays(path, "abc", ("images",))
    assert arrays["images"].shape == (2, 3) and meta["size"] == 84


def test_a_cache_is_on_disk_before_it_gets_its_name(tmp_path, flush_and_rename_events):
    """After a power cut the cache's name holds the whole cache, never an empty file: the
    temporary file is flushed to disk (fsync) before it is renamed into place."""
    import numpy as np

    from metalearn.data.cache import read_arrays, write_arrays

    events = flush_and_rename_events
    path = tmp_path / "omniglot-28x28-v1.npz"
    write_arrays(path, {"images": np.ones((2, 3), np.uint8)}, {"size": 28}, "abc")
    [(at, (_, src, dst))] = [(i, e) for i, e in enumerate(events) if e[0] == "replace"]
    assert dst == str(path) and ("fsync", src) in events[:at], events
    assert read_arrays(path, "abc", ("images",))[0]["images"].sum() == 6
    assert [p.name for p in tmp_path.iterdir()] == [path.name]


def test_a_cache_that_cannot_be_written_is_one_line_and_leaves_nothing(tmp_path, monkeypatch):
    """A full disk at the flush: one line naming the cache and the way out, no temporary file."""
    import numpy as np

    from metalearn.data.cache import write_arrays
    from metalearn.errors import MetalearnError

    def full(fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "fsync", full)
    path = tmp_path / "omniglot-28x28-v1.npz"
    with pytest.raises(MetalearnError) as info:
        write_arrays(path, {"images": np.ones((2, 3), np.uint8)}, {"size": 28}, "abc")
    message = str(info.value)
    assert ONE_LINE.match(message) and message.endswith(
        "; the cache takes some 6 B: point METALEARN_CACHE at a writable folder with that much space"), message
    assert list(tmp_path.iterdir()) == []


def test_a_full_disk_names_the_free_space_there_is_once_the_temporary_file_is_gone(tmp_path, monkeypatch):
    """The temporary file holds what the write took of the disk: measured with it still there, a
    full disk read "0 B free" although the failed write's space is free again."""
    import shutil

    from metalearn import files

    path = tmp_path / "checkpoint.pt"
    tmp = files.temporary_path(path)
    seen = []
    real_disk_usage = shutil.disk_usage

    def disk_usage(folder):
        seen.append(tmp.exists())
        return real_disk_usage(folder)

    def full(fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(shutil, "disk_usage", disk_usage)
    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(WriteError, match=r"No space left on device \(.* free there\)$"):
        atomic_write(path, lambda f: f.write(b"x" * 100_000))
    assert seen == [False]  # measured once, after the temporary file went
    assert list(tmp_path.iterdir()) == []


def test_a_probe_finds_a_folder_the_file_system_refuses_and_leaves_nothing(tmp_path, monkeypatch):
    """``os.access`` says yes to root on any folder, and misses what only the file system
    decides: the probe creates the very temporary file a write would, and deletes it."""
    from metalearn.files import probe_writable, temporary_path

    target = tmp_path / "eval.json"
    target.write_text("the previous evaluation")
    probe_writable(target)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["eval.json"] and target.read_text() == "the previous evaluation"
    real_open = os.open

    def read_only(path, flags, *args):
        if Path(path) == temporary_path(target):
            raise OSError(errno.EROFS, os.strerror(errno.EROFS))
        return real_open(path, flags, *args)

    monkeypatch.setattr(os, "open", read_only)
    with pytest.raises(WriteError, match=rf"^cannot write {re.escape(str(target))}: Read-only file system; the "
                                         "previous eval.json is unchanged$"):
        probe_writable(target)
    monkeypatch.undo()
    # a link at the temporary file's name is neither followed nor replaced
    victim = tmp_path / "victim.txt"
    victim.write_text("important")
    temporary_path(target).symlink_to(victim)
    probe_writable(target)
    assert victim.read_text() == "important" and temporary_path(target).is_symlink()


def test_an_exports_cleanup_removes_only_its_own_files_temporaries(tmp_path):
    """An export killed mid-write leaves ``summary.json.tmp<pid>`` or ``<plot>.png.tmp<pid>`` in
    OUT_DIR, a folder of the user's: those of dead writers go once old; a file of another
    program there that looks the same, and a live or recent writer's, stay."""
    from metalearn.files import remove_export_temporaries

    alive = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        dead = subprocess.Popen([sys.executable, "-c", "pass"])
        dead.wait()
        old = [f"summary.json.tmp{dead.pid}", f"curves.png.tmp{dead.pid}", f"data.csv.tmp{dead.pid}",
               f"loss.png.tmp{alive.pid}"]
        young = [f"accuracy.png.tmp{dead.pid}"]
        for name in old + young + ["summary.json", "curves.png"]:
            (tmp_path / name).write_text(name)
        hour_ago = time.time() - 3600
        for name in old:
            os.utime(tmp_path / name, (hour_ago, hour_ago))
        removed = remove_export_temporaries(tmp_path)
    finally:
        alive.kill()
        alive.wait()
    gone = {f"summary.json.tmp{dead.pid}", f"curves.png.tmp{dead.pid}"}
    assert {p.name for p in removed} == gone
    assert {p.name for p in tmp_path.iterdir()} == set(old + young + ["summary.json", "curves.png"]) - gone


def test_a_file_size_limit_and_the_open_files_limit_are_named_as_such(monkeypatch):
    """EFBIG is a file-size limit (ulimit -f), not a full disk: the free space would mislead.
    EMFILE is the limit on open files, whatever the path: the message says how to raise it."""
    import resource

    from metalearn.cli import describe_os_error

    assert str(WriteError(Path("/tmp/big.bin"), OSError(errno.EFBIG, "File too large"))) == (
        "cannot write /tmp/big.bin: File too large (beyond this process's file-size limit: ulimit -f)")
    monkeypatch.setattr(resource, "getrlimit", lambda kind: (64, resource.RLIM_INFINITY))
    assert describe_os_error(OSError(errno.EMFILE, "Too many open files")) == (
        "Too many open files: this process may have 64 files open at once; raise it with `ulimit -n 4096`")
    monkeypatch.setattr(resource, "getrlimit", lambda kind: (64, 64))
    assert describe_os_error(OSError(errno.EMFILE, "Too many open files", "/tmp/x")).startswith(
        "/tmp/x: Too many open files: the system's or this process's limit on open files is reached")
