"""The ``vinyals-trainval`` split: the ``vinyals`` train and val classes together (the 1200
characters, 4800 classes, that the papers on the vinyals split train their final models on),
tested on the vinyals test classes, with no validation part."""

from __future__ import annotations

import json

import pytest
import torch

from cli_runner import run
from metalearn.config import TaskConfig
from metalearn.data.splits import SPLITS, has_part, omniglot_split
from metalearn.errors import MetalearnError
from metalearn.tasks import has_validation, no_validation_reason


def classes(pool) -> set[tuple[int, int]]:
    return set(zip(pool.characters.tolist(), pool.rotations.tolist()))


def test_train_is_the_union_of_vinyals_train_and_val(omniglot):
    train = omniglot_split(omniglot, "vinyals-trainval", "train")
    vinyals = {part: omniglot_split(omniglot, "vinyals", part) for part in ("train", "val", "test")}
    assert (len(train), train.num_characters) == (4800, 1200)
    assert classes(train) == classes(vinyals["train"]) | classes(vinyals["val"])
    assert len(classes(train)) == 4800  # no class twice
    # in the lists' order: vinyals train, then vinyals val
    assert torch.equal(train.characters, torch.cat([vinyals["train"].characters, vinyals["val"].characters]))
    assert torch.equal(train.rotations, torch.cat([vinyals["train"].rotations, vinyals["val"].rotations]))
    test = omniglot_split(omniglot, "vinyals-trainval", "test")
    assert torch.equal(test.characters, vinyals["test"].characters)
    assert torch.equal(test.rotations, vinyals["test"].rotations)
    assert (len(test), test.num_characters) == (1692, 423)
    assert not set(train.characters.tolist()) & set(test.characters.tolist())  # no character in both
    assert (train.name, test.name) == ("vinyals-trainval/train", "vinyals-trainval/test")


def test_it_has_no_validation_part(omniglot):
    assert "vinyals-trainval" in SPLITS
    assert has_part("vinyals-trainval", "train") and has_part("vinyals-trainval", "test")
    assert not has_part("vinyals-trainval", "val") and has_part("vinyals", "val")
    with pytest.raises(MetalearnError, match="the vinyals-trainval split has no validation part"):
        omniglot_split(omniglot, "vinyals-trainval", "val")
    task = TaskConfig(split="vinyals-trainval")
    assert not has_validation(task) and "vinyals-trainval split has no validation part" in no_validation_reason(task)
    assert has_validation(TaskConfig(split="vinyals"))


def test_an_unknown_split_names_it(omniglot):
    with pytest.raises(MetalearnError, match="valid splits: vinyals, lake, maml, vinyals-trainval"):
        omniglot_split(omniglot, "vinyals+val", "train")


def test_a_run_on_it_trains_without_validation_and_tests_on_the_vinyals_test_classes(tmp_path, capsys,
                                                                                     omniglot_data_dir):
    code, out, err = run(["train", "protonet", "--split", "vinyals-trainval", "--print-config"], capsys)
    assert code == 0, err
    assert json.loads(out)["train"]["val_every"] == 0  # resolved off, as for lake
    run_dir = tmp_path / "run"
    code, out, err = run(["train", "protonet", "--dataset", "omniglot", "--split", "vinyals-trainval",
                          "--ways", 5, "--shots", 1, "--query", 1, "--steps", 2, "--meta-batch-size", 1,
                          "--eval-episodes", 2, "--data-dir", omniglot_data_dir, "--run-dir", run_dir,
                          "--no-progress"], capsys)
    assert code == 0, err
    assert "Traceback" not in err and "accuracy" in out
    config = json.loads((run_dir / "config.json").read_text())
    assert config["task"]["split"] == "vinyals-trainval" and config["train"]["val_every"] == 0
    # its test part is scored; its validation part, which it lacks, is refused in one line
    code, out, err = run(["eval", run_dir, "--episodes", 2, "--data-dir", omniglot_data_dir, "--no-progress"],
                         capsys)
    assert code == 0, err
    code, out, err = run(["eval", run_dir, "--part", "val", "--episodes", 2, "--data-dir", omniglot_data_dir,
                          "--no-progress"], capsys)
    assert code == 2 and "the vinyals-trainval split has no validation part" in err, err
    assert err.count("\n") == 1 and "Traceback" not in err, err


@pytest.mark.parametrize("options", [["--val-every", 1], ["--val-episodes", 10], ["--keep-best", 1]])
def test_asking_it_for_validation_is_one_line_error(tmp_path, capsys, omniglot_data_dir, options):
    code, _, err = run(["train", "protonet", "--dataset", "omniglot", "--split", "vinyals-trainval", "--steps", 1,
                        *options, "--data-dir", omniglot_data_dir, "--run-dir", tmp_path / "r", "--no-progress"],
                       capsys)
    assert code == 2
    assert f"{options[0]} cannot apply: the vinyals-trainval split has no validation part" in err, err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    assert not (tmp_path / "r").exists()
