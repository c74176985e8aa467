"""Plugins: a method, network or environment of the user's, registered in a module that
METALEARN_PLUGINS or an installed package's entry point names, is known to every metalearn
process: the one that trains, a later one that evaluates, the command line's help."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import textwrap
import warnings

import pytest
import torch

import metalearn.plugins as plugins
from metalearn.errors import MetalearnError

# a point on a line that walks to its task's goal: observation its position, action its step
# (clipped to 0.2), reward minus its distance to the goal; 10 steps, so a return lies in [-20, 0]
PLUGIN = '''
import torch
from torch import nn

from metalearn import register_environment
from metalearn.models import Network, register_network


class WalkToGoal:
    name = "toy-walk"
    observation_dim, action_dim, horizon = 1, 1, 10

    def sample_tasks(self, num_tasks, generator):
        return {"goal": torch.rand(num_tasks, 1, generator=generator) * 2 - 1}

    def reset(self, params, trajectories, seeds=None):
        position = torch.zeros(params["goal"].shape[0], trajectories, 1)
        return (position, params["goal"]), position

    def step(self, state, action):
        position, goal = state
        position = position + action.clamp(-0.2, 0.2)
        reward = -(position - goal[:, None]).abs().squeeze(-1)
        return (position, goal), position, reward, torch.zeros_like(reward, dtype=torch.bool)


register_environment("toy-walk", WalkToGoal)
register_network(Network("toy-mlp", lambda shape, out: nn.Sequential(nn.Linear(shape[0], 16), nn.ReLU(),
                                                                     nn.Linear(16, out)),
                         True, False, "vector", "a hidden layer of 16 units"))
'''


def metalearn(args, env=None, cwd=None):
    """``python -m metalearn ARGS`` in a new process: (exit code, stdout, stderr)."""
    environment = {key: value for key, value in os.environ.items() if key != plugins.ENVIRONMENT_VARIABLE}
    environment.update(env or {})
    done = subprocess.run([sys.executable, "-m", "metalearn", *map(str, args)], capture_output=True, text=True,
                          env=environment, cwd=cwd, timeout=600)
    return done.returncode, done.stdout, done.stderr


@pytest.fixture
def fresh_plugins(monkeypatch):
    """This process as if it had loaded no plugin yet; what a test registers is removed after it."""
    from metalearn.algorithms import METHODS
    from metalearn.datasets import DATASETS
    from metalearn.models import NETWORKS

    registries = [(registry, dict(registry)) for registry in (METHODS, DATASETS, NETWORKS)]
    for name, value in (("_loaded", None), ("_pending", None), ("_depth", 0), ("_imported", set()), ("_files", {}),
                        ("_importing", []), ("_sources", {}), ("_named", [])):
        monkeypatch.setattr(plugins, name, value)
    yield
    for registry, before in registries:
        registry.clear()
        registry.update(before)


def test_an_environment_and_a_network_of_a_plugin_file_train_and_evaluate_in_new_processes(tmp_path):
    plugin = tmp_path / "walk.py"
    plugin.write_text(PLUGIN)
    named = {plugins.ENVIRONMENT_VARIABLE: str(plugin)}
    run_dir = tmp_path / "policy"
    code, out, err = metalearn(["train", "maml-rl", "--env", "toy-walk", "--steps", 2, "--meta-batch-size", 4,
                                "--trajectories", 4, "--test-trajectories", 4, "--hidden", 8, "--eval-episodes", 4,
                                "--no-eval", "--no-progress", "--run-dir", run_dir], named)
    assert code == 0, err
    config = json.loads((run_dir / "config.json").read_text())
    assert config["task"]["dataset"] == "toy-walk"
    # the policy took the environment's sizes: one observation in, one action's mean out
    weights = torch.load(run_dir / "checkpoint.pt", weights_only=True)["learner"]
    shapes = sorted(tuple(value.shape) for value in weights.values())
    assert (8, 1) in shapes and (1, 8) in shapes
    code, out, err = metalearn(["eval", run_dir, "--no-progress"], named, cwd=tmp_path)
    assert code == 0, err
    result = json.loads((run_dir / "eval.json").read_text())
    assert len(result["per_step"]) == 4 and all(-20 <= value <= 0 for value in result["per_step"])
    # a process without the plugin says what the run needs, in one line
    code, out, err = metalearn(["eval", run_dir, "--no-progress"])
    assert code == 2 and err.count("\n") == 1, err
    # config.json recorded the plugin (as another folder reads it), so the message names it
    assert err.endswith(f"config.json: the run's dataset 'toy-walk' is not known to this process: the run was trained "
                        f"with the plugin {tmp_path / 'walk.py'}: set METALEARN_PLUGINS={tmp_path / 'walk.py'}\n"), err

    run_dir = tmp_path / "regression"
    code, out, err = metalearn(["train", "maml", "--dataset", "sinusoid", "--model", "toy-mlp", "--steps", 2,
                                "--meta-batch-size", 2, "--val-every", 0, "--eval-episodes", 2, "--no-progress",
                                "--run-dir", run_dir], named)
    assert code == 0, err
    weights = torch.load(run_dir / "checkpoint.pt", weights_only=True)["learner"]
    assert sorted(tuple(value.shape) for value in weights.values() if value.dim() == 2) == [(1, 16), (16, 1)]
    code, out, err = metalearn(["eval", run_dir, "--no-progress"])
    assert code == 2 and err.count("\n") == 1 and "'toy-mlp'" in err and "METALEARN_PLUGINS" in err, err


def test_an_installed_packages_entry_point_registers_its_method_for_the_help_and_for_training(tmp_path):
    (tmp_path / "toy_package.py").write_text(textwrap.dedent('''
        from metalearn import MAML, register_method


        def register():
            register_method(type("ToyMAML", (MAML,), {"name": "toy-maml", "__module__": __name__}))
        '''))
    info = tmp_path / "toy_package-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: toy-package\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text("[metalearn.plugins]\ntoy = toy_package:register\n")
    installed = {"PYTHONPATH": os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")])}
    code, out, err = metalearn(["train", "--help"], installed)
    assert code == 0 and "toy-maml" in out, err
    code, out, err = metalearn(["train", "toy-maml", "--dataset", "sinusoid", "--steps", 1, "--meta-batch-size", 2,
                                "--val-every", 0, "--no-eval", "--no-progress", "--run-dir", tmp_path / "run"], installed)
    assert code == 0, err
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert config["method"] == "toy-maml"
    assert config["plugins"] == [{"kind": "method", "name": "toy-maml", "entry_point": "toy", "package": "toy-package"}]
    code, out, err = metalearn(["eval", tmp_path / "run", "--no-progress"])  # not installed here: what to install
    assert code == 2 and err.endswith("the run's method 'toy-maml' is not known to this process: the run was trained "
                                      "with the entry point 'toy' of the package toy-package: install that package\n")
    off = {**installed, "METALEARN_DISABLE_PLUGIN_AUTOLOAD": "1"}  # installed, but no entry point is loaded
    code, out, err = metalearn(["eval", tmp_path / "run", "--no-progress"], off)
    assert code == 2 and err.endswith("of the package toy-package, and METALEARN_DISABLE_PLUGIN_AUTOLOAD is set, which "
                                      "loads no entry point: unset it\n"), err
    code, out, err = metalearn(["train", "toy-maml", "--steps", 1])  # not installed here: said so
    assert code == 2 and err.startswith("error: no method 'toy-maml'; the methods: maml, protonet, "), err
    assert "(one of your own: name its module in METALEARN_PLUGINS)" in err


@pytest.mark.parametrize("entry, said", [
    ("no_such_plugin_module", "no module named 'no_such_plugin_module' on the Python path or in the current folder "
                              "(a file of your own: give its path, e.g. METALEARN_PLUGINS=./no_such_plugin_module.py)"),
    ("./missing.py", "no file "),
    ("./broken.py", "could not be imported: ZeroDivisionError: division by zero"),
    ("~no_such_user_of_metalearn/p.py", "could not be imported: RuntimeError: "),
])
def test_a_plugin_that_does_not_load_is_one_line_naming_it(entry, said, tmp_path):
    (tmp_path / "broken.py").write_text("1 / 0\n")
    code, out, err = metalearn(["train", "maml", "--dataset", "sinusoid", "--steps", 1, "--run-dir", tmp_path / "run"],
                               {plugins.ENVIRONMENT_VARIABLE: entry}, cwd=tmp_path)
    assert code == 2 and err.count("\n") == 1 and err.startswith(f"error: plugin '{entry}' of METALEARN_PLUGINS"), err
    assert said in err and not (tmp_path / "run").exists()


def test_a_plugin_entry_naming_a_folder_says_it_is_one_and_what_to_give(fresh_plugins, tmp_path, monkeypatch):
    """Importing a folder runs no plugin code: a path to one, or the name of a folder without
    __init__.py (which Python imports as an empty namespace package, registering nothing), is
    refused in one line saying it is a folder, with a .py file or a module's name to give."""
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "walk.py").write_text(PLUGIN)
    (tmp_path / "toy_plugin_package").mkdir()
    (tmp_path / "toy_plugin_package" / "__init__.py").write_text("")
    (tmp_path / "toy_plugin_namespace").mkdir()
    monkeypatch.chdir(tmp_path)
    for entry, said in [
        ("./mine", f"{tmp_path / 'mine'} is a folder, not a plugin: give a .py file "
                   f"(METALEARN_PLUGINS={tmp_path / 'mine' / 'walk.py'}) or an importable module's name"),
        ("mine/", "is a folder, not a plugin"),
        ("./toy_plugin_package", "is a folder, not a plugin: give its package's name "
                                 "(METALEARN_PLUGINS=toy_plugin_package, from the folder holding it or installed)"),
        ("toy_plugin_namespace", f"{tmp_path / 'toy_plugin_namespace'} is a folder, not a plugin: give a .py file "
                                 "(METALEARN_PLUGINS=./my_plugin.py) or an importable module's name"),
    ]:
        monkeypatch.setenv(plugins.ENVIRONMENT_VARIABLE, entry)
        with pytest.raises(plugins.PluginError) as raised:
            plugins.load_plugins()
        message = str(raised.value)
        assert message.startswith(f"plugin {entry!r} of METALEARN_PLUGINS: ") and said in message, message
        assert "no file" not in message and "\n" not in message
    sys.modules.pop("toy_plugin_namespace", None)


def test_the_api_loads_the_plugins_at_its_first_lookup(fresh_plugins, tmp_path, monkeypatch):
    from metalearn import resolve_config
    from metalearn.datasets import DATASETS

    plugin = tmp_path / "walk_api.py"
    plugin.write_text(PLUGIN)
    monkeypatch.setenv(plugins.ENVIRONMENT_VARIABLE, f" {plugin} ,")
    assert plugins._loaded is None and "toy-walk" not in DATASETS
    config = resolve_config("maml-rl", {"dataset": "toy-walk"})
    assert config.task.dataset == "toy-walk" and plugins._loaded == (str(plugin),)
    assert plugins.load_plugins() == (str(plugin),)  # once per process: the module is not run again
    assert sys.modules[plugins.plugin_file_module(plugin)].__file__ == str(plugin)


def test_an_environment_lacking_what_a_policy_needs_is_one_line_at_its_first_use(fresh_plugins):
    from metalearn import register_environment, resolve_config
    from metalearn.tasks import problem_of

    class Sizeless:
        horizon = 5

        def sample_tasks(self, num_tasks, generator): ...

        def reset(self, params, trajectories, seeds=None): ...

    register_environment("toy-sizeless", Sizeless)
    config = resolve_config("maml-rl", {"dataset": "toy-sizeless"})
    with pytest.raises(MetalearnError, match=r"^environment toy-sizeless: what make\(\) returned \(Sizeless\) lacks "
                                             r"step, observation_dim, action_dim \(methods"):
        problem_of(config.task)
    for name, make in (("Toy", Sizeless), ("toy", Sizeless())):
        with pytest.raises(MetalearnError, match=r"^(an environment's name must be|register_environment\('toy', make\): "
                                                 r"make must be a function)"):
            register_environment(name, make)


def test_replacing_a_built_in_warns_and_registering_it_again_does_not(fresh_plugins):
    from metalearn.algorithms import METHODS, register_method
    from metalearn.datasets import DATASETS, register_dataset
    from metalearn.models import NETWORKS, Network, register_network

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        register_method(METHODS["maml"])
        register_network(NETWORKS["mlp"])
        register_dataset(DATASETS["sinusoid"])
    with pytest.warns(UserWarning, match=r"^this registration replaces metalearn's built-in network 'mlp' in this "
                                         r"process: runs that name it train and read the new one"):
        register_network(Network("mlp", NETWORKS["conv4"].build, True, False, "vector", "another"))
    with pytest.warns(UserWarning, match="built-in method 'maml'"):
        register_method(type("OtherMAML", (METHODS["maml"],), {"name": "maml"}))


def test_config_json_records_what_registered_the_runs_parts_and_a_process_without_it_is_told(fresh_plugins, tmp_path,
                                                                                             capsys):
    """A run's method, dataset or network registered in Python is recorded in config.json with
    where its registration came from; a process without it names what to load (a plugin), or,
    for a registration in a script or a module that is no plugin, what to do."""
    from metalearn import resolve_config
    from metalearn.algorithms import METHODS
    from metalearn.runs import RunDir

    def register(code, path, name):  # run code as the module ``name`` of the file ``path``
        path.write_text(code)
        exec(compile(code, str(path), "exec"), {"__name__": name, "__file__": str(path)})

    method = "from metalearn import ProtoNet, register_method\n" \
             "register_method(type('Mine', (ProtoNet,), {'name': 'mine', '__module__': __name__}))\n"
    told = {}
    for name, file in (("__main__", "train_mine.py"), ("my_methods", "my_methods.py")):
        register(method, tmp_path / file, name)
        run = RunDir(tmp_path / name)
        run.write_config(resolve_config("mine", {"dataset": "omniglot", "ways": 5}))
        recorded = json.loads(run.config_path.read_text())["plugins"]
        assert recorded == [{"kind": "method", "name": "mine", "module": name, "file": str(tmp_path / file)}]
        del METHODS["mine"]
        with pytest.raises(MetalearnError) as caught:
            run.read_config()
        told[name] = str(caught.value)
    assert told["__main__"].endswith(f"the run's method 'mine' is not known to this process: the run was trained by "
                                     f"{tmp_path / 'train_mine.py'}, which registered it: move the registration into "
                                     "a module of its own and name that module in METALEARN_PLUGINS")
    assert told["my_methods"].endswith(f"registered it in {tmp_path / 'my_methods.py'}, which is not a plugin: name it "
                                       f"in METALEARN_PLUGINS={tmp_path / 'my_methods.py'}")
    # metalearn train mine --resume says the same where the method's command is looked for
    from cli_runner import run as cli_run

    code, _, err = cli_run(["train", "mine", "--run-dir", tmp_path / "my_methods", "--resume"], capsys)
    assert code == 2 and (f"no method 'mine' in this process: the run's process registered it in "
                          f"{tmp_path / 'my_methods.py'}, which is not a plugin") in err, err
    code, _, err = cli_run(["train", "mine", "--run-dir", tmp_path / "my_methods"], capsys)  # a new run: the list
    assert code == 2 and "no method 'mine'; the methods: maml" in err, err

    # a plugin that replaced a built-in: read without it, the run would be scored by the built-in
    built_in = METHODS["protonet"]
    with pytest.warns(UserWarning, match="replaces metalearn's built-in method 'protonet'"):
        register("from metalearn import ProtoNet, register_method\n"
                 "register_method(type('Other', (ProtoNet,), {'name': 'protonet'}))\n", tmp_path / "other.py", "other")
    run = RunDir(tmp_path / "replaced")
    run.write_config(resolve_config("protonet", {"dataset": "omniglot", "ways": 5}))
    METHODS["protonet"] = built_in
    plugins._sources.clear()
    with pytest.warns(UserWarning, match=r"the run's method 'protonet' was registered in Python, replacing "
                                         r"metalearn's own, and this process reads it as metalearn's built-in method"):
        assert run.read_config().method == "protonet"


def test_what_a_run_records_names_every_plugin_and_survives_a_resume_without_them(fresh_plugins, tmp_path,
                                                                                   monkeypatch):
    """One plugin may need another to import, and a run's parts may come from several: the remedy
    names every METALEARN_PLUGINS plugin of the training process. A module found only in the
    current folder is recorded by its file; a resume in a process without the plugins keeps the
    record."""
    from metalearn import resolve_config
    from metalearn.algorithms import METHODS
    from metalearn.models import NETWORKS
    from metalearn.runs import RunDir

    (tmp_path / "my_method.py").write_text("from metalearn import ProtoNet, register_method\n"
                                           "register_method(type('Mine', (ProtoNet,), {'name': 'mine'}))\n")
    (tmp_path / "my_network.py").write_text("from torch import nn\nfrom metalearn.models import Network, register_network"
                                            "\nregister_network(Network('my-flat', lambda shape, out: nn.Flatten(), "
                                            "False, True, 'image', 'flattened pixels'))\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", [entry for entry in sys.path if entry not in ("", str(tmp_path))])
    monkeypatch.setenv(plugins.ENVIRONMENT_VARIABLE, "my_method,./my_network.py")  # a module of this folder, a file
    try:
        run = RunDir(tmp_path / "run")
        run.write_config(resolve_config("mine", {"dataset": "omniglot", "ways": 5}, {"model": "my-flat"}))
    finally:
        sys.modules.pop("my_method", None)
    every = [str(tmp_path / "my_method.py"), str(tmp_path / "my_network.py")]
    recorded = json.loads(run.config_path.read_text())["plugins"]
    assert recorded == [{"kind": "method", "name": "mine", "plugin": every[0], "with": every},
                        {"kind": "network", "name": "my-flat", "plugin": every[1], "with": every[::-1]}]
    # a process without them: the record stays through a rewrite (a --resume), and says what to load
    del METHODS["mine"], NETWORKS["my-flat"]
    plugins._sources.clear()
    mine = dataclasses.replace(resolve_config("protonet", {"dataset": "omniglot", "ways": 5}), method="mine",
                               method_config={"model": "my-flat"})
    run.write_config(mine, resumed=True)
    assert json.loads(run.config_path.read_text())["plugins"] == recorded
    with pytest.raises(MetalearnError, match=f"set METALEARN_PLUGINS={every[0]},{every[1]}$"):
        run.read_config()
    run.write_config(mine)  # a new run in the folder: nothing of the old one's record
    assert "plugins" not in json.loads(run.config_path.read_text())


def test_a_registration_in_a_package_module_is_named_by_its_module():
    said = plugins.remedy({"module": "my_package.data", "file": "/home/me/code/my_package/data.py"})
    assert said == ("the run's process registered it in the module my_package.data, which is not a plugin: name it in "
                    "METALEARN_PLUGINS=my_package.data (with /home/me/code on PYTHONPATH unless its package is "
                    "installed)")
    assert plugins.remedy({"plugin": "pkg.mod", "folder": "/home/me"}).endswith(
        "set METALEARN_PLUGINS=pkg.mod with /home/me on PYTHONPATH")


def test_a_plugin_that_replaces_a_built_in_is_what_the_api_reads_too(fresh_plugins, tmp_path, monkeypatch):
    """The command line loads the plugins before anything else; the API must read a built-in
    name as the plugin replaced it as well, or the two score one run differently."""
    from metalearn import resolve_config
    from metalearn.datasets import DATASETS

    plugin = tmp_path / "noisier.py"
    plugin.write_text("import dataclasses\nfrom metalearn.datasets import DATASETS, register_dataset\n"
                      "register_dataset(dataclasses.replace(DATASETS['sinusoid'], defaults={'noise_std': 5.0}))\n")
    monkeypatch.setenv(plugins.ENVIRONMENT_VARIABLE, str(plugin))
    built_in = DATASETS["sinusoid"]
    with pytest.warns(UserWarning, match="replaces metalearn's built-in dataset 'sinusoid'"):
        config = resolve_config("maml", {"dataset": "sinusoid"})
    assert DATASETS["sinusoid"] is not built_in and config.task.noise_std == 5.0


def test_plugins_load_whatever_their_order_and_a_refusal_names_its_plugin(fresh_plugins, tmp_path, monkeypatch):
    """A method whose default network a later plugin registers: its registration looks the network
    up, which loads the plugins after it first. What metalearn refuses in a plugin is named with it."""
    from metalearn.algorithms import METHODS

    (tmp_path / "method.py").write_text(textwrap.dedent('''
        from metalearn import MAML, register_method
        from metalearn.algorithms import MAMLConfig
        from metalearn.options import option, options


        @options
        class SmallConfig(MAMLConfig):
            model: str = option("toy-small", "the network")


        register_method(type("Small", (MAML,), {"name": "toy-small-maml", "Config": SmallConfig}))
        '''))
    (tmp_path / "network.py").write_text(textwrap.dedent('''
        from torch import nn
        from metalearn.models import Network, register_network

        register_network(Network("toy-small", lambda shape, out: nn.Linear(shape[0], out), True, False, "vector",
                                 "one linear layer"))
        '''))
    monkeypatch.setenv(plugins.ENVIRONMENT_VARIABLE, f"{tmp_path / 'method.py'},{tmp_path / 'network.py'}")
    assert plugins.load_plugins() == (str(tmp_path / "method.py"), str(tmp_path / "network.py"))
    assert METHODS["toy-small-maml"].Config().model == "toy-small"

    (tmp_path / "refused.py").write_text("from metalearn import register_method\nregister_method(dict)\n")
    monkeypatch.setenv(plugins.ENVIRONMENT_VARIABLE, str(tmp_path / "refused.py"))
    monkeypatch.setattr(plugins, "_loaded", None)
    with pytest.raises(plugins.PluginError, match=rf"^plugin '{tmp_path / 'refused.py'}' of METALEARN_PLUGINS: "
                                                  r"<class 'dict'> is not a MetaLearner subclass$"):
        plugins.load_plugins()


def test_plugin_files_shadow_no_module_and_each_runs_once(fresh_plugins, tmp_path, monkeypatch):
    """Two files named alike are two plugins; a plugin named like a module of the Python path
    (json.py) does not replace it; one file named twice, however spelt, runs once."""
    import json as real_json

    for folder in ("a", "b"):
        (tmp_path / folder).mkdir()
        (tmp_path / folder / "plugin.py").write_text(f"import builtins\nbuiltins.RUNS_{folder} = "
                                                     f"getattr(builtins, 'RUNS_{folder}', 0) + 1\n")
    (tmp_path / "json.py").write_text("VALUE = 1\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv(plugins.ENVIRONMENT_VARIABLE, f"a/plugin.py,b/plugin.py,./b/../b/plugin.py,{tmp_path}/json.py")
    import builtins
    try:
        plugins.load_plugins()
        assert (builtins.RUNS_a, builtins.RUNS_b) == (1, 1)
        assert sys.modules["json"] is real_json and json.dumps([1]) == "[1]"
        assert sys.modules[plugins.plugin_file_module(tmp_path / "json.py")].VALUE == 1
    finally:
        for folder in ("a", "b"):
            if hasattr(builtins, f"RUNS_{folder}"):
                delattr(builtins, f"RUNS_{folder}")


@pytest.mark.parametrize("order", ["module first", "file first"])
def test_a_module_named_both_by_its_name_and_by_its_file_runs_once(order, fresh_plugins, tmp_path, monkeypatch):
    import builtins

    package = tmp_path / "toy_plugin_pkg"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "mod.py").write_text("import builtins\nbuiltins.TOY_RUNS = getattr(builtins, 'TOY_RUNS', 0) + 1\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    entries = ["toy_plugin_pkg.mod", str(package / "mod.py")]
    monkeypatch.setenv(plugins.ENVIRONMENT_VARIABLE, ",".join(entries if order == "module first" else entries[::-1]))
    try:
        plugins.load_plugins()
        assert builtins.TOY_RUNS == 1
    finally:
        for name in ("toy_plugin_pkg.mod", "toy_plugin_pkg"):
            sys.modules.pop(name, None)
        if hasattr(builtins, "TOY_RUNS"):
            delattr(builtins, "TOY_RUNS")


def test_a_module_name_is_found_in_the_current_folder_as_python_m_would(tmp_path):
    """The ``metalearn`` command does not search the current folder; ``python -m metalearn`` and
    torchrun do: a plugin named as a module must be found by either."""
    (tmp_path / "here_plugin.py").write_text("from metalearn import MAML, register_method\n"
                                             "register_method(type('Here', (MAML,), {'name': 'toy-here'}))\n")
    program = ("import sys; sys.path[:] = [p for p in sys.path if p not in ('', '.')]; "
               "from metalearn.cli import main; main(['train', '--help'])")
    environment = {**os.environ, plugins.ENVIRONMENT_VARIABLE: "here_plugin"}
    done = subprocess.run([sys.executable, "-c", program], capture_output=True, text=True, env=environment,
                          cwd=tmp_path, timeout=300)
    assert done.returncode == 0 and "toy-here" in done.stdout, done.stderr


def test_an_environment_with_the_wrong_shapes_is_one_line_at_its_first_use(fresh_plugins):
    from metalearn import register_environment, resolve_config
    from metalearn.tasks import problem_of

    class Walk:
        observation_dim, action_dim, horizon = 1, 1, 5

        def sample_tasks(self, num_tasks, generator):
            return {"goal": torch.rand(num_tasks, 1, generator=generator)}

        def reset(self, params, trajectories, seeds=None):
            return None, torch.zeros(params["goal"].shape[0], trajectories, 1)

        def step(self, state, action):
            return None, action, action.sum(-1), torch.zeros(action.shape[:2], dtype=torch.bool)

    class Wide(Walk):
        def reset(self, params, trajectories, seeds=None):
            return None, torch.zeros(params["goal"].shape[0], trajectories, 3)

    class Rewards(Walk):
        def step(self, state, action):
            return None, action, action, torch.zeros(action.shape[:2], dtype=torch.bool)

    class Halves(Walk):
        observation_dim = 2.0

    torch.manual_seed(0)
    state = torch.random.get_rng_state()
    register_environment("toy-walk-ok", Walk)
    assert problem_of(resolve_config("maml-rl", {"dataset": "toy-walk-ok"}).task).input_shape == (1,)
    assert torch.equal(torch.random.get_rng_state(), state)  # the check draws nothing from torch's generator
    for make, said in ((Wide, r"reset's observations should be a float tensor of shape \(2, 3, 1\), got "
                              r"\(2, 3, 3\), torch.float32 \(with 2 tasks, 3 trajectories each"),
                       (Rewards, r"step's rewards should be a float tensor of shape \(2, 3\), got \(2, 3, 1\)"),
                       (Halves, r"observation_dim must be a whole number >= 1, got 2.0$")):
        register_environment("toy-walk-bad", make)
        config = resolve_config("maml-rl", {"dataset": "toy-walk-bad"})
        with pytest.raises(MetalearnError, match="^environment toy-walk-bad: " + said):
            problem_of(config.task)


def test_a_failing_entry_point_is_loaded_once_and_entry_points_can_be_turned_off(fresh_plugins, monkeypatch):
    calls = []

    class Point:
        name, value, dist = "toy", "toy_package:register", None

        def load(self):
            calls.append(1)
            return lambda: None

    class Broken(Point):
        name, value = "toy-broken", "broken:register"

        def load(self):
            raise ImportError("no module named broken")

    points = [Point(), Broken()]
    monkeypatch.setattr(plugins, "_entry_points", lambda: points)
    for _ in range(2):
        with pytest.raises(plugins.PluginError, match=r"^plugin entry point 'toy-broken' \(broken:register\) of group "
                                                      r"metalearn.plugins failed: ImportError: no module named broken "
                                                      r"\(fix or uninstall its package, or set "
                                                      r"METALEARN_DISABLE_PLUGIN_AUTOLOAD=1 to load no entry point\)$"):
            plugins.load_plugins()
    assert calls == [1]  # the entry point that loaded is not called again
    monkeypatch.setattr(plugins, "_imported", set())
    monkeypatch.setenv(plugins.NO_ENTRY_POINTS, "1")
    assert plugins.load_plugins() == () and calls == [1]


def test_predict_refuses_a_run_whose_examples_are_not_images(fresh_plugins, tmp_path, capsys):
    from cli_runner import run
    from metalearn.datasets import Dataset, register_dataset
    from metalearn.tasks.batch import Problem
    from toys import Blobs, NearestMean

    from metalearn.algorithms import register_method

    register_method(NearestMean)
    register_dataset(Dataset("toy-points", True, build=lambda task, shape, part, data_dir, progress: Blobs(
        shape.ways, shape.shots, shape.query), problem=lambda task: Problem((6,), task.ways, True),
        inapplicable=("noise_std", "image_size")))
    code, _, err = run(["train", "toy-nearest-mean", "--dataset", "toy-points", "--steps", 2, "--val-every", 0,
                        "--no-eval", "--no-progress", "--run-dir", tmp_path / "run"], capsys)
    assert code == 0, err
    # the committed record says where the method and the dataset came from, as config.json does
    code, _, err = run(["export", tmp_path / "run", tmp_path / "record"], capsys)
    assert code == 0, err
    recorded = json.loads((tmp_path / "run" / "config.json").read_text())["plugins"]
    assert {entry["name"] for entry in recorded} == {"toy-nearest-mean", "toy-points"}
    assert json.loads((tmp_path / "record" / "summary.json").read_text())["config"]["plugins"] == recorded
    (tmp_path / "support" / "a").mkdir(parents=True)
    code, _, err = run(["predict", tmp_path / "run", "--support", tmp_path / "support", "--query", tmp_path], capsys)
    assert code == 2 and err.count("\n") == 1, err
    assert "learned toy-points, whose examples are not images (inputs of shape (6,)); predict classifies" in err


def test_the_help_of_dataset_and_model_names_what_plugins_registered_that_the_method_takes(fresh_plugins):
    from torch import nn

    from metalearn.cli import _make_train_command
    from metalearn.datasets import DATASETS, register_dataset
    from metalearn.models import Network, register_network

    register_network(Network("toy-flat", lambda shape, out: nn.Flatten(), False, True, "image", "flattened pixels"))
    register_dataset(dataclasses.replace(DATASETS["sinusoid"], name="toy-sine"))

    def help_of(method, option):
        command = _make_train_command(method)
        text = next(param for param in command.params if param.name == option).help
        return " ".join(text.split())

    assert help_of("protonet", "model").endswith("; of plugins: toy-flat (default: see --print-config)")
    assert "toy-sine" not in help_of("protonet", "dataset")  # regression: not for a classification-only method
    assert help_of("maml", "dataset").endswith("cheetah-vel or cheetah-dir; of plugins: toy-sine")
    assert "toy-flat" not in help_of("maml", "model")  # an embedding: MAML needs an output layer
    # a method whose own help already lists it (a plugin's, written after another plugin's network
    # was registered) does not list it twice
    from metalearn.cli import _plugins_help
    from metalearn.algorithms import METHODS

    field = next(f for f in dataclasses.fields(METHODS["protonet"].Config) if f.name == "model")
    assert _plugins_help("protonet", field, "the network: conv4 or toy-flat") == "the network: conv4 or toy-flat"
    assert _plugins_help("protonet", field, "the network: conv4 or toy-flat-2") == ("the network: conv4 or toy-flat-2; "
                                                                                   "of plugins: toy-flat")
    assert _plugins_help("protonet", field, "the toy-flat network: conv4").endswith("; of plugins: toy-flat")  # a word
