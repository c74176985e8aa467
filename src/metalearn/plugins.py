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

The command line loads them before it reads its arguments (so ``--help`` lists their methods,
and ``--dataset`` and ``--model`` the names they registered that the method takes);
the Python API at its first look at a method, dataset or network name, so that a script needs
no import of its own to read a run trained with a plugin, and reads a built-in name as a plugin
replaced it, as the command line does.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import importlib.util
import os
import shlex
import sys
import warnings
from pathlib import Path
from typing import Any

from metalearn.errors import MetalearnError, caller_level, MetalearnWarning

ENVIRONMENT_VARIABLE = "METALEARN_PLUGINS"
ENTRY_POINT_GROUP = "metalearn.plugins"
NO_ENTRY_POINTS = "METALEARN_DISABLE_PLUGIN_AUTOLOAD"  # set (to anything but 0 or ""): no entry point is loaded

_loaded: tuple[str, ...] | None = None  # what load_plugins imported, once all have been
_pending: list | None = None  # while loading: the plugins not yet begun, ("named", entry) or ("entry point", point)
_done: list[str] = []  # while loading: what the outermost call loads, in order
_imported: set[str] = set()  # every plugin imported in this process: a retry after a failure skips them
_files: dict[Path, str] = {}  # a plugin file -> the module name it was imported as
_depth = 0  # load_plugins calls under way: a plugin's import may look a name up, which loads the rest
_importing: list[dict[str, Any]] = []  # the plugins being imported, innermost last (see source_of)
_sources: dict[tuple[str, str], dict[str, Any]] = {}  # (kind, name) -> where its registration came from
_named: list[dict[str, Any]] = []  # every METALEARN_PLUGINS plugin imported, as another process names it


class PluginError(MetalearnError):
    """A plugin that could not be loaded: the message names it, where it was named and what it
    raised."""


def load_plugins() -> tuple[str, ...]:
    """Import the plugins (see the module docstring) unless this process has already; returns
    what was loaded, each as ``METALEARN_PLUGINS`` or the entry point names it.

    A plugin whose import looks up a name (a method whose default network another plugin
    registers) gets the plugins after it loaded first, whatever their order. A plugin that fails
    to import is one :class:`PluginError` naming it, where it was named and what it raised
    (also a refusal of what it registers); at the next call the plugins not yet imported are
    tried again. Does nothing while metalearn itself is still being imported (a plugin imports
    it)."""
    global _loaded, _pending, _done, _depth
    if _loaded is not None:
        return _loaded
    if not hasattr(sys.modules.get("metalearn"), "__version__"):  # set at the end of metalearn/__init__.py
        return ()
    if _pending is None:  # the outermost call: what to load
        points = [] if os.environ.get(NO_ENTRY_POINTS, "") not in ("", "0") else _entry_points()
        _pending = [("named", entry) for entry in plugin_names()] + [("entry point", point) for point in points]
        _done = [plugin if kind == "named" else plugin.name for kind, plugin in _pending]  # in order
    _depth += 1
    try:
        while _pending:
            kind, plugin = _pending.pop(0)
            key = plugin if kind == "named" else f"entry point {plugin.name}={plugin.value}"
            if key not in _imported:
                _load_named(plugin) if kind == "named" else _load_entry_point(plugin)
                _imported.add(key)
    except BaseException:
        _pending = None  # the next call begins again, past those imported already
        raise
    finally:
        _depth -= 1
    if _depth > 0:  # a plugin's lookup, within the outermost call: the rest is loaded, its own import goes on
        return ()
    _loaded, _pending = tuple(_done), None
    return _loaded


def plugin_names() -> list[str]:
    """The entries of ``METALEARN_PLUGINS``, in order, blanks dropped."""
    return [entry.strip() for entry in os.environ.get(ENVIRONMENT_VARIABLE, "").split(",") if entry.strip()]


def _entry_points() -> list[importlib.metadata.EntryPoint]:
    return sorted(importlib.metadata.entry_points(group=ENTRY_POINT_GROUP), key=lambda point: point.name)


def _is_path(entry: str) -> bool:
    return entry.endswith(".py") or "/" in entry or os.sep in entry or entry.startswith("~")


def _load_named(entry: str) -> None:
    where = f"{entry!r} of {ENVIRONMENT_VARIABLE}"
    # how another process, in another folder, names this plugin: a file's absolute path, a module's
    # name; the registrations made while it is imported share this dict (see registering), which
    # _import_module completes where the module was found in the current folder
    source: dict[str, Any] = {"plugin": entry}
    _importing.append(source)
    try:
        if _is_path(entry):
            source["plugin"] = str(Path(entry).expanduser().resolve())
            _import_file(entry, where)
        else:
            _import_module(entry, source)
        _named.append(source)
    except PluginError:  # another plugin's, loaded from within this one's import: named already
        raise
    except ModuleNotFoundError as err:
        if err.name == entry.split(".")[0]:  # the plugin itself, not a module it imports
            file = "" if "." in entry else f" (a file of your own: give its path, e.g. {ENVIRONMENT_VARIABLE}=./{entry}.py)"
            raise PluginError(f"plugin {where}: no module named {entry!r} on the Python path or in the current "
                              f"folder{file}") from None
        raise PluginError(f"plugin {where} could not be imported: {type(err).__name__}: {err}") from err
    except MetalearnError as err:  # metalearn refused what it registers: the plugin is named with it
        raise PluginError(f"plugin {where}: {err}") from err
    except Exception as err:  # whatever the plugin's own code raised, named with the plugin
        raise PluginError(f"plugin {where} could not be imported: {type(err).__name__}: {err}") from err
    finally:
        _importing.pop()


def _import_module(name: str, source: dict[str, Any]) -> None:
    """Import the module ``name`` from the Python path or, failing that, the current folder: the
    ``metalearn`` command does not search the current folder, ``python -m metalearn`` and
    torchrun do, and a plugin must be found alike by the process that trains and the one that
    evaluates. ``source``: how another process names it, completed for one found in the current
    folder (a module's file as an absolute path; a package's module with that folder)."""
    try:
        if name not in sys.modules and _file_of_module(name) in _files:  # imported as a file plugin already
            return
        module = importlib.import_module(name)
    except ModuleNotFoundError as err:
        here = os.getcwd()
        if err.name != name.split(".")[0] or here in sys.path or "" in sys.path:
            raise
        sys.path.append(here)
        if "." in name:
            source["folder"] = here
        else:
            source["plugin"] = str(_file_of_module(name) or name)
        try:
            module = importlib.import_module(name)
        finally:
            sys.path.remove(here)
    if getattr(module, "__file__", None) is None and list(getattr(module, "__path__", [])):
        # a folder without __init__.py imports as a namespace package, which runs no code: nothing
        # would be registered, and the run would fail later on a name not known
        raise PluginError(f"plugin {name!r} of {ENVIRONMENT_VARIABLE}: {_a_folder(Path(list(module.__path__)[0]))}")


def _a_folder(path: Path) -> str:
    """What to say of a plugin entry naming the folder ``path``: importing a folder runs no
    code, so what to give instead, a ``.py`` file in it or, for a package, its module's name."""
    if (path / "__init__.py").is_file():
        instead = (f"its package's name ({ENVIRONMENT_VARIABLE}={path.name}, from the folder holding it or installed) "
                   "or one of its .py files")
    else:
        files = sorted(child.name for child in path.glob("*.py"))
        example = path / files[0] if files else "./my_plugin.py"
        instead = f"a .py file ({ENVIRONMENT_VARIABLE}={example}) or an importable module's name"
    return f"{path} is a folder, not a plugin: give {instead}"


def _import_file(entry: str, where: str) -> None:
    """Import the ``.py`` file ``entry`` (a relative path from the current folder), once per
    file however it is spelt, under a module name of its own (``metalearn_plugin_<name>_<n>``),
    so that a plugin called ``matplotlib.py`` or two files called ``plugin.py`` shadow nothing."""
    path = Path(entry).expanduser().resolve()
    if path.is_dir():
        raise PluginError(f"plugin {where}: {_a_folder(path)}")
    if not path.is_file():
        raise PluginError(f"plugin {where}: no file {path}" + (" (a relative path is read from the current folder)"
                                                              if not Path(entry).expanduser().is_absolute() else ""))
    if path in _files:
        return
    imported = next((module for module in list(sys.modules.values())
                     if _resolved(getattr(module, "__file__", None)) == path), None)
    if imported is not None:  # imported already under its own name (a module plugin, or the user's import)
        _files[path] = imported.__name__
        return
    name = f"metalearn_plugin_{path.stem}_{len(_files)}"
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise PluginError(f"plugin {where}: {path} is not a Python module")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # before running it, as an import does: its classes name their module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[name]
        raise
    _files[path] = name


def _resolved(file: str | None) -> Path | None:
    try:
        return Path(file).resolve() if isinstance(file, str) else None
    except (OSError, RuntimeError):
        return None


def _file_of_module(name: str) -> Path | None:
    """The file the module ``name`` would be imported from (None: not found, or not a file)."""
    try:
        spec = importlib.util.find_spec(name)
    except (ImportError, ValueError):
        return None
    return _resolved(spec.origin) if spec is not None and spec.has_location else None


def _load_entry_point(point: importlib.metadata.EntryPoint) -> None:
    package = getattr(point.dist, "name", None)
    where = f"entry point {point.name!r} ({point.value}" + (f", package {package})" if package else ")")
    _importing.append({"entry_point": point.name, "package": package or point.value.split(":")[0].split(".")[0]})
    try:
        loaded = point.load()
        if callable(loaded) and not isinstance(loaded, type):
            loaded()
    except PluginError:
        raise
    except Exception as err:
        raise PluginError(f"plugin {where} of group {ENTRY_POINT_GROUP} failed: {type(err).__name__}: {err} "
                          f"(fix or uninstall {package or 'its package'}, or set {NO_ENTRY_POINTS}=1 to load no entry "
                          "point)") from err
    finally:
        _importing.pop()


def plugin_file_module(path: Path | str) -> str | None:
    """The module name a plugin file was imported as (None: not imported)."""
    return _files.get(Path(path).expanduser().resolve())


def unknown_hint() -> str:
    """The remedy for a name nothing has registered, for the end of a message: the plugins this
    process loaded, where it loaded any (the name may be misspelt, or in a plugin not named)."""
    if _loaded:
        return f"plugins loaded: {', '.join(_loaded)}; one of your own: name its module in {ENVIRONMENT_VARIABLE}"
    return f"one of your own: name its module in {ENVIRONMENT_VARIABLE}"


def registering(kind: str, name: str, built_in: frozenset[str], same: bool) -> None:
    """Note that ``kind`` (``"method"``, ``"network"`` or ``"dataset"``) ``name`` is being
    registered: where from (:func:`source_of`), and a warning where it replaces the built-in of
    that name (``same``: it registers the built-in itself again, which changes nothing and is not
    warned about): a run of that name then trains something else than the documentation and its
    records say. Called by each ``register_*`` function, from the user's code."""
    frame = sys._getframe(1)  # the user's code: past register_environment's call of register_dataset
    while frame is not None and frame.f_globals.get("__name__", "").split(".")[0] == "metalearn":
        frame = frame.f_back
    if name in built_in and not same:
        warnings.warn(f"this registration replaces metalearn's built-in {kind} {name!r} in this process: runs that name "
                      f"it train and read the new one (choose another name to keep both)", MetalearnWarning,
                      stacklevel=caller_level())
    if same or not hasattr(sys.modules.get("metalearn"), "__version__"):  # the same again, or a built-in
        return
    if _importing:
        _sources[(kind, name)] = _importing[-1]  # shared: _import_module may complete it
        return
    module = frame.f_globals.get("__name__", "") if frame is not None else ""
    file = frame.f_globals.get("__file__") if frame is not None else None
    _sources[(kind, name)] = {"module": module, **({"file": str(Path(file).resolve())} if file else {})}


def source_of(kind: str, name: str) -> dict[str, Any] | None:
    """Where this process's registration of ``kind`` ``name`` came from, for a run's
    ``config.json`` (so that a process without it can say what to load): ``{"plugin": entry}``
    (the ``METALEARN_PLUGINS`` entry, a file's as an absolute path), ``{"entry_point": name,
    "package": package}``, or, registered outside a plugin, ``{"module": name, "file": path}``
    of the code that called the ``register_*`` function. A plugin's also holds ``"with"``, every
    ``METALEARN_PLUGINS`` plugin of this process (one may need another to import), and ``"folder"``
    where its module was found only in the current folder. None for a built-in never replaced."""
    source = _sources.get((kind, name))
    if source is None:
        return None
    if "plugin" not in source:
        return dict(source)
    named = list(dict.fromkeys(entry["plugin"] for entry in _named if entry is not source))
    return {**source, "with": [source["plugin"], *named]} if named else dict(source)


def remedy(source: Any) -> str:
    """What loads the registration ``source`` (:func:`source_of`, as a run's config.json holds
    it) into another process, for the end of a message; "" for one not understood."""
    if not isinstance(source, dict):
        return ""
    if isinstance(source.get("plugin"), str):
        together = source.get("with")
        value = ",".join(together) if isinstance(together, list) and all(isinstance(e, str) for e in together) \
            else source["plugin"]
        folder = (f" with {source['folder']} on PYTHONPATH" if isinstance(source.get("folder"), str) else "")
        return (f"the run was trained with the plugin {source['plugin']}: set "
                f"{ENVIRONMENT_VARIABLE}={shlex.quote(value)}{folder}")
    if isinstance(source.get("entry_point"), str):
        trained = (f"the run was trained with the entry point {source['entry_point']!r} of the package "
                   f"{source.get('package')}")
        if os.environ.get(NO_ENTRY_POINTS, "") not in ("", "0"):  # installed or not, none is loaded
            return f"{trained}, and {NO_ENTRY_POINTS} is set, which loads no entry point: unset it"
        return f"{trained}: install that package"
    module, file = source.get("module"), source.get("file")
    if module == "__main__":
        return (f"the run was trained by {file or 'a script'}, which registered it: move the registration into a "
                f"module of its own and name that module in {ENVIRONMENT_VARIABLE}")
    if isinstance(module, str) and "." in module:  # a package's module: named, its file alone loses the package
        root = _package_root(module, file)
        return (f"the run's process registered it in the module {module}, which is not a plugin: name it in "
                f"{ENVIRONMENT_VARIABLE}={module}" + (f" (with {root} on PYTHONPATH unless its package is installed)"
                                                       if root else ""))
    if isinstance(module, str) and module:
        return (f"the run's process registered it in {file or 'the module ' + module}, which is not a plugin: name it in "
                f"{ENVIRONMENT_VARIABLE}={shlex.quote(file or module)}")
    return ""


def _package_root(module: str, file: Any) -> str | None:
    """The folder that holds the top package of ``module`` (``a.b`` in ``/x/a/b.py``: ``/x``)."""
    if not isinstance(file, str):
        return None
    path = Path(file)
    depth = module.count(".") + (path.name == "__init__.py")
    return str(path.parents[depth]) if depth < len(path.parents) else None
