"""Your own images: a folder of class folders -> one cached uint8 array, and its class split.

Three layouts are read (see ``docs/data-folders.md``):

- ``classes``: ``ROOT/<class>/<image>`` (images may sit deeper inside a class folder). The
  classes are split into train / val / test by a seeded shuffle with the fractions of
  ``--split-fractions``, or by a split file (``--split-file``, JSON ``{"train": [class, ...],
  "val": [...], "test": [...]}``).
- ``parts``: ``ROOT/train/<class>/...``, ``ROOT/val/<class>/...``, ``ROOT/test/<class>/...``:
  the split is the folders' (how mini-ImageNet, tiered-ImageNet and CUB releases often come).
- ``csv``: mini-ImageNet as Ravi & Larochelle (2017) ship it: ``ROOT/images/<file>.jpg`` and
  ``ROOT/{train,val,test}.csv`` with lines ``filename,label``.

Every image is decoded once (:func:`metalearn.data.images.decode_image`: grey or RGB, stretched
to ``S x S``) into one ``(n_images, C, S, S)`` uint8 array, class after class, cached with its
metadata in the cache folder and rebuilt when the folder's file names, sizes or modification
times change. The decoding waits until the images are first used: the classes, their sizes and
parts come from the file names, so a folder with too few classes or images for the episodes
asked is refused before it. Images up to ``MAX_PIXELS`` (300 megapixels) are read; larger ones
are refused by name. Every file is tried before a refusal: all the files that are not readable
images (empty, damaged, too large) are named in one error, and no cache is written.

Links (to image files and to folders) are followed; a link whose target is missing, a folder
link back into its own ancestors (a cycle) and an image reached twice through links (symbolic
or hard) are refused by name, never skipped.
"""

from __future__ import annotations

import contextlib
import csv
import hashlib
import json
import math
import os
import warnings
from pathlib import Path

import numpy as np
import torch

from metalearn.data.cache import read_arrays, write_arrays
from metalearn.data.images import IMAGE_SUFFIXES, check_channels, decode_image, is_image_file
from metalearn.data.omniglot import default_cache_dir, file_in_the_way
from metalearn.data.splits import PARTS, ClassPool
from metalearn.errors import (STOP_SIGNALS, MetalearnError, caller_level, check_count, OptionError, OptionWarning, flag,
                              valued)
from metalearn.run_files import CHECKPOINT_NAME, CONFIG_NAME, RUN_SPLIT_NAME

# 2: 16-bit images scaled by their type's range, EXIF orientation applied; 3: the cached
# content_hash also covers the array's shape, the class sizes and the parts; 4: images with
# transparency composited onto white (data.images.pil_to_array), no longer their alpha dropped
CACHE_FORMAT_VERSION = 4
SPLIT_SEED = 1  # the seeded shuffle of class names behind --split-fractions
DEFAULT_FRACTIONS = (0.64, 0.16, 0.20)  # mini-ImageNet's 64 / 16 / 20 classes of 100


class ImageFolder:
    """The images of a folder, preprocessed.

    images:      (n_images, C, S, S) uint8, the images of class 0, then of class 1, ...
    class_names: (classes,) the class folder's path below the root ("dog", "train/dog"), or the
                 CSV label
    class_sizes: (classes,) int64, images per class
    parts:       (classes,) "train", "val" or "test" where the layout says, else ""
    layout:      "classes", "parts" or "csv"
    content_hash: sha256 over the array (and its shape), the class names, the class sizes and the
                 parts: moving an image between classes, or a class between the parts a
                 layout sets (CSV files, part folders), changes it

    A folder from :func:`load_image_folder` knows its classes, their sizes and parts from the
    scan of the file names alone; ``images`` and ``content_hash`` are read (from the cache, or
    by decoding every image) on first use. So the split and episode checks, which need only
    the classes, refuse a folder that cannot serve the episodes before its images are decoded
    (minutes for mini-ImageNet's 60,000), not after.
    """

    def __init__(self, images: np.ndarray, class_names: tuple[str, ...], class_sizes: np.ndarray,
                 parts: tuple[str, ...], layout: str, content_hash: str) -> None:
        self.class_names, self.class_sizes, self.parts, self.layout = class_names, class_sizes, parts, layout
        self._images: np.ndarray | None = images
        self._content_hash = content_hash
        self._shape = tuple(images.shape[1:])
        self._load = None

    @classmethod
    def deferred(cls, class_names: tuple[str, ...], class_sizes: np.ndarray, parts: tuple[str, ...], layout: str,
                 image_size: int, channels: int, load) -> "ImageFolder":
        """A folder whose images ``load()`` returns, as ``(images, content_hash)``, when first
        asked for; an error from ``load`` (an unreadable image) is raised there, and the next
        use tries again."""
        folder = cls.__new__(cls)
        folder.class_names, folder.class_sizes, folder.parts, folder.layout = class_names, class_sizes, parts, layout
        folder._images, folder._content_hash = None, ""
        folder._shape = (channels, image_size, image_size)
        folder._load = load
        return folder

    def _materialise(self) -> None:
        if self._images is None:
            self._images, self._content_hash = self._load()
            self._load = None

    @property
    def images(self) -> np.ndarray:
        self._materialise()
        return self._images

    @property
    def content_hash(self) -> str:
        self._materialise()
        return self._content_hash

    @property
    def image_size(self) -> int:
        """S, the side of the square images in pixels."""
        return int(self._shape[-1])

    @property
    def channels(self) -> int:
        """C, the colour channels of the images: 1 (grey) or 3 (RGB)."""
        return int(self._shape[0])


# --------------------------------------------------------------------------------------------
# Finding the classes


def _listdir(folder: Path) -> list[Path]:
    return sorted((p for p in folder.iterdir() if not p.name.startswith(".")), key=lambda p: p.name)


def image_files(folder: Path, links: list[Path] | None = None, skipped: list[Path] | None = None) -> list[Path]:
    """The image files at any depth below ``folder``, sorted by their path below it. A file is
    skipped when any part of that path starts with "." (``.DS_Store``, ``._x.jpg``, and
    everything inside ``.thumbs/`` or ``.git/``): hidden folders hold thumbnails and tool
    state, not examples of the class.

    Links are followed, to files and to folders alike, so a folder of images linked into a
    class is part of it as a copy would be. Refused with a one-line error, never skipped: a
    link whose target is missing, a folder link to a folder it is inside (a cycle: the walk
    would not end), a folder that cannot be listed. ``links``, when given, collects every link
    passed (the caller's check for an image reached twice); ``skipped`` every file passed over
    that is not hidden and not an image by its suffix (for :func:`warn_of_skipped_files`)."""
    files: list[tuple[str, Path]] = []
    _walk(Path(folder), "", {_identity(Path(folder))}, files, links if links is not None else [],
          skipped if skipped is not None else [])
    return [path for _, path in sorted(files, key=lambda item: item[0])]


_WARNED: set[tuple[str, int]] = set()  # the folders warned of in this process


def warn_of_skipped_files(skipped: list[Path], where: str | tuple[str, str]) -> None:
    """One warning for the files of ``where``'s class folders that are not read (a photo in a
    format no reader here takes, HEIC or RAW, would otherwise vanish from its class unseen).
    ``where``: the folder in words, or as Python and the command line name the option that gave
    it (``valued("support", folder)``)."""
    where = (where, where) if isinstance(where, str) else tuple(where)
    if not skipped or (where, len(skipped)) in _WARNED:  # once per folder: train, val and test read it alike
        return
    _WARNED.add((where, len(skipped)))
    shown = ", ".join(str(p) for p in skipped[:2]) + (f" and {len(skipped) - 2} more" if len(skipped) > 2 else "")
    suffixes = ", ".join(s.lstrip(".").upper() for s in IMAGE_SUFFIXES if s not in (".jpeg", ".tif"))
    what = ("file that is not an image by its name" if len(skipped) == 1 else
            "files that are not images by their names")
    them = "it" if len(skipped) == 1 else "them"
    warnings.warn(OptionWarning(f"{{where}}: skipped {len(skipped)} {what} ({suffixes}): {{shown}}; convert {them} "
                                f"to use {them}", where=where, shown=(shown, shown)), stacklevel=caller_level())


def no_images_note(folder: Path, skipped: list[Path]) -> str:
    """What ``folder``, which holds no images, holds instead, for the refusal that names it:
    ``skipped``, its files that are not images by their names (the first three and a count:
    "it holds 2 files that are not images by their names: notes.txt, cat.heic"), or that it is
    empty or holds only hidden files, which are skipped."""
    if skipped:
        def below(path: Path) -> str:
            try:
                return str(path.relative_to(folder))
            except ValueError:
                return str(path)
        what = ("1 file that is not an image by its name" if len(skipped) == 1 else
                f"{len(skipped)} files that are not images by their names")
        more = f" and {len(skipped) - 3} more" if len(skipped) > 3 else ""
        return f"it holds {what}: {', '.join(below(p) for p in skipped[:3])}{more}"
    try:
        with os.scandir(folder) as listing:
            names = [entry.name for entry in listing]
    except OSError:
        return ""
    if not names:
        return "it is empty"
    if all(name.startswith(".") for name in names):
        return f"it holds only hidden files, which are skipped ({', '.join(sorted(names)[:3])})"
    return ""


def _identity(folder: Path) -> tuple[int, int]:
    stat = folder.stat()
    return stat.st_dev, stat.st_ino


def _refuse_broken_link(path: Path) -> None:
    if path.is_symlink() and not path.exists():
        raise MetalearnError(f"{path} is a link to {os.readlink(path)}, which does not exist: restore its target "
                             "or remove the link")


def _walk(folder: Path, relative: str, ancestors: set[tuple[int, int]], files: list[tuple[str, Path]],
          links: list[Path], skipped: list[Path]) -> None:
    try:
        with os.scandir(folder) as listing:
            entries = sorted(listing, key=lambda e: e.name)
    except OSError as err:
        raise MetalearnError(f"cannot list {folder}: {err.strerror or err}") from None
    for entry in entries:
        if entry.name.startswith("."):
            continue
        path = Path(entry.path)
        if entry.is_symlink():
            _refuse_broken_link(path)
            links.append(path)
        if entry.is_dir():  # follows links
            identity = _identity(path)
            if entry.is_symlink():
                target, here = os.path.realpath(path), os.path.realpath(folder)
                if here == target or here.startswith(target.rstrip(os.sep) + os.sep):
                    raise MetalearnError(f"{path} is a link to {target}, a folder it is inside: the folder would "
                                         "contain itself without end; remove the link")
            if identity in ancestors:  # a cycle the link test cannot see (a bind mount)
                raise MetalearnError(f"{path} is {os.path.realpath(path)}, a folder it is inside: the folder would "
                                     "contain itself without end; remove the link or mount")
            _walk(path, f"{relative}{entry.name}/", ancestors | {identity}, files, links, skipped)
        elif is_image_file(path) and entry.is_file():
            files.append((relative + entry.name, path))
        elif entry.is_file():
            skipped.append(path)


def _classes_in(folder: Path, prefix: str, part: str, links: list[Path],
                skipped: list[Path]) -> list[tuple[str, str, list[Path]]]:
    """(name, part, files) of every class folder in ``folder``; a loose image is refused (in a
    part folder, with the hint that a class folder named like the part is read as the part)."""
    classes = []
    for entry in _listdir(folder):
        _refuse_broken_link(entry)
        if entry.is_symlink():
            links.append(entry)
        if entry.is_dir():
            name = prefix + entry.name
            before = len(skipped)
            files = image_files(entry, links, skipped)
            if not files:
                note = no_images_note(entry, skipped[before:])
                raise MetalearnError(f"class folder {name} ({entry}) has no images (PNG or JPEG)"
                                     f"{f'; {note}' if note else ''}; remove it or add images")
            classes.append((name, part, files))
        elif is_image_file(entry):
            if part:
                raise MetalearnError(f"{entry}: {folder.name}/ is read as the {part} part, which holds class folders, "
                                     f"not images ({folder}/<class>/{entry.name}); if {folder.name} is a class, "
                                     "rename its folder (train, val and test at the top name the parts)")
            raise MetalearnError(f"{entry}: images go in one folder per class ({folder}/<class>/{entry.name}), "
                                 "not loose in the folder")
    return classes


def scan_folder(root: Path) -> tuple[str, list[tuple[str, str, list[Path]]], list[Path]]:
    """List the classes of the image folder ``root`` and check its layout, reading no image:
    returns (layout, [(class name, part, image files)], other files the content depends on).

    ``layout`` is ``"classes"``, ``"parts"`` or ``"csv"`` (see the module's docstring); a class
    name is the class folder's path below ``root`` (``"dog"``, ``"train/dog"``) or the CSV
    label; ``part`` is ``"train"``, ``"val"`` or ``"test"`` where the layout sets it, else
    ``""``; the other files are the CSV files of the ``csv`` layout. Raises
    :class:`MetalearnError`, naming the path, when ``root`` is not a folder or holds no
    images, when a class folder holds no images, when part folders are mixed with class
    folders or named in other than lower case, when an image lies loose beside the class
    folders, when a class is under two parts, for a CSV line that is not ``filename,label``
    or names a missing file, for an image listed twice, and for a broken link, a link cycle or
    an image reached twice through links."""
    root = Path(root)
    if not root.is_dir():
        # named as the caller gave it (OptionError): data_dir from Python, --data-dir on the command line
        what = file_in_the_way(root, "{named}") or "{named} does not exist"
        raise OptionError(f"{what}; give the folder that holds one folder per class", named=valued("data_dir", root))
    csvs, folders, part_dirs = _top_entries(root)
    if csvs:
        classes = _csv_classes(root, csvs)  # names one file under two rows itself, with both rows
        _refuse_images_reached_twice(classes)  # hard links; two spellings of a name on a case-insensitive disk
        return "csv", classes, csvs
    # Part folders when the top holds train/, val/ or test/ and no other folder; class folders
    # when it holds none of them. Both at once has two readings (a class named "test", or
    # classes not yet moved into a part), so it is refused, naming the folders of each kind.
    odd_case = [p.name + "/" for p in part_dirs if p.name not in PARTS]
    if odd_case:  # on a case-insensitive disk "Test" and "test" are one folder: neither reading is safe
        raise MetalearnError(f"{root} has {', '.join(odd_case)}: name part folders train/, val/ and test/ in lower "
                             "case, or, if it is a class of yours, rename that class folder")
    links: list[Path] = []
    skipped: list[Path] = []  # files inside class folders that are not images by their names
    if part_dirs:
        others = [p.name + "/" for p in folders if p.name not in PARTS]
        if others:
            shown = ", ".join(others[:5]) + (f" and {len(others) - 5} more" if len(others) > 5 else "")
            raise MetalearnError(f"{root} mixes part folders ({', '.join(p.name + '/' for p in part_dirs)}) with "
                                 f"class folders ({shown}): move every class folder into train/, val/ or test/, or, "
                                 "if a part's name is a class of yours, rename that class folder")
        loose = [p for p in _listdir(root) if is_image_file(p) and p.is_file()]
        if loose:
            raise MetalearnError(f"{loose[0]}: images go in a class folder inside train/, val/ or test/ "
                                 f"({root}/train/<class>/{loose[0].name}), not loose beside them")
        links += [p for p in part_dirs if p.is_symlink()]
        classes = [c for folder in sorted(part_dirs, key=lambda p: PARTS.index(p.name))
                   for c in _classes_in(folder, folder.name + "/", folder.name, links, skipped)]
        _refuse_shared_classes(classes)
        layout = "parts"
    else:
        classes, layout = _classes_in(root, "", "", links, skipped), "classes"
    _refuse_images_reached_twice(classes)  # through symbolic links, or hard links, which leave no trace in a path
    if not classes:
        raise MetalearnError(f"no images in {root}: expected one folder per class holding PNG or JPEG images "
                             "(or train/ val/ test/ folders of class folders, or mini-ImageNet's images/ + "
                             "train.csv)")
    warn_of_skipped_files(skipped, f"image folder {root}")
    return layout, classes, []


def _top_entries(root: Path) -> tuple[list[Path], list[Path], list[Path]]:
    """What decides a folder's layout, from its top level: the CSV files of the ``csv`` layout
    (train.csv, val.csv, test.csv beside ``images/``; none without it), the folders, and those
    of them named like a part in any case (``Test/`` too, which scan_folder refuses)."""
    images = (root / "images").is_dir()
    csvs = [root / f"{part}.csv" for part in PARTS if images and (root / f"{part}.csv").is_file()]
    folders = [p for p in _listdir(root) if p.is_dir()]
    return csvs, folders, [p for p in folders if p.name.lower() in PARTS]


def _refuse_images_reached_twice(classes: list[tuple[str, str, list[Path]]]) -> None:
    """One file under two paths (through symbolic or hard links) would be two images of a class
    (support and query of an episode could be the same picture) or images of two classes (the
    same picture in training and test): refused, as an image on two CSV rows is. Files are told
    apart by device and inode, which is what two hard links share."""
    seen: dict[tuple[int, int], Path] = {}
    for _, _, files in classes:
        for path in files:
            key = _identity(path)
            if key in seen:
                first, real = seen[key], os.path.realpath(path)
                how = (f"({real}), reached through a link" if os.path.realpath(first) == real
                       else "(hard links to one file)")
                raise MetalearnError(f"{first} and {path} are one file {how}: an image belongs to one class, once; "
                                     "remove one of the links")
            seen[key] = path


def _refuse_shared_classes(classes: list[tuple[str, str, list[Path]]]) -> None:
    """Part folders: a class folder name under two parts (``train/dog`` and ``test/dog``) would
    put meta-test classes into training; refused, naming the class and its parts."""
    parts_of: dict[str, list[str]] = {}
    for name, part, _ in classes:
        parts_of.setdefault(name.split("/", 1)[1], []).append(part)
    for name, parts in parts_of.items():
        if len(parts) > 1:
            where = [part + "/" for part in parts]
            where_text = f"both {where[0]} and {where[1]}" if len(where) == 2 else f"{', '.join(where[:-1])} and {where[-1]}"
            raise MetalearnError(f"class {name} is in {where_text}: a class belongs to "
                                 "one part (its images would leak between training and testing); rename or remove one")


def _csv_classes(root: Path, csvs: list[Path]) -> list[tuple[str, str, list[Path]]]:
    """mini-ImageNet's CSV layout: ``filename,label`` lines (a header line is skipped). Each
    file is listed once: a file under two rows would sit in two classes or parts, or twice in
    one class (support and query of an episode could then be the same image)."""
    classes: dict[str, tuple[str, list[Path]]] = {}
    listed: dict[str, str] = {}  # file name -> "train.csv line 7", where it was first listed
    images = root / "images"
    for path in csvs:
        part = path.stem
        try:
            # utf-8-sig: Excel's UTF-8 export starts with a byte order mark, which would
            # otherwise prefix the first file name or the header
            rows = list(csv.reader(path.read_text(encoding="utf-8-sig").splitlines()))
        except (OSError, UnicodeDecodeError, csv.Error) as err:
            raise MetalearnError(f"cannot read {path}: {err}") from None
        for number, row in enumerate(rows, 1):
            if not row or (number == 1 and row[:2] == ["filename", "label"]):
                continue
            if len(row) != 2:
                raise MetalearnError(f"{path} line {number}: expected filename,label, got {','.join(row)!r}")
            filename, label = row
            # a name that climbs out of images/ (absolute, or through ..) would read any file the user
            # can: a CSV from someone else must not pull in images from elsewhere
            if Path(filename).is_absolute() or ".." in Path(filename).parts:
                raise MetalearnError(f"{path} line {number} names {filename}, which is not inside {images}: give "
                                     "a file name relative to it, without ..")
            file = images / filename
            if not file.is_file():
                raise MetalearnError(f"{path} line {number} names {filename}, which is not in {images}")
            owner = classes.setdefault(label, (part, []))
            if owner[0] != part:
                raise MetalearnError(f"class {label} is in both {owner[0]}.csv and {part}.csv: a class belongs to "
                                     "one part")
            key = str(file.resolve())  # "a.jpg", "./a.jpg" and a link to it are one image
            if key in listed:
                raise MetalearnError(f"{filename} is listed twice, in {listed[key]} and {path.name} line {number}: "
                                     "list each image once")
            listed[key] = f"{path.name} line {number}"
            owner[1].append(file)
    if not classes:
        raise MetalearnError(f"no images listed in {', '.join(p.name for p in csvs)} of {root}")
    return [(label, part, files) for label, (part, files) in classes.items()]


def fingerprint(root: Path, classes: list[tuple[str, str, list[Path]]], extra: list[Path]) -> str:
    """Cheap identity of the folder's content: every image's path, size and modification time
    (a file replaced deep inside a class folder changes no folder's own size or time). Names
    that are not UTF-8 (Python holds their bytes as surrogates) count as those bytes."""
    digest = hashlib.sha256(os.fsencode(Path(root).resolve()))  # the path's bytes, UTF-8 or not
    for name, part, files in classes:
        digest.update(f"\n{part}|{name}".encode("utf-8", "surrogateescape"))
        for path in files:
            stat = path.stat()
            digest.update(f"|{path.name}:{stat.st_size}:{stat.st_mtime_ns}".encode("utf-8", "surrogateescape"))
    for path in extra:
        stat = path.stat()
        digest.update(f"\n{path.name}:{stat.st_size}:{stat.st_mtime_ns}".encode("utf-8", "surrogateescape"))
    return digest.hexdigest()


# --------------------------------------------------------------------------------------------
# Reading and caching


def read_folder(root: Path | str, image_size: int, channels: int, progress: bool = False,
                scanned: tuple | None = None, workers: int | None = None) -> ImageFolder:
    """Decode every image of the folder: the slow part, one pass over the files, spread over
    ``workers`` processes (default: every core, up to 16; folders of fewer than
    ``PARALLEL_FROM`` images are read in this process). See ``benchmarks/folder.py``.

    Every file is tried: the files that are not readable images are refused together, after
    the pass, in one error that counts them and names the first ``UNREADABLE_SHOWN`` with
    their reasons (see :func:`refuse_unreadable`), so that one run shows what to fix."""
    layout, classes, _ = scanned or scan_folder(Path(root))
    paths = [path for _, _, files in classes for path in files]
    from metalearn.memory_budget import allocate_images

    images = allocate_images((len(paths), channels, image_size, image_size),
                             f"{len(paths)} images at {image_size}x{image_size} pixels",
                             "give a smaller {image_size}", image_size="image_size")
    unreadable: list[tuple[Path, str]] = []
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(paths), desc=f"reading {Path(root).name}", unit="img", leave=False)
    # the cores this process may use (a batch job's affinity), not the machine's
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    workers = min(workers or usable or 1, 16)
    try:
        if workers > 1 and len(paths) >= PARALLEL_FROM:
            unreadable = _decode_in_processes(paths, images, image_size, channels, workers, bar)
        else:
            for index, path in enumerate(paths):
                images[index], reason = _decode(path, image_size, channels)
                if reason:
                    unreadable.append((path, reason))
                if bar is not None:
                    bar.update()
    finally:
        if bar is not None:
            bar.close()
    refuse_unreadable(unreadable, Path(root))
    names = tuple(name for name, _, _ in classes)
    sizes = np.array([len(f) for _, _, f in classes], np.int64)
    parts = tuple(part for _, part, _ in classes)
    # The array alone leaves out where one class ends and the next begins (an image moved from
    # the end of one class to the start of the next gives the same bytes) and which part each
    # class belongs to (the CSV files move classes between parts without moving an image).
    digest = hashlib.sha256(images.data)  # the array's own bytes: tobytes() would copy it whole
    digest.update(json.dumps({"shape": list(images.shape), "classes": names, "sizes": sizes.tolist(),
                              "parts": parts}).encode())
    return ImageFolder(images, names, sizes, parts, layout, digest.hexdigest())


PARALLEL_FROM = 2000  # below this, starting processes costs more than it saves
CHUNK = 256  # images decoded per task handed to a process


UNREADABLE_SHOWN = 5  # the unreadable files an error names; the rest are counted


def _decode(path: Path, image_size: int, channels: int) -> tuple[np.ndarray, str]:
    """``(image, "")``, or ``(zeros, why)`` for a file that is not a readable image: ``why`` is
    decode_image's reason after the file's name, or "it is empty (0 bytes)" for an empty file
    (which PIL would call no image it can decode, as if the file held something else)."""
    try:
        return decode_image(path, image_size, channels), ""
    except MetalearnError as err:
        try:
            empty = path.stat().st_size == 0
        except OSError:  # gone since the scan: decode_image's reason says so
            empty = False
        if empty:
            return np.zeros((channels, image_size, image_size), np.uint8), "it is empty (0 bytes)"
        message, named = str(err), f"cannot read image {path}: "
        return np.zeros((channels, image_size, image_size), np.uint8), message.removeprefix(named)


def refuse_unreadable(unreadable: list[tuple[Path, str]], root: Path) -> None:
    """One error for every ``(file, reason)`` of ``root`` that is not a readable image, or none
    where the list is empty. One file: ``cannot read image <file>: <reason>``, decode_image's
    message. Several: their count and the first ``UNREADABLE_SHOWN`` with their reasons (each
    reason up to its advice, which the closing advice replaces), so that all are fixed before
    the next run rather than one per run."""
    if not unreadable:
        return
    if len(unreadable) == 1:
        path, reason = unreadable[0]
        raise MetalearnError(f"cannot read image {path}: {reason}")
    shown = "; ".join(f"{path}: {reason.split('; ')[0]}" for path, reason in unreadable[:UNREADABLE_SHOWN])
    more = len(unreadable) - UNREADABLE_SHOWN
    raise MetalearnError(f"cannot read {len(unreadable)} images of image folder {root}: {shown}"
                         f"{f'; and {more} more' if more > 0 else ''}. Replace or remove them")


def _decode_chunk(paths: list[Path], image_size: int, channels: int) -> tuple[np.ndarray, list[tuple[int, str]]]:
    """The decoded ``paths`` (zeros for an unreadable one) and ``(index in paths, reason)`` of
    each unreadable one."""
    decoded = [_decode(path, image_size, channels) for path in paths]
    return np.stack([image for image, _ in decoded]), [(i, why) for i, (_, why) in enumerate(decoded) if why]


def _decode_in_processes(paths: list[Path], images: np.ndarray, image_size: int, channels: int, workers: int,
                         bar) -> list[tuple[Path, str]]:
    """Fill ``images`` with the decoded ``paths``, chunk by chunk, in ``workers`` processes;
    returns ``(file, reason)`` of every unreadable one, in the order of ``paths``.

    Ctrl-C (or any error here) stops the pool at once and is raised as it came: the chunks not
    started are cancelled and the processes terminated, so that nothing is left decoding, and
    the interpreter's exit, which waits for the pool, does not hang. The processes ignore
    SIGINT (see :func:`_ignore_interrupts`): a terminal's Ctrl-C reaches every process of its
    group, and this process alone answers it, with no traceback from each worker and no
    BrokenProcessPool in place of the KeyboardInterrupt."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor
    from concurrent.futures.process import BrokenProcessPool

    method = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
    context = multiprocessing.get_context(method)
    pool = ProcessPoolExecutor(workers, mp_context=context, initializer=_ignore_interrupts,
                               initargs=(context.Semaphore(LARGE_AT_ONCE), os.getpid()))
    try:
        starts = range(0, len(paths), CHUNK)
        with _interrupts_blocked():  # the processes start here: from their first instruction until
            # _ignore_interrupts, a Ctrl-C would raise in them; blocked, it waits and is then ignored
            futures = [pool.submit(_decode_chunk, paths[start:start + CHUNK], image_size, channels)
                       for start in starts]
        unreadable: list[tuple[Path, str]] = []
        for index, start in enumerate(starts):
            chunk, failed = futures[index].result()
            # let go of the chunk once copied: every future kept its result, a second copy of the array
            futures[index] = None
            images[start:start + len(chunk)] = chunk
            unreadable += [(paths[start + i], reason) for i, reason in failed]
            if bar is not None:
                bar.update(len(chunk))
    except BrokenProcessPool:
        _stop_pool(pool)
        raise OptionError(f"a process decoding the {len(paths)} images died (killed by the system, most often for "
                          "lack of memory: large source images take far more while decoded than their "
                          f"{images.nbytes / 1e9:.3g} GB at this size); free memory, or give a smaller "
                          "{image_size} or shrink the largest images, and run again", image_size="image_size") from None
    except BaseException:
        _stop_pool(pool)
        raise
    pool.shutdown()
    return unreadable


LARGE_AT_ONCE = 2  # images of more than images.LARGE_PIXELS decoded at once, over all the processes


def _ignore_interrupts(large_image_gate=None, parent: int | None = None) -> None:
    """A decoding process's start: it dies with ``parent`` (:func:`_die_with_parent`); SIGINT
    ignored (its parent stops it, see :func:`_decode_in_processes`), then it and the stop
    signals let through, now harmlessly, where the parent blocked them while starting the
    process; SIGTERM, the parent's stop, ends it (a forked process inherits the parent's
    handlers: a training run's notes SIGTERM and goes on); SIGUSR1 and
    SIGUSR2 ignored (the parent, which a scheduler signals too, stops the pool). The pool's
    ``large_image_gate`` (a semaphore of :data:`LARGE_AT_ONCE`) bounds the memory of decoding
    very large images in every process together (see ``images.LARGE_IMAGE_GATE``)."""
    import signal

    from metalearn.data import images

    if parent is not None:
        _die_with_parent(parent)
    images.LARGE_IMAGE_GATE = large_image_gate

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    for warning in set(STOP_SIGNALS) - {signal.SIGTERM}:  # a scheduler's: the parent, signalled too, stops the pool
        signal.signal(warning, signal.SIG_IGN)
    if hasattr(signal, "pthread_sigmask"):
        signal.pthread_sigmask(signal.SIG_UNBLOCK, _held_signals())


def _die_with_parent(parent: int) -> None:
    """Have the kernel kill this decoding process when ``parent`` (the command that started
    the pool) ends, on Linux (``prctl(PR_SET_PDEATHSIG, SIGKILL)``): a parent killed by
    SIGKILL cannot stop its pool, whose processes would otherwise wait forever for work on
    pipes they hold both ends of. A parent already gone ends this process at once. Elsewhere
    nothing is done (such a process outlives its parent, holding no lock: see
    :mod:`metalearn.locking`)."""
    import ctypes
    import signal
    import sys

    if not sys.platform.startswith("linux"):
        return
    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, int(signal.SIGKILL), 0, 0, 0)  # 1: PR_SET_PDEATHSIG
    except (OSError, AttributeError):  # no libc to load, no prctl: as elsewhere
        return
    if os.getppid() != parent:  # ended before the request: the kernel will not send the signal
        os._exit(1)


def _held_signals() -> set:
    """Ctrl-C and the stop signals (errors.STOP_SIGNALS)."""
    import signal

    return {signal.SIGINT, *STOP_SIGNALS}


@contextlib.contextmanager
def _interrupts_blocked():
    """Ctrl-C and the stop signals held within the block: none acts while a process is forked but
    not yet the pool's (it would be left running, an orphan the pool's stop never reaches, or
    Python would drop the signal's exception in a fork callback). Each is noted by a handler of
    this block's (blocking alone would not do: another thread of the process, a progress bar's
    or the pool's, takes a signal the main thread blocks, and the main thread runs its handler
    all the same), and raised again, to the handler the command had, when the block ends; and
    blocked for this thread (where the platform can: not on Windows), so that the processes
    started in it begin with them blocked until their own handlers are set. Signal handlers are
    the main thread's to set: elsewhere nothing is held."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield
        return
    held: list[int] = []
    previous = {number: signal.signal(number, lambda number, frame: held.append(number))
                for number in _held_signals()}
    masked = hasattr(signal, "pthread_sigmask")
    before = signal.pthread_sigmask(signal.SIG_BLOCK, _held_signals()) if masked else None
    try:
        yield
    finally:
        if masked:
            signal.pthread_sigmask(signal.SIG_SETMASK, before)
        for number, handler in previous.items():
            signal.signal(number, handler)
        for number in dict.fromkeys(held):  # each once, in the order they came
            signal.raise_signal(number)


def _stop_pool(pool) -> None:
    """Stop ``pool`` now: its queued chunks cancelled, its processes terminated and waited for
    (a chunk of large images takes seconds, which a Ctrl-C should not wait for). The shutdown
    comes first, so that the pool's own thread drops the cancelled chunks before it sees the
    processes end (it then marks only the running chunks' futures broken, which no one reads)."""
    processes = list((getattr(pool, "_processes", None) or {}).values())  # shutdown() forgets them
    pool.shutdown(wait=False, cancel_futures=True)
    for process in processes:
        process.terminate()
    for process in processes:
        process.join(5)
        if process.is_alive():  # terminate is SIGTERM, which a decoder stuck in C may not act on
            process.kill()
            process.join(5)


CACHE_NAME_BYTES = 60  # of the folder's name in its cache file's name: a file name holds 255 bytes at most


def cache_path(cache_dir: Path, root: Path, image_size: int, channels: int) -> Path:
    """The cache file of the folder ``root``: its name (cut to :data:`CACHE_NAME_BYTES` bytes, on a
    character's boundary, so that any folder name leaves room for the rest and the ``.tmp<pid>``
    of its writing), a hash of its absolute path (which tells folders apart), size and version."""
    key = hashlib.sha256(os.fsencode(Path(root).resolve())).hexdigest()[:16]  # the path's bytes, UTF-8 or not
    name = Path(root).resolve().name.encode(errors="surrogateescape")[:CACHE_NAME_BYTES]
    name = name.decode(errors="ignore")  # a character cut in two is dropped whole
    return Path(cache_dir) / f"folder-{name}-{key}-{image_size}x{image_size}x{channels}-v{CACHE_FORMAT_VERSION}.npz"


_SHARED_SCANS: dict[str, tuple] | None = None  # within shared_scans(): each folder's scan and fingerprint


@contextlib.contextmanager
def shared_scans():
    """Within the block, each folder is scanned (its files listed and stat'ed) once, however often
    it is loaded: a run's setup loads it for every part's check and build, and on network storage
    a scan of 60,000 files takes long. Outside such a block every load scans anew, so a folder
    changed between two commands is seen as it is."""
    global _SHARED_SCANS
    outer = _SHARED_SCANS
    _SHARED_SCANS = {} if outer is None else outer
    try:
        yield
    finally:
        _SHARED_SCANS = outer


def load_image_folder(root: Path | str | None, image_size: int = 84, channels: int = 3,
                      cache_dir: Path | str | None = None, progress: bool = False,
                      workers: int | None = None) -> ImageFolder:
    """The folder's images at ``image_size`` with ``channels`` (1 grey, 3 RGB), from the cache
    when the folder has not changed since it was written, else read and cached anew. The cache
    lives in ``cache_dir`` (default ``$METALEARN_CACHE`` or ``~/.cache/metalearn``), never
    beside the possibly read-only images. ``workers``: decoding processes (see :func:`read_folder`).
    ``progress``: show a bar while images are decoded.

    The folder is scanned now (file names only); its images are read from the cache or decoded
    when ``images`` or ``content_hash`` is first used (see :class:`ImageFolder`), so checks of
    the classes against the episodes come first.

    Raises :class:`MetalearnError` when ``root`` is None (a folder dataset needs
    ``--data-dir``), when ``image_size`` is below 4 or ``channels`` neither 1 nor 3, and for a
    folder :func:`scan_folder` refuses; the files that are not readable images are refused
    together, naming them, when the images are first used (no cache is written then)."""
    if root is None:
        raise OptionError("an image folder dataset needs {data_dir}, the folder of class folders (a run whose "
                          "checkpoint records none needs it again to resume, evaluate or plot)", data_dir="data_dir")
    image_size = check_count(image_size, "image size", 4,
                             message="{name} must be a whole number of at least {least} pixels, got {value!r}")
    check_channels(channels)
    root = Path(root)
    key = str(root.resolve())
    if _SHARED_SCANS is not None and key in _SHARED_SCANS:
        scanned, print_ = _SHARED_SCANS[key]
    else:
        scanned = scan_folder(root)
        print_ = fingerprint(root, scanned[1], scanned[2])
        if _SHARED_SCANS is not None:
            _SHARED_SCANS[key] = scanned, print_
    layout, classes, extra = scanned
    path = cache_path(Path(cache_dir) if cache_dir is not None else default_cache_dir(), root, image_size, channels)
    if path in _LOADED and _LOADED[path][0] == print_:  # train, val and test of one run share one array
        return _LOADED[path][1]
    names = tuple(name for name, _, _ in classes)
    sizes = np.array([len(files) for _, _, files in classes], np.int64)
    parts = tuple(part for _, part, _ in classes)

    def load() -> tuple[np.ndarray, str]:  # the slow part, deferred until the images are used
        folder = _read_cache(path, print_)
        if folder is None or folder.class_names != names or folder.parts != parts or \
                not np.array_equal(folder.class_sizes, sizes):
            folder = read_folder(root, image_size, channels, progress, scanned, workers)
            _write_cache(path, folder, print_)
        return folder.images, folder.content_hash

    folder = ImageFolder.deferred(names, sizes, parts, layout, image_size, channels, load)
    _LOADED.clear()  # one folder held at a time: a mini-ImageNet array is over a gigabyte
    _LOADED[path] = (print_, folder)
    return folder


_LOADED: dict[Path, tuple[str, ImageFolder]] = {}


def _read_cache(path: Path, fingerprint: str) -> ImageFolder | None:
    cached = read_arrays(path, fingerprint, ("images", "class_sizes"))
    if cached is None:
        return None
    arrays, meta = cached
    try:
        folder = ImageFolder(arrays["images"], tuple(meta["class_names"]), arrays["class_sizes"],
                             tuple(meta["parts"]), meta["layout"], meta["content_hash"])
    except (KeyError, TypeError):
        return None  # a cache of another format version
    fits = (folder.images.dtype == np.uint8 and folder.images.ndim == 4
            and int(folder.class_sizes.sum()) == folder.images.shape[0]
            and len(folder.class_names) == len(folder.parts) == len(folder.class_sizes))
    return folder if fits else None


def _write_cache(path: Path, folder: ImageFolder, fingerprint: str) -> None:
    meta = {"class_names": list(folder.class_names), "parts": list(folder.parts), "layout": folder.layout,
            "content_hash": folder.content_hash, "format": CACHE_FORMAT_VERSION}
    write_arrays(path, {"images": folder.images, "class_sizes": folder.class_sizes}, meta, fingerprint)


# --------------------------------------------------------------------------------------------
# Splits


def parse_fractions(text: str) -> tuple[float, float, float]:
    """``"0.64,0.16,0.2"`` -> the train / val / test fractions of the classes (they sum to 1)."""
    try:
        values = tuple(float(v) for v in text.split(","))
    except ValueError:
        values = ()
    if len(values) != 3 or any(not (0 <= v <= 1) for v in values) or abs(sum(values) - 1) > 1e-6:
        raise OptionError(f"{{split_fractions}} must be three fractions train,val,test summing to 1 (e.g. "
                          f"0.64,0.16,0.2), got {text!r}", split_fractions="split_fractions")
    return values  # type: ignore[return-value]


def class_parts(folder: ImageFolder, fractions: str = "", split_file: str = "") -> tuple[str, ...]:
    """The part (train / val / test, or "" for none) of every class of ``folder``."""
    if not isinstance(folder, ImageFolder):
        raise MetalearnError(f"the folder's split needs an ImageFolder (load_image_folder(path, image_size, "
                             f"channels)), got {type(folder).__name__}")
    if not isinstance(fractions, str):
        raise MetalearnError(f"fractions are given as text, train,val,test (e.g. \"0.64,0.16,0.2\"), got {fractions!r}")
    if folder.layout != "classes":
        if fractions or split_file:
            given = "split_fractions" if fractions else "split_file"
            where = "train.csv / val.csv / test.csv" if folder.layout == "csv" else "train/ val/ test/ folders"
            raise OptionError(f"{{given}} cannot apply: this folder's {where} set the split; leave {{given}} out",
                              given=given)
        return folder.parts
    if fractions and split_file:
        raise OptionError("give {split_fractions} or {split_file}, not both", **SPLIT_OPTIONS)
    if split_file:
        return _parts_from_file(folder, Path(split_file))
    n = len(folder.class_names)
    n_train, n_val, _ = split_counts(n, parse_fractions(fractions) if fractions else DEFAULT_FRACTIONS,
                                     fractions or "0.64,0.16,0.2 (the default)")
    order = np.random.RandomState(SPLIT_SEED).permutation(n)
    parts = [""] * n
    for position, index in enumerate(order):
        parts[index] = "train" if position < n_train else "val" if position < n_train + n_val else "test"
    return tuple(parts)


def split_counts(n: int, fractions: tuple[float, float, float], given: str = "") -> tuple[int, int, int]:
    """The train / val / test class counts for ``n`` classes: they sum to ``n``. Each part gets
    its share rounded down; the classes left over go one each to the parts with the largest
    remainders (ties: train, then val, then test); then a part asked for a nonzero fraction
    that got no class takes one from the largest part (train first on ties). A zero fraction
    gets no class. Fewer classes than nonzero fractions is an error: a part asked for would be
    silently empty. ``given``: the fractions as the user wrote them, for the message."""
    wanted = [f * n for f in fractions]
    counts = [math.floor(w + 1e-9) for w in wanted]  # 1e-9: 0.7 * 10 is 7.000000000000001, 0.29 * 100 is 28.999...
    by_remainder = sorted(range(3), key=lambda i: (-(wanted[i] - counts[i]), i))
    for i in by_remainder[:n - sum(counts)]:
        counts[i] += 1
    asked = [i for i in range(3) if fractions[i] > 0]
    if len(asked) > n:
        names = " and ".join(PARTS[i] for i in asked).replace(" and ", ", ", len(asked) - 2)
        raise OptionError(f"{{given}} asks for {names} classes but the folder has {n} class{'' if n == 1 else 'es'}: "
                          "add classes, set a part's fraction to 0, or give {split_file}", split_file="split_file",
                          given=valued("split_fractions", given or ",".join(map(str, fractions))))
    for i in asked:
        if counts[i] == 0:
            donor = max(range(3), key=lambda j: (counts[j], -j))
            counts[donor] -= 1
            counts[i] += 1
    return counts[0], counts[1], counts[2]


def data_fingerprint(folder: ImageFolder, fractions: str = "", split_file: str = "") -> str:
    """What a run drew its episodes from, for the checkpoint's refusal to resume on other data:
    ``"<sha256>:<n> classes, <m> images"``, the hash over the folder's content hash and the
    part of every class as ``fractions`` or ``split_file`` assign them. A split file edited to
    move a class between parts (or a changed rule for fractions) changes it; a split file
    rewritten with the same assignment does not."""
    parts = class_parts(folder, fractions, split_file)
    digest = hashlib.sha256(folder.content_hash.encode())
    digest.update(json.dumps(list(parts)).encode())
    return f"{digest.hexdigest()}:{len(folder.class_names)} classes, {len(folder.images)} images"


def class_split(folder: ImageFolder, fractions: str = "", split_file: str = "") -> dict[str, list[str]]:
    """The class names of each part, as a split file writes them: ``{"train": [...], "val":
    [...], "test": [...]}`` (a part with no class: an empty list)."""
    parts = class_parts(folder, fractions, split_file)
    return {part: [name for name, p in zip(folder.class_names, parts) if p == part] for part in PARTS}


def is_run_split(path: Path) -> bool:
    """Whether ``path`` is a trained run's record of its split (``split.json`` beside the run's
    ``config.json`` and ``checkpoint.pt``), for the messages that speak of the run's classes."""
    folder = path.parent
    return path.name == RUN_SPLIT_NAME and (folder / CONFIG_NAME).is_file() and (folder / CHECKPOINT_NAME).is_file()


def sets_own_split(root: Path | str | None) -> bool:
    """Whether the image folder ``root`` sets its own split (``images/`` with train.csv,
    val.csv or test.csv; or train/ val/ test/ folders), from its top level alone; False where
    it is no folder (its error comes when it is read)."""
    if root is None or not Path(root).is_dir():
        return False
    csvs, _, part_dirs = _top_entries(Path(root))
    return bool(csvs or part_dirs)


def read_split_file(path: Path) -> dict[str, list]:
    """The parts of a split file, ``{"train": [class, ...], "val": [...], "test": [...]}`` (a
    part may be left out), refused in one line where it cannot be one; class names unchecked."""
    given = valued("split_file", path)
    if not path.is_file():
        raise OptionError(f"{{split_file}}: {'a folder' if path.is_dir() else 'no such file'}; give the JSON file "
                          '{"train": [class, ...], "val": [...], "test": [...]}', split_file=given)
    try:  # -sig: a byte order mark, as Windows editors write
        spec = json.loads(path.read_text(encoding="utf-8-sig"), object_pairs_hook=_KeyedTwice.of)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as err:
        error = "nested too deeply" if isinstance(err, RecursionError) else str(err)
        raise OptionError("{split_file}: cannot read it as JSON ({error})", split_file=given,
                          error=(error, error)) from None
    if not isinstance(spec, dict) or not all(isinstance(v, list) for v in spec.values()):
        raise OptionError('{split_file}: expected {"train": [class, ...], "val": [...], "test": [...]}',
                          split_file=given)
    if spec.twice:  # JSON keeps the last list of a key given twice: the classes of the first would be dropped, silently
        key = json.dumps(spec.twice[0])
        raise OptionError("{split_file}: {key} is given twice, and only its last list would be read; give each "
                          "part once, with all its classes in one list", split_file=given, key=(key, key))
    unknown = [key for key in spec if key not in PARTS]
    if unknown:  # a misspelt part ("tset") would otherwise leave its classes in no part, silently
        listed = ", ".join(json.dumps(key) for key in unknown)
        raise OptionError(f"{{split_file}}: unknown key{'' if len(unknown) == 1 else 's'} {{listed}}; the keys are "
                          '"train", "val" and "test", each a list of class names', split_file=given,
                          listed=(listed, listed))
    return spec


class _KeyedTwice(dict):
    """A JSON object as :func:`json.loads` reads it (the last value of a key given twice), and
    ``twice``: the keys given more than once, in their order."""

    twice: list[str]

    @classmethod
    def of(cls, pairs: list[tuple[str, object]]) -> "_KeyedTwice":
        read = cls(pairs)
        seen: set[str] = set()
        read.twice = [key for key, _ in pairs if key in seen or seen.add(key)]
        return read


def _parts_from_file(folder: ImageFolder, path: Path) -> tuple[str, ...]:
    spec = read_split_file(path)
    given = valued("split_file", path)
    index = {name: i for i, name in enumerate(folder.class_names)}
    if is_run_split(path):  # a run's evaluation on a folder that lost classes, or on another folder
        missing = [name for names in spec.values() for name in names if name not in index]
        if missing:
            raise OptionError(  # score_all: evaluate_run's option from Python, metalearn eval's flag on the shell
                f"the run in {path.parent} trained on classes that this folder lacks ({len(missing)} of them, "
                f"e.g. {missing[0]!r}; its {RUN_SPLIT_NAME} lists its classes): give {{data_dir}} the folder it "
                "trained on, or split this folder's classes yourself ({split_fractions}, {split_file}; for a "
                "folder of classes the run never saw, {score_all} scores every class)",
                data_dir="data_dir", **SPLIT_OPTIONS,
                score_all=("split_fractions='0,0,1' in evaluate_run", "--split-fractions 0,0,1 in metalearn eval"))
    parts = [""] * len(index)
    for part, names in spec.items():
        for name in names:
            if not isinstance(name, str):  # a class is named by its folder's name; a list or number names none
                raise OptionError(f"{{split_file}}: {part} lists {{entry}}, not a class name; every entry is a class "
                                  f'folder\'s name in quotes, e.g. "{part}": ["dog", "cat"]', split_file=given,
                                  entry=(json.dumps(name),) * 2)
            if name not in index:
                raise OptionError(f"{{split_file}} names class {name!r}, which the folder lacks", split_file=given)
            if parts[index[name]] == part:
                raise OptionError(f"{{split_file}} lists class {name!r} twice in {part}; list each class once",
                                  split_file=given)
            if parts[index[name]]:
                raise OptionError(f"{{split_file}} puts class {name!r} in both {parts[index[name]]} and {part}",
                                  split_file=given)
            parts[index[name]] = part
    return tuple(parts)


# The advice for a part with too few classes. metalearn train builds train / val / test and can
# leave a part out (--val-every 0, --no-eval); eval, plot and compare build one part, which
# --part chooses. The caller says which command builds the part (``command``: "train", "eval",
# or "" for one that does not say), and each piece of advice names the command it belongs to,
# as the caller spells it: the Python API's arguments (``val_every=0``, ``evaluate_run``) or the
# command line's (``metalearn train --val-every 0``), see errors.Options.
# --split-fractions 0,0,1 makes every class of a folder a test class: honest for another folder
# of new classes, but on the run's own folder it would score the classes the run trained on, so
# it is offered only for a folder of new classes, and for the run's own folder the way out is
# fewer ways.
SPLIT_OPTIONS = {"split_fractions": "split_fractions", "split_file": "split_file"}  # as errors.Options takes them
REMEDIES = {  # (Python, command line), as errors.Options takes them
    "train_unvalidated": ("val_every=0", "metalearn train --val-every 0"),
    "train_untested": ("evaluate_after=False", "metalearn train --no-eval"),
    "train_neither": ("val_every=0 and evaluate_after=False", "metalearn train --val-every 0 --no-eval"),
    "score_test": ("evaluate_run without part='val'", "metalearn eval without --part val"),
    "score_every": ("evaluate_run with split_fractions='0,0,1'", "metalearn eval --split-fractions 0,0,1"),
}
NEW_FOLDER = ("for another folder, of classes the run never trained on, {score_every} scores every class (on the "
              "folder it trained on, that would score its training classes too)")  # a template of REMEDIES' fields


def _setting(field: str | tuple[str, str], value: object) -> tuple[str, str]:
    """A ``TaskConfig`` field with its value, as Python (``test_ways=5``) and the command line
    (``--test-ways 5``) give it; or an option named otherwise, as (Python, command line), with
    its value after each name (``episode_shape's ways 5``, ``--ways 5``)."""
    if isinstance(field, tuple):
        return f"{field[0]} {value}", f"{field[1]} {value}"
    return f"{field}={value}", f"{flag(field)} {value}"


def _both(text: str) -> tuple[str, str]:
    """``text``, which names no option (a class name, a path), as both spellings of a field of
    errors.Options: a field's text is never read for fields, so its braces are safe."""
    return text, text


def folder_split(folder: ImageFolder, part: str, fractions: str = "", split_file: str = "",
                 command: str = "") -> ClassPool:
    """The classes of ``part`` (unrotated), or a clear error when the part has none, whose advice
    is ``command``'s: "train" (training, which can leave the part out), "eval" (evaluating,
    comparing or plotting a run, which score or draw the part that ``part`` names), or "" (a
    caller that does not say: the remedies of both, each naming its command). The remedies are
    named as the caller spells them (an :class:`~metalearn.errors.OptionError`): ``val_every=0``
    from Python, ``metalearn train --val-every 0`` on the command line.

    ``folder``: an :class:`ImageFolder` (:func:`load_image_folder`'s). ``fractions``: the
    train,val,test fractions of a folder of classes, as text (``"0.64,0.16,0.2"``), which deal
    out its classes shuffled with a fixed seed; ``split_file``: a JSON file ``{"train": [class,
    ...], "val": [...], "test": [...]}`` that names each part's classes. Give one of the two or
    neither (``""``, the default of both: the fractions 0.64, 0.16, 0.2); a folder whose
    ``train/ val/ test/`` folders or CSV files set the split refuses either."""
    if part not in PARTS:
        raise MetalearnError(f"unknown split part {part!r}: give {', '.join(PARTS)}")
    parts = class_parts(folder, fractions, split_file)
    members = [i for i, p in enumerate(parts) if p == part]
    if not members:
        if split_file and is_run_split(Path(split_file)):  # a run's recorded split: mostly metalearn eval of that run
            where = f"the run's split ({{split}}) has no {part} classes"
            split = _both(str(split_file))
            if part == "test":  # every class it names it trained (or validated) on: none is left to score
                raise OptionError(f"{where}: every class it names was trained or validated on; {NEW_FOLDER}; "
                                  "training on this split needs {no_eval}", split=split,
                                  no_eval=("evaluate_after=False", "--no-eval"), **REMEDIES)
            if part == "val":  # metalearn eval --part val of a run trained without validation classes
                raise OptionError(f"{where} (it trained without validation): {{evaluate}} scores its test classes "
                                  "without {part_val}; training on this split needs {val_every}", split=split,
                                  val_every=("val_every=0", "--val-every 0"),
                                  evaluate=("evaluate_run", "metalearn eval"), part_val=("part='val'", "--part val"))
            raise OptionError(f"{where}: give {{split_fractions}} or a {{split_file}} with {part} classes", split=split,
                              **SPLIT_OPTIONS)
        if folder.layout == "classes":
            fix = f"give {part} a nonzero fraction in {{split_fractions}} or classes in {{split_file}}"
        else:
            fix = f"add a {part}/ folder of classes" if folder.layout == "parts" else f"add classes to {part}.csv"
        if part == "val":  # metalearn train validates on it; metalearn eval asks for it with --part val only
            remedies = [*(["train without validation ({train_unvalidated})"] if command != "eval" else []),
                        *(["score the test classes ({score_test})"] if command != "train" else [])]
            fix += "; or " + ", or ".join(remedies)
        if part == "test" and command != "eval":
            fix += ", or train without the test ({train_untested})"
        raise OptionError(f"the image folder has no {part} classes: {fix}", **SPLIT_OPTIONS, **REMEDIES)
    characters = torch.tensor(members, dtype=torch.long)
    return ClassPool(part, characters, torch.zeros_like(characters))


def check_part_classes(folder: ImageFolder, pool: ClassPool, part: str, ways: int, task,
                       option: str | tuple[str, str] = "ways", command: str = "",
                       note: str | tuple[str, str] = "") -> None:
    """A part of a class-folder split with fewer classes than the episodes' ``ways``: an
    :class:`~metalearn.errors.OptionError` that names the split that gave it so few and the
    options that give it more (``task``: the run's ``TaskConfig``; ``option``: its field that set
    ``ways``, "ways" for the training episodes, "test_ways" for validation and test, or for an
    evaluation's own option its (Python, command line) names, ``("episode_shape's ways",
    "--ways")``; ``note``: what to say after it, such as where its value came from, one text or
    (Python, command line); ``command``: as :func:`folder_split`'s). The options and commands are named as the
    caller spells them: ``test_ways=5`` and ``split_fractions`` from Python, ``--test-ways 5``
    and ``--split-fractions`` on the command line.

    In training, ``test_ways`` sets the ways of both val and test, and val is checked first: a
    remedy offered for val holds for the test part too (a value to lower ``test_ways`` to that
    both parts can take, or, where the test part cannot make an episode at all, the split
    options and leaving the test out). A new split is offered only where the folder has classes
    enough for it to give every part in use its ways: in training the train part ``task.ways``
    and val and test (those with classes, or the one checked) the test ways each, in an
    evaluation the one part scored; where it has not, the message says so, and offers the
    remedies that can work. Under the run's recorded split (its ``split.json``: evaluating the
    run on its own folder) the honest fix is fewer ways over the run's own test classes, never a
    new split of the folder, which would score classes the run trained on."""
    if len(pool) >= ways:
        return
    n = len(folder.class_names)
    recorded = bool(task.split_file) and is_run_split(Path(task.split_file))  # the run's own, not typed by the user
    split = (_both(f"the run's split ({task.split_file})") if recorded else
             valued("split_file", task.split_file) if task.split_file else
             valued("split_fractions", task.split_fractions) if task.split_fractions else
             _both("the default split 0.64,0.16,0.2"))
    parts = class_parts(folder, task.split_fractions, task.split_file)  # every part's count: fix them all at once
    have = len(pool)
    # the test part, which training checks after val with the same test_ways (one without
    # classes is refused as such, by folder_split)
    tested = parts.count("test") if command == "train" and part == "val" else 0
    fewest = min(have, tested) if tested else have
    if have < 2:
        lower = "{option} cannot go below 2, so this part cannot make an episode"
    elif fewest >= 2:
        lower = f"lower {{option}} to {fewest} or fewer" + (f" (the test part has {fewest})" if fewest < have else "")
    else:  # the test part's one class makes no episode at any test_ways
        lower = (f"lower {{option}} to {have} or fewer and train without the test ({{train_untested}}), whose 1 class "
                 "cannot make an episode")
    # what a new split must give: in training every part it uses (train the training ways, val and
    # test the test ways: those with classes now, and the one checked), else the part scored
    test_ways = ways if part != "train" else task.test_ways or task.ways
    used = ({"train": task.ways if part != "train" else ways,
             **{p: test_ways for p in ("val", "test") if p == part or parts.count(p)}}
            if command == "train" else {part: ways})
    needed = sum(used.values())
    if recorded:
        fixes = [f"{lower} to score the run on its own {part} classes" if have >= 2 else lower]
    else:
        short = [part, *(["test"] if tested and tested < ways else [])]
        if needed > n:  # no split of the folder's classes gives every part its ways: none is offered
            listed = ", ".join(f"{p} {count}" for p, count in used.items())
            fixes = [f"no split of its {n} classes can give " + (f"{listed} ({needed} in all)" if len(used) > 1
                                                                  else f"the {part} part {ways}")]
            for left_out, remedy, what in (("val", "train_unvalidated", "validation"),
                                           ("test", "train_untested", "the test")):
                rest = {p: count for p, count in used.items() if p != left_out}
                # the part checked left out where this split's other parts hold their ways: said
                # below without a new split (training reaches the test part after the val part)
                as_split = left_out == part and (part == "test" or len(short) == 1)
                if (command == "train" and not as_split and left_out in used and len(rest) > 1
                        and sum(rest.values()) <= n):
                    fixes.append(f"train without {what} ({{{remedy}}}) on a split ({{split_fractions}} or "
                                 f"{{split_file}}) that gives " + ", ".join(f"{p} {c}" for p, c in rest.items()))
        else:
            fixes = [f"give {'it' if len(short) == 1 else ' and '.join(short)} {ways} or more"
                     f"{' each' if len(short) > 1 else ''} with {{split_fractions}} or {{split_file}}"]
        if part == "val" and command != "eval":
            if len(short) == 1:
                fixes.append("train without validation ({train_unvalidated})")
            elif tested < 2:
                fixes.append("train without validation or the test ({train_neither})")
            elif tested > have:  # else lowering test_ways for both parts (below) does as well
                fixes.append(f"train without validation ({{train_unvalidated}}) and with {{option}} {tested} or fewer")
        if part == "test" and command == "train":
            fixes.append("train without the test ({train_untested})")
        fixes.append(lower)
    if (part == "test" or recorded) and command != "train":
        fixes.append(NEW_FOLDER)
    counts = ", ".join(f"{p} {parts.count(p)}" for p in PARTS) + (f", in no part {parts.count('')}"
                                                                  if "" in parts else "")
    python, command_line = _setting(option, ways)
    noted = _both(note) if isinstance(note, str) else tuple(note)
    raise OptionError(f"{{split}} gives the {part} part {have} of the folder's {n} classes ({counts}); {{asked}} "
                      f"needs {ways}: " + "; ".join(fixes), split=split, option=option,
                      asked=(python + noted[0], command_line + noted[1]), **SPLIT_OPTIONS, **REMEDIES)


def check_class_sizes(folder: ImageFolder, pool: ClassPool, shots: int, query: int, test: bool = False,
                      note: str | tuple[str, str] = "", options: dict[str, tuple[str, str]] | None = None) -> None:
    """Every class of ``pool`` has ``shots + query`` images, or an
    :class:`~metalearn.errors.OptionError` naming the smallest and the values that fit it: the
    query or the shots lowered alone where either can go low enough, else both. ``test``: the
    validation and test episodes, set by ``TaskConfig``'s ``test_shots`` and ``test_query``, not
    ``shots`` and ``query``; ``note``: what to say after them, such as where a defaulted one came
    from, one text or (Python, command line). The options are named as the caller spells them:
    ``shots=5 with query=5`` from Python, ``--shots 5 with --query 5`` on the command line;
    ``options``: for options named otherwise than those fields (an evaluation's), ``shots`` and
    ``query`` as (Python, command line), ``("episode_shape's shots", "--shots")``."""
    needed = shots + query
    sizes = folder.class_sizes[pool.characters.numpy()]
    if not (sizes < needed).any():
        return
    small = int(pool.characters[int(np.argmin(sizes))])
    count = int(folder.class_sizes[small])
    prefix = "test_" if test else ""
    named = {key: (options or {}).get(key, prefix + key) for key in ("shots", "query")}
    lower = [f"{{{name}}} to {count - other}" for name, other in (("query", shots), ("shots", query))
             if count - other >= 1]
    if lower:
        fix = "add images, or lower " + " or ".join(lower)
    elif count >= 2:  # neither alone goes low enough: an episode takes at least 1 of each
        fix = f"add images, or lower {{shots}} plus {{query}} to {count} or fewer (e.g. {{example}})"
    else:
        fix = "add images: an episode takes 2 or more of each class (1 shot, 1 query), or remove the class"
    example = [_setting(named["shots"], count - 1), _setting(named["query"], 1)]
    given = [_setting(named["shots"], shots), _setting(named["query"], query)]
    noted = _both(note) if isinstance(note, str) else tuple(note)
    raise OptionError(f"class {{name}} has {count} image{'' if count == 1 else 's'}; {{given}} needs {needed} per "
                      f"class: {fix}", name=_both(folder.class_names[small]),
                      shots=named["shots"], query=named["query"],
                      example=tuple(f"{s} with {q}" for s, q in zip(*example)),
                      given=tuple(f"{s} with {q}{n}" for s, q, n in zip(*given, noted)))
