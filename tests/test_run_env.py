"""The folders that environment variables name for runs (METALEARN_RUNS) and caches
(METALEARN_CACHE): a file where a folder should be is refused in one line naming the variable,
never read as a folder that holds no runs; a folder not made yet is said not to exist."""

from __future__ import annotations

import pytest

from cli_runner import run
from metalearn.errors import MetalearnError
from metalearn.runs import default_runs_root, no_runs_in


def refused(code: int, out: str, err: str, *messages: str) -> None:
    """Exit code 2, nothing on stdout and one line of error holding every one of ``messages``."""
    assert code == 2 and out == "", (code, out, err)
    assert "Traceback" not in err and err.startswith("error: ") and err.count("\n") == 1, err
    for message in messages:
        assert message in err, err


@pytest.fixture
def afile(tmp_path):
    path = tmp_path / "afile"
    path.write_text("not a folder")
    return path


@pytest.mark.parametrize("as_json", [[], ["--json"]])
def test_status_refuses_a_runs_or_cache_variable_naming_a_file(afile, tmp_path, monkeypatch, capsys, as_json):
    monkeypatch.setenv("METALEARN_RUNS", str(afile))
    refused(*run(["status", *as_json], capsys), f"error: METALEARN_RUNS {afile} is a file, not a folder; "
                                                 "point METALEARN_RUNS at a folder of runs")
    monkeypatch.setenv("METALEARN_RUNS", str(afile / "runs"))  # a path through a file
    refused(*run(["status", *as_json], capsys), f"error: METALEARN_RUNS {afile / 'runs'}: {afile} is a file")
    monkeypatch.delenv("METALEARN_RUNS")  # runs/ in the cache folder, which a file stands in for
    monkeypatch.setenv("METALEARN_CACHE", str(afile))
    refused(*run(["status", *as_json], capsys), f"error: METALEARN_CACHE {afile} is a file, not a folder; "
                                                 "point METALEARN_CACHE at a folder")
    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / "runs").write_text("")
    monkeypatch.setenv("METALEARN_CACHE", str(cache))
    refused(*run(["status", *as_json], capsys), f"the runs folder {cache / 'runs'} is a file, not a folder; move it "
                                                 "away, or point METALEARN_RUNS at a folder of runs")


@pytest.mark.parametrize("variable", ["METALEARN_RUNS", "METALEARN_CACHE", "METALEARN_DATA"])
def test_a_folder_variable_of_blanks_is_refused_and_an_empty_one_is_unset(variable, tmp_path, monkeypatch, capsys):
    """A value of only blanks would make a folder named by them; an empty one means unset."""
    from metalearn.data.omniglot import default_cache_dir, default_data_dir

    monkeypatch.setenv("METALEARN_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("METALEARN_RUNS", raising=False)
    monkeypatch.delenv("METALEARN_DATA", raising=False)
    monkeypatch.setenv(variable, " ")
    message = f"{variable} is set to ' ', only blanks: point it at a folder, or unset it"
    reader = {"METALEARN_RUNS": default_runs_root, "METALEARN_CACHE": default_cache_dir,
              "METALEARN_DATA": default_data_dir}[variable]
    with pytest.raises(MetalearnError, match=f"^{message}$"):
        reader()
    if variable != "METALEARN_DATA":  # status reads the runs folder, in the cache folder by default
        refused(*run(["status"], capsys), f"error: {message}")
    monkeypatch.setenv(variable, "")
    if variable == "METALEARN_CACHE":
        monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    expected = {"METALEARN_RUNS": tmp_path / "cache" / "runs", "METALEARN_DATA": tmp_path / "cache" / "omniglot",
                "METALEARN_CACHE": tmp_path / "xdg" / "metalearn"}
    assert reader() == expected[variable]
    assert not list(tmp_path.glob(" *"))


def test_a_runs_folder_not_made_yet_is_said_not_to_exist(tmp_path, monkeypatch, capsys):
    missing = tmp_path / "no-such-runs"
    monkeypatch.setenv("METALEARN_RUNS", str(missing))
    assert default_runs_root() == missing  # the first run started without a run folder makes it
    assert no_runs_in(missing) == f"no runs: METALEARN_RUNS {missing} does not exist"
    code, out, err = run(["status"], capsys)
    assert code == 0 and str(missing) in out, (code, out, err)
    missing.mkdir()
    assert no_runs_in(missing) == f"no runs in {missing}"
    monkeypatch.delenv("METALEARN_RUNS")
    monkeypatch.setenv("METALEARN_CACHE", str(tmp_path / "new-cache"))
    assert no_runs_in(default_runs_root()) == (f"no runs: {tmp_path / 'new-cache' / 'runs'} does not exist (runs "
                                               "started without a run folder go there)")


def test_training_without_a_run_folder_refuses_a_runs_variable_naming_a_file(afile, monkeypatch, capsys):
    monkeypatch.setenv("METALEARN_RUNS", str(afile))
    with pytest.raises(MetalearnError, match="METALEARN_RUNS .* is a file, not a folder"):
        default_runs_root()
    refused(*run(["train", "maml", "--dataset", "sinusoid", "--steps", 1, "--no-eval", "--no-progress"], capsys),
            f"error: METALEARN_RUNS {afile} is a file, not a folder")
    assert afile.read_text() == "not a folder"
