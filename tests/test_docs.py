"""The documentation runs: every ```python block of README.md and docs/ executes against the
code as it is, and the site builds with ``mkdocs build --strict``.

The blocks of one page run in order in one namespace (a page may build on its earlier blocks),
in a fresh working folder, with ``$METALEARN_RUNS`` pointing into it. A block opts out with an
HTML comment on the line just before its fence:

- ``<!-- no-run -->``: not run at all (only for a block that needs a long run or a GPU; prefer
  small settings);
- ``<!-- needs-omniglot -->``: run only when Omniglot is available (see ``conftest.py``).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch

from conftest import PROJECT, omniglot_dir

MARKERS = {"no-run", "needs-omniglot"}
FENCE = re.compile(r"^```python[ \t]*\n(.*?)^```[ \t]*$", re.MULTILINE | re.DOTALL)
MARKER = re.compile(r"<!--\s*([a-z-]+)\s*-->\s*$")


def pages() -> list[Path]:
    return [PROJECT / "README.md"] + sorted((PROJECT / "docs").rglob("*.md"))


def python_blocks(text: str) -> list[tuple[int, str, str | None]]:
    """(line number, code, marker or None) of every ```python block, in order."""
    blocks = []
    for match in FENCE.finditer(text):
        before = text[:match.start()].rstrip("\n").rsplit("\n", 1)[-1]
        marker = MARKER.search(before)
        line = text.count("\n", 0, match.start()) + 2
        blocks.append((line, match.group(1), marker.group(1) if marker else None))
    return blocks


def test_python_blocks_are_found_and_markers_known():
    text = "intro\n<!-- no-run -->\n```python\nx = 1\n```\n\n```python\ny = 2\n```\n"
    assert python_blocks(text) == [(4, "x = 1\n", "no-run"), (8, "y = 2\n", None)]
    for page in pages():
        for line, _, marker in python_blocks(page.read_text()):
            assert marker is None or marker in MARKERS, f"{page.name}:{line}: unknown marker {marker!r}"
    tutorial = python_blocks((PROJECT / "docs" / "tutorial.md").read_text())
    assert len(tutorial) >= 6 and all(marker != "no-run" for _, _, marker in tutorial)


@pytest.mark.parametrize("page", [page for page in pages() if python_blocks(page.read_text())],
                         ids=lambda page: str(page.relative_to(PROJECT)))
def test_python_examples_run(page, tmp_path, monkeypatch):
    blocks = python_blocks(page.read_text())
    have_omniglot = omniglot_dir() is not None and omniglot_dir().is_dir()
    runnable = [(line, code) for line, code, marker in blocks
                if marker is None or (marker == "needs-omniglot" and have_omniglot)]
    if not runnable:
        pytest.skip(f"{page.name}: its Python blocks need Omniglot, which is not available")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("METALEARN_RUNS", str(tmp_path / "runs"))
    # a real module, so that a block may define dataclasses (they look their module up)
    module = types.ModuleType("metalearn_docs_example")
    monkeypatch.setitem(sys.modules, module.__name__, module)
    namespace = module.__dict__
    threads = torch.get_num_threads()
    # one thread: these tiny examples gain nothing from two, and lose much when the cores are shared
    torch.set_num_threads(1)
    try:
        for line, code in runnable:
            try:
                exec(compile(code, f"{page.relative_to(PROJECT)}:{line}", "exec"), namespace)
            except Exception as error:
                raise AssertionError(f"the Python block at {page.relative_to(PROJECT)}:{line} fails: "
                                     f"{type(error).__name__}: {error}") from error
    finally:
        torch.set_num_threads(threads)


def test_readme_test_command_is_what_ci_runs():
    readme = (PROJECT / "README.md").read_text()
    ci = (PROJECT / ".ci" / "run").read_text()
    assert "python -m pytest" in readme and re.search(r"^python -m pytest\s*$", ci, re.MULTILINE)


def test_site_builds_strict(tmp_path):
    if not os.environ.get("METALEARN_REQUIRE_DOCS"):  # CI sets it: there a missing MkDocs fails
        for module in ("mkdocs", "material", "mkdocstrings", "mkdocs_click"):
            pytest.importorskip(module, reason='the docs extra is not installed: pip install -e ".[docs]"')
    site = tmp_path / "site"
    done = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(site)],
                          cwd=PROJECT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-4000:]
    cli_page = (site / "cli" / "index.html").read_text()
    assert "--inner-lr" in cli_page and "metalearn train maml" in cli_page  # generated, not copied
    assert (site / "results" / "maml-sinusoid-k5" / "fits.png").is_file()  # the plots are served
    for method in ("maml", "platipus", "protonet", "matchingnet", "reptile"):
        page = (site / "methods" / method / "index.html").read_text()
        # the options table that scripts/docs_hooks.py generates from the method's Config
        assert "<!-- options" not in page and "Config()</code> default" in page, method
