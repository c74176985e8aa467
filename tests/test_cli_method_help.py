"""`metalearn train METHOD --help`: a reinforcement-learning method's help lists only the options
its environments take; a supervised method's lists every option."""

from __future__ import annotations

import dataclasses
import importlib.util
import re

from cli_runner import run
from metalearn.algorithms import METHODS
from metalearn.algorithms.maml_rl import MAMLRL
from metalearn.datasets import DATASETS

SUPERVISED_ONLY = ("--ways", "--shots", "--query", "--test-ways", "--test-shots", "--test-query", "--image-size",
                   "--channels", "--split", "--split-fractions", "--split-file", "--noise-std", "--augment",
                   "--data-dir")


def flags_of(help_text: str) -> set[str]:
    """The flags the help lists, each at the start of its entry (``--dataset, --env TEXT``)."""
    return {name for line in help_text.splitlines() if line.startswith("  -")
            for name in re.findall(r"--[a-z0-9-]+", line.split("  ")[1])}


def test_the_help_of_a_reinforcement_learning_method_lists_only_what_its_environments_take(capsys):
    code, out, err = run(["train", "maml-rl", "--help"], capsys)
    assert code == 0, err
    flags = flags_of(out)
    assert not flags & set(SUPERVISED_ONLY), flags & set(SUPERVISED_ONLY)
    assert {"--env", "--dataset", "--steps", "--meta-batch-size", "--run-dir", "--resume", "--print-config",
            "--inner-steps", "--first-order", "--outer", "--trajectories"} <= flags
    words = " ".join(out.split())
    assert "--dataset, --env TEXT the environment: nav2d (its default), cheetah-vel or cheetah-dir" in words
    assert "omniglot" not in words and "image" not in words


def test_a_supervised_method_keeps_every_option_in_its_help(capsys):
    code, out, _ = run(["train", "maml", "--help"], capsys)
    assert code == 0 and set(SUPERVISED_ONLY) <= flags_of(out)
    assert "omniglot, folder (your own class folders" in " ".join(out.split())


def test_the_options_left_out_of_the_help_are_refused_by_the_environment_in_its_words(tmp_path, capsys):
    # still parsed: the environment's refusal, not click's "No such option"
    for args, words in ((["--ways", 5], "--ways does not apply to nav2d, a reinforcement-learning dataset"),
                        (["--augment", "crop"], "--augment does not apply to nav2d"),
                        (["--data-dir", tmp_path], "nav2d tasks are generated, not read from files")):
        code, out, err = run(["train", "maml-rl", *args, "--print-config"], capsys)
        assert code == 2 and out == "" and err.count("\n") == 1 and words in err, err
    code, out, err = run(["train", "maml-rl", "--env", "cheetah-vel", "--steps", 3, "--print-config"], capsys)
    if all(importlib.util.find_spec(name) for name in ("gymnasium", "mujoco")):
        assert code == 0 and '"dataset": "cheetah-vel"' in out, err
    else:  # without the rl extra: its one-line remedy
        assert code == 2 and "need MuJoCo through gymnasium, which is not installed" in err, err


def test_what_is_left_out_follows_the_declared_properties_not_the_method_name(monkeypatch, capsys):
    # an environment that takes --noise-std: no longer refused by every environment, so listed
    takes_noise = dataclasses.replace(DATASETS["nav2d"], name="noisy-nav",
                                      inapplicable=tuple(n for n in DATASETS["nav2d"].inapplicable if n != "noise_std"))
    monkeypatch.setitem(DATASETS, "noisy-nav", takes_noise)

    class OtherRL(MAMLRL):  # another reinforcement-learning method, by its class attribute alone
        name = "other-rl"
        default_dataset = "noisy-nav"

    monkeypatch.setitem(METHODS, "other-rl", OtherRL)
    code, out, err = run(["train", "other-rl", "--help"], capsys)
    assert code == 0, err
    flags = flags_of(out)
    assert "--noise-std" in flags and "--ways" not in flags and "--env" in flags
    assert "nav2d, cheetah-vel, cheetah-dir or noisy-nav (its default)" in " ".join(out.split())


def test_the_dataset_and_split_help_name_every_built_in_one():
    """The help of --dataset and --split is written by hand, with a word on each: a dataset,
    environment or split added to the registry must be added there too."""
    from metalearn.config import TaskConfig
    from metalearn.data.splits import SPLITS
    from metalearn.options import help_of

    import json
    import os
    import subprocess
    import sys

    fields = {field.name: help_of(field) for field in dataclasses.fields(TaskConfig)}
    # the registry of a fresh process without plugins: this one may hold datasets tests registered
    env = {key: value for key, value in os.environ.items() if key != "METALEARN_PLUGINS"}
    listed = subprocess.run([sys.executable, "-c", "import json; from metalearn.datasets import DATASETS, get_dataset; "
                             "get_dataset('omniglot'); print(json.dumps(list(DATASETS)))"],
                            capture_output=True, text=True, env=env, timeout=120)
    built_in = json.loads(listed.stdout)
    assert len(built_in) >= 8, listed.stderr
    missing = [name for name in built_in if not re.search(rf"(?<![\w-]){re.escape(name)}(?![\w-])", fields["dataset"])]
    assert not missing, missing
    assert all(re.search(rf"(?<![\w-]){re.escape(split)}(?![\w-])", fields["split"]) for split in SPLITS)
