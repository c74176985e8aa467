"""The documentation runs: every ```python block of README.md and docs/ executes against the
code as it is, every `metalearn` command its shell blocks show is one the command line takes,
every `python benchmarks/...` or `python scripts/...` command it shows parses with that
script's options, and the site builds with ``mkdocs build --strict``.

The blocks of one page run in order in one namespace (a page may build on its earlier blocks),
in a fresh working folder, with ``$METALEARN_RUNS`` pointing into it. A block opts out with an
HTML comment on the line just before its fence:

- ``<!-- no-run -->``: not run at all (only for a block that needs a long run or a GPU; prefer
  small settings);
- ``<!-- needs-omniglot -->``: run only when Omniglot is available (see ``conftest.py``).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import re
import runpy
import shlex
import subprocess
import sys
import types
import warnings
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


@pytest.fixture
def registries_kept(monkeypatch):
    """What a test registers (a page's example, a plugin its commands name) is gone after it, so
    that no later test sees it in a list of names."""
    import metalearn.plugins
    from metalearn.algorithms import METHODS
    from metalearn.datasets import DATASETS
    from metalearn.models import NETWORKS

    kept = [(registry, dict(registry)) for registry in (METHODS, DATASETS, NETWORKS)]
    for name in ("_loaded", "_imported", "_files"):  # a plugin imported here is imported again by a later test
        monkeypatch.setattr(metalearn.plugins, name, getattr(metalearn.plugins, name).copy()
                            if name != "_loaded" else metalearn.plugins._loaded)
    yield
    for registry, before in kept:
        registry.clear()
        registry.update(before)


@pytest.mark.parametrize("page", [page for page in pages() if python_blocks(page.read_text())],
                         ids=lambda page: str(page.relative_to(PROJECT)))
def test_python_examples_run(page, tmp_path, monkeypatch, registries_kept):
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


# -- the commands of the shell blocks ----------------------------------------------------------

SHELL_FENCES = {"", "bash", "console", "sh", "shell"}
# what a command line may need that a test machine lacks: a run to continue or start from, the
# user's own folder, a GPU; such commands are parsed (every option known, every value of its
# type), not resolved
NEEDS_MORE = ("--resume", "--init-from", "--data-dir", "--device")
# environments that need an optional extra (`pip install -e ".[rl]"`): resolved only where it is
# installed, parsed elsewhere (CI installs the extra; a user's checkout may not)
MUJOCO_ENVS = ("cheetah-vel", "cheetah-dir")


def have_mujoco() -> bool:
    from metalearn.envs.cheetah import _gymnasium
    from metalearn.errors import MetalearnError

    try:
        _gymnasium()
    except MetalearnError:
        return False
    return True


def shell_blocks(text: str) -> list[tuple[int, str]]:
    """(line number, text) of every shell block (```bash, ```console, ```sh, ```shell or bare),
    read fence by fence, so that the closing fence of another block never opens one."""
    blocks, opened, lines = [], None, []
    for number, line in enumerate(text.splitlines(), 1):
        fence = re.match(r"\s*```(\S*)", line)
        if fence is None:
            lines.append(line)
        elif opened is None:
            opened, start, lines = fence.group(1), number + 1, []
        else:
            if opened in SHELL_FENCES:
                blocks.append((start, "\n".join(lines)))
            opened = None
    return blocks


def metalearn_commands(block: str) -> list[list[str]]:
    """The arguments of every ``metalearn`` command in a shell block: continued lines joined,
    ``$ `` prompts, ``VAR=value`` prefixes, ``nice``, comments and ``[optional ...]`` parts left
    out, ``torchrun ... -m metalearn ARGS`` taken as ``metalearn ARGS``."""
    commands = []
    for line in block.replace("\\\n", " ").splitlines():
        line = re.sub(r"\[[^\]]*\]", "", line.strip().removeprefix("$ "))
        for part in re.split(r"&&|\|\||;|\|", line):
            try:
                words = shlex.split(part, comments=True)
            except ValueError as error:  # e.g. an apostrophe in a bare fence that is no shell: mark it ```text
                raise ValueError(f"{error} in the shell block line {line!r}") from None
            while words and re.fullmatch(r"[A-Za-z_]\w*=\S*", words[0]):
                words = words[1:]
            if words[:2] == ["nice", "-n"]:
                words = words[3:]
            if words[:1] == ["torchrun"] and "metalearn" in words:
                words = words[words.index("metalearn"):]
            if words[:1] == ["metalearn"]:
                commands.append(words[1:])
    return commands


def test_shell_blocks_and_their_commands_are_found():
    text = ("```python\nx = 1\n```\n```bash\nOMP_NUM_THREADS=1 metalearn train maml --ways 5 \\\n"
            "    --run-dir runs/a  # comment\n$ metalearn eval RUN [--ensemble] && metalearn plot RUN\n"
            "torchrun --standalone --nproc_per_node=2 -m metalearn train maml\n```\n")
    [(line, block)] = shell_blocks(text)
    assert line == 5 and metalearn_commands(block) == [
        ["train", "maml", "--ways", "5", "--run-dir", "runs/a"], ["eval", "RUN"], ["plot", "RUN"], ["train", "maml"]]


def parse_command_line(args: list[str]) -> None:
    """Parse ``metalearn ARGS`` as click would, without running it: an unknown command or option,
    a missing argument or a value of the wrong type raises click's UsageError."""
    import click

    from metalearn.cli import cli

    command, context, name = cli, None, "metalearn"
    while isinstance(command, click.Group):
        context = click.Context(command, info_name=name, parent=context)
        if not args:
            raise click.UsageError(f"{name} needs a command", context)
        name, args = args[0], args[1:]
        command = command.get_command(context, name)
        if command is None:
            raise click.UsageError(f"no command {name!r}", context)
    command.make_context(name, list(args), parent=context)


def test_documented_commands_are_ones_the_command_line_takes(tmp_path, monkeypatch, capsys, registries_kept):
    """Every `metalearn` command in README.md's and docs/'s shell blocks: `metalearn train ...`
    resolves with --print-config (the options combine, the values are valid) where this machine
    has what it needs, and every other command parses. A renamed option or a stale example
    fails here, not in a reader's shell. The plugins the commands name (``METALEARN_PLUGINS=``,
    files of the project) are loaded first, as the commands would load them."""
    import metalearn.plugins
    from cli_runner import run

    named = {entry for page in pages() for _, block in shell_blocks(page.read_text())
             for value in re.findall(r"METALEARN_PLUGINS=(\S+)", block) for entry in value.split(",")}
    missing = sorted(entry for entry in named if not (PROJECT / entry).is_file())
    assert not missing, f"the docs name plugin files that the project lacks: {missing}"
    monkeypatch.setenv("METALEARN_PLUGINS", ",".join(str(PROJECT / entry) for entry in sorted(named)))
    monkeypatch.setattr(metalearn.plugins, "_loaded", None)
    assert len(metalearn.plugins.load_plugins()) == len(named)
    have_omniglot = omniglot_dir() is not None and omniglot_dir().is_dir()
    mujoco = have_mujoco()
    monkeypatch.chdir(tmp_path)
    if have_omniglot:
        monkeypatch.setenv("METALEARN_DATA", str(omniglot_dir()))
    found, resolved, lacking, failures = 0, 0, 0, []
    for page in pages():
        for line, block in shell_blocks(page.read_text()):
            for args in metalearn_commands(block):
                found += 1
                where = f"{page.relative_to(PROJECT)}:{line}: metalearn {' '.join(args)}"
                named = [args[i + 1] for i, word in enumerate(args[:-1]) if word in ("--dataset", "--env")]
                trains = args[:1] == ["train"] and not any(flag in args for flag in NEEDS_MORE)
                resolvable = (trains
                              and (have_omniglot or args[1:2] == ["maml-rl"] or named[-1:] not in ([], ["omniglot"]))
                              and (mujoco or not set(named) & set(MUJOCO_ENVS)))
                lacking += trains and not resolvable  # resolved where Omniglot and MuJoCo are at hand
                if resolvable:
                    code, _, err = run([*args, "--print-config"], capsys)
                    resolved += 1
                    if code != 0:
                        failures.append(f"{where}\n    {err.strip()}")
                    continue
                try:
                    parse_command_line(args)
                except Exception as error:  # click's UsageError, BadParameter, ...
                    failures.append(f"{where}\n    {type(error).__name__}: {error}")
    assert found >= 100 and resolved >= (40 if have_omniglot else 10), (found, resolved)
    assert not failures, "\n".join(failures)
    if lacking:  # said, not silent: the training commands that need them were only parsed
        missing = " and ".join(name for name, have in (("Omniglot", have_omniglot), ("MuJoCo", mujoco)) if not have)
        warnings.warn(f"{lacking} documented training commands only parsed, not resolved: no {missing} here",
                      stacklevel=1)
    assert not any(tmp_path.iterdir())  # resolving wrote nothing


# -- the benchmark and script commands ------------------------------------------------------

SCRIPT_COMMAND = re.compile(r"(?:^|\s)python3?\s+((?:benchmarks|scripts)/[\w-]+\.py)\b(.*)")
PLACEHOLDER_VALUE = re.compile(r"invalid \w+ value: '[A-Z][A-Z0-9_]*'")  # --threads T: the docs' placeholder


def script_commands(text: str) -> list[tuple[str, list[str]]]:
    """(script, arguments) of every ``python benchmarks/X.py ...`` or ``python scripts/X.py ...``
    in a page's shell blocks and inline code (which may wrap across lines), comments and
    ``[optional ...]`` parts left out."""
    spans = [block for _, block in shell_blocks(text)]
    prose = re.sub(r"^\s*```.*?^\s*```", "", text, flags=re.DOTALL | re.MULTILINE)
    spans += [span.replace("\n", " ") for span in re.findall(r"`([^`]+)`", prose)]
    commands = []
    for span in spans:
        for line in span.replace("\\\n", " ").splitlines():
            found = SCRIPT_COMMAND.search(line)
            if found:
                rest = re.sub(r"\[[^\]]*\]", "", found.group(2))
                commands.append((found.group(1), shlex.split(rest, comments=True)))
    return commands


class Parsed(Exception):
    """Raised where a script's argument parser has accepted its command line."""


def parse_script_commands(commands: list[tuple[str, list[str]]]) -> list[str]:
    """Run each script as ``__main__`` up to its argument parsing, and stop there: a failure line
    for each command whose options the script's parser refuses. Meant for a process of its
    own (the scripts set threads and environment at import)."""
    plain_parse_args, plain_parse_known_args = argparse.ArgumentParser.parse_args, \
        argparse.ArgumentParser.parse_known_args
    inside = []

    def parse_args(self, args=None, namespace=None):
        inside.append(self)
        try:
            plain_parse_args(self, args, namespace)
        finally:
            inside.pop()
        raise Parsed

    def parse_known_args(self, args=None, namespace=None):
        result = plain_parse_known_args(self, args, namespace)
        if not inside:
            raise Parsed
        return result

    argparse.ArgumentParser.parse_args, argparse.ArgumentParser.parse_known_args = parse_args, parse_known_args
    failures = []
    for script, args in commands:
        sys.argv = [script, *args]
        sys.path.insert(0, str(PROJECT / Path(script).parent))
        err = io.StringIO()
        try:
            with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
                runpy.run_path(str(PROJECT / script), run_name="__main__")
            failures.append(f"{script} {' '.join(args)}: ran without parsing arguments with argparse")
        except Parsed:
            pass
        except SystemExit as exit:
            if exit.code and not PLACEHOLDER_VALUE.search(err.getvalue()):
                said = err.getvalue().strip().splitlines() or [f"exit status {exit.code}"]
                failures.append(f"{script} {' '.join(args)}: {said[-1]}")
        except Exception as error:  # the script fails before its parser (an import, a module-level error)
            failures.append(f"{script} {' '.join(args)}: {type(error).__name__}: {error}")
        finally:
            sys.path.pop(0)
    return failures


def parse_script_commands_in_a_process(commands: list[tuple[str, list[str]]]) -> list[str]:
    """:func:`parse_script_commands` in a fresh interpreter (one for all the commands)."""
    code = ("import json, sys; sys.path.insert(0, sys.argv[1]); import test_docs; "
            "print(json.dumps(test_docs.parse_script_commands(json.loads(sys.argv[2]))))")
    done = subprocess.run([sys.executable, "-c", code, str(PROJECT / "tests"), json.dumps(commands)], cwd=PROJECT,
                          capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-4000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_documented_benchmark_and_script_commands_parse():
    """Every `python benchmarks/...` and `python scripts/...` command of README.md and docs/
    (the commands behind the docs' figures) is accepted by that script's parser, in a process
    of its own; what the script then does is not run."""
    commands = [(script, args) for page in pages() for script, args in script_commands(page.read_text())]
    assert len(commands) >= 40 and all((PROJECT / script).is_file() for script, _ in commands), \
        [script for script, _ in commands if not (PROJECT / script).is_file()]
    failures = parse_script_commands_in_a_process(commands)
    assert not failures, "\n".join(failures)


def test_script_commands_are_found_and_a_wrong_option_is_caught():
    text = ("Run `python\nbenchmarks/rl.py --threads 1` or:\n\n```bash\npython scripts/kill-resume.py --kills 4 "
            "[--method protonet]  # comment\n```\n")
    assert script_commands(text) == [("scripts/kill-resume.py", ["--kills", "4"]),
                                     ("benchmarks/rl.py", ["--threads", "1"])]
    failures = parse_script_commands_in_a_process([("benchmarks/rl.py", ["--threads", "T"]),
                                                   ("benchmarks/rl.py", ["--threadz", "1"]),
                                                   ("benchmarks/rl.py", ["--threads", "x"])])
    assert len(failures) == 2 and "--threadz 1" in failures[0] and "invalid int value: 'x'" in failures[1], failures


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
    for method in builtin_methods():
        page = (site / "methods" / method / "index.html").read_text()
        # the options table that scripts/docs_hooks.py generates from the method's Config
        assert "<!-- options" not in page and "Config()</code> default" in page, method


# Pages under docs/methods/ that are no registered method's: a preset of a method (`--preset`),
# {page: (method, preset)}; MAML++ is MAML with six of its options set, not a method of its own.
PRESET_PAGES = {"maml-plus-plus": ("maml", "maml++")}
OPTIONS_MARKER = re.compile(r"<!--\s*options:\s*([^;>]*?)\s*(?:;|-->)")


def builtin_methods() -> dict:
    """METHODS without a method a test registered in this process."""
    from metalearn.algorithms import METHODS

    return {name: cls for name, cls in METHODS.items() if cls.__module__.startswith("metalearn.")}


def method_docs_missing() -> list[str]:
    """Everything "Adding a method" in docs/design.md asks for that some method lacks, each as
    "where: what to add": the package map's line for every module, and for every registered
    method its registry line and import, its page, nav line, generated options table and its
    class and Config in docs/api.md."""
    import importlib
    import inspect
    import pkgutil

    yaml = pytest.importorskip("yaml", reason='the docs extra is not installed: pip install -e ".[docs]"')

    import metalearn.algorithms as algorithms
    from metalearn.algorithms import MetaLearner

    docs, package = PROJECT / "docs", PROJECT / "src" / "metalearn"
    design, api = (docs / "design.md").read_text(), (docs / "api.md").read_text()
    missing = [f"docs/design.md: a line for {path.relative_to(package)} in the package map (its ```text block, "
               "in layering order)" for path in sorted(package.rglob("*.py"))
               if path.stem not in ("__init__", "__main__") and not re.search(rf"\b{path.stem}\.py\b", design)]
    methods = builtin_methods()
    for info in pkgutil.iter_modules(algorithms.__path__):  # a method class in a file, not in the registry
        module = importlib.import_module(f"{algorithms.__name__}.{info.name}")
        for cls in vars(module).values():
            if (inspect.isclass(cls) and issubclass(cls, MetaLearner) and cls.__module__ == module.__name__
                    and "name" in cls.__dict__ and methods.get(cls.name) is not cls):
                missing.append(f"src/metalearn/algorithms/__init__.py: `\"{cls.name}\": {cls.__name__},` in METHODS")
    nav = yaml.safe_load((PROJECT / "mkdocs.yml").read_text())["nav"]
    in_nav = {page for entry in nav if isinstance(entry, dict) and "Methods" in entry
              for item in entry["Methods"] for page in item.values()}
    for name, cls in methods.items():
        for documented in (cls, cls.Config):
            label = documented.__name__
            if getattr(algorithms, label, None) is not documented or label not in algorithms.__all__:
                missing.append(f"src/metalearn/algorithms/__init__.py: import {label} and list it in __all__")
            if not any(f"::: {prefix}.{label}\n" in api for prefix in ("metalearn", "metalearn.algorithms")):
                missing.append(f"docs/api.md: `::: metalearn.algorithms.{label}` (in the methods' section)")
        page = docs / "methods" / f"{name}.md"
        if f"methods/{name}.md" not in in_nav:
            missing.append(f"mkdocs.yml: `- TITLE: methods/{name}.md` under nav's Methods")
        if not page.is_file():
            missing.append(f"docs/methods/{name}.md: {name}'s page (the method, its options, how to run it)")
            continue
        text = page.read_text()
        if name not in OPTIONS_MARKER.findall(text):
            missing.append(f"docs/methods/{name}.md: `<!-- options: {name}; SETTING; ... -->` where its options "
                           "table goes (scripts/docs_hooks.py generates it there when the site builds)")
    for page in sorted((docs / "methods").glob("*.md")):
        if page.stem in methods:
            continue
        method, preset = PRESET_PAGES.get(page.stem, (None, None))
        if method not in methods or preset not in methods[method].presets:
            missing.append(f"docs/methods/{page.name}: the page of no registered method or preset; register the method "
                           "or name the preset in PRESET_PAGES of tests/test_docs.py")
        elif f"methods/{page.name}" not in in_nav:
            missing.append(f"mkdocs.yml: `- TITLE: methods/{page.name}` under nav's Methods")
    return missing


def test_every_module_and_method_is_documented_where_adding_a_method_says():
    """docs/design.md's map of the package names every module (a newcomer reads the code from
    it), and every registered method has its registry line, page, nav line, options table and
    API entries: all that is missing, for every method, in one failure."""
    missing = method_docs_missing()
    assert not missing, ("documentation is missing (\"Adding a method\" in docs/design.md); add:\n  "
                         + "\n  ".join(missing))


def test_what_a_method_lacks_is_all_named_at_once(monkeypatch):
    """A method registered but documented nowhere: each place it needs is named, with the
    already documented methods' places not."""
    from metalearn.algorithms import METHODS, ProtoNet

    class Undocumented(ProtoNet):
        name = "undocumented"

    Undocumented.__module__ = "metalearn.algorithms.undocumented"
    monkeypatch.setitem(METHODS, "undocumented", Undocumented)
    missing = method_docs_missing()
    assert [line.split(":")[0] for line in missing] == ["src/metalearn/algorithms/__init__.py", "docs/api.md",
                                                        "mkdocs.yml", "docs/methods/undocumented.md"], missing
    assert "`- TITLE: methods/undocumented.md` under nav's Methods" in missing[2]


# the imports inside functions that look forward, each named in docs/design.md's Layers:
# (importing module or package, imported one)
FORWARD_INSIDE_FUNCTIONS = {("datasets", "data"), ("datasets", "tasks"), ("datasets", "envs"), ("datasets", "config"),
                            ("tasks", "envs"), ("config", "algorithms"), ("algorithms", "prediction")}


def test_modules_import_at_their_top_only_what_the_design_map_lists_before_them():
    """The order of docs/design.md's map is the layering: a module-level import of a module on a
    later line of the map (or absent from it) is one that runs upward. Inside functions, only
    the forward imports that docs/design.md names (:data:`FORWARD_INSIDE_FUNCTIONS`)."""
    import ast

    design = (PROJECT / "docs" / "design.md").read_text()
    block = design[design.index("```text\nmetalearn/"):]
    block = block[:block.index("\n```", 4)]
    rank: dict[str, int] = {}
    for line in block.splitlines()[1:]:
        if re.match(r"  \S", line):  # a line of its own; continuation lines are deeper
            head = re.split(r"\s{2,}", line.strip())[0]
            for name in re.findall(r"(\w+)(?:\.py|/)", head):
                rank[name] = len(rank)
    assert {"errors", "config", "algorithms", "training", "cli"} <= rank.keys(), rank
    upward, inside = [], set()
    for path in sorted((PROJECT / "src" / "metalearn").rglob("*.py")):
        me = path.relative_to(PROJECT / "src" / "metalearn").parts[0].removesuffix(".py")
        if me in ("__init__", "__main__"):
            continue
        tree = ast.parse(path.read_text())
        top = set(map(id, tree.body))
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("metalearn."):
                target = node.module.split(".")[1]
                if target != me and rank.get(target, len(rank)) > rank.get(me, len(rank)):
                    if id(node) in top:
                        upward.append(f"{path.name}: from {node.module} import ...")
                    else:
                        inside.add((me, target))
    assert not upward, upward
    assert inside <= FORWARD_INSIDE_FUNCTIONS, sorted(inside - FORWARD_INSIDE_FUNCTIONS)


def heading_anchors(text: str) -> set[str]:
    """The anchors MkDocs gives a page's headings (Python-Markdown's toc slugify: ASCII, lower
    case, punctuation dropped, runs of spaces and hyphens made one hyphen), fenced code left out."""
    import unicodedata

    anchors = set()
    for line in re.sub(r"```.*?```", "", text, flags=re.DOTALL).splitlines():
        heading = re.match(r"#{1,6}\s+(.*?)\s*#*\s*$", line)
        if heading:
            title = re.sub(r"`([^`]*)`", r"\1", heading.group(1))
            title = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", title)
            title = unicodedata.normalize("NFKD", title).encode("ascii", "ignore").decode()
            title = re.sub(r"[^\w\s-]", "", title).strip().lower()
            anchors.add(re.sub(r"[-\s]+", "-", title))
    return anchors


def test_readme_links_lead_somewhere():
    """README.md is the first screen and not part of the site that `mkdocs build --strict`
    checks: every relative link in it names a file of the project, and every #anchor into a
    page one of that page's headings."""
    readme = (PROJECT / "README.md").read_text()
    links = re.findall(r"\]\(([^)\s]+)\)", readme)
    assert len(links) >= 20, links
    broken = []
    for link in links:
        if re.match(r"[a-z]+://", link):
            continue
        path, _, anchor = link.partition("#")
        target = PROJECT / path if path else PROJECT / "README.md"
        if not target.exists():
            broken.append(f"{link}: no such file")
        elif anchor and target.suffix == ".md" and anchor not in heading_anchors(target.read_text()):
            broken.append(f"{link}: no heading with that anchor")
    assert not broken, broken
    assert heading_anchors("## Sinusoid regression (paper section 5.1)\n```\n# not a heading\n```\n"
                           "### `--task-chunk`: one [link](x.md)\n") == {
        "sinusoid-regression-paper-section-51", "-task-chunk-one-link"}


# what `metalearn.X` must hold beyond the classes and functions every tutorial imports: the
# function of each command (docs/api.md's table) and the errors and warnings the docs tell users
# to catch or filter
COMMAND_FUNCTIONS = {"resolve_config", "train", "build_trainer", "evaluate_run", "plot_run", "export_results",
                     "run_status", "predict_run", "sample_run", "summarize_runs", "compare_learners"}
ERRORS = {"MetalearnError", "ConfigError", "OptionError", "TrainingStopped", "TrainingInterrupted",
          "MetalearnWarning", "OptionWarning"}


def test_every_exported_name_is_its_home_module_s_object_and_documented_by_it():
    """Every name of ``metalearn.__all__`` imports from ``metalearn`` (also with ``import *``) as
    the very object its home module defines, so that ``except metalearn.TrainingInterrupted``
    catches what training raises; the commands' functions and the errors are among them; and
    docs/api.md documents and links each exported object by its top-level name, not by the
    module path it is also reachable under (``metalearn.api.run_status``)."""
    import importlib

    import metalearn

    exported = metalearn.__all__
    assert len(set(exported)) == len(exported), sorted(name for name in exported if exported.count(name) > 1)
    assert COMMAND_FUNCTIONS | ERRORS <= set(exported), sorted(COMMAND_FUNCTIONS | ERRORS - set(exported))
    star: dict = {}
    exec("from metalearn import *", star)
    homes = {"METHODS": "metalearn.algorithms"}  # a dict: it has no __module__ of its own
    for name in exported:
        obj = getattr(metalearn, name)
        assert star[name] is obj, name
        home = importlib.import_module(homes.get(name) or obj.__module__)
        assert getattr(home, name) is obj, f"metalearn.{name} is not {home.__name__}.{name}"
    api = (PROJECT / "docs" / "api.md").read_text()
    targets = re.findall(r"^::: (\S+)", api, re.MULTILINE) + re.findall(r"\]\[([\w.]+)\]", api)
    by_module_path = sorted({target for target in targets if target.count(".") >= 2
                             and target.rsplit(".", 1)[1] in exported
                             and getattr(metalearn, target.rsplit(".", 1)[1]) is _resolved(target)})
    assert not by_module_path, f"docs/api.md: name these by their top-level names (metalearn.X): {by_module_path}"
    assert {f"metalearn.{name}" for name in COMMAND_FUNCTIONS | ERRORS} <= set(targets)


def _resolved(path: str):
    """The object a dotted path names: the longest importable module, then its attributes."""
    import importlib

    parts = path.split(".")
    for end in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:end]))
        except ImportError:
            continue
        for part in parts[end:]:
            obj = getattr(obj, part)
        return obj
    raise ImportError(path)
