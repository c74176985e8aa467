"""download_omniglot against a local HTTP server on loopback that serves the shared archives.

The shared zips hold the official PNGs in a re-packed container, so their checksums differ from
the official ones: the tests pass sha256 digests of the shared files instead.
"""

from __future__ import annotations

import hashlib
import http.server
import os
import socket
import subprocess
import sys
import threading
import time
import zipfile
from pathlib import Path

import pytest

from metalearn.data.download import (
    OFFICIAL_CHECKSUMS,
    OFFICIAL_URL,
    download_omniglot,
    file_digest,
    verify_archive,
)
from metalearn.data.omniglot import ARCHIVES, CHARACTERS_PER_ARCHIVE, locate_sources
from metalearn.errors import MetalearnError


class ArchiveServer:
    """Serves ``<root>/<name>.zip`` under a few behaviours chosen by the first path segment:

    /ok/<file>         the whole file
    /truncated/<file>  announces the full Content-Length, sends half, then closes the connection
    /stall/<file>      announces the full length, sends half, then waits for ``release`` (or 10 s)
                       and closes the connection
    anything else      404
    """

    def __init__(self, root: Path):
        self.root = root
        self.requests: list[str] = []
        self.half_sent = threading.Event()
        self.release = threading.Event()
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                server.requests.append(self.path)
                mode, _, name = self.path.lstrip("/").partition("/")
                path = server.root / name
                if mode not in ("ok", "truncated", "stall") or "/" in name or not path.is_file():
                    self.send_error(404, "Not Found")
                    return
                data = path.read_bytes()
                self.send_response(200)
                self.send_header("Content-Type", "application/zip")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                if mode == "ok":
                    self.wfile.write(data)
                    return
                self.wfile.write(data[: len(data) // 2])
                self.wfile.flush()
                self.close_connection = True
                if mode == "stall":
                    server.half_sent.set()
                    server.release.wait(10)

            def log_message(self, format, *args):
                pass

        class Server(http.server.ThreadingHTTPServer):
            daemon_threads = True

            def handle_error(self, request, client_address):
                pass  # a client that hangs up mid-transfer (the tests do) is not news

        self.httpd = Server(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, args=(0.02,), daemon=True)
        self.thread.start()

    def close(self):
        self.release.set()
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def server(omniglot_data_dir):
    srv = ArchiveServer(Path(omniglot_data_dir))
    yield srv
    srv.close()


@pytest.fixture(scope="module")
def shared_sha256(omniglot_data_dir) -> dict[str, tuple[str, str]]:
    return {
        name: ("sha256", hashlib.sha256((Path(omniglot_data_dir) / f"{name}.zip").read_bytes()).hexdigest())
        for name in ARCHIVES
    }


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir()) if folder.exists() else []


def test_official_source_and_checksums():
    assert OFFICIAL_URL == "https://raw.githubusercontent.com/brendenlake/omniglot/master/python"
    assert set(OFFICIAL_CHECKSUMS) == set(ARCHIVES)
    assert OFFICIAL_CHECKSUMS["images_background"] == ("md5", "68d2efa1b9178cc56df9314c21c6e718")
    assert OFFICIAL_CHECKSUMS["images_evaluation"] == ("md5", "6b91aef0f799c5bb55b94e3f2daec811")


def test_download_verifies_and_load_finds_the_archives(server, shared_sha256, omniglot_data_dir, tmp_path):
    data_dir = tmp_path / "not" / "yet" / "there"
    paths = download_omniglot(data_dir, base_url=server.url + "/ok/", checksums=shared_sha256)

    assert paths == {name: data_dir / f"{name}.zip" for name in ARCHIVES}
    assert sorted(server.requests) == ["/ok/images_background.zip", "/ok/images_evaluation.zip"]
    assert leftovers(data_dir) == ["images_background.zip", "images_evaluation.zip"]  # no temporary file
    for name, path in paths.items():
        assert verify_archive(path, *shared_sha256[name])
        assert path.read_bytes() == (Path(omniglot_data_dir) / f"{name}.zip").read_bytes()
    # what load_omniglot reads: it finds the zips, and they hold every drawing
    assert locate_sources(data_dir) == paths
    for name, path in paths.items():
        with zipfile.ZipFile(path) as archive:
            pngs = [n for n in archive.namelist() if n.endswith(".png")]
            assert archive.testzip() is None
        assert len(pngs) == 20 * CHARACTERS_PER_ARCHIVE[name]


def test_present_and_valid_archives_are_not_downloaded_again(server, shared_sha256, tmp_path, capsys):
    download_omniglot(tmp_path, base_url=server.url + "/ok", checksums=shared_sha256)
    before = {p.name: p.stat().st_mtime_ns for p in tmp_path.iterdir()}
    assert len(server.requests) == 2

    paths = download_omniglot(tmp_path, base_url=server.url + "/ok", checksums=shared_sha256, progress=True)

    assert len(server.requests) == 2  # nothing fetched
    assert {p.name: p.stat().st_mtime_ns for p in tmp_path.iterdir()} == before
    assert set(paths) == set(ARCHIVES)
    assert "present and verified" in capsys.readouterr().err


def test_present_but_invalid_archive_is_replaced_by_a_verified_download(server, shared_sha256, tmp_path):
    (tmp_path / "images_background.zip").write_bytes(b"not the archive")
    only_background = {"images_background.zip": shared_sha256["images_background"]}  # .zip accepted

    paths = download_omniglot(tmp_path, base_url=server.url + "/ok", checksums=only_background, progress=True)

    assert paths == {"images_background": tmp_path / "images_background.zip"}
    assert server.requests == ["/ok/images_background.zip"]
    assert verify_archive(paths["images_background"], *shared_sha256["images_background"])
    assert leftovers(tmp_path) == ["images_background.zip"]


def test_checksum_mismatch_is_refused_and_leaves_nothing(server, shared_sha256, tmp_path):
    actual = shared_sha256["images_evaluation"][1]
    wrong = {"images_evaluation": ("sha256", "0" * 64)}

    with pytest.raises(MetalearnError) as info:
        download_omniglot(tmp_path, base_url=server.url + "/ok", checksums=wrong)

    message = str(info.value)
    assert f"{server.url}/ok/images_evaluation.zip" in message
    assert "0" * 64 in message and actual in message  # expected and actual digest
    assert "mismatch" in message
    assert leftovers(tmp_path) == []  # neither the final file nor a temporary one


def test_official_md5_does_not_match_the_repacked_shared_copy(server, tmp_path):
    """The default checksums are really checked: the shared re-packed zip is refused."""
    with pytest.raises(MetalearnError, match="68d2efa1b9178cc56df9314c21c6e718"):
        download_omniglot(tmp_path, base_url=server.url + "/ok", checksums=OFFICIAL_CHECKSUMS)
    assert leftovers(tmp_path) == []


def test_connection_closed_mid_transfer_leaves_no_file(server, shared_sha256, tmp_path):
    with pytest.raises(MetalearnError) as info:
        download_omniglot(tmp_path, base_url=server.url + "/truncated", checksums=shared_sha256)

    message = str(info.value)
    assert f"{server.url}/truncated/images_background.zip" in message
    assert "cut short" in message and "bytes" in message
    assert leftovers(tmp_path) == []


def test_no_file_under_the_final_name_while_downloading(server, shared_sha256, tmp_path):
    """Mid-transfer the bytes live in <name>.zip.tmp<pid>; the final name appears only after
    verification, and a transfer that then breaks removes the temporary file."""
    errors = []

    def run():
        try:
            download_omniglot(tmp_path, base_url=server.url + "/stall", checksums=shared_sha256, timeout=10)
        except MetalearnError as err:
            errors.append(err)

    thread = threading.Thread(target=run)
    thread.start()
    try:
        assert server.half_sent.wait(10)
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            parts = [p for p in tmp_path.iterdir() if ".zip.tmp" in p.name]
            if parts and parts[0].stat().st_size > 0:
                break
            time.sleep(0.01)
        assert [p.name.split(".tmp")[0] for p in parts] == ["images_background.zip"]
        assert parts[0].name.split(".tmp")[1] == str(os.getpid())
        assert not (tmp_path / "images_background.zip").exists()
    finally:
        server.release.set()
        thread.join(20)
    assert not thread.is_alive()
    assert len(errors) == 1 and "cut short" in str(errors[0])
    assert leftovers(tmp_path) == []


def test_an_archive_is_on_disk_before_it_gets_its_name(server, shared_sha256, tmp_path, flush_and_rename_events):
    """After a power cut the final name holds the whole archive, never an empty file: the
    temporary file is flushed to disk (fsync) before it is renamed to ``<name>.zip``."""
    events = flush_and_rename_events
    download_omniglot(tmp_path, base_url=server.url + "/ok", checksums=shared_sha256)
    renames = [(i, e) for i, e in enumerate(events) if e[0] == "replace"]
    assert sorted(Path(e[2]).name for _, e in renames) == ["images_background.zip", "images_evaluation.zip"]
    for i, (_, src, _) in renames:
        assert ("fsync", src) in events[:i], (src, events)


def test_a_download_removes_what_killed_downloads_left_and_nothing_else(server, shared_sha256, tmp_path):
    """A download killed outright (SIGKILL, a crash) leaves its temporary file, as large as an
    archive; the next download removes it once its process is gone and nothing has written to
    it for a while. One still being written (maybe from another machine) stays."""
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = tmp_path / f"images_background.zip.tmp{dead.pid}"
    recent = tmp_path / f"images_evaluation.zip.tmp{dead.pid}"
    for path in (stale, recent):
        path.write_bytes(b"half an archive")
    hour_ago = time.time() - 3600
    os.utime(stale, (hour_ago, hour_ago))
    download_omniglot(tmp_path, base_url=server.url + "/ok", checksums=shared_sha256)
    assert leftovers(tmp_path) == ["images_background.zip", "images_evaluation.zip", recent.name]


def test_stalled_server_times_out_and_leaves_no_file(server, shared_sha256, tmp_path):
    # "timed out", not "cut short": the read gave up before the stalled server closed the connection
    with pytest.raises(MetalearnError, match="timed out") as info:
        download_omniglot(tmp_path, base_url=server.url + "/stall", checksums=shared_sha256, timeout=0.3)
    assert "/stall/images_background.zip" in str(info.value)
    assert leftovers(tmp_path) == []


def test_http_error_names_url_and_status(server, shared_sha256, tmp_path):
    with pytest.raises(MetalearnError) as info:
        download_omniglot(tmp_path, base_url=server.url + "/gone", checksums=shared_sha256)
    assert "HTTP 404" in str(info.value)
    assert f"{server.url}/gone/images_background.zip" in str(info.value)
    assert leftovers(tmp_path) == []


def test_unreachable_server(shared_sha256, tmp_path):
    with socket.socket() as sock:  # a loopback port that nothing listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    with pytest.raises(MetalearnError, match="cannot reach") as info:
        download_omniglot(tmp_path, base_url=url, checksums=shared_sha256, timeout=5)
    assert f"{url}/images_background.zip" in str(info.value)
    assert "internet connection" in str(info.value)
    assert leftovers(tmp_path) == []


def test_interrupt_removes_the_partial_file(server, shared_sha256, tmp_path, monkeypatch):
    """Ctrl-C mid-transfer propagates as KeyboardInterrupt and cleans up."""
    import tqdm

    def interrupt(self, n=1):
        raise KeyboardInterrupt

    monkeypatch.setattr(tqdm.tqdm, "update", interrupt)
    with pytest.raises(KeyboardInterrupt):
        download_omniglot(tmp_path, base_url=server.url + "/ok", checksums=shared_sha256, progress=True)
    assert leftovers(tmp_path) == []


@pytest.mark.parametrize(
    "checksums, message",
    [
        ({"images_background": ("crc99", "00")}, "unknown checksum method 'crc99'; use one of"),
        ({"images_background": ("sha256", "abc")}, "must be 64 hex digits"),
        ({"images_background": ("md5", "z" * 32)}, "must be 32 hex digits"),
        ({"images_background": "68d2efa1b9178cc56df9314c21c6e718"}, "must be (method, hexdigest)"),
        ({}, "checksum table is empty"),
    ],
)
def test_bad_checksum_table(checksums, message, tmp_path):
    with pytest.raises(MetalearnError) as info:
        download_omniglot(tmp_path / "data", base_url="http://127.0.0.1:9", checksums=checksums)
    assert message in str(info.value)
    assert not (tmp_path / "data").exists()  # rejected before touching the disk or network


def test_file_digest_matches_hashlib(tmp_path):
    path = tmp_path / "f.bin"
    path.write_bytes(b"omniglot" * 100_000)
    assert file_digest(path, "md5") == hashlib.md5(path.read_bytes()).hexdigest()
    assert verify_archive(path, "md5", hashlib.md5(path.read_bytes()).hexdigest().upper())
    assert not verify_archive(tmp_path / "missing.zip", "md5", "0" * 32)


def test_a_failed_download_over_a_present_archive_keeps_it_and_says_what_it_is(tmp_path):
    """An archive that is there but not the official one (a re-packed copy, as the shared data;
    a damaged download): offline, --download fails, and the message says the archive is present,
    its digest, and how to check its content instead; the archive stays as it was."""
    present = b"a re-packed copy"
    (tmp_path / "images_background.zip").write_bytes(present)
    with socket.socket() as sock:  # a loopback port that nothing listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with pytest.raises(MetalearnError, match="cannot reach") as info:
        download_omniglot(tmp_path, base_url=f"http://127.0.0.1:{port}", checksums=OFFICIAL_CHECKSUMS, timeout=5)
    message = str(info.value)
    assert f"{tmp_path / 'images_background.zip'} is present, but with md5 {hashlib.md5(present).hexdigest()}" in message
    assert f"metalearn data verify --data-dir {tmp_path}" in message and "\n" not in message
    assert (tmp_path / "images_background.zip").read_bytes() == present
