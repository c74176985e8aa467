"""Augmentation of training episodes (``--augment``): each part's exact values, its draws (after
the episodes', for every task: seeds, rank slices and resume stay exact), training episodes only,
and the refusals."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from batches import assert_batches_equal, gen
from checkpoints import assert_same_weights
from cli_runner import one_line_error, run
from metalearn.api import resolve_config
from metalearn.config import RunConfig, TaskConfig
from metalearn.data.images import to_float
from metalearn.data.splits import ClassPool
from metalearn.datasets import DATASETS, Dataset
from metalearn.errors import ConfigError, MetalearnError
from metalearn.runs import RunDir
from metalearn.tasks import SinusoidTasks, build_task_source
from metalearn.tasks.episodes import (AugmentDraws, Augmentation, EpisodeSampler, crop_and_flip, crop_padding,
                                      jitter_colors)


def pixels(n: int, channels: int = 3, side: int = 12, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 256, (n, channels, side, side), dtype=torch.uint8, generator=gen(seed))


def sampler(augment: str = "", classes: int = 7, per_class: int = 6, side: int = 10, **options) -> EpisodeSampler:
    """3-way 2-shot 3-query episodes of a flat bank of ``classes`` classes of RGB images whose
    pixels follow from their position (no random numbers)."""
    n = classes * per_class
    images = (torch.arange(n * 3 * side * side) * 37 % 251).to(torch.uint8).view(n, 3, side, side)
    pool = ClassPool("mine", torch.arange(classes), torch.zeros(classes, dtype=torch.long))
    return EpisodeSampler(images, pool, 3, 2, 3, class_sizes=torch.full((classes,), per_class), augment=augment,
                          **options)


def digest(batch) -> str:
    h = hashlib.sha256()
    for t in (batch.support_x, batch.support_y, batch.query_x, batch.query_y):
        h.update(t.contiguous().numpy().tobytes())
    return h.hexdigest()


# -- each part's values ---------------------------------------------------------------------


def test_crop_padding_is_a_tenth_of_the_side():
    assert [crop_padding(side) for side in (84, 32, 28, 16, 4)] == [8, 3, 2, 1, 1]


def test_a_crop_is_the_padded_image_shifted_and_a_flip_its_mirror():
    x = pixels(4, side=20)  # padding 2: offsets 0..4
    offsets = torch.tensor([[0, 0], [4, 4], [1, 3], [2, 2]])
    padded = F.pad(x, (2, 2, 2, 2))
    expected = torch.stack([padded[i, :, top:top + 20, left:left + 20] for i, (top, left) in enumerate(offsets.tolist())])
    assert torch.equal(crop_and_flip(x, offsets, None), expected)
    assert torch.equal(crop_and_flip(x, offsets, None)[3], x[3])  # the middle offset: the image itself
    assert bool((crop_and_flip(x, offsets, None)[0, :, :2, :] == 0).all())  # the padding's zeros come in
    flips = torch.tensor([True, False, True, False])
    assert torch.equal(crop_and_flip(x, None, flips), torch.where(flips[:, None, None, None], x.flip(-1), x))
    assert torch.equal(crop_and_flip(x, None, flips)[0], x[0].flip(-1))
    # the crop first, then the mirror of the crop
    both = crop_and_flip(x, offsets, flips)
    assert torch.equal(both[0], expected[0].flip(-1)) and torch.equal(both[1], expected[1])
    # on uint8 pixels before the conversion or on floats after it: the same floats
    augmentation = Augmentation("crop,flip")
    draws = AugmentDraws(offsets=offsets, flips=flips)
    on_pixels = augmentation.apply(x, draws, torch.float32)
    assert on_pixels.dtype == torch.float32 and torch.equal(on_pixels, to_float(both))
    assert torch.equal(augmentation.apply(to_float(x, torch.float64), draws), to_float(both, torch.float64))


def grey(x: torch.Tensor) -> torch.Tensor:
    """torchvision's rgb_to_grayscale of one (C, H, W) image, (1, H, W)."""
    return x if x.shape[0] == 1 else (0.2989 * x[0] + 0.587 * x[1] + 0.114 * x[2])[None]


def blend(x: torch.Tensor, y: torch.Tensor, f: float) -> torch.Tensor:
    """torchvision's _blend for float images."""
    return (f * x + (1.0 - f) * y).clamp(0, 1)


def colour_reference(x: torch.Tensor, factors: list[float], order: list[int]) -> torch.Tensor:
    """ColorJitter's changes to one image as torchvision defines them, in ``order``."""
    b, c, s = factors
    for change in order:
        if change == 0:
            x = blend(x, torch.zeros_like(x), b)
        elif change == 1:
            x = blend(x, grey(x).mean(), c)
        elif x.shape[0] == 3:  # saturation: none for a grey image
            x = blend(x, grey(x), s)
    return x


@pytest.mark.parametrize("channels", [3, 1])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_colour_jitter_is_torchvisions_changes_in_the_order_drawn(channels, dtype):
    draws = Augmentation("color").draw((60,), 12, gen(1))
    assert bool(((draws.factors >= 0.6) & (draws.factors < 1.4)).all())
    assert torch.equal(draws.orders.sort(dim=1).values, torch.arange(3).expand(60, 3))
    assert len({tuple(order) for order in draws.orders.tolist()}) == 6  # every order drawn
    x = to_float(pixels(60, channels), dtype)
    changed = jitter_colors(x.clone(), draws.factors.to(dtype), draws.orders)
    for i in range(60):
        expected = colour_reference(x[i], draws.factors[i].tolist(), draws.orders[i].tolist())
        torch.testing.assert_close(changed[i], expected, rtol=0, atol=1e-6)
    assert changed.min() >= 0 and changed.max() <= 1


def test_colour_changes_by_their_definitions():
    x = torch.tensor([0.1, 0.5, 0.9]).view(1, 3, 1, 1).expand(1, 3, 2, 2).contiguous()
    order = torch.tensor([[0, 1, 2]])
    # brightness b multiplies every value and clamps at 1; contrast and saturation 1 change nothing
    brighter = jitter_colors(x.clone(), torch.tensor([[1.25, 1.0, 1.0]]), order)
    torch.testing.assert_close(brighter[0, :, 0, 0], torch.tensor([0.125, 0.625, 1.0]))
    darker = jitter_colors(x.clone(), torch.tensor([[0.6, 1.0, 1.0]]), order)
    torch.testing.assert_close(darker[0, :, 0, 0], torch.tensor([0.06, 0.3, 0.54]))
    # contrast c: toward the mean of the grey image (here one grey value, 0.6154) by 1 - c
    m = 0.2989 * 0.1 + 0.587 * 0.5 + 0.114 * 0.9
    flat = jitter_colors(x.clone(), torch.tensor([[1.0, 0.6, 1.0]]), order)
    torch.testing.assert_close(flat[0, :, 0, 0], torch.tensor([0.6 * v + 0.4 * m for v in (0.1, 0.5, 0.9)]))
    # saturation s: toward each pixel's grey value; below 1 a colour greys, a grey image stays
    pale = jitter_colors(x.clone(), torch.tensor([[1.0, 1.0, 0.6]]), order)
    torch.testing.assert_close(pale[0, :, 0, 0], torch.tensor([0.6 * v + 0.4 * m for v in (0.1, 0.5, 0.9)]))
    one = torch.rand(2, 1, 4, 4, generator=gen(0))
    assert torch.equal(jitter_colors(one.clone(), torch.tensor([[1.0, 1.0, 0.6]] * 2), order.expand(2, 3)), one)


def test_draws_cover_every_offset_and_flip_half():
    draws = Augmentation("crop,flip").draw((4000,), 84, gen(2))
    assert set(draws.offsets.flatten().tolist()) == set(range(17))  # padding 8 at 84: 0..16
    assert 0.45 < draws.flips.float().mean() < 0.55


# -- the sampler: draws after the episodes', for every task ----------------------------------


def test_without_augmentation_the_episodes_are_those_drawn_before_it_existed():
    """The digests of these batches as the sampler drew them before --augment existed (the same
    generator calls; torch's CPU generator)."""
    plain = sampler().sample(4, gen(5))
    assert digest(plain) == "53d5261a29a76c13246885845fac1d7a9af24b46ef22f9d845b5cc0a64ccb32f"
    assert_batches_equal(sampler(augment="").sample(4, gen(5)), plain)
    assert_batches_equal(sampler().augmented("").sample(4, gen(5)), plain)
    images = (torch.arange(9 * 4 * 8 * 8) * 13 % 256).to(torch.uint8).view(9, 4, 8, 8)  # rotated classes
    rotated = EpisodeSampler(images, ClassPool("rot", torch.arange(9), torch.full((9,), -1)), 5, 1, 2)
    assert digest(rotated.sample(6, gen(3))) == "4b0539b2f33dbff8303699c46b7ed36f6e4f574378b4d4e10d0c78f80d567714"


def test_augmented_episodes_are_the_same_episodes_changed():
    plain = sampler().sample(5, gen(7))
    flipped = sampler(augment="flip").sample(5, gen(7))
    assert torch.equal(flipped.support_y, plain.support_y) and torch.equal(flipped.query_y, plain.query_y)
    for a, b in ((flipped.support_x, plain.support_x), (flipped.query_x, plain.query_x)):
        same = (a == b).flatten(2).all(-1)
        mirrored = (a == b.flip(-1)).flatten(2).all(-1)
        assert bool((same | mirrored).all()) and bool(mirrored.any()) and bool(same.any())
    # support and query images, and every image of a task, change independently
    changed = sampler(augment="crop,flip,color").sample(5, gen(7))
    assert changed.support_x.shape == plain.support_x.shape and changed.support_x.dtype == torch.float32
    assert not torch.equal(changed.support_x, plain.support_x)
    assert len({tuple(image.flatten().tolist()[:20]) for image in changed.query_x[0]}) == 9


def test_a_seed_repeats_the_batch_and_a_rank_gets_its_slice_of_it():
    augmented = sampler(augment="crop,flip,color")
    full = augmented.sample(8, gen(11))
    assert_batches_equal(augmented.sample(8, gen(11)), full)
    assert not torch.equal(augmented.sample(8, gen(12)).query_x, full.query_x)
    for start, stop in ((0, 3), (3, 6), (6, 8), (5, 6)):
        assert_batches_equal(augmented.sample(8, gen(11), tasks=slice(start, stop)), full.select(slice(start, stop)))
    # float64: the same draws, the same changes to float64's rounding
    wide = sampler(augment="crop,flip,color", dtype=torch.float64).sample(8, gen(11))
    assert wide.query_x.dtype == torch.float64
    torch.testing.assert_close(wide.query_x.float(), full.query_x, rtol=0, atol=1e-6)


# -- the configuration, and the samplers a run builds -----------------------------------------


def test_the_option_is_checked_and_kept_in_the_order_it_applies():
    assert TaskConfig(dataset="folder", augment=" color, flip ").augment == "flip,color"
    assert TaskConfig(dataset="folder").augment == ""
    for value, problem in (("crop,blur", "unknown part 'blur'"), ("flip,crop,flip", "'flip' given twice"),
                           ("crop,", "an empty part between commas"), ("Crop", "unknown part 'Crop'")):
        with pytest.raises(ConfigError, match=f"^TaskConfig.augment takes parts among crop, flip and color, "
                                              f"comma-separated, each at most once .*: {problem}$"):
            TaskConfig(dataset="folder", augment=value)
    with pytest.raises(ConfigError, match="^EpisodeSampler.augment takes parts among crop, flip and color"):
        sampler(augment="blur")
    with pytest.raises(ConfigError, match=r"^EpisodeSampler.augment takes parts .* as one string"):
        sampler(augment=["crop"])
    assert TaskConfig(dataset="folder", augment="crop").for_testing().augment == ""
    # a run saved before the option existed reads as without augmentation
    saved = resolve_config("protonet", {"dataset": "folder", "augment": "flip"}).to_dict()
    assert saved["task"]["augment"] == "flip"
    del saved["task"]["augment"]
    assert RunConfig.from_dict(saved).task.augment == ""


def write_colours(root, classes: int = 12, per_class: int = 4, side: int = 16):
    """Class folders of noisy patches, one colour each (RGB PNGs)."""
    rng = np.random.default_rng(0)
    for i, colour in enumerate(rng.integers(0, 256, (classes, 3))):
        folder = root / f"colour{i:02d}"
        folder.mkdir(parents=True)
        for j in range(per_class):
            values = np.clip(colour + rng.normal(0, 30, (side, side, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(values, "RGB").save(folder / f"{j}.png")
    return root


@pytest.fixture(scope="module")
def colours(tmp_path_factory):
    return write_colours(tmp_path_factory.mktemp("colours"))


def test_only_the_training_sampler_of_a_run_augments(colours, monkeypatch):
    task = {"dataset": "folder", "ways": 3, "shots": 1, "query": 1, "image_size": 12,
            "split_fractions": "0.5,0.25,0.25"}
    augmented = resolve_config("protonet", {**task, "augment": "crop,flip,color"}).task
    plain = resolve_config("protonet", task).task
    train = build_task_source(augmented, "train", data_dir=colours, progress=False)
    assert train.augmentation.parts == ("crop", "flip", "color")
    plain_train = build_task_source(plain, "train", data_dir=colours, progress=False)
    assert not torch.equal(train.sample(4, gen(0)).query_x, plain_train.sample(4, gen(0)).query_x)
    for part, evaluation in (("val", False), ("test", False), ("train", True)):  # eval --part train: test episodes
        source = build_task_source(augmented, part, data_dir=colours, progress=False, evaluation=evaluation)
        assert not source.augmentation
        assert_batches_equal(source.sample(4, gen(0)), build_task_source(plain, part, data_dir=colours, progress=False,
                                                                         evaluation=evaluation).sample(4, gen(0)))
    # a dataset that does not take it refuses it in Python too, before reading any data, and so
    # does one whose task source draws no images
    with pytest.raises(ConfigError, match="^TaskConfig.augment does not apply to omniglot: its papers train on"):
        build_task_source(TaskConfig(augment="flip"), "train")
    points = Dataset("points", True, lambda task, shape, part, data_dir, progress: SinusoidTasks(),
                     lambda task: None, augments=True)
    monkeypatch.setitem(DATASETS, "points", points)
    with pytest.raises(ConfigError, match=r"^TaskConfig.augment changes images of the episodes an EpisodeSampler "
                                          r"draws; points's task source is a metalearn.tasks.sinusoid.SinusoidTasks$"):
        build_task_source(TaskConfig(dataset="points", augment="flip"), "train")
    assert isinstance(build_task_source(TaskConfig(dataset="points", augment="flip"), "test"), SinusoidTasks)


def test_a_trainer_refuses_samplers_whose_augmentation_its_config_does_not_record(tmp_path):
    from metalearn import ProtoNet
    from metalearn.models import Conv4
    from metalearn.training import Trainer

    task = {"dataset": "folder", "ways": 3, "shots": 2, "query": 3, "image_size": 10, "channels": 3}
    plain = resolve_config("protonet", task, train={"steps": 1, "val_every": 0})
    flipping = resolve_config("protonet", {**task, "augment": "flip"}, train={"steps": 1, "val_every": 0})
    learner = lambda: ProtoNet(Conv4(3, None, pooling="stride"))
    # config.json would say "no augmentation", and a resume from it would draw other images
    with pytest.raises(MetalearnError, match=r"^the Trainer's train_tasks change their images with augment='flip' "
                                             r"but the config records augment='': give the config the same"):
        Trainer(plain, learner(), sampler("flip"), None, tmp_path / "a")
    with pytest.raises(MetalearnError, match="config records augment='flip'"):
        Trainer(flipping, learner(), sampler(), None, tmp_path / "b")
    with pytest.raises(MetalearnError, match="^the Trainer's val_tasks change their images"):
        Trainer(flipping, learner(), sampler("flip"), sampler("flip"), tmp_path / "c")
    with pytest.raises(MetalearnError, match=r"^the config records augment='flip' but the Trainer's train_tasks "
                                             r"\(metalearn.tasks.sinusoid.SinusoidTasks\) change no images"):
        Trainer(flipping, learner(), SinusoidTasks(), None, tmp_path / "e")
    Trainer(flipping, learner(), sampler("flip"), sampler(), tmp_path / "d").fit(progress=False)
    assert RunDir(tmp_path / "d").read_config().task.augment == "flip"


# -- the command line ------------------------------------------------------------------------


def test_bad_values_and_datasets_without_images_are_refused_in_one_line(capsys):
    for method in ("protonet", "maml"):  # the option comes from TaskConfig's field, for every method
        code, out, err = run(["train", method, "--help"], capsys)
        assert code == 0 and "--augment TEXT" in out and "training episodes only" in " ".join(out.split())
    code, out, err = run(["train", "protonet", "--dataset", "folder", "--data-dir", "photos", "--augment",
                          "crop,blur", "--print-config"], capsys)
    one_line_error(code, out, err, "--augment takes parts among crop, flip and color, comma-separated, each at most "
                                   "once (e.g. crop,flip,color; empty for none), got 'crop,blur': unknown part 'blur'")
    code, out, err = run(["train", "protonet", "--dataset", "folder", "--data-dir", "photos", "--augment",
                          "flip,flip", "--print-config"], capsys)
    one_line_error(code, out, err, "got 'flip,flip': 'flip' given twice")
    code, out, err = run(["train", "maml", "--dataset", "sinusoid", "--augment", "flip", "--print-config"], capsys)
    one_line_error(code, out, err, "--augment does not apply to sinusoid, a regression dataset")
    code, out, err = run(["train", "maml-rl", "--env", "nav2d", "--augment", "flip", "--print-config"], capsys)
    one_line_error(code, out, err, "--augment does not apply to nav2d, a reinforcement-learning dataset")
    code, out, err = run(["train", "protonet", "--augment", "crop", "--print-config"], capsys)
    one_line_error(code, out, err, "--augment does not apply to omniglot: its papers train on the drawings as they "
                                   "are (a mirrored character can be another, b and d;")


def train(run_dir, colours, capsys, *options) -> None:
    code, out, err = run(["train", "protonet", "--dataset", "folder", "--data-dir", colours, "--image-size", 16,
                          "--ways", 3, "--shots", 1, "--query", 2, "--split-fractions", "0.5,0,0.5",
                          "--meta-batch-size", 3, "--val-every", 0, "--no-eval", "--checkpoint-every", 2,
                          "--run-dir", run_dir, "--no-progress", *options], capsys)
    assert code == 0, err


def test_a_run_with_augmentation_resumes_exactly_and_evaluates_without_it(colours, tmp_path, capsys, monkeypatch,
                                                                         one_thread):
    augment = ("--augment", "crop,flip,color")
    train(tmp_path / "straight", colours, capsys, "--steps", 4, *augment)
    train(tmp_path / "resumed", colours, capsys, "--steps", 2, *augment)
    train(tmp_path / "resumed", colours, capsys, "--steps", 4, "--resume")  # keeps the run's own augment
    assert_same_weights(tmp_path / "straight", tmp_path / "resumed", atol=0)
    assert json.loads((tmp_path / "resumed" / "config.json").read_text())["task"]["augment"] == "crop,flip,color"
    train(tmp_path / "plain", colours, capsys, "--steps", 4)
    with pytest.raises(AssertionError):  # augmentation changed what was trained
        assert_same_weights(tmp_path / "straight", tmp_path / "plain", atol=0)

    # another --augment on resume is refused as another task option is
    code, out, err = run(["train", "protonet", "--run-dir", tmp_path / "resumed", "--resume", "--steps", 6,
                          "--augment", "flip"], capsys)
    one_line_error(code, out, err, "--augment: 'crop,flip,color' there, 'flip' requested")
    assert "steps" not in err  # a longer run is no conflict: only what a resume may not change is named
    # a misspelt part is named as such, not as a change of the run
    code, out, err = run(["train", "protonet", "--run-dir", tmp_path / "resumed", "--resume", "--steps", 6,
                          "--augment", "colour"], capsys)
    one_line_error(code, out, err, "unknown part 'colour'")
    assert "another configuration" not in err

    # a run saved before --augment existed resumes as one without it
    train(tmp_path / "older", colours, capsys, "--steps", 2)
    run_dir = RunDir(tmp_path / "older")
    config = json.loads(run_dir.config_path.read_text())
    del config["task"]["augment"]
    run_dir.config_path.write_text(json.dumps(config))
    state = run_dir.read_checkpoint()
    del state["config"]["task"]["augment"]
    run_dir.write_checkpoint(state)
    train(tmp_path / "older", colours, capsys, "--steps", 4, "--resume")
    assert_same_weights(tmp_path / "plain", tmp_path / "older", atol=0)

    # evaluation draws no augmentation, of the test classes nor of the training classes
    def refused(*args, **kwargs):
        raise MetalearnError("Augmentation.apply was called")

    monkeypatch.setattr(Augmentation, "apply", refused)
    for part in ("test", "train"):
        code, out, err = run(["eval", tmp_path / "straight", "--episodes", 6, "--part", part], capsys)
        assert code == 0, err
    code, out, err = run(["train", "protonet", "--run-dir", tmp_path / "straight", "--resume", "--steps", 5], capsys)
    one_line_error(code, out, err, "Augmentation.apply was called")  # where training does


def test_colour_needs_grey_or_rgb_images_and_draws_fit_the_images_they_change():
    images = (torch.arange(6 * 4 * 10 * 10) % 251).to(torch.uint8).view(6, 4, 10, 10)  # RGBA
    pool = ClassPool("mine", torch.arange(2), torch.zeros(2, dtype=torch.long))
    refused = "^augment color changes grey .1-channel. or RGB .3-channel. images, not images of 4 channels"
    with pytest.raises(MetalearnError, match=refused):
        EpisodeSampler(images, pool, 2, 1, 1, class_sizes=torch.tensor([3, 3]), augment="crop,color")
    plain = EpisodeSampler(images, pool, 2, 1, 1, class_sizes=torch.tensor([3, 3]), augment="crop,flip")
    assert plain.sample(2, gen(0)).support_x.shape == (2, 2, 4, 10, 10)
    with pytest.raises(MetalearnError, match=refused):
        plain.augmented("color")
    crop = Augmentation("crop")
    with pytest.raises(MetalearnError, match="^the crop offsets were drawn for larger images than these 28x28"):
        crop.apply(pixels(64, side=28), crop.draw((64,), 84, gen(0)))
    assert crop.apply(pixels(64, side=28), crop.draw((64,), 28, gen(0))).shape == (64, 3, 28, 28)


def test_a_dataset_refuses_augment_unless_it_says_it_takes_it():
    # a dataset of one's own that does not opt in refuses --augment when a run is configured, as
    # omniglot (with its reason) and the regression datasets do; "" and "none" are no augmentation
    # anywhere, so a script that always passes --augment runs on every dataset
    assert "augment" in Dataset("mine", True, lambda *a: None, lambda task: None).inapplicable
    assert "augment" not in DATASETS["folder"].inapplicable and "augment" not in DATASETS["mini-imagenet"].inapplicable
    with pytest.raises(ConfigError, match="^TaskConfig.augment does not apply to sinusoid, a regression dataset"):
        resolve_config("maml", {"dataset": "sinusoid", "augment": "flip"})
    assert resolve_config("protonet", {"dataset": "omniglot", "augment": ""}).task.augment == ""
    assert resolve_config("protonet", {"dataset": "omniglot", "augment": " none "}).task.augment == ""
    assert resolve_config("protonet", {"dataset": "omniglot", "augment": "  "}).task.augment == ""
    with pytest.raises(ConfigError, match="^TaskConfig.augment does not apply to omniglot"):  # a bad value too
        resolve_config("protonet", {"dataset": "omniglot", "augment": "blur"})
    assert resolve_config("maml", {"dataset": "sinusoid", "augment": "none"}).task.augment == ""


def test_none_is_no_augmentation_and_an_episode_shape_is_a_dict():
    assert TaskConfig(dataset="folder", augment="none").augment == ""
    from metalearn.evaluation_setup import with_test_shape

    config = resolve_config("protonet", {"dataset": "omniglot", "ways": 5})
    with pytest.raises(MetalearnError, match=r"^an episode shape is a dict such as \{'ways': 20, 'shots': 1\}, got a list$"):
        with_test_shape(config, [("shots", 2)])
