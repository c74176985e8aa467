"""The array caches of decoded datasets: one ``.npz`` per dataset and image size.

A cache is written atomically (a temporary file in the same folder, flushed to disk, then
``os.replace``), holds its arrays plus a JSON ``meta`` record with the fingerprint of the
sources it was made from, and is trusted only when that fingerprint matches: a cache of other
sources, a damaged file or one of another layout reads as ``None`` and the caller decodes the
sources again. Decoding is the slow part of loading (seconds for Omniglot, minutes for an
84x84 RGB folder), so every dataset keeps one of these beside ``METALEARN_CACHE``.
"""

from __future__ import annotations

import json
import os
import zipfile
from pathlib import Path

import numpy as np

from metalearn.errors import MetalearnError, OptionError
from metalearn.files import WriteError, atomic_write, format_bytes, remove_temporaries


def read_arrays(path: Path, fingerprint: str, names: tuple[str, ...]) -> tuple[dict[str, np.ndarray], dict] | None:
    """The arrays ``names`` and the meta record of the cache at ``path`` if it exists, reads
    back whole and was made from sources with this ``fingerprint``; else ``None``. Whether the
    arrays fit together is the caller's check (it knows their shapes)."""
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as archive:
            meta = json.loads(str(archive["meta"]))
            if not isinstance(meta, dict) or meta.get("fingerprint") != fingerprint:
                return None
            arrays = {name: archive[name] for name in names}
    except MemoryError:  # not the run's options (--task-chunk, --meta-batch-size): the data's size
        raise OptionError(f"reading the cache {path} ({path.stat().st_size / 1e9:.3g} GB) ran out of memory: the "
                          "images at this size do not fit; give a smaller {image_size}, or use a machine with more "
                          "memory", image_size="image_size") from None
    except (OSError, EOFError, ValueError, KeyError, TypeError, RecursionError, zipfile.BadZipFile):
        return None  # a damaged cache is rebuilt, not trusted (np.load of an empty file: EOFError)
    return arrays, meta


def write_arrays(path: Path, arrays: dict[str, np.ndarray], meta: dict, fingerprint: str) -> None:
    """Write ``arrays`` and ``meta`` (plus ``fingerprint``) to ``path`` atomically with
    :func:`metalearn.files.atomic_write`: the file is flushed to disk before it is renamed into
    place, so a reader, or the next start after a kill or a power cut, sees the old cache or the
    whole new one, never a part or an empty file. A write failure is one line naming the file
    and the free space (or the file that stands where the cache folder would be made, as
    ``METALEARN_CACHE`` names it), and leaves no temporary file. Temporary files that killed writers left
    in the cache folder (as large as a cache: about 1.3 GB for mini-ImageNet at 84x84) go
    first, those of processes no longer running and untouched for
    ``files.UNOWNED_TEMPORARY_AGE_S``."""
    record = {"fingerprint": fingerprint, **meta}
    try:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            blocked = cache_folder_blocked(path.parent)
            if blocked:  # mkdir's own words ("File exists", "Not a directory") do not say which file
                raise MetalearnError(f"cannot write {path}: {blocked}; point METALEARN_CACHE at a folder") from None
            raise WriteError(path, err) from None
        remove_temporaries(path.parent)
        atomic_write(path, lambda f: np.savez(f, **arrays, meta=np.array(json.dumps(record))))
    except WriteError as err:
        need = format_bytes(sum(array.nbytes for array in arrays.values()))  # the file: np.savez does not compress
        raise MetalearnError(f"{err}; the cache takes some {need}: point METALEARN_CACHE at a writable folder "
                             "with that much space") from None


def path_variable(name: str) -> str | None:
    """The path the environment variable ``name`` (``METALEARN_CACHE``, ``METALEARN_DATA``,
    ``METALEARN_RUNS``) sets, or None where it is unset or empty (the default folder then);
    one of only spaces is refused in one line naming it, where it would make a folder named
    by the spaces."""
    value = os.environ.get(name)
    if value and not value.strip():
        raise MetalearnError(f"{name} is set to {value!r}, only blanks: point it at a folder, or unset it")
    return value or None


def cache_folder_blocked(folder: Path) -> str | None:
    """Why the cache folder ``folder`` cannot be made because of a file, named as the user set
    it: ``"METALEARN_CACHE /x/afile is a file, not a folder"`` where the variable names a file
    (or a path through one), ``"the cache folder /x is a file, not a folder"`` where the default
    does; None where no file blocks it."""
    from metalearn.data.omniglot import file_in_the_way  # omniglot imports this module

    set_to = path_variable("METALEARN_CACHE")
    named = (f"METALEARN_CACHE {set_to}" if set_to and Path(set_to).expanduser().absolute() == Path(folder).absolute()
             else f"the cache folder {folder}")
    return file_in_the_way(folder, named)


def usable_cache_folder(folder: Path) -> Path:
    """``folder``, the cache folder, where no file stands in its way (it need not exist: its
    first write makes it); else one line naming it as the user set it
    (:func:`cache_folder_blocked`), refused before anything is looked for in it, where a file
    would read as a folder holding nothing."""
    blocked = cache_folder_blocked(folder)
    if blocked:
        raise MetalearnError(f"{blocked}; point METALEARN_CACHE at a folder")
    return folder
