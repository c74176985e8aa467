"""What a user of their own image folders meets: predictions that depend on the queries given
together (transductive batch norm), query images that are support images too, and the
learning curve of a short run (``--log-every``'s default)."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from cli_runner import run
from metalearn import prediction
from metalearn.algorithms import build_learner
from metalearn.api import resolve_config
from metalearn.config import LOG_EVERY, RunConfig, TrainConfig, default_log_every
from metalearn.errors import MetalearnWarning
from metalearn.prediction import normalises_queries_together, predict_new_classes, warn_of_query_in_support
from metalearn.runs import RunDir
from metalearn.tasks.batch import Problem

PROBLEM = Problem((3, 28, 28), 3, True)


def write_images(folder: Path, count: int, colour: tuple[int, int, int], seed: int) -> list[Path]:
    """``count`` 16-pixel PNGs of noise around ``colour``."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(count):
        pixels = np.clip(rng.normal(colour, 40, (16, 16, 3)), 0, 255).astype(np.uint8)
        Image.fromarray(pixels, "RGB").save(folder / f"{i:02d}.png")
        paths.append(folder / f"{i:02d}.png")
    return paths


COLOURS = ((220, 40, 40), (40, 180, 60), (40, 70, 220))


@pytest.fixture
def new_classes(tmp_path) -> tuple[Path, list[Path]]:
    """A support folder of 3 classes, 1 shot each, and 6 query images (2 per class)."""
    support, queries = tmp_path / "support", []
    for c, colour in enumerate(COLOURS):
        write_images(support / f"class{c}", 1, colour, seed=c)
        queries += write_images(tmp_path / "query" / f"class{c}", 2, colour, seed=10 + c)
    return support, queries


def few_query_warnings(caught) -> list[str]:
    return [str(w.message) for w in caught if issubclass(w.category, MetalearnWarning)
            and "normalises its query images together" in str(w.message)]


# -- transductive batch norm ------------------------------------------------------------------


def test_which_learners_normalise_their_queries_together():
    """The networks with one output per class whose batch norm uses the batch's statistics at
    evaluation classify the queries in a batch of their own; the embedding methods put the
    support set into every batch, non-transductive Reptile each query with the support set,
    and MAML++'s running statistics normalise without the batch."""
    together = {method: normalises_queries_together(build_learner(method, {}, PROBLEM))
                for method in ("maml", "platipus", "reptile", "protonet", "matchingnet")}
    assert together == {"maml": True, "platipus": True, "reptile": True, "protonet": False, "matchingnet": False}
    assert not normalises_queries_together(build_learner("reptile", {"transductive": False}, PROBLEM))
    running = {"per_step_bn_statistics": True}
    assert not normalises_queries_together(build_learner("maml", running, PROBLEM))
    assert normalises_queries_together(build_learner("maml", {**running, "eval_bn_statistics": "batch"}, PROBLEM))


def test_predictions_keep_only_the_query_images_a_contact_sheet_shows(new_classes, monkeypatch):
    """Every prepared query image was kept for the sheet (150 KB each at 84x84 RGB): only the
    first SHEET_QUERIES are, also across query chunks, and they are the images prepared."""
    import metalearn.prediction as prediction

    support, queries = new_classes
    monkeypatch.setattr(prediction, "SHEET_QUERIES", 3)
    monkeypatch.setattr(prediction, "QUERY_CHUNK", 2)  # 6 queries in chunks of 2: the third chunk is dropped
    learner = build_learner("protonet", {}, PROBLEM)
    result = predict_new_classes(learner, support, queries, 28, 3)
    assert len(result["predictions"]) == 6
    kept = result.images[2]
    assert kept.shape[0] == 3 and torch.equal(kept, learner.prepare_images(queries[:3], 28, 3))


def test_few_queries_to_a_transductive_learner_are_warned_of(new_classes):
    """One query image alone gets other probabilities than among others (the batch statistics of
    one image): a Python caller is warned, in one line saying what to do; enough queries, or a
    learner that normalises with the support set, are not."""
    support, queries = new_classes
    torch.manual_seed(0)
    maml = build_learner("maml", {"test_inner_steps": 1}, PROBLEM)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        alone = predict_new_classes(maml, support, queries[:1], 28, 3)
        together = predict_new_classes(maml, support, queries, 28, 3)
    said = few_query_warnings(caught)
    assert len(said) == 1 and "\n" not in said[0], said
    assert said[0].startswith("maml normalises its query images together (batch statistics, as in training), so "
                              "each one's probabilities depend on the others classified with it: 1 query image is "
                              "fewer than one per class (3)"), said[0]
    assert said[0].endswith("classify at least 3 query images together")
    first = lambda result: result["predictions"][0]["probabilities"]  # noqa: E731
    assert first(alone) != pytest.approx(first(together), abs=1e-4)  # what the warning is about

    # the run's own number of queries per task, where the caller knows it
    with pytest.warns(MetalearnWarning, match=r"5 query images are fewer than the 6 of a task of its run, .*"
                                              r"classify at least 6 query images together$"):
        predict_new_classes(maml, support, queries[:5], 28, 3, queries_per_task=6)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        predict_new_classes(maml, support, queries, 28, 3, queries_per_task=6)
        predict_new_classes(build_learner("protonet", {}, PROBLEM), support, queries[:1], 28, 3)
        predict_new_classes(build_learner("reptile", {"transductive": False, "test_inner_steps": 1}, PROBLEM),
                            support, queries[:1], 28, 3)
    assert few_query_warnings(caught) == []
    # learner.fit_predict, the images and labels of a Python caller
    with pytest.warns(MetalearnWarning, match=r"^maml normalises its query images together .*1 query image is fewer "
                                              r"than one per class \(3\)"):
        maml.fit_predict([f for f in sorted(support.rglob("*.png"))], [0, 1, 2], queries[:1], image_size=28,
                         channels=3)


def test_queries_are_classified_in_chunks_of_equal_sizes(new_classes, monkeypatch):
    """More queries than one pass takes are split evenly: no small last chunk normalised alone."""
    support, queries = new_classes

    class Recorder(nn.Module):
        problem = None

        def __init__(self):
            super().__init__()
            self.sizes = []

        def prepare_images(self, images, image_size, channels):
            return torch.zeros(len(images), channels, image_size, image_size)

        def fit_predict(self, support_x, support_y, query_x):
            self.sizes.append(query_x.shape[0])
            return torch.full((query_x.shape[0], 3), 1 / 3)

    monkeypatch.setattr(prediction, "QUERY_CHUNK", 4)
    learner = Recorder()
    result = predict_new_classes(learner, support, queries[:5], 28, 3)
    assert learner.sizes == [2, 3] and len(result["predictions"]) == 5
    learner.sizes = []
    predict_new_classes(learner, support, queries[:4], 28, 3)
    assert learner.sizes == [4]


def probabilities_of(result: dict) -> torch.Tensor:
    """predict_new_classes's probabilities as fit_predict gives them: (queries, classes)."""
    return torch.tensor([[p["probabilities"][name] for name in result["classes"]] for p in result["predictions"]])


@pytest.mark.parametrize("name", ["maml", "protonet"])
def test_fit_predict_classifies_more_queries_than_a_pass_takes_as_metalearn_predict_does(tmp_path, name):
    """300 queries, more than one pass takes (QUERY_CHUNK): fit_predict splits them as metalearn
    predict does (prediction.query_chunks, two passes of 150), so a learner whose answers depend
    on the queries classified together (MAML's batch statistics over the queries, ProtoNets'
    over support and queries) answers alike, to the bit, from files and from tensors; its memory
    is a pass's of 150 queries."""
    support, queries = tmp_path / "support", []
    for c, colour in enumerate(COLOURS):
        write_images(support / f"class{c}", 1, colour, seed=c)
        queries += write_images(tmp_path / "query" / f"class{c}", 100, colour, seed=10 + c)
    torch.manual_seed(0)
    learner = build_learner(name, {"test_inner_steps": 1} if name == "maml" else {}, PROBLEM)
    expected = probabilities_of(predict_new_classes(learner, support, [tmp_path / "query"], 28, 3))
    support_files = sorted(support.rglob("*.png"))
    passes = []
    predict = learner.predict
    learner.predict = lambda batch: passes.append(batch.query_x.shape[1]) or predict(batch)
    found = learner.fit_predict(support_files, [0, 1, 2], queries, image_size=28, channels=3)
    assert passes == [150, 150] and prediction.query_chunks(300) == [(0, 150), (150, 300)]
    assert torch.equal(found, expected)
    images = learner.prepare_images(queries, 28, 3)
    assert torch.equal(learner.fit_predict(learner.prepare_images(support_files, 28, 3), [0, 1, 2], images), expected)
    # each pass's logits, and what the chunks change: all 300 in one pass are normalised otherwise
    def logits(start: int, stop: int) -> torch.Tensor:
        with torch.no_grad():
            return predict(learner.task_batch(support_files, [0, 1, 2], images[start:stop]))[0]

    chunked, whole = torch.cat([logits(0, 150), logits(150, 300)]), logits(0, 300)
    assert torch.equal(chunked.softmax(-1), found)
    assert (whole - chunked).abs().max() > 1e-3


def test_platipus_fit_predict_draws_its_models_as_metalearn_predict_does(new_classes, monkeypatch):
    """PLATIPUS samples models: fit_predict draws them from a generator seeded as metalearn
    predict's (not from torch's global one, which it leaves as it was), on from one chunk to the
    next, so two calls agree and agree with predict_new_classes; ``generator=`` draws others."""
    from metalearn.errors import MetalearnError

    monkeypatch.setattr(prediction, "QUERY_CHUNK", 4)  # 6 queries: chunks of 3 and 3
    support, queries = new_classes
    torch.manual_seed(0)
    learner = build_learner("platipus", {"num_samples": 3, "test_inner_steps": 1}, PROBLEM)
    support_files = sorted(support.rglob("*.png"))
    expected = probabilities_of(predict_new_classes(learner, support, queries, 28, 3))
    state = torch.get_rng_state()
    first = learner.fit_predict(support_files, [0, 1, 2], queries, image_size=28, channels=3)
    assert torch.equal(torch.get_rng_state(), state)
    assert torch.equal(first, expected)
    assert torch.equal(learner.fit_predict(support_files, [0, 1, 2], queries, image_size=28, channels=3), first)
    other = learner.fit_predict(support_files, [0, 1, 2], queries, image_size=28, channels=3,
                                generator=torch.Generator().manual_seed(1))
    assert (other - first).abs().max() > 1e-4
    # within one pass, the mean of sample_probabilities (seeded alike by default)
    monkeypatch.setattr(prediction, "QUERY_CHUNK", 256)
    one_pass = learner.fit_predict(support_files, [0, 1, 2], queries, image_size=28, channels=3)
    samples = learner.sample_probabilities(support_files, [0, 1, 2], queries, image_size=28, channels=3)
    assert samples.shape == (3, 6, 3) and torch.equal(samples.mean(0), one_pass)
    assert torch.equal(torch.get_rng_state(), state)
    with pytest.raises(MetalearnError, match=r"^generator must be a torch.Generator .*got int$"):
        learner.fit_predict(support_files, [0, 1, 2], queries, image_size=28, channels=3, generator=0)


def test_metalearn_predict_prints_the_few_queries_warning_as_one_line(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("METALEARN_CACHE", str(tmp_path / "cache"))
    for c in range(6):
        write_images(tmp_path / "data" / f"class{c}", 3, (40 * c, 200 - 30 * c, 100), seed=c)
    run_dir = tmp_path / "run"
    code, out, err = run(["train", "maml", "--dataset", "folder", "--data-dir", tmp_path / "data", "--image-size", 28,
                          "--ways", 3, "--shots", 1, "--query", 1, "--steps", 0, "--val-every", 0, "--no-eval",
                          "--split-fractions", "1,0,0", "--test-inner-steps", 1, "--run-dir", run_dir,
                          "--no-progress"], capsys)
    assert code == 0, err
    support = tmp_path / "new" / "support"
    queries = []
    for c, colour in enumerate(COLOURS):
        write_images(support / f"c{c}", 1, colour, seed=20 + c)
        queries += write_images(tmp_path / "new" / "query" / f"c{c}", 1, colour, seed=30 + c)
    code, out, err = run(["predict", run_dir, "--support", support, "--query", queries[0]], capsys)
    assert code == 0, err
    warned = [line for line in err.strip().splitlines() if line.startswith("warning: ")]
    assert len(warned) == 1 and len(err.strip().splitlines()) == 1, err
    assert warned[0].startswith("warning: maml normalises its query images together"), warned
    assert "classify at least 3 query images together" in warned[0]
    code, out, err = run(["predict", run_dir, "--support", support, "--query", tmp_path / "new" / "query"], capsys)
    assert code == 0 and "warning" not in err, err


# -- query images that are support images ----------------------------------------------------


def test_support_images_among_the_queries_are_named_truthfully(new_classes):
    """A support image given as a query is not sure to get its own label (a prototype of several
    shots, an adapted network): the warning says it is no test of new images, not that its
    label is repeated."""
    support, queries = new_classes
    shots = [[path] for path in sorted(support.glob("*/*.png"))]
    with pytest.warns(MetalearnWarning) as caught:
        warn_of_query_in_support(shots, [shots[0][0], shots[1][0], queries[0]])
    message = str(caught[0].message)
    assert message == (f"2 of the 3 query images are also in the support set (e.g. {shots[0][0]}): the learner was "
                       "given them with their labels, so their predictions (and an accuracy counting them) do not "
                       "show how it classifies new images; query other images to test it")
    with pytest.warns(MetalearnWarning, match=r"^1 of the 2 query images is also in the support set .*: the learner "
                                              r"was given it with its label, so its prediction \(and an accuracy "
                                              r"counting it\) does not show"):
        warn_of_query_in_support(shots, [shots[2][0], queries[0]])


# -- the learning curve of a short run -----------------------------------------------------


def test_log_every_defaults_to_about_ten_lines_for_a_short_run():
    assert [default_log_every(steps) for steps in (0, 5, 50, 120, 499, 500, 60000)] == [1, 1, 5, 12, 49, 50, 50]
    assert TrainConfig().log_every == LOG_EVERY == 50
    assert resolve_config("maml", train={"steps": 50}).train.log_every == 5
    assert resolve_config("maml", train={"steps": 50, "log_every": 50}).train.log_every == 50  # the user's own
    assert resolve_config("maml", train={"steps": 500}).train.log_every == 50
    # the presets and the papers' runs resolve as before; maml-rl sets its own
    assert resolve_config("maml").train.log_every == 50
    assert resolve_config("maml", preset="maml++").train.log_every == 50
    assert resolve_config("maml-rl").train.log_every == 1


def test_a_saved_or_resumed_run_keeps_its_log_every(tmp_path):
    """A run saved with 50 steps logged every 50 (before the default followed the steps) reads
    and resumes with 50; a short run that logged at the default of its length and is resumed
    for longer takes the default of the new length."""
    old = resolve_config("maml", train={"steps": 50, "log_every": 50})
    assert RunConfig.from_dict(json.loads(json.dumps(old.to_dict()))).train.log_every == 50
    RunDir(tmp_path / "old").write_config(old)
    assert resolve_config("maml", resume_from=tmp_path / "old").train.log_every == 50
    assert resolve_config("maml", train={"steps": 100}, resume_from=tmp_path / "old").train.log_every == 50
    short = resolve_config("maml", train={"steps": 50})
    RunDir(tmp_path / "short").write_config(short)
    assert resolve_config("maml", train={"steps": 60000}, resume_from=tmp_path / "short").train.log_every == 50
    assert resolve_config("maml", resume_from=tmp_path / "short").train.log_every == 5


def test_a_short_run_logs_about_ten_points(tmp_path, capsys):
    run_dir = tmp_path / "run"
    code, out, err = run(["train", "maml", "--dataset", "sinusoid", "--steps", 20, "--meta-batch-size", 2,
                          "--val-every", 0, "--no-eval", "--run-dir", run_dir, "--no-progress"], capsys)
    assert code == 0, err
    steps = [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()
             if "loss" in json.loads(line)]
    assert steps == list(range(2, 21, 2))


def test_one_query_of_small_images_is_predicted_not_refused_by_torch():
    """At 16 pixels Conv4's last feature map is 1x1, so one query image is one value per channel,
    which torch's native batch norm refuses in training mode; the decomposed form gives the bias
    for it, as for any batch of equal values (the few-queries warning says what that is worth)."""
    from metalearn.models.norm import batch_stat_norm

    torch.manual_seed(0)
    maml = build_learner("maml", {"model": "conv4", "test_inner_steps": 1}, Problem((3, 16, 16), 3, True))
    with pytest.warns(MetalearnWarning, match="normalises its query images together"):
        probabilities = maml.fit_predict(torch.rand(3, 3, 16, 16), [0, 1, 2], torch.rand(1, 3, 16, 16))
    assert probabilities.shape == (1, 3) and torch.isfinite(probabilities).all()
    one = torch.randn(1, 4, 1, 1)
    bias = torch.arange(4.0)
    assert torch.equal(batch_stat_norm(one, None, bias, 1e-5), bias.view(1, 4, 1, 1))
