"""Ctrl-C while an image folder is decoded in several processes (``metalearn.data.folder``):
the command stops at once with its usual one line, leaving no process behind."""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

# The command under test, its folder decoded in 2 processes whatever the machine's cores, one
# image to a task; each decode first leaves a file named by its process and image. The first
# image stands for a large one: its decoding takes long in C code, which acts on no signal (a
# Ctrl-C would wait for it), here 30 seconds of sleep with SIGINT ignored. The other process
# decodes the rest and waits for work, where a Ctrl-C once ended it with a traceback.
PROGRAM = """
import os, signal, sys, time
from pathlib import Path
from metalearn.data import folder

root, marks, run_dir = sys.argv[1:4]
real_decode, real_read = folder.decode_image, folder.read_folder

def decode(path, size, channels):
    Path(marks, f"{os.getpid()}-{path.parent.name}-{path.name}").touch()
    if (path.parent.name, path.name) == ("class0", "0.png"):
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        time.sleep(30)
    return real_decode(path, size, channels)

folder.decode_image = decode
folder.PARALLEL_FROM, folder.CHUNK = 1, 1
folder.read_folder = lambda *args: real_read(*args[:5], workers=2)
from metalearn.cli import main
main(["train", "protonet", "--dataset", "folder", "--data-dir", root, "--image-size", "16", "--channels", "1",
      "--ways", "2", "--shots", "1", "--query", "1", "--split-fractions", "0.5,0,0.5", "--val-every", "0",
      "--no-eval", "--steps", "1", "--no-progress", "--run-dir", run_dir])
"""


def _photos_and_marks(tmp_path: Path) -> tuple[Path, Path, dict]:
    """PROGRAM's arguments: a folder of 4 classes of 10 images, an empty folder for the marks,
    and the environment (this checkout's metalearn, a cache of the test's own)."""
    root = tmp_path / "photos"
    rng = np.random.default_rng(0)
    for c in range(4):
        (root / f"class{c}").mkdir(parents=True)
        for i in range(10):
            Image.fromarray(rng.integers(0, 256, (8, 8), dtype=np.uint8), "L").save(root / f"class{c}" / f"{i}.png")
    marks = tmp_path / "marks"
    marks.mkdir()
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1] / "src"),
           "METALEARN_CACHE": str(tmp_path / "cache")}
    return root, marks, env


def _wait_for_every_decode(child: subprocess.Popen, marks: Path, output) -> None:
    """Until PROGRAM has started decoding all 40 images (90 s at most: the imports on a busy
    machine); ``output()``: what the command wrote, shown where it ended first."""
    deadline = time.monotonic() + 90
    while len(list(marks.iterdir())) < 40 and child.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert child.poll() is None, output()
    assert len(list(marks.iterdir())) == 40, "the images were not decoded within 90 s"


def alive(pid: int) -> bool:
    """Whether process ``pid`` runs (a zombie, ended but not yet reaped, does not)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    except OSError:  # no /proc: ask the kernel
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        return True
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


@pytest.mark.skipif(sys.platform == "win32" or "fork" not in multiprocessing.get_all_start_methods(),
                    reason="sends SIGINT to a process group; the slowed decoder reaches forked processes only")
def test_ctrl_c_while_decoding_in_processes_stops_at_once_with_one_line(tmp_path):
    root, marks, env = _photos_and_marks(tmp_path)
    # a session of its own, so that the signal goes to the command and its processes together, as a
    # terminal's Ctrl-C does
    child = subprocess.Popen([sys.executable, "-c", PROGRAM, str(root), str(marks), str(tmp_path / "run")],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                             start_new_session=True)
    try:
        _wait_for_every_decode(child, marks, child.communicate)
        time.sleep(0.3)  # one process decodes the first image, the other waits for work
        os.killpg(child.pid, signal.SIGINT)
        out, err = child.communicate(timeout=15)  # not the 30 s of the first image's decoding
    finally:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(child.pid, signal.SIGKILL)  # whatever a failure left of the command's session
        if child.poll() is None:
            child.kill()
            child.communicate()
    workers = {int(mark.name.split("-")[0]) for mark in marks.iterdir()}
    assert child.pid not in workers and len(workers) == 2, workers  # decoded in the 2 processes
    assert child.returncode == 130, (child.returncode, out, err)
    assert err.strip().splitlines() == ["interrupted before training began; nothing was trained or saved: run the "
                                        "same command again to start"], err
    assert "Traceback" not in out + err and "BrokenProcessPool" not in err
    deadline = time.monotonic() + 5  # ended with the command (reaped by it, or at once by init)
    while any(alive(pid) for pid in workers) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not [pid for pid in workers if alive(pid)], workers
    assert not (tmp_path / "cache").exists() or not any((tmp_path / "cache").rglob("folder-*"))  # nothing cached


@pytest.mark.skipif(sys.platform == "win32", reason="SIGUSR1 and os.kill of a signal to itself: POSIX")
def test_a_stop_signal_while_the_decoding_processes_start_acts_when_they_are_the_pool_s():
    """A SIGTERM or a scheduler's SIGUSR1 that landed while the pool forked its processes left a
    process forked but not yet the pool's running forever (the pool's stop never reached it), or
    Python dropped the signal's exception in a fork callback and the command went on. Within
    the start, a stop signal (and Ctrl-C) is held, and acts on the command's own handler when
    the start is done."""
    from metalearn.data.folder import _interrupts_blocked
    from metalearn.errors import Terminated

    def stop(number, frame):
        raise Terminated(number)

    previous = signal.signal(signal.SIGUSR1, stop)
    try:
        with pytest.raises(Terminated) as stopped:
            with _interrupts_blocked():
                os.kill(os.getpid(), signal.SIGUSR1)
                time.sleep(0.05)  # the handler would run here, and did, though the main thread blocked it
                reached = True
        assert reached and stopped.value.signal_number == signal.SIGUSR1
        assert signal.getsignal(signal.SIGUSR1) is stop  # the command's handler, back
        with pytest.raises(KeyboardInterrupt):
            with _interrupts_blocked():
                os.kill(os.getpid(), signal.SIGINT)
                time.sleep(0.05)
                reached = "after Ctrl-C"
        assert reached == "after Ctrl-C"
    finally:
        signal.signal(signal.SIGUSR1, previous)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the kernel's parent-death signal is Linux's")
def test_a_command_killed_while_decoding_in_processes_leaves_no_process_and_no_lock(tmp_path):
    """A SIGKILL to the command alone (the kernel's out-of-memory killer, ``kill -9 PID``) cannot
    stop its pool: the decoding processes, which hold both ends of the pool's pipes, waited for
    work forever, and held the run folder's lock. They now die with the command, and hold no
    lock meanwhile."""
    from metalearn.locking import lock_is_held
    from metalearn.runs import RunDir

    root, marks, env = _photos_and_marks(tmp_path)
    log = tmp_path / "log"
    with log.open("w") as output:  # a file, not a pipe: the processes left would hold a pipe open
        child = subprocess.Popen([sys.executable, "-c", PROGRAM, str(root), str(marks), str(tmp_path / "run")],
                                 stdout=output, stderr=output, env=env, start_new_session=True)
    try:
        _wait_for_every_decode(child, marks, log.read_text)
        workers = {int(mark.name.split("-")[0]) for mark in marks.iterdir()}
        assert len(workers) == 2 and all(alive(pid) for pid in workers), workers
        child.kill()  # the command alone, not its session
        child.wait(timeout=30)
        deadline = time.monotonic() + 10
        while any(alive(pid) for pid in workers) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not [pid for pid in workers if alive(pid)], workers
        assert not lock_is_held(tmp_path / "run" / ".lock")
        with RunDir(tmp_path / "run").lock():  # the next command takes the folder
            pass
    finally:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(child.pid, signal.SIGKILL)  # whatever a failure left of the command's session
