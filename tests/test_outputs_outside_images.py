"""metalearn never writes over, or among, the images it reads: predict's outputs, a run folder,
an export."""

from __future__ import annotations

import pytest

from cli_runner import run
from images import colours


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("predict")
    data = colours(root / "data", 6, 3)
    code = run(["train", "protonet", "--dataset", "folder", "--data-dir", data, "--ways", 2, "--shots", 1,
                "--image-size", 16, "--steps", 1, "--val-every", 0, "--split-fractions", "0.5,0,0.5", "--no-eval",
                "--run-dir", root / "run", "--no-progress"], _Quiet())[0]
    assert code == 0
    return root / "run"


class _Quiet:  # capsys stands in for module-scoped use
    def readouterr(self):
        return "", ""


@pytest.mark.parametrize("option, where", [("--json", "query file"), ("--sheet", "support file"),
                                           ("--csv", "support folder"), ("--json", "query folder"),
                                           ("--csv", "query given as a file")])
def test_an_output_among_the_input_images_is_refused_before_anything_is_written(trained, tmp_path, capsys,
                                                                                 option, where):
    support = colours(tmp_path / "support", 2, 1, seed=1)
    query = colours(tmp_path / "query", 2, 1, seed=2)
    target = {"query file": query / "class 0" / "0.png", "support file": support / "class 1" / "0.png",
              "support folder": support / "class 0" / "predictions.csv",
              "query folder": query / "out.json", "query given as a file": query / "class 1" / "0.png"}[where]
    if option == "--sheet" and target.suffix != ".png":
        target = target.with_suffix(".png")
    before = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    source = support if "support" in where else target if where == "query given as a file" else query
    code, _, err = run(["predict", trained, "--support", support, "--query", query if source != target else target,
                        option, target], capsys)
    assert code == 2 and err.count("\n") == 1 and "Traceback" not in err, err
    verb = "is" if source == target else "lies in"
    assert f"error: {option} {target} {verb} the --{'support' if 'support' in where else 'query'} input " in err
    assert str(source) in err and "write it elsewhere" in err
    assert {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()} == before


def test_a_run_folder_or_an_export_inside_the_data_is_refused(trained, tmp_path, capsys):
    """A run folder in the image folder becomes a class of checkpoints and plots; an export into a
    class folder adds a plot among its images: the next read sees another dataset."""
    data = colours(tmp_path / "data", 4, 2)
    before = sorted(p.relative_to(data) for p in data.rglob("*"))
    for run_dir in (data / "myrun", data / "class 1" / "run", data):
        code, _, err = run(["train", "protonet", "--dataset", "folder", "--data-dir", data, "--ways", 2,
                            "--image-size", 16, "--steps", 1, "--val-every", 0, "--run-dir", run_dir], capsys)
        assert code == 2 and err == (f"error: --run-dir {run_dir} lies inside --data-dir {data}: its files would be "
                                     f"read as images of the dataset; give a folder outside {data}\n"), err
    code, _, err = run(["export", trained, data / "class 0", "--data-dir", data], capsys)
    assert code == 2 and err.startswith(f"error: OUT_DIR {data / 'class 0'} lies inside --data-dir {data}"), err
    assert sorted(p.relative_to(data) for p in data.rglob("*")) == before


def test_a_resume_after_the_split_file_changed_names_the_split_not_the_images(tmp_path, capsys):
    data = colours(tmp_path / "data", 6, 2)
    split = tmp_path / "split.json"
    split.write_text('{"train": ["class 0", "class 1"], "test": ["class 2", "class 3"]}')
    train = ["train", "protonet", "--dataset", "folder", "--data-dir", data, "--split-file", split, "--ways", 2,
             "--image-size", 16, "--steps", 1, "--val-every", 0, "--no-eval", "--run-dir", tmp_path / "run"]
    assert run(train, capsys)[0] == 0
    split.write_text('{"train": ["class 0", "class 4"], "test": ["class 2", "class 3"]}')
    code, _, err = run(["train", "protonet", "--run-dir", tmp_path / "run", "--data-dir", data, "--resume",
                        "--steps", 2, "--no-eval"], capsys)
    assert code == 2 and err.count("\n") == 1, err
    assert err.startswith(f"error: --split-file {split} puts 2 classes of the run in {tmp_path / 'run'} in another "
                          "part than when it trained (e.g. 'class 1': train then, no part now): put the file back as "
                          f"it was (the run's copy of its split: {tmp_path / 'run' / 'split.json'})"), err


def test_eval_warns_when_a_given_split_scores_the_run_s_training_classes(tmp_path, capsys):
    """--split-fractions 0,0,1 is for a folder of new classes; on the run's own folder it scores the
    classes the run trained on: said beside the result, which is still written."""
    data = colours(tmp_path / "data", 6, 2)
    assert run(["train", "protonet", "--dataset", "folder", "--data-dir", data, "--ways", 2, "--image-size", 16,
                "--steps", 1, "--val-every", 0, "--split-fractions", "0.5,0,0.5", "--no-eval",
                "--run-dir", tmp_path / "run"], capsys)[0] == 0
    code, out, err = run(["eval", tmp_path / "run", "--data-dir", data, "--split-fractions", "0,0,1", "--episodes", 2,
                          "--no-progress"], capsys)
    assert code == 0 and "accuracy" in out, err
    assert err.startswith("warning: 3 of the 6 classes scored have the names of classes that the run in "), err
    code, _, err = run(["eval", tmp_path / "run", "--data-dir", data, "--episodes", 2, "--no-progress"], capsys)
    assert code == 0 and "warning" not in err, err  # its own split: its test classes


@pytest.mark.parametrize("option, name", [("--json", "checkpoint.pt"), ("--csv", "metrics.jsonl"),
                                          ("--json", "config.json"), ("--csv", "eval.json"),
                                          ("--json", "eval-part=val.json"), ("--csv", "split.json"),
                                          ("--sheet", "best/sheet.png")])
def test_an_output_over_a_run_s_own_files_is_refused_before_anything_is_read(trained, tmp_path, capsys,
                                                                              option, name):
    """predict's outputs named as one of a run folder's files would replace what the run loads and
    resumes from: refused, the run folder unchanged (of this run, or of another)."""
    support = colours(tmp_path / "support", 2, 1, seed=1)
    other = tmp_path / "other"
    assert run(["train", "maml", "--dataset", "sinusoid", "--steps", 1, "--meta-batch-size", 2, "--no-eval",
                "--no-progress", "--val-every", 0, "--run-dir", other], capsys)[0] == 0
    for folder in (trained, other):
        target = folder / name
        before = {p: p.read_bytes() for p in folder.rglob("*") if p.is_file() and p.name != ".lock"}
        code, _, err = run(["predict", trained, "--support", support, "--query", support, option, target], capsys)
        assert code == 2 and err.count("\n") == 1 and "Traceback" not in err, err
        if "/" in name:
            assert err == (f"error: {option} {target} lies in {folder / 'best'}, where the run {folder} keeps its best "
                           f"checkpoints; give another file, e.g. in {folder / 'plots'}\n"), err
        elif name.startswith("eval"):
            assert err == (f"error: {option} {target} would replace {name}, an evaluation of the run {folder}: its "
                           f"recorded score would be lost; give another file, e.g. in {folder / 'plots'}\n"), err
        else:
            assert err == (f"error: {option} {target} would replace {name}, one of the files of the run {folder}: the "
                           f"run would no longer load or resume; give another file, e.g. in {folder / 'plots'}\n"), err
        assert {p: p.read_bytes() for p in folder.rglob("*") if p.is_file() and p.name != ".lock"} == before
    # any other name in a run folder is the user's to write
    code, _, err = run(["predict", trained, "--support", support, "--query", support,
                        option, trained / ("predictions.png" if option == "--sheet" else "predictions.out")], capsys)
    assert code == 0, err


def test_outputs_among_the_images_a_run_trained_on_are_refused(trained, tmp_path, capsys):
    """The run's next resume would find its folder changed (a contact sheet read as an image of a
    class): predict and compare refuse a file there, found from the run's checkpoint."""
    from metalearn.api import predict_run
    from metalearn.errors import MetalearnError

    data = trained.parent / "data"
    support = colours(tmp_path / "support", 2, 1, seed=1)
    before = sorted(data.rglob("*"))
    code, _, err = run(["predict", trained, "--support", support, "--query", support,
                        "--sheet", data / "class 0" / "sheet.png"], capsys)
    assert code == 2 and err == (f"error: --sheet {data / 'class 0' / 'sheet.png'} lies in {data}, the image folder the "
                                 f"run {trained} trained on: the run's next read would see another dataset; write it "
                                 "elsewhere, outside the images\n"), err
    with pytest.raises(MetalearnError, match=r"^json_out .* lies in .*, the image folder the run"):
        predict_run(trained, support, support, json_out=data / "p.json")
    code, _, err = run(["compare", trained, "--episodes", 1, "--json", data / "compare.json"], capsys)
    assert code == 2 and err.startswith(f"error: --json {data / 'compare.json'} lies in {data}, the image folder"), err
    code, _, err = run(["compare", trained, "--episodes", 1, "--json", trained / "eval.json"], capsys)
    assert code == 2 and err.startswith(f"error: --json {trained / 'eval.json'} would replace eval.json"), err
    assert sorted(data.rglob("*")) == before


def test_eval_warns_when_a_given_split_scores_the_run_s_validation_classes_as_test(tmp_path, capsys):
    """The validation classes chose the run's checkpoints: a split file that scores them as its
    test part is said to, beside the result; scoring them as validation (--part val) is not."""
    data = colours(tmp_path / "data", 6, 2)
    split = tmp_path / "split.json"
    split.write_text('{"train": ["class 0", "class 1"], "val": ["class 2", "class 3"], "test": ["class 4", "class 5"]}')
    assert run(["train", "protonet", "--dataset", "folder", "--data-dir", data, "--ways", 2, "--image-size", 16,
                "--steps", 1, "--val-every", 0, "--split-file", split, "--no-eval",
                "--run-dir", tmp_path / "run"], capsys)[0] == 0
    again = tmp_path / "val-as-test.json"
    again.write_text('{"train": ["class 0", "class 1"], "test": ["class 2", "class 3"]}')
    code, out, err = run(["eval", tmp_path / "run", "--data-dir", data, "--split-file", again, "--episodes", 2,
                          "--no-progress"], capsys)
    assert code == 0 and "accuracy" in out, err
    assert err.startswith("warning: 2 of the 2 classes scored have the names of the validation classes of the run "
                          f"in {tmp_path / 'run'} (e.g. 'class 2'; its split.json lists them), which chose its "
                          "checkpoints"), err
