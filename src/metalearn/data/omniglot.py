"""Omniglot (Lake, Salakhutdinov & Tenenbaum 2015): official archives -> cached uint8 array.

The official release is two archives, ``images_background.zip`` (964 characters) and
``images_evaluation.zip`` (659 characters), each ``<top>/<Alphabet>/characterNN/XXXX_YY.png``
where ``XXXX`` numbers the character (0001..1623) and ``YY`` the drawer (01..20). Either the zips
or the same trees already extracted are read. Preprocessing happens once: every drawing is
resized with antialiasing (Lanczos) and inverted so strokes are bright, then the whole set is
cached as one ``(1623, 20, S, S)`` uint8 array with its metadata and a content hash, so later
loads take a fraction of a second.
"""

from __future__ import annotations

import hashlib
import io
import os
import sys
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
from PIL import Image, UnidentifiedImageError

from metalearn.data.cache import path_variable, read_arrays, usable_cache_folder, write_arrays
from metalearn.errors import MetalearnError, OptionError, valued
from metalearn.files import WriteError, remove_temporaries
from metalearn.locking import FolderLock

ARCHIVES = ("images_background", "images_evaluation")
CHARACTERS_PER_ARCHIVE = {"images_background": 964, "images_evaluation": 659}
NUM_CHARACTERS = 1623
DRAWINGS_PER_CHARACTER = 20
CACHE_FORMAT_VERSION = 1

# sha256 of the sorted `sha256sum` listing of each tree's PNG files (see `content_digest`): an
# integrity check that does not depend on how the archive was packed.
CONTENT_DIGESTS = {
    "images_background": "deaa02f758afda524b3a045c7af40311f2d9ded3e2a39f715ece8470d474bc6a",
    "images_evaluation": "3d5e035f27423c362bf9a181af649b43cda64c1008f842177ddc5203269c901e",
}


def default_data_dir() -> Path:
    """``$METALEARN_DATA``, else ``omniglot`` in the cache folder (:func:`default_cache_dir`,
    ``~/.cache/metalearn`` unless ``$METALEARN_CACHE`` or ``$XDG_CACHE_HOME`` say otherwise)."""
    if path_variable("METALEARN_DATA"):
        return Path(os.environ["METALEARN_DATA"]).expanduser()
    return usable_cache_folder(default_cache_dir()) / "omniglot"


def default_cache_dir() -> Path:
    """``$METALEARN_CACHE``, else ``$XDG_CACHE_HOME/metalearn``, else ``~/.cache/metalearn``."""
    if path_variable("METALEARN_CACHE"):
        return Path(os.environ["METALEARN_CACHE"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base).expanduser() / "metalearn"


def file_in_the_way(folder: Path | str, named: str) -> str | None:
    """Why ``folder`` cannot be a folder of data because of a file, as the start of a message
    about ``named`` (how the user gave it: ``"--data-dir /etc/passwd"``): ``"<named> is a file,
    not a folder"`` where a file (or anything but a folder) has its name, ``"<named>:
    /etc/passwd is a file, not a folder"`` where a file lies on its way
    (``/etc/passwd/omniglot``); None where ``folder`` is a folder or nothing blocks it (it does
    not exist). Datasets read from folders (Omniglot's archives, image folders) say this rather
    than that their data is missing, which would send the user looking for data in a folder
    that cannot hold any."""
    folder = Path(folder)
    if folder.exists():
        return None if folder.is_dir() else f"{named} is a file, not a folder"
    blocking = next((p for p in folder.parents if p.exists() and not p.is_dir()), None)
    return f"{named}: {blocking} is a file, not a folder" if blocking is not None else None


@dataclass(frozen=True)
class Omniglot:
    """All 1623 characters x 20 drawings, preprocessed.

    images:     (1623, 20, S, S) uint8, strokes bright (255), background 0
    names:      "Alphabet/characterNN" per character, in character-number order
    background: (1623,) bool, True for the 964 characters of images_background
    drawers:    (1623, 20) int, the drawer number (1..20) of each drawing
    content_hash: sha256 over the array and metadata, recorded in the cache
    """

    images: np.ndarray
    names: tuple[str, ...]
    background: np.ndarray
    drawers: np.ndarray
    content_hash: str

    @property
    def image_size(self) -> int:
        return int(self.images.shape[-1])

    @property
    def alphabets(self) -> tuple[str, ...]:
        return tuple(name.split("/")[0] for name in self.names)

    def index_of(self) -> dict[str, int]:
        return {name: i for i, name in enumerate(self.names)}


# --------------------------------------------------------------------------------------------
# Reading the release


ARCHIVES_IN_WORDS = "images_background.zip and images_evaluation.zip (or their extracted folders)"


def locate_sources(data_dir: Path, given: bool = True) -> dict[str, Path]:
    """The extracted tree or the zip of each archive under ``data_dir``; a clear error if absent,
    and one that says so where a file stands in the folder's place (``--data-dir /etc/passwd``:
    the data is not missing, the path is wrong). ``given``: whether the user named ``data_dir``
    (``--data-dir``), else it is the default (``$METALEARN_DATA``, the cache folder)."""
    data_dir = Path(data_dir)
    # the options as the caller spells them (OptionError): data_dir from Python, --data-dir on the command line
    named = valued("data_dir", data_dir) if given else (str(data_dir),) * 2
    blocked = file_in_the_way(data_dir, "{named}")
    if blocked is not None:
        raise OptionError(f"{blocked}; {'give' if given else 'point {data_dir} or METALEARN_DATA at'} the folder that "
                          f"holds {ARCHIVES_IN_WORDS}", named=named, data_dir="data_dir")
    found, missing = {}, []
    for archive in ARCHIVES:
        tree, zipped = data_dir / archive, data_dir / f"{archive}.zip"
        if tree.is_dir():
            found[archive] = tree
        elif zipped.is_file():
            found[archive] = zipped
        else:
            missing.append(archive)
    if missing:
        raise OptionError(
            "Omniglot not found in {folder}: missing "
            + ", ".join(f"{m}.zip (or the extracted {m}/ folder)" for m in missing)
            + ". Put the official archives there, point {data_dir} or METALEARN_DATA at the folder that holds them, "
            "or run `metalearn data prepare --download --data-dir {folder}` to fetch them there.",
            folder=(str(data_dir),) * 2, data_dir="data_dir")
    return found


def iter_pngs(source: Path) -> Iterator[tuple[str, bytes]]:
    """(relative path like 'images_background/Alpha/character01/0001_01.png', bytes), sorted."""
    if source.is_dir():
        root = source.parent
        paths = [p for p in source.rglob("*.png") if not _is_metadata(p.relative_to(root).as_posix())]
        for path in sorted(paths, key=lambda p: p.relative_to(root).as_posix()):
            try:
                yield path.relative_to(root).as_posix(), path.read_bytes()
            except OSError as err:
                raise MetalearnError(f"cannot read {path}: {err}") from None
        return
    try:
        with zipfile.ZipFile(source) as archive:
            names = sorted(n for n in archive.namelist() if n.endswith(".png") and not _is_metadata(n))
            for name in names:
                try:
                    data = archive.read(name)
                except (zipfile.BadZipFile, OSError, EOFError, zlib.error, NotImplementedError, RuntimeError) as err:
                    # a damaged deflate stream (zlib.error), an unsupported compression method
                    # (NotImplementedError) or an encrypted member (RuntimeError)
                    raise MetalearnError(
                        f"{source} is corrupt or unreadable ({name}: {type(err).__name__}: {err}). "
                        "Delete it and download it again."
                    ) from None
                yield name, data
    except (zipfile.BadZipFile, EOFError) as err:
        raise MetalearnError(
            f"{source} is not a readable zip archive ({err}); it is probably truncated or "
            "corrupt. Delete it and download it again."
        ) from None


def _is_metadata(name: str) -> bool:
    """macOS archive droppings (``__MACOSX/``, ``._x.png``), not drawings."""
    return name.startswith("__MACOSX/") or name.rsplit("/", 1)[-1].startswith("._")


def decode_drawing(name: str, data: bytes, image_size: int) -> np.ndarray:
    """One PNG -> (S, S) uint8 with strokes bright, resized with antialiasing."""
    try:
        with Image.open(io.BytesIO(data)) as img:
            img = img.convert("L")
            if img.size != (image_size, image_size):
                img = img.resize((image_size, image_size), Image.Resampling.LANCZOS)
            return 255 - np.asarray(img, dtype=np.uint8)
    except UnidentifiedImageError:  # its own message names an in-memory buffer, not the file
        raise MetalearnError(f"corrupt image {name}: not a readable image. The data is damaged: run `metalearn "
                             "data verify`, and download the archive again") from None
    except (OSError, SyntaxError, ValueError) as err:
        raise MetalearnError(f"corrupt image {name}: {err}. The data is damaged: run `metalearn data verify`, "
                             "and download the archive again") from None


def parse_name(name: str) -> tuple[str, int, int]:
    """'top/Alpha/character01/0123_07.png' -> ('Alpha/character01', 123, 7)."""
    parts = name.split("/")
    if len(parts) < 3:
        raise MetalearnError(f"unexpected file name {name} (expected <top>/<Alphabet>/characterNN/XXXX_YY.png)")
    stem = parts[-1].rsplit(".", 1)[0]
    try:
        number, drawer = (int(t) for t in stem.split("_"))
    except ValueError:
        raise MetalearnError(f"unexpected file name {name} (expected XXXX_YY.png)") from None
    return f"{parts[-3]}/{parts[-2]}", number, drawer


def read_release(data_dir: Path, image_size: int = 28, progress: bool = False) -> Omniglot:
    """Decode and resize every drawing of both archives (a few seconds to a minute)."""
    sources = locate_sources(data_dir)
    from metalearn.memory_budget import allocate_images

    images = allocate_images((NUM_CHARACTERS, DRAWINGS_PER_CHARACTER, image_size, image_size),
                             f"Omniglot at {image_size}x{image_size} pixels",
                             "give a smaller {image_size} (the papers' is 28)", zeros=True, image_size="image_size")
    drawers = np.zeros((NUM_CHARACTERS, DRAWINGS_PER_CHARACTER), np.int16)
    names: list[str | None] = [None] * NUM_CHARACTERS
    background = np.zeros(NUM_CHARACTERS, bool)
    filled = np.zeros((NUM_CHARACTERS, DRAWINGS_PER_CHARACTER), bool)
    for archive, source in sources.items():
        pngs = iter_pngs(source)
        if progress:
            from tqdm import tqdm

            pngs = tqdm(pngs, desc=f"reading {source.name}", unit="img", leave=False)
        characters = set()
        for name, data in pngs:
            character, number, drawer = parse_name(name)
            if not (1 <= number <= NUM_CHARACTERS):
                raise MetalearnError(f"unexpected character number in {name}")
            index = number - 1
            slot = int(filled[index].sum())
            if slot >= DRAWINGS_PER_CHARACTER:
                raise MetalearnError(f"more than 20 drawings of {character} in {source}")
            images[index, slot] = decode_drawing(name, data, image_size)
            drawers[index, slot] = drawer
            filled[index, slot] = True
            names[index] = character
            background[index] = archive == "images_background"
            characters.add(index)
        expected = CHARACTERS_PER_ARCHIVE[archive]
        if len(characters) != expected:
            raise MetalearnError(
                f"{source} holds {len(characters)} characters, expected {expected}: the archive "
                "is incomplete. Delete it and download it again."
            )
    if not filled.all():
        bad = names[int(np.argwhere(~filled.all(1))[0, 0])]
        raise MetalearnError(f"character {bad} has fewer than 20 drawings: incomplete data")
    return Omniglot(images, tuple(names), background, drawers, hash_arrays(images, names))


def hash_arrays(images: np.ndarray, names: list[str] | tuple[str, ...]) -> str:
    digest = hashlib.sha256()
    digest.update(np.ascontiguousarray(images).data)  # the bytes as they are: tobytes() would copy them
    digest.update("\n".join(names).encode())
    return digest.hexdigest()


# --------------------------------------------------------------------------------------------
# Cache


def source_fingerprint(sources: dict[str, Path]) -> str:
    """Cheap identity of the sources (path, size, mtime) to know when the cache is stale: of the
    zip, or of every file in an extracted tree (a PNG replaced deep inside it changes no
    folder's size or time)."""
    parts = []
    for archive, path in sorted(sources.items()):
        root = path.resolve()
        if not root.is_dir():
            stat = root.stat()
            parts.append(f"{archive}:{root}:{stat.st_size}:{stat.st_mtime_ns}")
            continue
        parts.append(f"{archive}:{root}")
        for folder, dirs, files in os.walk(root):
            dirs.sort()
            for name in sorted(files):
                stat = os.stat(os.path.join(folder, name))
                parts.append(f"{os.path.relpath(os.path.join(folder, name), root)}:{stat.st_size}:{stat.st_mtime_ns}")
    return hashlib.sha256("|".join(parts).encode()).hexdigest()


def cache_path(cache_dir: Path, image_size: int) -> Path:
    return Path(cache_dir) / f"omniglot-{image_size}x{image_size}-v{CACHE_FORMAT_VERSION}.npz"


def load_omniglot(
    data_dir: Path | str | None = None,
    image_size: int = 28,
    cache_dir: Path | str | None = None,
    progress: bool = False,
) -> Omniglot:
    """The preprocessed Omniglot array, built from the release on first use and cached.

    ``data_dir`` defaults to ``$METALEARN_DATA`` or the user cache; the cache lives in
    ``cache_dir`` (default ``$METALEARN_CACHE`` or ``~/.cache/metalearn``), never beside the
    possibly read-only data. ``image_size``: the side of the square images every drawing is
    resized to, with antialiasing (at least 4; the default, 28, is the papers'); each size is
    cached in a file of its own. ``progress``: progress bars while the release is decoded (not
    when the cached array is read); False (the default) draws none.
    """
    if image_size < 4:
        raise MetalearnError(f"image size must be at least 4 pixels, got {image_size}")
    given = data_dir is not None
    data_dir = Path(data_dir) if given else default_data_dir()
    cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    sources = locate_sources(data_dir, given)
    fingerprint = source_fingerprint(sources)
    path = cache_path(cache_dir, image_size)
    cached = _read_cache(path, fingerprint, image_size)
    if cached is not None:
        return cached
    # one process builds a cache file at a time (others wait, then read it), and the builder
    # removes the temporary file of one killed while writing it
    # said with or without progress bars: a process that waits on another's lock would look hung
    waiting = lambda holder: print(f"waiting for {holder}, which is preparing {path}", file=sys.stderr)  # noqa: E731
    try:
        lock = FolderLock.take(path.with_name(path.name + ".lock"), "preparing the Omniglot cache", wait=waiting)
    except OSError as err:
        from metalearn.data.cache import cache_folder_blocked

        blocked = cache_folder_blocked(path.parent)  # mkdir's "File exists" would not say which file
        if blocked:
            raise MetalearnError(f"cannot write {path}: {blocked}; point METALEARN_CACHE at a folder") from None
        raise MetalearnError(f"{WriteError(path, err)}; point METALEARN_CACHE at a writable folder") from None
    with lock:
        remove_temporaries(path.parent, owned=(path.name,))
        cached = _read_cache(path, fingerprint, image_size)
        if cached is not None:
            return cached  # built by the process this one waited for
        omniglot = read_release(data_dir, image_size, progress=progress)
        _write_cache(path, omniglot, fingerprint)
    return omniglot


def _read_cache(path: Path, fingerprint: str, image_size: int | None = None) -> Omniglot | None:
    """The cached array if it was made from these sources and its arrays fit together, else
    None (the release is then read again)."""
    cached = read_arrays(path, fingerprint, ("images", "background", "drawers"))
    if cached is None:
        return None
    arrays, meta = cached
    try:
        omniglot = Omniglot(arrays["images"], tuple(meta["names"]), arrays["background"], arrays["drawers"],
                            meta["content_hash"])
    except (KeyError, TypeError):
        return None  # a cache of another format version
    images, characters = omniglot.images, len(omniglot.names)
    fits = (images.dtype == np.uint8 and images.ndim == 4
            and images.shape[:2] == (characters, DRAWINGS_PER_CHARACTER) == omniglot.drawers.shape
            and images.shape[2] == images.shape[3] == (image_size or images.shape[2])
            and omniglot.background.shape == (characters,))
    return omniglot if fits else None  # e.g. a cache written by hand or by another version


def _write_cache(path: Path, omniglot: Omniglot, fingerprint: str) -> None:
    meta = {"names": list(omniglot.names), "content_hash": omniglot.content_hash, "format": CACHE_FORMAT_VERSION}
    arrays = {"images": omniglot.images, "background": omniglot.background, "drawers": omniglot.drawers}
    write_arrays(path, arrays, meta, fingerprint)


# --------------------------------------------------------------------------------------------
# Integrity


def content_digest(source: Path) -> str:
    """sha256 of ``find <top> -name '*.png' | LC_ALL=C sort | xargs sha256sum`` for one archive."""
    listing = hashlib.sha256()
    for name, data in iter_pngs(source):
        listing.update(f"{hashlib.sha256(data).hexdigest()}  {name}\n".encode())
    return listing.hexdigest()


def verify_release(data_dir: Path | str | None = None) -> dict[str, bool]:
    """Compare each archive's content digest with the official one; True where they match."""
    given = data_dir is not None
    data_dir = Path(data_dir) if given else default_data_dir()
    return {
        archive: content_digest(source) == CONTENT_DIGESTS[archive]
        for archive, source in locate_sources(data_dir, given).items()
    }
