"""Fetch the official Omniglot archives, verified before anything uses them.

The two archives of the dataset's own release (``images_background.zip`` and
``images_evaluation.zip``, from github.com/brendenlake/omniglot) are streamed into a temporary
file beside their destination (``<name>.zip.tmp<pid>``, :func:`metalearn.files.atomic_write`)
while being hashed; only when the digest matches the expected one is the file flushed to disk
and renamed (atomically, with ``os.replace``) to its final name. A failed, interrupted or
tampered download therefore never leaves a file under the final name, nor does a power cut
leave an empty or partial one there, and its temporary file is removed. The temporary file of a
download killed outright (SIGKILL, a crash) is removed by the next download into that folder
(:func:`metalearn.files.remove_temporaries`). Archives already present whose checksum verifies
are not downloaded again. :func:`metalearn.data.omniglot.load_omniglot` reads the zips
directly, so nothing is extracted.

Only the standard library is used (``urllib``), with a timeout on every network operation.
"""

from __future__ import annotations

import hashlib
import http.client
import socket
import sys
import urllib.error
import urllib.request
from pathlib import Path
from typing import Mapping

from metalearn.errors import MetalearnError, OptionError
from metalearn.files import atomic_write, remove_temporaries

OFFICIAL_URL = "https://raw.githubusercontent.com/brendenlake/omniglot/master/python"

# md5 of the official archives, the digests torchvision's Omniglot dataset checks as well.
OFFICIAL_CHECKSUMS: dict[str, tuple[str, str]] = {
    "images_background": ("md5", "68d2efa1b9178cc56df9314c21c6e718"),
    "images_evaluation": ("md5", "6b91aef0f799c5bb55b94e3f2daec811"),
}

DEFAULT_TIMEOUT = 60.0  # seconds, for connecting and for each read
CHUNK_SIZE = 1 << 16
USER_AGENT = "metalearn (python urllib)"


def download_omniglot(
    data_dir: Path | str,
    base_url: str = OFFICIAL_URL,
    checksums: Mapping[str, tuple[str, str]] = OFFICIAL_CHECKSUMS,
    progress: bool = False,
    timeout: float = DEFAULT_TIMEOUT,
) -> dict[str, Path]:
    """Make ``<data_dir>/<name>.zip`` present and verified for every archive in ``checksums``.

    ``checksums`` maps an archive name (``images_background``; a trailing ``.zip`` is accepted)
    to ``(method, hexdigest)`` with any :mod:`hashlib` method; each archive is fetched
    from ``<base_url>/<name>.zip`` (``base_url``: by default the official release's, the
    Omniglot repository on GitHub). An archive already in ``data_dir`` is kept when its digest
    matches, and otherwise replaced, but only by a download that verifies. Returns
    ``{name: path of the verified zip}``. Raises :class:`MetalearnError` (naming the URL or file,
    and the expected and actual digest where relevant) on any failure, leaving no partial file.
    Temporary files (``<name>.tmp<pid>``) that killed writers left in ``data_dir`` are removed
    first: those whose process is no longer running and that have not been written to for
    ``files.UNOWNED_TEMPORARY_AGE_S`` (a download in progress on another machine sharing the
    folder keeps writing to its own).

    ``progress``: a progress bar over each download's bytes; False (the default) draws none.
    ``timeout``: the seconds to wait for the connection and for each read of a download
    (default 60), after which it fails.
    """
    data_dir = Path(data_dir).expanduser()
    base_url = base_url.rstrip("/")
    if not checksums:
        raise MetalearnError("no archives to download: the checksum table is empty")
    plan = []
    for name, spec in checksums.items():
        name = name.removesuffix(".zip")
        method, expected = _checksum_spec(name, spec)
        plan.append((name, method, expected))
    try:
        data_dir.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise OptionError(f"cannot create the data folder {data_dir} ({err}); choose a writable one with "
                          "{data_dir} or METALEARN_DATA.", data_dir="data_dir") from None
    remove_temporaries(data_dir)  # an archive's worth of bytes each, left by SIGKILL or a crash

    result = {}
    for name, method, expected in plan:
        final = data_dir / f"{name}.zip"
        present = file_digest(final, method) if final.is_file() else None
        if present == expected:
            print(f"{final} is present and verified ({method}); not downloading it", file=sys.stderr)
            result[name] = final
            continue
        url = f"{base_url}/{name}.zip"
        try:
            _fetch(url, final, method, expected, timeout, progress)
        except MetalearnError as err:
            if present is None:
                raise
            # the archive there is kept (a failed download replaces nothing): say what it is
            raise MetalearnError(
                f"{err} {final} is present, but with {method} {present}, not the official archive's: a "
                f"re-packed copy or a damaged download. `metalearn data verify --data-dir {data_dir}` checks "
                "its images against the official release; if they match, prepare without --download."
            ) from None
        result[name] = final
    return result


def file_digest(path: Path | str, method: str) -> str:
    """Hex digest of a file's bytes with the named :mod:`hashlib` method."""
    digest = _new_hash(method)
    try:
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                digest.update(chunk)
    except OSError as err:
        raise MetalearnError(f"cannot read {path}: {err}") from None
    return digest.hexdigest()


def verify_archive(path: Path | str, method: str, expected: str) -> bool:
    """True when the file exists and its digest equals ``expected``."""
    path = Path(path)
    return path.is_file() and file_digest(path, method) == expected.lower()


# --------------------------------------------------------------------------------------------


def _checksum_spec(name: str, spec) -> tuple[str, str]:
    try:
        method, expected = spec
    except (TypeError, ValueError):
        raise MetalearnError(
            f"the checksum of {name} must be (method, hexdigest), got {spec!r}"
        ) from None
    method, expected = str(method).lower(), str(expected).lower()
    size = _new_hash(method).digest_size  # fails early on an unknown method
    if len(expected) != 2 * size or any(c not in "0123456789abcdef" for c in expected):
        raise MetalearnError(
            f"the expected {method} of {name} must be {2 * size} hex digits, got {spec[1]!r}"
        )
    return method, expected


def _new_hash(method: str):
    try:
        digest = hashlib.new(method, usedforsecurity=False)
        if digest.digest_size == 0:  # the variable-length shake_* digests
            raise ValueError(method)
        return digest
    except (ValueError, TypeError):
        raise MetalearnError(
            f"unknown checksum method {method!r}; use one of "
            + ", ".join(sorted(a for a in hashlib.algorithms_guaranteed if not a.startswith("shake")))
        ) from None


def _fetch(url: str, final: Path, method: str, expected: str, timeout: float, progress: bool) -> None:
    """Stream ``url`` into a temporary file beside ``final`` while hashing, verify, then flush it
    to disk and rename it to ``final`` (:func:`metalearn.files.atomic_write`): a power cut after
    the rename finds the whole archive, never an empty file under its name.

    The temporary file is removed whatever happens (including Ctrl-C, which propagates)."""
    manual = (
        f"Alternatively download {url} yourself (it must have {method} {expected}) and put "
        f"it in {final.parent}."
    )

    def download(out) -> None:
        actual, received, announced = _stream(url, out, final, method, timeout, progress, manual)
        if announced is not None and received != announced:
            raise MetalearnError(
                f"the download of {url} was cut short: received {received} of {announced} bytes. "
                f"Nothing was saved; try again. {manual}"
            )
        if actual != expected:  # raised inside the write: the temporary file goes, final stays as it was
            raise MetalearnError(
                f"checksum mismatch for {url}: expected {method} {expected}, got {actual} "
                f"({received} bytes). The file was discarded and {final} was not written. Try "
                "again; if it persists the server is not serving the official archive (a proxy "
                f"or a changed release). {manual}"
            )

    atomic_write(final, download)


def _stream(url, out, final: Path, method: str, timeout: float, progress: bool, manual: str):
    """(hex digest, bytes received, Content-Length or None) of ``url`` written to the open
    file ``out`` (the temporary file of ``final``)."""
    digest = _new_hash(method)
    received = 0
    request = urllib.request.Request(url, headers={"User-Agent": USER_AGENT})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            announced = _content_length(response)
            bar = None
            if progress:
                from tqdm import tqdm

                bar = tqdm(total=announced, desc=f"downloading {final.name}",
                           unit="B", unit_scale=True, unit_divisor=1024, leave=False)
            try:
                while True:
                    chunk = response.read(CHUNK_SIZE)
                    if not chunk:
                        break
                    digest.update(chunk)
                    out.write(chunk)
                    received += len(chunk)
                    if bar is not None:
                        bar.update(len(chunk))
            finally:
                if bar is not None:
                    bar.close()
    except urllib.error.HTTPError as err:
        raise MetalearnError(
            f"downloading {url} failed: HTTP {err.code} {err.reason}. Check the address (and the "
            f"base URL, if you changed it). {manual}"
        ) from None
    except urllib.error.URLError as err:
        reason = err.reason
        raise MetalearnError(
            f"cannot reach {url}: {reason}. Check your internet connection or proxy settings. "
            f"{manual}"
        ) from None
    except (TimeoutError, socket.timeout) as err:
        raise MetalearnError(
            f"downloading {url} timed out after {timeout:g} s without data ({err}); try again. "
            f"{manual}"
        ) from None
    except (http.client.HTTPException, ConnectionError) as err:
        raise MetalearnError(
            f"the connection broke while downloading {url} after {received} bytes "
            f"({type(err).__name__}: {err}). Nothing was saved; try again. {manual}"
        ) from None
    except OSError as err:
        raise MetalearnError(
            f"downloading {url} into {final.parent} failed after {received} bytes: {err}. "
            f"{manual}"
        ) from None
    return digest.hexdigest(), received, announced


def _content_length(response) -> int | None:
    value = response.headers.get("Content-Length")
    try:
        length = int(value) if value is not None else None
    except ValueError:
        return None
    return length if length is not None and length >= 0 else None
