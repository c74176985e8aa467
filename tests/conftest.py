"""Shared fixtures. Omniglot is read from ``$METALEARN_DATA`` (CI points it at
``../shared/data/omniglot``), else from that folder beside the project when present, else from
the library's own data folder when ``metalearn data prepare --download`` has filled it."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

PROJECT = Path(__file__).resolve().parents[1]
SHARED_OMNIGLOT = PROJECT.parent / "shared" / "data" / "omniglot"


def omniglot_dir() -> Path | None:
    if os.environ.get("METALEARN_DATA"):
        return Path(os.environ["METALEARN_DATA"])
    if has_omniglot(SHARED_OMNIGLOT):
        return SHARED_OMNIGLOT
    from metalearn.data.omniglot import default_data_dir

    downloaded = default_data_dir()  # in the user's cache folder: asked before the session moves it
    return downloaded if has_omniglot(downloaded) else None


def has_omniglot(path: Path) -> bool:
    return (path / "images_background.zip").is_file() or (path / "images_background").is_dir()


@pytest.fixture(scope="session")
def omniglot_data_dir() -> Path:
    """The Omniglot folder; the tests that need it are skipped without one, but fail when
    ``$METALEARN_DATA`` names a folder without it (CI sets it: a wrong path must not turn the
    data tests into skips)."""
    path = omniglot_dir()
    if path is None or not has_omniglot(path):
        if os.environ.get("METALEARN_DATA"):
            pytest.fail(f"METALEARN_DATA={os.environ['METALEARN_DATA']} holds no Omniglot (images_background.zip "
                        "or images_background/): point it at the folder holding the archives, or unset it to skip "
                        "the tests that need them")
        pytest.skip("Omniglot not available: set METALEARN_DATA to the folder holding the archives")
    return path


@pytest.fixture(scope="session")
def omniglot_cache_dir(tmp_path_factory) -> Path:
    """A fresh cache folder for this test session, which the tests' image folders fill and
    which goes with the session; the preprocessed Omniglot arrays of the user's cache folder
    (``$METALEARN_CACHE``, else the default one) are linked into it, so that they are reused
    across sessions without the tests writing into the user's folder."""
    from metalearn.data.omniglot import default_cache_dir

    session = tmp_path_factory.mktemp("metalearn-cache")
    user = default_cache_dir()
    if user.is_dir():
        for array in user.glob("omniglot-*.npz"):
            try:
                (session / array.name).symlink_to(array.resolve())
            except (OSError, RuntimeError):  # a link that loops: the session prepares its own array
                continue
    return session


@pytest.fixture(scope="session", autouse=True)
def _omniglot_cache_of_the_session(omniglot_cache_dir):
    """Point ``$METALEARN_CACHE`` at the session's cache folder for the whole session: tasks built
    through ``build_task_source`` (and CLI or torchrun subprocesses, which inherit the environment)
    write the preprocessed array there, not into the user's ``~/.cache/metalearn``. The data
    folder that :func:`omniglot_dir` finds is pinned first, since the library's default data
    folder lies inside the cache folder and would move with it (also when the one found is that
    default folder, filled by ``metalearn data prepare --download``); without one, the data
    tests skip."""
    with pytest.MonkeyPatch.context() as patch:
        found = omniglot_dir()
        if found is not None and not os.environ.get("METALEARN_DATA"):
            patch.setenv("METALEARN_DATA", str(found))
        patch.setenv("METALEARN_CACHE", str(omniglot_cache_dir))
        yield


@pytest.fixture(scope="session")
def omniglot(omniglot_data_dir, omniglot_cache_dir):
    from metalearn.data.omniglot import load_omniglot

    return load_omniglot(omniglot_data_dir, 28, cache_dir=omniglot_cache_dir)


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)
    yield


@pytest.fixture
def one_thread():
    """For tests of tiny tensors: extra intra-op threads would only contend with other processes."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def flush_and_rename_events(monkeypatch):
    """The ``("fsync", path)`` and ``("replace", src, dst)`` calls of the test, in order: a file
    is on disk before it gets its name when its fsync comes before its rename (Linux: the path
    of an fsynced descriptor is read from /proc/self/fd)."""
    if not os.path.isdir("/proc/self/fd"):
        pytest.skip("needs /proc/self/fd to name the file flushed")
    events = []
    fsync, replace = os.fsync, os.replace

    def recording_fsync(fd):
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        fsync(fd)

    def recording_replace(src, dst, **kwargs):
        events.append(("replace", str(src), str(dst)))
        replace(src, dst, **kwargs)

    monkeypatch.setattr(os, "fsync", recording_fsync)
    monkeypatch.setattr(os, "replace", recording_replace)
    return events
