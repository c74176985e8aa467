"""Plugins: methods, networks, datasets and environments of your own, known to every metalearn
process (the command line, its torchrun ranks, a later ``metalearn eval`` of the run) without a
script wrapped around the command line.

A plugin is a Python module that registers what it adds when it is imported
(:func:`metalearn.register_method`, :func:`metalearn.models.register_network`,
:func:`metalearn.datasets.register_dataset`, :func:`metalearn.register_environment`). metalearn
imports, once per process:

- each module named in the environment variable ``METALEARN_PLUGINS``: names separated by
  commas, each an importable module (``my_package.my_method``) or the path of a ``.py`` file
  (``./my_method.py``, ``~/meta/my_env.py``);
- each entry point of the group ``metalearn.plugins`` of the installed packages (in a package's
  ``pyproject.toml``: ``[project.entry-points."metalearn.plugins"]`` ``mine = "my_package.plugin"``);
  an entry point that names a function (``"my_package.plugin:register"``) is called with no
  arguments.

The command line loads them before it reads its arguments (so ``--help`` lists their methods);
the Python API loads them the first time it meets a method, dataset or network name that nothing
has registered, so that a script needs no import of its own to read a run trained with a plugin.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import importlib.util
import os
import sys
import warnings
from pathlib import Path

from metalearn.errors import MetalearnError

ENVIRONMENT_VARIABLE = "METALEARN_PLUGINS"
ENTRY_POINT_GROUP = "metalearn.plugins"

_loaded: tuple[str, ...] | None = None  # what load_plugins imported, once it has succeeded
_loading = False  # a plugin's own import that looks a name up must not load the plugins again


def load_plugins() -> tuple[str, ...]:
    """Import the plugins (see the module docstring) unless this process has already; returns
    what was loaded, each as ``METALEARN_PLUGINS`` or the entry point names it.

    A plugin that fails to import is one :class:`MetalearnError` naming it, where it was named
    and what it raised; it is tried again at the next call."""
    global _loaded, _loading
    if _loaded is not None or _loading:
        return _loaded or ()
    _loading = True
    try:
        loaded = [_load_named(entry) for entry in plugin_names()]
        for point in _entry_points():
            loaded.append(_load_entry_point(point))
        _loaded = tuple(loaded)
    finally:
        _loading = False
    return _loaded


def plugin_names() -> list[str]:
    """The entries of ``METALEARN_PLUGINS``, in order, blanks dropped."""
    return [entry.strip() for entry in os.environ.get(ENVIRONMENT_VARIABLE, "").split(",") if entry.strip()]


def _entry_points() -> list[importlib.metadata.EntryPoint]:
    return sorted(importlib.metadata.entry_points(group=ENTRY_POINT_GROUP), key=lambda point: point.name)


def _is_path(entry: str) -> bool:
    return entry.endswith(".py") or "/" in entry or os.sep in entry or entry.startswith("~")


def _load_named(entry: str) -> str:
    where = f"{entry!r} of {ENVIRONMENT_VARIABLE}"
    try:
        if _is_path(entry):
            _import_file(entry, where)
        else:
            importlib.import_module(entry)
    except MetalearnError:
        raise
    except ModuleNotFoundError as err:
        if err.name == entry.split(".")[0]:  # the plugin itself, not a module it imports
            raise MetalearnError(f"plugin {where}: no module named {entry!r} on the Python path (a file of your "
                                 f"own: give its path, e.g. {ENVIRONMENT_VARIABLE}=./{entry}.py)") from None
        raise MetalearnError(f"plugin {where} could not be imported: {type(err).__name__}: {err}") from err
    except Exception as err:  # whatever the plugin's own code raised, named with the plugin
        raise MetalearnError(f"plugin {where} could not be imported: {type(err).__name__}: {err}") from err
    return entry


def _import_file(entry: str, where: str) -> None:
    """Import the ``.py`` file ``entry`` as a module named after the file, once: a second entry
    of the same file, or a module of that name imported from it already, is not run again."""
    path = Path(entry).expanduser().resolve()
    if not path.is_file():
        raise MetalearnError(f"plugin {where}: no file {path}")
    name = path.stem
    existing = sys.modules.get(name)
    if existing is not None:
        if getattr(existing, "__file__", None) and Path(existing.__file__).resolve() == path:
            return
        name = f"metalearn_plugin_{path.stem}"  # a module of that name is another file (or built in)
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise MetalearnError(f"plugin {where}: {path} is not a Python module")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # before running it, as an import does: its classes name their module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[name]
        raise


def _load_entry_point(point: importlib.metadata.EntryPoint) -> str:
    package = getattr(point.dist, "name", None)
    where = f"entry point {point.name!r} ({point.value}" + (f", package {package})" if package else ")")
    try:
        loaded = point.load()
        if callable(loaded) and not isinstance(loaded, type):
            loaded()
    except Exception as err:
        raise MetalearnError(f"plugin {where} of group {ENTRY_POINT_GROUP} failed: {type(err).__name__}: {err}") from err
    return point.name


def unknown_hint() -> str:
    """The remedy for a name nothing has registered, for the end of a message."""
    return f"one of your own: name its module in {ENVIRONMENT_VARIABLE}"


def warn_if_replacing(kind: str, name: str, built_in: frozenset[str], same: bool) -> None:
    """Warn that a registration replaces the built-in ``kind`` called ``name`` (``same``: it
    registers the built-in itself again, which changes nothing and is not warned about): a run
    of that name then trains something else than the documentation and its records say."""
    if name in built_in and not same:
        warnings.warn(f"this registration replaces metalearn's built-in {kind} {name!r} in this process: runs that name "
                      f"it train and read the new one (choose another name to keep both)", stacklevel=3)
