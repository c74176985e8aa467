"""Datasets from image folders, the mini-ImageNet CSV layout, and few-shot prediction on new
classes (``metalearn predict``, ``MetaLearner.fit_predict``)."""

from __future__ import annotations

import dataclasses
import json
import os
import re
import signal
import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from batches import gen
from cli_runner import one_line_error, run
from images import write_tiny
from metalearn.algorithms import METHODS, build_learner
from metalearn.api import resolve_config
from metalearn.config import TaskConfig
from metalearn.data import folder as folder_module
from metalearn.data.folder import class_parts, class_split, folder_split, load_image_folder
from metalearn.data.images import decode_image, prepare_images, to_float
from metalearn.data.splits import ClassPool
from metalearn.errors import MetalearnError, MetalearnWarning, OptionError
from metalearn.evaluation_setup import with_split
from metalearn.runs import RunDir
from metalearn.tasks import build_task_source, problem_of
from metalearn.tasks.episodes import EpisodeSampler

SHAPES = ("circle", "square", "triangle", "cross", "ring", "diamond", "hbar", "vbar", "dot-pair")
COLOURS = {"red": (220, 40, 40), "green": (40, 180, 60), "blue": (40, 70, 220), "yellow": (230, 210, 40),
           "purple": (150, 50, 190), "cyan": (40, 200, 210), "orange": (240, 140, 30), "grey": (130, 130, 130)}


def draw_shape(shape: str, colour: tuple[int, int, int], size: int, rng: np.random.Generator) -> Image.Image:
    """One image of a coloured shape at a random place and scale on a noisy light background."""
    background = rng.integers(200, 256, (size, size, 3), dtype=np.uint8)
    img = Image.fromarray(background, "RGB")
    draw = ImageDraw.Draw(img)
    r = size * rng.uniform(0.22, 0.34)
    cx, cy = size * rng.uniform(0.38, 0.62, 2)
    box = (cx - r, cy - r, cx + r, cy + r)
    if shape == "circle":
        draw.ellipse(box, fill=colour)
    elif shape == "square":
        draw.rectangle(box, fill=colour)
    elif shape == "triangle":
        draw.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=colour)
    elif shape == "cross":
        draw.rectangle((cx - r, cy - r / 3, cx + r, cy + r / 3), fill=colour)
        draw.rectangle((cx - r / 3, cy - r, cx + r / 3, cy + r), fill=colour)
    elif shape == "ring":
        draw.ellipse(box, outline=colour, width=max(2, int(r / 3)))
    elif shape == "diamond":
        draw.polygon([(cx, cy - r), (cx + r, cy), (cx, cy + r), (cx - r, cy)], fill=colour)
    elif shape == "hbar":
        draw.rectangle((cx - r, cy - r / 4, cx + r, cy + r / 4), fill=colour)
    elif shape == "vbar":
        draw.rectangle((cx - r / 4, cy - r, cx + r / 4, cy + r), fill=colour)
    else:
        draw.ellipse((cx - r, cy - r / 3, cx - r / 3, cy + r / 3), fill=colour)
        draw.ellipse((cx + r / 3, cy - r / 3, cx + r, cy + r / 3), fill=colour)
    return img


def write_shapes(root: Path, per_class: int = 10, seed: int = 0) -> list[str]:
    """72 classes (shape x colour), ``per_class`` images each: RGB, sizes 24 to 64 pixels, PNG
    and JPEG mixed, one grey image among them. Returns the class names."""
    rng = np.random.default_rng(seed)
    names = []
    for shape in SHAPES:
        for colour_name, colour in COLOURS.items():
            name = f"{colour_name}-{shape}"
            folder = root / name
            folder.mkdir(parents=True)
            for i in range(per_class):
                img = draw_shape(shape, colour, int(rng.integers(24, 65)), rng)
                if i % 2:
                    img.save(folder / f"{i:03d}.jpg", quality=90)
                else:
                    img.save(folder / f"{i:03d}.png")
            names.append(name)
    Image.fromarray(rng.integers(0, 256, (30, 40), dtype=np.uint8), "L").save(root / names[0] / "grey.png")
    return names


@pytest.fixture(scope="module")
def shapes(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("shapes")
    write_shapes(root)
    return root


def one_file(folder: Path, pattern: str) -> Path:
    """The one file of ``folder`` that ``pattern`` matches (an evaluation of another folder is
    named by that folder's name and a hash of its path)."""
    found = sorted(folder.glob(pattern))
    assert len(found) == 1, (pattern, sorted(p.name for p in folder.iterdir()))
    return found[0]


# -- images as training sees them -----------------------------------------------------------


def test_prepare_images_is_the_samplers_conversion_and_the_caches_decoding(shapes, tmp_path):
    """Files, PIL images, uint8 and float tensors all come out as the cache and the sampler make
    them: decode_image's bytes divided by 255."""
    files = sorted((shapes / "red-circle").iterdir())[:3]
    expected = torch.stack([torch.from_numpy(decode_image(f, 28, 3)) for f in files]).float() / 255
    assert torch.equal(prepare_images(files, 28, 3), expected)
    assert torch.equal(prepare_images([str(f) for f in files], 28, 3), expected)
    with Image.open(files[0]) as img:
        assert torch.equal(prepare_images(img, 28, 3), expected[:1])
    uint8 = (expected * 255).round().to(torch.uint8)
    assert torch.equal(prepare_images(uint8, 28, 3), expected)
    assert torch.equal(to_float(uint8), expected)
    assert torch.equal(prepare_images(expected, 28, 3), expected)  # floats at the right size: as they are
    grey = prepare_images(files, 28, 1)
    assert grey.shape == (3, 1, 28, 28) and grey.dtype == torch.float32
    big = prepare_images(uint8, 56, 3)  # another size: resized as a file would be
    assert big.shape == (3, 3, 56, 56)
    with pytest.raises(MetalearnError, match="in \\[0, 1\\]"):
        prepare_images(expected * 255, 28, 3)
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"not a png")
    with pytest.raises(MetalearnError, match="cannot read image .*broken.png"):
        prepare_images([bad], 28, 3)
    # lists of tensors or arrays (one image each, any size), a read-only array as PIL gives it,
    # and channels last named; sizes, channel counts and values out of range in one line
    assert torch.equal(prepare_images(list(expected), 28, 3), expected)
    assert torch.equal(prepare_images([expected[0].numpy(), files[1], expected[2]], 28, 3), expected)
    with Image.open(files[0]) as img:
        pixels = np.asarray(img.convert("RGB"))  # (H, W, 3), read-only
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # torch.from_numpy of a read-only array warns
        assert torch.equal(prepare_images(pixels.transpose(2, 0, 1).copy()[None], 28, 3), expected[:1])
    with pytest.raises(MetalearnError, match=r"got shape \(\d+, \d+, 3\): channels last\? give x.permute"):
        prepare_images(pixels, 28, 3)  # the shape as given, not as read (one image)
    with pytest.raises(MetalearnError, match=r"got shape \(5, 28, 28\): 5 grey images\? give x\[:, None\]"):
        prepare_images(torch.rand(5, 28, 28), 28, 1)
    for size in (0, 28.0, "28", True):
        with pytest.raises(MetalearnError, match=f"image_size must be a whole number of pixels of at least 1, got {size!r}"):
            prepare_images(files, size, 3)
    with pytest.raises(MetalearnError, match="channels must be 1 \\(grey\\) or 3 \\(RGB\\), got '3'"):
        prepare_images(files, 28, "3")
    with pytest.raises(MetalearnError, match="no images given \\(a tensor of 0 images\\)"):
        prepare_images(expected[:0], 28, 3)
    with pytest.raises(MetalearnError, match="NaN or infinite"):
        prepare_images(torch.full((1, 3, 28, 28), float("nan")), 28, 3)


# -- the folder dataset ---------------------------------------------------------------------


def test_the_folder_loaders_name_what_they_take(shapes, tmp_path):
    folder = load_image_folder(shapes, 16, 3, cache_dir=tmp_path)
    for size in (16.0, "16", 2):
        with pytest.raises(MetalearnError, match=f"image size must be a whole number of at least 4 pixels, got {size!r}"):
            load_image_folder(shapes, size, 3, cache_dir=tmp_path)
    with pytest.raises(MetalearnError, match="the folder's split needs an ImageFolder \\(load_image_folder\\(path, "
                                             "image_size, channels\\)\\), got PosixPath"):
        folder_split(shapes, "train")
    with pytest.raises(MetalearnError, match="fractions are given as text, train,val,test"):
        folder_split(folder, "train", fractions=(0.5, 0.25, 0.25))
    with pytest.raises(MetalearnError, match="unknown split part 'testing': give train, val, test"):
        folder_split(folder, "testing")
    with pytest.raises(MetalearnError, match="overrides are a dict of method options"):
        from metalearn.checkpoints import load_trained

        load_trained(tmp_path / "no-run", overrides=["distance"])


def test_files_that_are_not_images_are_named_in_one_warning(tmp_path):
    """A class folder's other files (notes, a HEIC photo) are left out with one warning naming
    them; files beside the class folders (a README) and hidden files are left out silently."""
    rng = np.random.default_rng(0)
    for c in range(3):
        (tmp_path / "data" / f"class{c}").mkdir(parents=True)
        for i in range(2):
            draw_shape(SHAPES[c], (200, 0, 0), 20, rng).save(tmp_path / "data" / f"class{c}" / f"{i}.png")
    (tmp_path / "data" / "README.txt").write_text("about these images")
    (tmp_path / "data" / "class1" / ".DS_Store").write_bytes(b"")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        load_image_folder(tmp_path / "data", 16, 3, cache_dir=tmp_path / "cache")
    for name in ("IMG_1.HEIC", "IMG_2.HEIC", "notes.txt"):
        (tmp_path / "data" / "class2" / name).write_bytes(b"x")
    with pytest.warns(MetalearnWarning) as caught:
        folder = load_image_folder(tmp_path / "data", 16, 3, cache_dir=tmp_path / "cache")
    assert len(caught) == 1
    assert str(caught[0].message) == (f"image folder {tmp_path / 'data'}: skipped 3 files that are not images by their "
                                      "names (PNG, JPG, BMP, GIF, WEBP, TIFF): "
                                      f"{tmp_path / 'data' / 'class2' / 'IMG_1.HEIC'}, "
                                      f"{tmp_path / 'data' / 'class2' / 'IMG_2.HEIC'} and 1 more; convert them to use them")
    assert folder.class_sizes.tolist() == [2, 2, 2]


def test_folder_is_read_split_and_sampled_in_colour(shapes, tmp_path):
    folder = load_image_folder(shapes, 20, 3, cache_dir=tmp_path)
    assert folder.layout == "classes" and len(folder.class_names) == 72
    assert folder.images.shape == (72 * 10 + 1, 3, 20, 20)
    assert folder.class_sizes[folder.class_names.index("red-circle")] == 11  # with its grey image
    parts = class_parts(folder)
    assert [parts.count(p) for p in ("train", "val", "test")] == [46, 12, 14]  # round(0.64 * 72), round(0.16 * 72)
    assert class_parts(folder) == parts  # seeded: the same split every time
    assert class_parts(folder, "0.5,0.25,0.25").count("train") == 36
    with pytest.raises(MetalearnError, match="three fractions train,val,test summing to 1"):
        class_parts(folder, "0.5,0.6,0.1")
    task = TaskConfig(dataset="folder", image_size=20, channels=3, ways=5, shots=2, query=3)
    batch = build_task_source(task, "train", data_dir=shapes).sample(4, gen(0))
    assert batch.support_x.shape == (4, 10, 3, 20, 20) and batch.query_x.shape == (4, 15, 3, 20, 20)
    assert problem_of(task).input_shape == (3, 20, 20)
    # colour survives: a red class's support images are redder than they are blue
    train = folder_split(folder, "train")
    red = next(i for i, c in enumerate(train.characters.tolist()) if folder.class_names[c].startswith("red-"))
    x = to_float(torch.from_numpy(folder.images[int(folder.class_sizes[:train.characters[red]].sum()):][:10]))
    assert bool((x[:, 0].mean((1, 2)) > x[:, 2].mean((1, 2)) + 0.02).all())


def test_decoding_in_several_processes_gives_the_same_array(shapes, monkeypatch):
    monkeypatch.setattr(folder_module, "PARALLEL_FROM", 1)
    monkeypatch.setattr(folder_module, "CHUNK", 100)
    one = folder_module.read_folder(shapes, 12, 3, workers=1)
    two = folder_module.read_folder(shapes, 12, 3, workers=2)
    assert np.array_equal(one.images, two.images) and one.content_hash == two.content_hash


def test_very_large_images_are_decoded_a_few_at_a_time_over_the_processes(shapes, monkeypatch, tmp_path):
    """A decode of more than LARGE_PIXELS holds the pool's gate (a semaphore shared by the
    decoding processes), so that many processes meeting such images together stay within a few
    decodes' memory; smaller images pass freely, and the processes' array is the one process's."""
    from metalearn.data import images as images_module

    entered = []

    class Gate:
        def __enter__(self):
            entered.append(True)

        def __exit__(self, *exc):
            return False

    monkeypatch.setattr(images_module, "LARGE_IMAGE_GATE", Gate())
    Image.new("RGB", (40, 30)).save(tmp_path / "large.png")
    monkeypatch.setattr(images_module, "LARGE_PIXELS", 40 * 30)
    decode_image(tmp_path / "large.png", 8, 3)
    assert entered == []  # not more than the bound
    monkeypatch.setattr(images_module, "LARGE_PIXELS", 40 * 30 - 1)
    decode_image(tmp_path / "large.png", 8, 3)
    assert entered == [True]
    monkeypatch.setattr(images_module, "LARGE_IMAGE_GATE", None)
    monkeypatch.setattr(images_module, "LARGE_PIXELS", 10)  # every image of the folder through the real gate
    monkeypatch.setattr(folder_module, "PARALLEL_FROM", 1)
    monkeypatch.setattr(folder_module, "LARGE_AT_ONCE", 1)
    one = folder_module.read_folder(shapes, 12, 3, workers=1)
    two = folder_module.read_folder(shapes, 12, 3, workers=2)
    assert np.array_equal(one.images, two.images)


def _killed_decoder(paths, image_size, channels):
    """A decoding process killed as the kernel's out-of-memory killer kills one."""
    os.kill(os.getpid(), signal.SIGKILL)


def test_a_decoding_process_killed_is_one_line_naming_memory(shapes, monkeypatch):
    """The pool's BrokenProcessPool, with its traceback, was what a user saw when the system
    killed a decoding process for lack of memory: one line instead, naming the array's size."""
    monkeypatch.setattr(folder_module, "PARALLEL_FROM", 1)
    monkeypatch.setattr(folder_module, "_decode_chunk", _killed_decoder)
    with pytest.raises(MetalearnError, match=r"^a process decoding the \d+ images died \(killed by the system, most "
                                             r"often for lack of memory: large source images take far more while "
                                             r"decoded than their .* GB at this size\); free memory, or give a smaller "
                                             r"image_size or shrink the largest images, and run again$"):
        folder_module.read_folder(shapes, 12, 3, workers=2)


def test_a_split_file_chooses_the_classes(shapes, tmp_path):
    folder = load_image_folder(shapes, 8, 3, cache_dir=tmp_path)
    spec = {"train": list(folder.class_names[:10]), "val": [folder.class_names[10]], "test": list(folder.class_names[11:15])}
    path = tmp_path / "split.json"
    path.write_text(json.dumps(spec))
    parts = class_parts(folder, split_file=str(path))
    assert parts[:10] == ("train",) * 10 and parts[10] == "val" and parts[11:15] == ("test",) * 4
    assert set(parts[15:]) == {""}  # classes the file leaves out are not used
    path.write_text(json.dumps({"train": ["no-such-class"]}))
    with pytest.raises(MetalearnError, match="names class 'no-such-class', which the folder lacks"):
        class_parts(folder, split_file=str(path))
    # an entry that is not a class name: one line naming the file, the part and the entry
    for entry, shown in (([folder.class_names[0]], f'["{folder.class_names[0]}"]'), (3, "3"), (None, "null")):
        path.write_text(json.dumps({"train": list(folder.class_names[:2]), "val": [entry]}))
        with pytest.raises(MetalearnError) as info:
            class_parts(folder, split_file=str(path))
        assert str(info.value).startswith(f"split_file {path}: val lists {shown}, not a class name"), info.value
        assert "\n" not in str(info.value)


def test_hidden_files_and_folders_at_any_depth_are_skipped(shapes, tmp_path):
    """A thumbnail folder (``.thumbs/``) inside a class is not part of the class, in training
    and in predict's support and query folders alike, whether its images decode or not."""
    from metalearn.prediction import read_query, read_support

    root = tmp_path / "photos"
    for name in ("red-circle", "blue-square", "green-ring"):
        shutil.copytree(shapes / name, root / name)
    decodable = sorted((root / "red-circle").glob("*.png"))[0]
    (root / "red-circle" / ".thumbs" / "deeper").mkdir(parents=True)
    shutil.copy(decodable, root / "red-circle" / ".thumbs" / "thumb.png")
    shutil.copy(decodable, root / "red-circle" / ".thumbs" / "deeper" / "thumb.png")
    (root / "blue-square" / "sub" / ".cache").mkdir(parents=True)
    (root / "blue-square" / "sub" / ".cache" / "broken.jpg").write_bytes(b"\xff\xd8 not an image")
    (root / "green-ring" / "._000.png").write_bytes(b"resource fork")
    visible = {name: len([p for p in (shapes / name).iterdir()]) for name in ("red-circle", "blue-square", "green-ring")}
    folder = load_image_folder(root, 12, 3, cache_dir=tmp_path / "cache")
    assert dict(zip(folder.class_names, folder.class_sizes.tolist())) == visible
    names, files = read_support(root)
    assert names == ["blue-square", "green-ring", "red-circle"]
    assert [len(f) for f in files] == [visible[n] for n in names]
    query = read_query([root])
    assert len(query) == sum(visible.values()) and not any(".thumbs" in str(f) or ".cache" in str(f) for f in query)


def test_classes_of_unequal_sizes_draw_only_their_own_images():
    """A flat bank of ragged classes: every draw lies within its class, and when every class has
    as many images the draws are the dense sampler's, image for image."""
    sizes = torch.tensor([3, 7, 5, 9])
    images = torch.arange(int(sizes.sum()), dtype=torch.uint8).view(-1, 1, 1, 1).expand(-1, 1, 2, 2).contiguous()
    pool = ClassPool("mine", torch.arange(4), torch.zeros(4, dtype=torch.long))
    sampler = EpisodeSampler(images, pool, 3, 1, 2, class_sizes=sizes)
    classes, draws, _ = sampler.sample_indices(500, gen(0))
    assert bool((draws < sizes[classes][..., None]).all())
    batch = sampler.sample(500, gen(0))
    values = torch.cat([batch.support_x.view(500, 3, 1, -1)[..., 0],
                        batch.query_x.view(500, 3, 2, -1)[..., 0]], 2) * 255
    starts = torch.cumsum(sizes, 0) - sizes
    assert torch.equal(values.round().long(), starts[classes][..., None] + draws)
    dense = torch.randint(0, 255, (4, 6, 1, 5, 5), dtype=torch.uint8)
    flat = EpisodeSampler(dense.reshape(24, 1, 5, 5), pool, 3, 2, 2, class_sizes=torch.full((4,), 6))
    a, b = EpisodeSampler(dense, pool, 3, 2, 2).sample(20, gen(1)), flat.sample(20, gen(1))
    assert torch.equal(a.support_x, b.support_x) and torch.equal(a.query_x, b.query_x)


def test_omniglot_written_as_class_folders_gives_the_same_episodes(omniglot, tmp_path):
    """The first 40 characters written as grey PNGs under train/ and 10 under val/ and test/:
    the folder dataset reads the same pixels and draws the same episodes as the built-in loader."""
    root = tmp_path / "omniglot-folders"
    layout = {"train": range(0, 40), "val": range(40, 50), "test": range(50, 60)}
    for part, characters in layout.items():
        for c in characters:
            folder = root / part / f"c{c:04d}"
            folder.mkdir(parents=True)
            for d in range(20):
                Image.fromarray(omniglot.images[c, d], "L").save(folder / f"{d:02d}.png")
    task = TaskConfig(dataset="folder", image_size=28, channels=1, ways=5, shots=1, query=3)
    from_folder = build_task_source(task, "train", data_dir=root, progress=False)
    images = torch.from_numpy(omniglot.images)
    pool = ClassPool("first-40", torch.arange(40), torch.zeros(40, dtype=torch.long))
    built_in = EpisodeSampler(images, pool, 5, 1, 3)
    for seed in (0, 1):
        a, b = built_in.sample(16, gen(seed)), from_folder.sample(16, gen(seed))
        for name in ("support_x", "support_y", "query_x", "query_y"):
            assert torch.equal(getattr(a, name), getattr(b, name)), name
    test_pool = ClassPool("test", torch.arange(50, 60), torch.zeros(10, dtype=torch.long))
    a = EpisodeSampler(images, test_pool, 5, 1, 3).sample(8, gen(2))
    b = build_task_source(task, "test", data_dir=root, progress=False).sample(8, gen(2))
    assert torch.equal(a.query_x, b.query_x)


def write_mini_imagenet(root: Path, classes: dict[str, int], per_class: int = 6, seed: int = 0) -> None:
    """An imitation of Ravi & Larochelle's release: images/<wnid><number>.jpg and one CSV per part."""
    rng = np.random.default_rng(seed)
    (root / "images").mkdir(parents=True)
    rows = {"train": [], "val": [], "test": []}
    parts = ["train"] * classes["train"] + ["val"] * classes["val"] + ["test"] * classes["test"]
    for c, part in enumerate(parts):
        wnid = f"n{1000000 + c:08d}"
        shape, colour = SHAPES[c % len(SHAPES)], list(COLOURS.values())[c // len(SHAPES) % len(COLOURS)]
        for i in range(per_class):
            name = f"{wnid}{i + 1:08d}.jpg"
            draw_shape(shape, colour, int(rng.integers(40, 100)), rng).save(root / "images" / name)
            rows[part].append(f"{name},{wnid}")
    for part, lines in rows.items():
        (root / f"{part}.csv").write_text("filename,label\n" + "\n".join(lines) + "\n")


def test_mini_imagenet_csv_layout_and_the_cache_rebuilt_after_a_change(tmp_path, monkeypatch):
    root = tmp_path / "mini"
    write_mini_imagenet(root, {"train": 8, "val": 3, "test": 4})
    cache = tmp_path / "cache"
    folder = load_image_folder(root, 16, 3, cache_dir=cache)
    assert folder.layout == "csv" and folder.images.shape == (15 * 6, 3, 16, 16)
    assert folder.parts.count("train") == 8 and folder.parts.count("test") == 4
    assert folder.class_names[0] == "n01000000"
    with pytest.raises(MetalearnError, match="^split_fractions cannot apply: this folder's train.csv"):
        class_parts(folder, "0.5,0.25,0.25")  # the release's split, not a silently unused option
    task = resolve_config("protonet", {"dataset": "mini-imagenet", "image_size": 16, "ways": 3, "shots": 1,
                                       "query": 2}).task
    assert task.channels == 3 and task.split == "folder"
    val = build_task_source(task, "val", data_dir=root, progress=False)
    assert val.sample(2, gen(0)).query_x.shape == (2, 6, 3, 16, 16)
    # the paper's setting for mini-imagenet: 84x84 RGB, 15 queries per class, MAML's 32-filter network
    maml = resolve_config("maml", {"dataset": "mini-imagenet"})
    assert (maml.task.image_size, maml.task.channels, maml.task.query) == (84, 3, 15)
    assert maml.method_config["model"] == "conv4-maxpool-32" and maml.method_config["inner_lr"] == 0.01
    assert (maml.method_config["inner_steps"], maml.method_config["test_inner_steps"]) == (5, 10)
    assert maml.train.meta_batch_size == 4
    assert resolve_config("maml", {"dataset": "mini-imagenet", "shots": 5}).train.meta_batch_size == 2

    # unchanged: read from the cache (decoding would fail)
    monkeypatch.setattr(folder_module, "_LOADED", {})

    def no_decoding(*args, **kwargs):
        raise AssertionError("the folder was decoded again")

    monkeypatch.setattr(folder_module, "decode_image", no_decoding)
    again = load_image_folder(root, 16, 3, cache_dir=cache)
    assert np.array_equal(again.images, folder.images) and again.content_hash == folder.content_hash
    monkeypatch.undo()
    # one image replaced by another (its size and time change): rebuilt, with the new pixels
    first = root / "images" / "n0100000000000001.jpg"
    Image.new("RGB", (50, 50), (0, 0, 0)).save(first)
    os.utime(first, ns=(1, 1))
    changed = load_image_folder(root, 16, 3, cache_dir=cache)
    assert changed.images[0].max() < 30 and not np.array_equal(changed.images[0], folder.images[0])
    assert [p.name for p in cache.iterdir()] == [next(cache.iterdir()).name]  # one cache file, no leftovers
    # a class added to test.csv: rebuilt too
    Image.new("RGB", (40, 40), (0, 90, 200)).save(root / "images" / "extra1.jpg")
    Image.new("RGB", (40, 40), (200, 90, 0)).save(root / "images" / "extra2.jpg")
    with open(root / "test.csv", "a") as f:
        f.write("extra1.jpg,extra\n")
    assert "extra" in load_image_folder(root, 16, 3, cache_dir=cache).class_names
    with pytest.raises(MetalearnError, match="class n01000000 is in both train.csv and test.csv"):
        with open(root / "test.csv", "a") as f:
            f.write("extra2.jpg,n01000000\n")
        load_image_folder(root, 16, 3, cache_dir=cache)


def test_an_option_a_dataset_refuses_is_refused_for_its_reason(capsys):
    """mini-ImageNet's split is its release's, Omniglot's one of the published splits, and
    Omniglot is grey: the refusal says so, not that the dataset is of a kind (folder is a
    classification dataset that takes these options); options of one reason are named
    together, in one line."""
    from metalearn.errors import ConfigError

    code, out, err = run(["train", "protonet", "--dataset", "mini-imagenet", "--data-dir", "mini",
                          "--split-fractions", "0.5,0,0.5"], capsys)
    one_line_error(code, out, err, "--split-fractions does not apply to mini-imagenet: its split is the release's "
                                   "own, its train.csv, val.csv and test.csv or its train/ val/ test/ folders (to split "
                                   "class folders of your own, use --dataset folder)")
    code, out, err = run(["train", "protonet", "--dataset", "omniglot", "--channels", 3, "--split-file", "s.json",
                          "--split-fractions", "0,0,1"], capsys)
    one_line_error(code, out, err, "--channels does not apply to omniglot: its images are black-and-white drawings, "
                                   "always read as 1 (grey) channel; --split-fractions, --split-file do not apply "
                                   "either: its classes are split by one of the published splits, chosen with --split "
                                   "(maml, vinyals, vinyals-trainval or lake)")
    code, out, err = run(["train", "protonet", "--dataset", "folder", "--split", "lake"], capsys)
    one_line_error(code, out, err, "--split does not apply to folder: --split chooses one of Omniglot's published "
                                   "splits; an image folder is split by its train/ val/ test/ folders or CSV files, "
                                   "else by --split-fractions or --split-file")
    with pytest.raises(ConfigError, match=r"^TaskConfig.noise_std does not apply to mini-imagenet, a classification "
                                          r"dataset; TaskConfig.split_file does not apply either: its split is"):
        resolve_config("protonet", {"dataset": "mini-imagenet", "noise_std": 0.1, "split_file": "s.json"})


def test_csv_rows_listing_one_image_twice_are_refused(tmp_path):
    """An image under two CSV rows (twice in one class, or under two labels or parts) could be
    support and query of one episode, or a training image tested on: refused, naming the file
    and both rows."""
    root = tmp_path / "mini"
    write_mini_imagenet(root, {"train": 3, "val": 1, "test": 2}, per_class=3)
    assert load_image_folder(root, 16, 3, cache_dir=tmp_path / "cache").images.shape[0] == 18
    train = (root / "train.csv").read_text()
    first = "n0100000000000001.jpg"  # train.csv line 2 (after the header), class n01000000
    (root / "train.csv").write_text(train + f"{first},n01000000\n")  # twice in its own class
    with pytest.raises(MetalearnError, match=f"{first} is listed twice, in train.csv line 2 and train.csv line 11"):
        load_image_folder(root, 16, 3, cache_dir=tmp_path / "cache")
    (root / "train.csv").write_text(train)
    test = (root / "test.csv").read_text()
    (root / "test.csv").write_text(test + f"./{first},n01000005\n")  # the same file under a test class
    with pytest.raises(MetalearnError, match=f"{first} is listed twice, in train.csv line 2 and test.csv line 8"):
        load_image_folder(root, 16, 3, cache_dir=tmp_path / "cache")
    (root / "test.csv").write_text(test)
    assert load_image_folder(root, 16, 3, cache_dir=tmp_path / "cache").images.shape[0] == 18


def test_csv_rows_naming_files_outside_images_are_refused(tmp_path):
    """A CSV from someone else names a file outside images/ (absolute, or through ..): refused in
    one line, not read into the cache; a name in a subfolder of images/ is fine."""
    root = tmp_path / "mini"
    write_mini_imagenet(root, {"train": 3, "val": 1, "test": 2}, per_class=3)
    train = (root / "train.csv").read_text()
    outside = tmp_path / "private.jpg"
    shutil.copy(root / "images" / "n0100000000000001.jpg", outside)
    for name in (str(outside), "../../private.jpg", "sub/../../../private.jpg"):
        (root / "train.csv").write_text(train + f"{name},n01000009\n")
        with pytest.raises(MetalearnError, match=f"train.csv line 11 names {re.escape(name)}, which is not inside "):
            load_image_folder(root, 16, 3, cache_dir=tmp_path / "cache")
    (root / "images" / "sub").mkdir()
    shutil.copy(outside, root / "images" / "sub" / "private.jpg")
    (root / "train.csv").write_text(train + "sub/private.jpg,n01000000\n")
    assert load_image_folder(root, 16, 3, cache_dir=tmp_path / "cache").images.shape[0] == 19


def test_csv_rows_naming_one_file_by_two_names_are_refused(tmp_path):
    """A hard link (or, on a case-insensitive disk, another spelling of a name) lists one picture
    in train.csv and test.csv under two names: refused as in the class-folder layouts."""
    root = tmp_path / "mini"
    write_mini_imagenet(root, {"train": 3, "val": 1, "test": 2}, per_class=3)
    first = root / "images" / "n0100000000000001.jpg"
    os.link(first, root / "images" / "copy.jpg")
    (root / "test.csv").write_text((root / "test.csv").read_text() + "copy.jpg,n01000005\n")
    with pytest.raises(MetalearnError, match=f"{re.escape(str(first))} and .*copy.jpg are one file \\(hard links"):
        load_image_folder(root, 16, 3, cache_dir=tmp_path / "cache")


def test_a_folder_of_a_long_name_is_cached_under_a_name_the_file_system_takes(tmp_path):
    """The cache file's name holds the folder's name: cut to 60 bytes on a character's boundary,
    so that a folder named with 70 characters of three bytes each (210 bytes) still trains."""
    from metalearn.data.folder import cache_path

    rng = np.random.default_rng(0)
    root = tmp_path / ("照片" * 35)
    for c in range(3):
        (root / f"class{c}").mkdir(parents=True)
        for i in range(2):
            draw_shape(SHAPES[c], (200, 0, 0), 20, rng).save(root / f"class{c}" / f"{i}.png")
    path = cache_path(tmp_path / "cache", root, 16, 3)
    assert path.name.startswith("folder-" + "照片" * 10 + "-") and len(path.name.encode()) < 150
    assert load_image_folder(root, 16, 3, cache_dir=tmp_path / "cache").images.shape[0] == 6
    assert path.is_file()


def test_a_class_folder_in_two_parts_is_refused(tmp_path):
    """train/dog and test/dog: the test classes would be trained on; refused, naming the class
    and both parts."""
    rng = np.random.default_rng(0)
    for part, names in (("train", ["cat", "dog", "owl"]), ("val", ["ant"]), ("test", ["bee", "dog"])):
        for c, name in enumerate(names):
            (tmp_path / "data" / part / name).mkdir(parents=True)
            draw_shape(SHAPES[c], (200, 0, 0), 20, rng).save(tmp_path / "data" / part / name / "0.png")
    with pytest.raises(MetalearnError, match="class dog is in both train/ and test/: a class belongs to one part"):
        load_image_folder(tmp_path / "data", 16, 3, cache_dir=tmp_path / "cache")
    shutil.rmtree(tmp_path / "data" / "test" / "dog")
    folder = load_image_folder(tmp_path / "data", 16, 3, cache_dir=tmp_path / "cache")
    assert folder.layout == "parts" and folder.class_names == ("train/cat", "train/dog", "train/owl", "val/ant",
                                                              "test/bee")


# -- what identifies a folder, how it is split, and how it is read ------------------------------


def fresh_load(root: Path, cache: Path):
    """The folder read now (its images are otherwise read on first use), as a run reads it."""
    folder_module._LOADED.clear()
    folder = load_image_folder(root, 8, 1, cache_dir=cache)
    assert folder.images.shape[0] == int(folder.class_sizes.sum())
    return folder


def test_the_run_fingerprint_covers_the_split_file_and_the_csv_parts(tmp_path):
    """Resuming is refused when the data a run drew from changed; which classes are train, val
    and test is part of that data: a split file's assignment, or a class moved between CSVs."""
    from metalearn.data.folder import data_fingerprint

    write_tiny(tmp_path / "d", {"a": 2, "b": 2, "c": 2, "d": 2})
    folder = fresh_load(tmp_path / "d", tmp_path / "cache")
    split = tmp_path / "split.json"
    split.write_text(json.dumps({"train": ["a", "b"], "val": ["c"], "test": ["d"]}))
    before = data_fingerprint(folder, split_file=str(split))
    assert before.endswith(":4 classes, 8 images")
    split.write_text(json.dumps({"test": ["d"], "val": ["c"], "train": ["b", "a"]}, indent=2))  # the same split
    assert data_fingerprint(folder, split_file=str(split)) == before
    split.write_text(json.dumps({"train": ["a", "c"], "val": ["b"], "test": ["d"]}))  # b and c swapped
    assert data_fingerprint(folder, split_file=str(split)) != before
    assert data_fingerprint(folder) != data_fingerprint(folder, "0.25,0.25,0.5")
    # CSV layout: the last train class moved to the top of val.csv: the array and the class
    # order stay, the parts change
    root = tmp_path / "m"
    write_tiny(root, {"images": 6})
    rows = [f"{i:02d}.png,{'abc'[i // 2]}" for i in range(6)]
    (root / "train.csv").write_text("\n".join(rows[:4]) + "\n")
    (root / "val.csv").write_text("\n".join(rows[4:]) + "\n")
    first = fresh_load(root, tmp_path / "cache")
    (root / "train.csv").write_text("\n".join(rows[:2]) + "\n")
    (root / "val.csv").write_text("\n".join(rows[2:]) + "\n")
    moved = fresh_load(root, tmp_path / "cache")
    assert np.array_equal(first.images, moved.images) and first.class_names == moved.class_names
    assert first.parts != moved.parts and first.content_hash != moved.content_hash


def test_moving_an_image_between_classes_changes_the_content_hash(tmp_path):
    """a/01.png moved to b/: the array (a's images, then b's) is the same bytes, the classes
    are not."""
    root = tmp_path / "d"
    write_tiny(root, {"a": 2, "b": 1})
    (root / "b" / "00.png").rename(root / "b" / "10.png")  # b's image sorts after the one moved in
    before = fresh_load(root, tmp_path / "cache")
    (root / "a" / "01.png").rename(root / "b" / "01.png")
    after = fresh_load(root, tmp_path / "cache")
    assert np.array_equal(before.images, after.images) and before.class_names == after.class_names
    assert before.class_sizes.tolist() == [2, 1] and after.class_sizes.tolist() == [1, 2]
    assert before.content_hash != after.content_hash


def test_split_fractions_give_counts_that_sum_and_leave_no_asked_part_empty():
    """Largest remainder, then one class for every part asked for; an error where impossible."""
    from metalearn.data.folder import ImageFolder

    def counts(n: int, fractions: str = "") -> list[int]:
        folder = ImageFolder(np.zeros((n, 1, 4, 4), np.uint8), tuple(f"c{i}" for i in range(n)),
                             np.ones(n, np.int64), ("",) * n, "classes", "")
        parts = class_parts(folder, fractions)
        return [parts.count(part) for part in ("train", "val", "test")]

    assert counts(100) == [64, 16, 20] and counts(72) == [46, 12, 14]
    assert counts(10, "0.7,0.15,0.15") == [7, 2, 1]  # the left-over class: the tie goes to val
    assert counts(3) == [1, 1, 1]  # rounding alone gives val 0.48 -> no class
    assert counts(2, "0.75,0.25,0") == [1, 1, 0]
    assert counts(3, "0.5,0.5,0") == [2, 1, 0]
    assert counts(4, "1,0,0") == [4, 0, 0]
    for n in range(3, 40):
        assert sum(counts(n)) == n and min(counts(n)) >= 1
    with pytest.raises(MetalearnError, match=r"^split_fractions 0.64,0.16,0.2 \(the default\) asks for train, val "
                                             "and test classes but the folder has 2 classes"):
        counts(2)
    with pytest.raises(MetalearnError, match="asks for train and test classes but the folder has 1 class:"):
        counts(1, "0.5,0,0.5")


def test_part_folder_names_are_read_one_way(tmp_path):
    """The top holds train/ val/ test/ and no other folder (part folders), or none of them
    (class folders); both at once, a part folder holding images, a case variant or a loose
    image beside part folders is refused, naming the folders."""
    mixed = tmp_path / "mixed"
    write_tiny(mixed, {"dog": 1, "cat": 1, "test": 1})
    with pytest.raises(MetalearnError, match=r"mixes part folders \(test/\) with class folders \(cat/, dog/\): "
                                             "move every class folder into train/, val/ or test/, or, if a part's "
                                             "name is a class of yours, rename"):
        folder_module.scan_folder(mixed)
    classes_named_like_parts = tmp_path / "named"
    write_tiny(classes_named_like_parts, {"train": 1, "test": 1})
    with pytest.raises(MetalearnError, match=r"train/00.png: train/ is read as the train part, which holds class "
                                             "folders, not images .*; if train is a class, rename its folder"):
        folder_module.scan_folder(classes_named_like_parts)
    upper = tmp_path / "upper"
    write_tiny(upper, {"Train/a": 1, "Test/b": 1})
    with pytest.raises(MetalearnError, match="has Test/, Train/: name part folders train/, val/ and test/ in lower"):
        folder_module.scan_folder(upper)
    loose = tmp_path / "loose"
    write_tiny(loose, {"train/a": 1, "test/b": 1, ".": 1})
    with pytest.raises(MetalearnError, match=r"loose/00.png: images go in a class folder inside train/, val/ or "
                                             "test/"):
        folder_module.scan_folder(loose)
    (loose / "00.png").unlink()
    scan = folder_module.scan_folder(loose)
    assert scan[0] == "parts" and [name for name, _, _ in scan[1]] == ["train/a", "test/b"]


def test_csv_and_split_files_with_a_byte_order_mark_are_read(tmp_path):
    """Excel's "CSV UTF-8" and Windows editors start the file with a byte order mark."""
    root = tmp_path / "m"
    write_tiny(root, {"images": 4})
    (root / "train.csv").write_bytes("filename,label\n00.png,a\n01.png,a\n".encode("utf-8-sig"))
    (root / "val.csv").write_bytes("02.png,b\n03.png,b\n".encode("utf-8-sig"))  # no header: the first file
    folder = fresh_load(root, tmp_path / "cache")
    assert folder.class_names == ("a", "b") and folder.class_sizes.tolist() == [2, 2]
    write_tiny(tmp_path / "d", {"x": 1, "y": 1})
    split = tmp_path / "split.json"
    split.write_bytes(json.dumps({"train": ["x"], "test": ["y"]}).encode("utf-8-sig"))
    assert class_parts(fresh_load(tmp_path / "d", tmp_path / "cache"), split_file=str(split)) == ("train", "test")


def test_links_are_followed_and_cycles_missing_targets_and_doubles_refused(tmp_path):
    """A linked folder or image counts as a copy would; nothing is skipped silently."""
    root, elsewhere = tmp_path / "d", tmp_path / "elsewhere"
    write_tiny(root, {"a": 1, "b": 1})
    write_tiny(elsewhere, {"more": 2, "single": 1}, start=100)
    (root / "a" / "more").symlink_to(elsewhere / "more")  # a folder of images linked into a class
    (root / "b" / "linked.png").symlink_to(elsewhere / "single" / "00.png")
    folder = fresh_load(root, tmp_path / "cache")
    assert folder.class_names == ("a", "b") and folder.class_sizes.tolist() == [3, 2]
    assert sorted(folder.images[:, 0, 0, 0].tolist()) == [0, 1, 100, 101, 102]
    (root / "c").symlink_to(elsewhere / "single", target_is_directory=True)  # a linked class: b's image again
    with pytest.raises(MetalearnError, match=r"b/linked.png and .*c/00.png are one file .*, reached through a link: "
                                             "an image belongs to one class, once"):
        fresh_load(root, tmp_path / "cache")
    (root / "c").unlink()
    plain = tmp_path / "plain"  # no symbolic link anywhere: a hard link, which no path tells, the inode does
    write_tiny(plain, {"a": 1, "b": 1})
    os.link(plain / "a" / "00.png", plain / "b" / "hard.png")
    with pytest.raises(MetalearnError, match=r"a/00.png and .*b/hard.png are one file \(hard links to one file\): "
                                             "an image belongs to one class, once"):
        fresh_load(plain, tmp_path / "cache")
    (root / "a" / "loop").symlink_to(root, target_is_directory=True)
    with pytest.raises(MetalearnError, match=r"a/loop is a link to .*, a folder it is inside: the folder would "
                                             "contain itself without end; remove the link"):
        fresh_load(root, tmp_path / "cache")
    (root / "a" / "loop").unlink()
    (root / "a" / "gone.png").symlink_to(tmp_path / "missing.png")
    with pytest.raises(MetalearnError, match=r"a/gone.png is a link to .*missing.png, which does not exist"):
        fresh_load(root, tmp_path / "cache")


# -- decoding: 16-bit images and EXIF orientation ----------------------------------------------


def test_16_bit_images_are_scaled_by_their_types_range(tmp_path):
    """A uniform 16-bit value v decodes to round(v / 257) (v / 65535 of 255), grey or RGB, in
    either byte order; not stretched to white by the image's own maximum."""
    png = tmp_path / "thousand.png"
    Image.fromarray(np.full((30, 40), 1000, np.uint16)).save(png)
    with Image.open(png) as img:
        assert img.mode in ("I;16", "I")
    assert np.array_equal(decode_image(png, 16, 1), np.full((1, 16, 16), round(1000 / 257), np.uint8))  # 4
    assert np.array_equal(decode_image(png, 16, 3), np.full((3, 16, 16), 4, np.uint8))
    tiff = tmp_path / "big-endian.tif"
    Image.frombytes("I;16B", (40, 30), np.full((30, 40), 30000, ">u2").tobytes()).save(tiff)
    with Image.open(tiff) as img:
        assert img.mode == "I;16B"
    assert np.array_equal(decode_image(tiff, 16, 1), np.full((1, 16, 16), round(30000 / 257), np.uint8))  # 117
    ramp = np.linspace(0, 65535, 40 * 30).reshape(30, 40).astype(np.uint16)  # full range: 0 ... 255
    Image.fromarray(ramp).save(tmp_path / "ramp.png")
    decoded = decode_image(tmp_path / "ramp.png", 30, 1)
    assert decoded.min() <= 1 and decoded.max() >= 254
    # 32-bit integers within 0..65535 are 16-bit values; floats are intensities in [0, 1], clipped
    as_int = Image.fromarray(np.full((8, 8), 30000, np.int32))
    assert as_int.mode == "I" and prepare_images(as_int, 8, 1).mul(255).round().eq(117).all()
    as_float = Image.fromarray(np.array([[0.5, 2.0], [-1.0, 0.0]], np.float32))
    assert np.array_equal(prepare_images(as_float, 2, 1).mul(255).round()[0, 0].numpy(), [[128, 255], [0, 0]])
    with pytest.raises(MetalearnError, match="outside the 16-bit range 0..65535"):
        prepare_images(Image.fromarray(np.full((4, 4), 70000, np.int32)), 4, 1)
    Image.fromarray(np.full((4, 4), -5, np.int32)).save(tmp_path / "negative.tif")
    with pytest.raises(MetalearnError, match="cannot read image .*negative.tif: 32-bit integer pixels"):
        decode_image(tmp_path / "negative.tif", 4, 1)


def test_exif_orientation_is_applied(tmp_path):
    """A phone photo stored sideways with an EXIF orientation tag decodes as it is displayed:
    as ImageOps.exif_transpose of it, not as the stored pixels."""
    from PIL import ImageOps

    pixels = np.zeros((40, 60, 3), np.uint8)
    pixels[:, :20] = (230, 30, 30)  # red on the left third, blue below a green top half elsewhere
    pixels[:20, 20:] = (30, 200, 40)
    pixels[20:, 20:] = (30, 40, 220)
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    path = tmp_path / "phone.jpg"
    Image.fromarray(pixels).save(path, quality=95, exif=exif)
    with Image.open(path) as img:
        upright = ImageOps.exif_transpose(img)
        assert upright.size == (40, 60)
        stored = np.asarray(img.convert("RGB").resize((24, 24), Image.Resampling.LANCZOS)).transpose(2, 0, 1)
    expected = np.asarray(upright.convert("RGB").resize((24, 24), Image.Resampling.LANCZOS)).transpose(2, 0, 1)
    decoded = decode_image(path, 24, 3)
    assert np.array_equal(decoded, expected)
    assert not np.array_equal(decoded, stored)
    assert decoded[0, :6].mean() > 150 and decoded[2, 14:, :8].mean() > 150  # upright: red on top, blue left
    with Image.open(path) as img:  # a PIL image given to prepare_images is turned upright too
        assert torch.equal(prepare_images(img, 24, 3), torch.from_numpy(expected.copy())[None].float() / 255)


# -- every method on RGB images ------------------------------------------------------------


@pytest.mark.parametrize("method", sorted(m for m, cls in METHODS.items() if not cls.reinforcement))
def test_every_method_trains_and_predicts_on_rgb_84x84(shapes, method):
    """One meta-update and one one-task prediction of each method on 3-way RGB 84x84 tasks with
    the method's own defaults for photographs (one inner step and first order, to stay fast)."""
    options = {"inner_steps": 1, "test_inner_steps": 1} if method in ("maml", "platipus", "reptile") else {}
    if method in ("maml", "platipus"):
        options["first_order"] = True
    config = resolve_config(method, {"dataset": "folder", "ways": 3, "shots": 1, "query": 2}, options)
    assert (config.task.image_size, config.task.channels) == (84, 3)
    if method == "statistician":  # the paper's networks take 28x28 grey images only: one clear line
        with pytest.raises(MetalearnError, match="statistician's networks are the paper's for 1x28x28 images"):
            build_learner(method, config.method_config, problem_of(config.task))
        return
    learner = build_learner(method, config.method_config, problem_of(config.task))
    batch = build_task_source(config.task, "train", data_dir=shapes, progress=False).sample(1, gen(0))
    assert batch.support_x.shape == (1, 3, 3, 84, 84)
    loss, _ = learner.meta_loss(batch)
    loss.backward()
    assert torch.isfinite(loss)
    assert sum(p.grad is not None for p in learner.model.parameters()) >= len(list(learner.model.parameters())) - 1
    files = sorted((shapes / "red-circle").iterdir())[:3]
    probs = learner.fit_predict(files, [0, 1, 2], files[:2])
    assert probs.shape == (2, 3) and torch.allclose(probs.sum(-1), torch.ones(2))
    # in eval mode whatever the learner's (no dropout: the Memory Module's 0.7), which it keeps
    assert learner.training
    torch.manual_seed(0)  # PLATIPUS's sampled models
    in_training_mode = learner.fit_predict(files, [0, 1, 2], files[:2])
    assert learner.training
    learner.eval()
    torch.manual_seed(0)
    assert torch.equal(in_training_mode, learner.fit_predict(files, [0, 1, 2], files[:2]))
    assert not learner.training
    learner.train()
    # images given as files or as the uint8 pixels the cache holds: the same task
    uint8 = torch.from_numpy(np.stack([decode_image(f, 84, 3) for f in files]))
    a, b = learner.task_batch(files, [0, 1, 2], files), learner.task_batch(uint8, [0, 1, 2], uint8)
    assert torch.equal(a.support_x, b.support_x) and torch.equal(a.query_x, b.query_x) and a.ways == 3
    assert bool((a.query_y == -1).all())  # no query labels
    if learner.fixed_ways:
        with pytest.raises(MetalearnError, match=f"{method} was trained for 3-way tasks .* cannot classify 2 classes"):
            learner.fit_predict(files[:2], [0, 1], files)


# -- learning, and predicting new classes ---------------------------------------------------


def split_support_query(shapes: Path, classes: list[str], root: Path, shots: int) -> tuple[Path, Path]:
    support, query = root / "support", root / "query"
    for name in classes:
        files = sorted(f for f in (shapes / name).iterdir() if f.name != "grey.png")
        (support / name).mkdir(parents=True)
        (query / name).mkdir(parents=True)
        for f in files[:shots]:
            shutil.copy(f, support / name / f.name)
        for f in files[shots:]:
            shutil.copy(f, query / name / f.name)
    return support, query


def test_protonet_learns_the_shapes_and_predicts_new_classes(shapes, tmp_path, capsys):
    run_dir = tmp_path / "run"
    code, out, err = run(["train", "protonet", "--dataset", "folder", "--data-dir", shapes, "--image-size", 16,
                          "--ways", 5, "--shots", 1, "--query", 3, "--steps", 40, "--val-every", 0,
                          "--eval-episodes", 30, "--run-dir", run_dir, "--no-progress"], capsys)
    assert code == 0, err
    accuracy = json.loads((run_dir / "eval.json").read_text())["mean"]
    assert accuracy > 60, accuracy  # chance: 20%, on test classes never trained on
    folder = load_image_folder(shapes, 16, 3)
    test_classes = [n for n, p in zip(folder.class_names, class_parts(folder)) if p == "test"][:5]
    support, query = split_support_query(shapes, test_classes, tmp_path, shots=2)
    outputs = tmp_path / "out"
    code, out, err = run(["predict", run_dir, "--support", support, "--query", query, "--json", outputs / "p.json",
                          "--csv", outputs / "p.csv", "--sheet", outputs / "sheet.png"], capsys)
    assert code == 0, err
    result = json.loads((outputs / "p.json").read_text())
    assert result["classes"] == sorted(test_classes) and result["shots"] == [2] * 5
    assert len(result["predictions"]) == 5 * 8
    assert result["accuracy"] > 0.6, result["accuracy"]  # chance: 20%
    first = result["predictions"][0]
    assert first["label"] in test_classes and abs(sum(first["probabilities"].values()) - 1) < 1e-5
    assert first["probability"] == max(first["probabilities"].values())
    assert len((outputs / "p.csv").read_text().splitlines()) == 41
    with Image.open(outputs / "sheet.png") as sheet:
        assert sheet.size[0] > 400 and sheet.size[1] > 400
    lines = out.strip().splitlines()
    assert lines[0].startswith("protonet (step 40), classes:") and lines[-1].startswith("wrote")
    assert f"{first['label']}\t{first['probability']:.3f}" in out
    # `-`: the JSON or CSV alone on the output, for a script; the same predictions as the files
    code, out, err = run(["predict", run_dir, "--support", support, "--query", query, "--json", "-"], capsys)
    assert code == 0 and json.loads(out) == result, err
    code, out, err = run(["predict", run_dir, "--support", support, "--query", query, "--csv", "-",
                          "--json", outputs / "q.json"], capsys)
    assert code == 0 and out == (outputs / "p.csv").read_bytes().decode() and err == f"wrote {outputs / 'q.json'}\n", err
    code, out, err = run(["predict", run_dir, "--support", support, "--query", query, "--csv", "-", "--json", "-"],
                         capsys)
    assert code == 2 and err == "error: --json - and --csv - both print to the output; give one of them a file\n"
    # one query file; the Python convenience gives the same probabilities
    code, out, err = run(["predict", run_dir, "--support", support, "--query", first["file"]], capsys)
    assert code == 0 and first["file"] in out
    # the support images as the query: scored, with a warning; files that are not images are
    # named in one warning each for the support and query folders, and left out
    one_class = next(p for p in Path(support).iterdir() if p.is_dir())
    (one_class / "notes.txt").write_text("not an image")
    (one_class / "IMG_0001.HEIC").write_bytes(b"a format no reader here takes")
    code, out, err = run(["predict", run_dir, "--support", support, "--query", support], capsys)
    assert code == 0, err
    warned = [line for line in err.strip().splitlines() if line.startswith("warning: ")]
    assert len(warned) == 3, err
    assert "skipped 2 files that are not images by their names (PNG, JPG," in warned[0]
    assert str(one_class / "IMG_0001.HEIC") in warned[0] and f"--support {support}" in warned[0]
    assert warned[1].startswith(f"warning: --query {support}: skipped 2 files")
    assert "10 of the 10 query images are also in the support set" in warned[2]


def test_platipus_predicts_with_a_spread_and_fixed_ways_are_named(shapes, tmp_path, capsys, monkeypatch):
    run_dir = tmp_path / "platipus"
    code, out, err = run(["train", "platipus", "--dataset", "folder", "--data-dir", shapes, "--image-size", 16,
                          "--ways", 3, "--shots", 1, "--query", 1, "--steps", 2, "--meta-batch-size", 2,
                          "--inner-steps", 1, "--test-inner-steps", 1, "--model", "conv4-maxpool",
                          "--val-every", 0, "--no-eval", "--run-dir", run_dir, "--no-progress"], capsys)
    assert code == 0, err
    support, query = split_support_query(shapes, ["red-circle", "blue-square", "green-ring"], tmp_path, shots=1)
    code, out, err = run(["predict", run_dir, "--support", support, "--query", query / "red-circle",
                          "--json", tmp_path / "p.json", "--samples", 4], capsys)
    assert code == 0, err
    result = json.loads((tmp_path / "p.json").read_text())
    assert all(0 <= p["spread"] <= 0.5 for p in result["predictions"]) and "+/-" in out
    # measuring a pass's memory first (done above MEASURE_SUPPORT_ABOVE support images) samples
    # models too, and leaves those of the predictions as they were
    from metalearn import prediction

    monkeypatch.setattr(prediction, "MEASURE_SUPPORT_ABOVE", 0)
    code, out, err = run(["predict", run_dir, "--support", support, "--query", query / "red-circle",
                          "--json", tmp_path / "measured.json", "--samples", 4], capsys)
    assert code == 0 and json.loads((tmp_path / "measured.json").read_text()) == result, err
    # another number of classes than trained: refused, naming the trained ways, nothing written
    shutil.rmtree(support / "green-ring")
    code, out, err = run(["predict", run_dir, "--support", support, "--query", query, "--json", tmp_path / "two.json"],
                         capsys)
    one_line_error(code, out, err, "platipus was trained for 3-way tasks (one output per class) and cannot classify 2")
    assert not (tmp_path / "two.json").exists()


# -- bad inputs: one line, exit 2, nothing half-written ---------------------------------------


def bad_folders(root: Path) -> dict[str, tuple[Path, list, str]]:
    """name -> (data dir, extra options, message)."""
    cases = {}
    rng = np.random.default_rng(0)

    def classes(folder: Path, n: int, per_class: int) -> None:
        for c in range(n):
            (folder / f"class{c}").mkdir(parents=True)
            for i in range(per_class):
                draw_shape(SHAPES[c % 9], (200, 0, 0), 20, rng).save(folder / f"class{c}" / f"{i}.png")

    empty_class = root / "empty-class"
    classes(empty_class, 12, 4)
    (empty_class / "class3" / "notes").mkdir()
    for f in (empty_class / "class3").glob("*.png"):
        f.unlink()
    cases["empty class"] = (empty_class, [], "class folder class3")
    few = root / "few-classes"
    classes(few, 12, 4)
    cases["fewer classes than ways"] = (few, ["--ways", 8], "the default split 0.64,0.16,0.2 gives the val part 2 of the folder's 12 classes (train 8, val 2, test 2); --test-ways 8")
    small = root / "small-class"
    classes(small, 12, 4)
    for f in sorted((small / "class5").glob("*.png"))[2:]:
        f.unlink()
    cases["fewer images than shots + query"] = (small, ["--shots", 1, "--query", 2], "has 2 images; --shots 1 with --query 2 needs 3 per class: add images, or lower --query to 1")
    broken = root / "broken-image"
    classes(broken, 12, 4)
    (broken / "class2" / "9.png").write_bytes(b"\x89PNG truncated")
    cases["unreadable image"] = (broken, ["--split-fractions", "0.5,0.25,0.25"], "cannot read image " + str(broken / "class2" / "9.png"))
    nothing = root / "no-images"
    (nothing / "a").mkdir(parents=True)
    (nothing / "readme.txt").write_text("no images here")
    cases["no images at all"] = (nothing, [], "class folder a")
    bare = root / "bare"
    bare.mkdir()
    cases["a folder with nothing"] = (bare, [], "no images in")
    leaking = root / "leaking-parts"
    classes(leaking / "train", 6, 4)
    classes(leaking / "val", 1, 4)
    (leaking / "val" / "class0").rename(leaking / "val" / "class6")
    classes(leaking / "test", 1, 4)  # test/class0 beside train/class0
    cases["a class in two parts"] = (leaking, [], "class class0 is in both train/ and test/")
    named = root / "class-named-test"
    classes(named, 12, 4)
    (named / "class11").rename(named / "test")
    cases["a class folder named like a part"] = (named, [], "mixes part folders (test/) with class folders (class0/")
    looping = root / "link-cycle"
    classes(looping, 12, 4)
    (looping / "class4" / "up").symlink_to(looping, target_is_directory=True)
    cases["a link cycle"] = (looping, [], f"{looping / 'class4' / 'up'} is a link to {looping.resolve()}, a folder it")
    return cases


def test_every_bad_folder_is_one_line_and_leaves_nothing_behind(tmp_path, capsys, monkeypatch):
    cache = tmp_path / "cache"
    monkeypatch.setenv("METALEARN_CACHE", str(cache))
    for name, (data_dir, extra, message) in bad_folders(tmp_path / "data").items():
        run_dir = tmp_path / "runs" / name.replace(" ", "-")
        code, out, err = run(["train", "protonet", "--dataset", "folder", "--data-dir", data_dir, "--image-size", 16,
                              "--ways", 3, "--steps", 1, "--run-dir", run_dir, "--no-progress", *extra], capsys)
        one_line_error(code, out, err, message)
        assert not run_dir.exists() or not any(run_dir.iterdir()), name
        assert not any(p.name.count(".tmp") for p in cache.rglob("*")) if cache.exists() else True
    code, out, err = run(["train", "protonet", "--dataset", "folder", "--steps", 1, "--no-progress",
                          "--run-dir", tmp_path / "r"], capsys)
    one_line_error(code, out, err, "needs --data-dir")
    code, out, err = run(["train", "protonet", "--dataset", "omniglot", "--channels", 3], capsys)
    one_line_error(code, out, err, "--channels does not apply to omniglot")
    code, out, err = run(["train", "protonet", "--dataset", "folder", "--channels", 2], capsys)
    one_line_error(code, out, err, "--channels must be 1 (grey) or 3 (RGB), got 2")


def test_bad_predict_inputs_are_one_line_and_write_nothing(shapes, tmp_path, capsys, monkeypatch):
    run_dir = tmp_path / "run"
    code, out, err = run(["train", "protonet", "--dataset", "folder", "--data-dir", shapes, "--image-size", 16,
                          "--ways", 3, "--steps", 1, "--no-eval", "--val-every", 0, "--run-dir", run_dir,
                          "--no-progress"], capsys)
    assert code == 0, err
    support, query = split_support_query(shapes, ["red-circle", "blue-square"], tmp_path, shots=1)
    out_json = tmp_path / "out" / "p.json"
    (support / "empty").mkdir()
    cases = [(support, query, "support class folder " + str(support / "empty") + " has no images")]
    good = tmp_path / "good-support"
    shutil.copytree(support, good)
    (good / "empty").rmdir()
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"\xff\xd8 not really")
    cases += [(good, broken, f"cannot read image {broken}"), (good, tmp_path / "missing", "does not exist"),
              (tmp_path / "nowhere", query, "nowhere does not exist; give a folder")]
    lonely = tmp_path / "lonely"
    shutil.copytree(good / "red-circle", lonely / "red-circle")
    cases.append((lonely, query, "has one class (red-circle)"))
    for support_dir, query_path, message in cases:
        code, out, err = run(["predict", run_dir, "--support", support_dir, "--query", query_path,
                              "--json", out_json, "--sheet", tmp_path / "out" / "s.png"], capsys)
        one_line_error(code, out, err, message)
        assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())
    (tmp_path / "a-folder.json").mkdir()
    code, out, err = run(["predict", run_dir, "--support", good, "--query", query, "--json", tmp_path / "a-folder.json"],
                         capsys)
    one_line_error(code, out, err, "is a folder")
    both = tmp_path / "out" / "p.txt"  # one file for two outputs: one would overwrite the other
    code, out, err = run(["predict", run_dir, "--support", good, "--query", query, "--json", both,
                          "--csv", tmp_path / "out" / ".." / "out" / "p.txt"], capsys)
    one_line_error(code, out, err, f"--json and --csv both name {both}; give each output its own file")
    code, out, err = run(["predict", run_dir, "--support", good, "--query", query, "--samples", 5], capsys)
    one_line_error(code, out, err, "--samples is for methods that sample models (platipus); protonet gives one")
    # a folder not made yet (the slash as typed) would become a file; a sheet named .jpg would hold PNG bytes
    for option, given, message in (("--json", f"{tmp_path / 'out'}/", f"names a folder; give a file name, e.g. "
                                                                      f"{tmp_path / 'out' / 'predictions.json'}"),
                                   ("--sheet", tmp_path / "out" / "s.jpg", f"--sheet {tmp_path / 'out' / 's.jpg'}: the "
                                    f"file is written as PNG; give a name ending in .png, e.g. "
                                    f"{tmp_path / 'out' / 's.png'}")):
        code, out, err = run(["predict", run_dir, "--support", good, "--query", query, option, given], capsys)
        one_line_error(code, out, err, message)
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())
    # a support set larger than the memory a pass can use: said before the pass (which the
    # kernel's out-of-memory kill would end without a word), nothing written
    from metalearn import memory_budget, prediction

    monkeypatch.setattr(prediction, "MEASURE_SUPPORT_ABOVE", 1)
    monkeypatch.setattr(memory_budget, "available_memory", lambda device: 10**4)
    code, out, err = run(["predict", run_dir, "--support", good, "--query", query, "--json", out_json], capsys)
    one_line_error(code, out, err, "classifying with the 2 support images takes about ")
    assert err.rstrip().endswith("far more than the 1e-05 GB available; give a support folder with fewer classes or "
                                 "images per class") and not out_json.exists()


def test_a_pass_memory_estimate_is_near_the_pass_measured(monkeypatch):
    """check_pass_fits scales a small pass in proportion to the whole support set: within a
    factor of 3 of the memory the pass takes (protonet, 1,000 support images at 28x28 with 50
    or 256 queries, the most a pass classifies: the queries scale with the probe's share). In a
    process of its own with the allocator as ``metalearn predict`` sets it (tune_allocator): the
    peak RSS of a pass depends on what the process's heap already holds, which the tests run
    before it (in-process commands tune the allocator too) would change."""
    import subprocess
    import sys

    from metalearn import prediction

    if not Path("/proc/self/clear_refs").exists():
        pytest.skip("the memory of a pass is measured through /proc/self/clear_refs (Linux)")
    program = """
import re, sys, torch
from metalearn import memory_budget, prediction
from metalearn.algorithms.protonet import ProtoNet
from metalearn.errors import MetalearnError
from metalearn.models import Conv4
from metalearn.runtime import tune_allocator
tune_allocator()
torch.manual_seed(0)
learner = ProtoNet(Conv4(1, None, pooling="max"))
support_x, query_x = torch.rand(1000, 1, 28, 28), torch.rand(int(sys.argv[1]), 1, 28, 28)
support_y = torch.arange(200).repeat_interleave(5)
classify = lambda sx, sy, qx: learner.fit_predict(sx, sy, qx)
memory_budget.available_memory = lambda device: 0
try:
    prediction.check_pass_fits(learner, classify, support_x, support_y, query_x)
except MetalearnError as refused:
    print(float(re.search(r"about ([0-9.e+-]+) GB", str(refused)).group(1)) * 1e9)
# the larger of two measures: pages the kernel reclaims during a pass (a loaded machine) lower its peak RSS
print(max(memory_budget.peak_memory_of(lambda: classify(support_x, support_y, query_x), torch.device("cpu"))
          for _ in range(2)))
"""
    for queries in (50, 256):  # 256: the most a pass classifies (QUERY_CHUNK)
        done = subprocess.run([sys.executable, "-c", program, str(queries)], capture_output=True, text=True,
                              timeout=300)
        assert done.returncode == 0, done.stderr[-3000:]
        values = done.stdout.split()
        assert len(values) == 2, done.stdout  # the estimate (the pass refused at no memory available), the measure
        estimate, measured = map(float, values)
        assert measured / 3 < estimate < measured * 3, (queries, estimate, measured)
    # a support set up to MEASURE_SUPPORT_ABOVE is not measured
    calls = []
    support_y = torch.arange(200).repeat_interleave(5)[:prediction.MEASURE_SUPPORT_ABOVE]
    prediction.check_pass_fits(None, lambda *args: calls.append(1), torch.rand(len(support_y), 1, 28, 28), support_y,
                               torch.rand(50, 1, 28, 28))
    assert not calls


def test_predict_run_checks_its_outputs_and_writes_all_or_none(shapes, tmp_path, monkeypatch):
    """The Python API refuses an output path that cannot be written before reading anything,
    as the CLI does, and writes its outputs together: a failure while writing the second
    leaves neither, and an earlier output file as it was."""
    import errno

    from metalearn.api import predict_run, train
    from metalearn.files import WriteError

    run_dir = tmp_path / "run"
    train(resolve_config("protonet", task={"dataset": "folder", "image_size": 16, "ways": 3},
                         train={"steps": 1, "val_every": 0}), run_dir, data_dir=shapes, progress=False,
          evaluate_after=False)
    support, query = split_support_query(shapes, ["red-circle", "blue-square"], tmp_path, shots=1)
    out = tmp_path / "out"
    (out / "a-folder").mkdir(parents=True)
    (out / "a-file").write_text("a file")
    # named as Python names them: the parameters, not the command line's --csv, --sheet and --json
    for outputs, message in (({"csv_out": out / "a-folder"}, f"csv_out {out / 'a-folder'} is a folder; give a file "
                                                             "name"),
                             ({"sheet": out / "a-file" / "s.png"}, f"sheet {out / 'a-file' / 's.png'}: "
                                                                   f"{out / 'a-file'} is a file, not a folder"),
                             ({"csv_out": out / "x" / ".." / "p.json"}, "json_out and csv_out both name")):
        with pytest.raises(MetalearnError, match="^" + re.escape(message)):
            predict_run(run_dir, support, query, json_out=out / "p.json", **outputs)
        assert sorted(p.name for p in out.iterdir()) == ["a-file", "a-folder"]  # no p.json
    # images in memory, or a list of support folders: one line naming what predict_run takes
    with Image.open(next(Path(query).rglob("*.png"))) as image:
        for bad_support, bad_query in ((support, image), (support, torch.rand(2, 3, 16, 16)), ([support], query)):
            with pytest.raises(MetalearnError, match="predict_run takes a support folder and query image files or "
                                                     "folders \\(paths\\), got a (PngImageFile|Tensor|list); for "
                                                     "images in memory use learner.fit_predict"):
                predict_run(run_dir, bad_support, bad_query)
    # an empty path is refused before the run is read (here a folder that does not exist)
    for bad_support, bad_query, empty in (("", query, "support"), (support, [query, ""], "query")):
        with pytest.raises(MetalearnError, match=f"^{empty} is empty; give an image file or folder$"):
            predict_run(tmp_path / "no-such-run", bad_support, bad_query)
    # any iterable of paths is a query (a glob), as is one path
    globbed = predict_run(run_dir, support, Path(query).rglob("*.png"))
    assert len(globbed["predictions"]) == len(list(Path(query).rglob("*.png"))) > 0
    with pytest.raises(MetalearnError, match="^split_fractions are given as text"):
        from metalearn.api import evaluate_run

        evaluate_run(run_dir, data_dir=shapes, split_fractions=(0, 0, 1), progress=False)
    (out / "p.json").write_text("the previous predictions")
    fsync = os.fsync

    def full_at_the_csv(fd):  # the disk fills while the CSV is written, after the JSON
        if ".csv" in os.readlink(f"/proc/self/fd/{fd}"):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        fsync(fd)

    if not os.path.isdir("/proc/self/fd"):
        pytest.skip("needs /proc/self/fd to fail the CSV's write alone")
    monkeypatch.setattr(os, "fsync", full_at_the_csv)
    with pytest.raises(WriteError, match=f"cannot write {re.escape(str(out / 'new' / 'p.csv'))}: No space left"):
        predict_run(run_dir, support, query, json_out=out / "p.json", csv_out=out / "new" / "p.csv")
    assert (out / "p.json").read_text() == "the previous predictions"
    assert sorted(p.name for p in out.iterdir()) == ["a-file", "a-folder", "p.json"]  # no temporary file, no new/
    monkeypatch.setattr(os, "fsync", fsync)
    result = predict_run(run_dir, support, query, json_out=out / "p.json", csv_out=out / "new" / "p.csv")
    assert json.loads((out / "p.json").read_text())["classes"] == result["classes"] == ["blue-square", "red-circle"]
    assert len((out / "new" / "p.csv").read_text().splitlines()) == 1 + len(result["predictions"])


def test_paths_from_python_expand_a_tilde_as_the_shell_would(shapes, tmp_path, monkeypatch):
    """``~/...`` given to the Python API means the home folder, as on the command line: a run
    folder is not made as ``./~/...``; images, run folders and outputs are found there.
    predict_run's result is plain data (json.dumps takes it), as its file is."""
    from metalearn.api import evaluate_run, export_results, predict_run, train

    home = tmp_path / "home"
    shutil.copytree(shapes, home / "shapes")
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(tmp_path)
    train(resolve_config("protonet", task={"dataset": "folder", "image_size": 16, "ways": 3},
                         train={"steps": 1, "val_every": 0, "eval_episodes": 2}), "~/runs/r", data_dir="~/shapes",
          progress=False, announce=None)
    assert (home / "runs" / "r" / "checkpoint.pt").is_file() and not (tmp_path / "~").exists()
    assert evaluate_run("~/runs/r", episodes=2, progress=False)["episodes"] == 2
    support, query = split_support_query(home / "shapes", ["red-circle", "blue-square"], home, shots=1)
    home_of = lambda path: "~/" + str(Path(path).relative_to(home))  # noqa: E731
    result = predict_run("~/runs/r", home_of(support), [home_of(query)], json_out="~/p.json")
    assert json.loads((home / "p.json").read_text()) == json.loads(json.dumps(result))
    export_results("~/runs/r", "~/record")
    assert (home / "record" / "summary.json").is_file() and not (tmp_path / "~").exists()
    with pytest.raises(MetalearnError, match=r"^run_dir is a path \(a str or pathlib.Path\), got int 5$"):
        evaluate_run(5)


def test_a_folder_run_resumes_only_on_its_own_images_and_says_how(shapes, tmp_path, capsys, monkeypatch):
    """The checkpoint keeps a fingerprint of the folder's images: resuming on other images (a
    class less here) is refused naming both counts; the folder it trained on resumes. The
    messages that say how to continue repeat --data-dir, which the run does not keep."""
    import signal

    from metalearn.training import TrainingInterrupted, build_trainer

    args = ["protonet", "--dataset", "folder", "--image-size", 16, "--ways", 3, "--shots", 1, "--query", 1,
            "--val-every", 0, "--no-eval", "--no-progress"]
    run_dir = tmp_path / "run"
    code, out, err = run(["train", *args, "--steps", 2, "--data-dir", shapes, "--run-dir", run_dir], capsys)
    assert code == 0, err
    fewer = tmp_path / "fewer"
    shutil.copytree(shapes, fewer)
    shutil.rmtree(next(p for p in sorted(fewer.iterdir()) if p.is_dir()))
    classes, images = len(load_image_folder(shapes, 16, 3).class_names), len(load_image_folder(shapes, 16, 3).images)
    code, out, err = run(["train", "protonet", "--resume", "--run-dir", run_dir, "--steps", 4, "--data-dir", fewer,
                          "--no-progress"], capsys)
    one_line_error(code, out, err, f"trained on other images than --data-dir {fewer} holds ({classes} classes, "
                                   f"{images} images, now {classes - 1} classes")
    code, out, err = run(["train", "maml", "--resume", "--run-dir", run_dir], capsys)
    one_line_error(code, out, err, f"`metalearn train protonet --resume --run-dir {run_dir}`, or train maml")
    # without --data-dir, the folder the checkpoint records; where it has moved, say so
    moved = tmp_path / "moved"
    shapes.rename(moved)
    try:
        code, out, err = run(["train", "protonet", "--resume", "--run-dir", run_dir, "--steps", 3, "--no-progress"],
                             capsys)
        one_line_error(code, out, err, f"{run_dir} trained on the images in {shapes}, which is not a folder now: give "
                                       "--data-dir, the folder that holds its images")
        code, out, err = run(["train", "maml", "--resume", "--run-dir", run_dir], capsys)
        one_line_error(code, out, err, f"`metalearn train protonet --resume --run-dir {run_dir} --data-dir FOLDER`")
    finally:
        moved.rename(shapes)
    from metalearn.api import run_status

    assert run_status(run_dir)["resume"] == f"metalearn train protonet --run-dir {run_dir} --resume"  # no --data-dir
    copy = tmp_path / "copy"
    shutil.copytree(run_dir, copy)
    code, out, err = run(["train", "protonet", "--resume", "--run-dir", copy, "--steps", 3, "--no-eval",
                          "--no-progress"], capsys)
    assert code == 0 and torch.load(copy / "checkpoint.pt", weights_only=True)["step"] == 3, err

    # the same images, split by a file that then moves a class from train to test
    names = sorted(p.name for p in shapes.iterdir() if p.is_dir())
    split = tmp_path / "split.json"
    split.write_text(json.dumps({"train": names[:40], "val": names[40:56], "test": names[56:]}))
    by_file = tmp_path / "by-file"
    assert run(["train", *args, "--steps", 1, "--data-dir", shapes, "--split-file", split,
                "--run-dir", by_file], capsys)[0] == 0
    split.write_text(json.dumps({"train": names[1:40], "val": names[40:56], "test": names[:1] + names[56:]}))
    code, out, err = run(["train", "protonet", "--resume", "--run-dir", by_file, "--steps", 2, "--data-dir", shapes,
                          "--no-progress"], capsys)
    one_line_error(code, out, err, f"--split-file {split} puts 1 class of the run in {by_file} in another part than "
                                   f"when it trained (e.g. {names[0]!r}: train then, test now)")

    def signalled(*a, **k):  # SIGTERM during step 3 of 4
        trainer = build_trainer(*a, **k)
        meta_loss = trainer.learner.meta_loss
        trainer.learner.meta_loss = lambda batch: (trainer.step == 2 and os.kill(os.getpid(), signal.SIGTERM),
                                                   meta_loss(batch))[1]
        return trainer

    monkeypatch.setattr("metalearn.api.build_trainer", signalled)
    with pytest.raises(TrainingInterrupted, match=rf"after step 3 of 4.*`metalearn\.train\(config, run_dir="
                                              rf"'{run_dir}', data_dir='{shapes}', resume=True\)`"):
        from metalearn.api import train
        train(resolve_config("protonet", train={"steps": 4}, resume_from=run_dir), run_dir, data_dir=shapes,
              resume=True, progress=False, evaluate_after=False)
    assert torch.load(run_dir / "checkpoint.pt", weights_only=True)["step"] == 3


def test_fit_predict_refuses_labels_that_are_not_class_ids(shapes, tmp_path):
    """Strings would fail inside torch, and 1.5 would silently become class 1."""
    config = resolve_config("protonet", task={"dataset": "folder", "ways": 2, "image_size": 16})
    learner = build_learner("protonet", config.method_config, problem_of(config.task))
    files = [sorted((shapes / name).iterdir())[0] for name in ("red-circle", "blue-square")]
    assert learner.fit_predict(files, [0.0, 1.0], files[:1]).shape == (1, 2)  # whole floats are ids
    for labels, shown in ((["cat", "dog"], "['cat', 'dog'] (map class names to ids first"), ([0, 1.5], "[0, 1.5]"),
                          (np.array(["a", "b"]), "(map class names"), ([True, False], "booleans")):
        with pytest.raises(MetalearnError, match=r"support labels must be class ids.*" + re.escape(shown)):
            learner.fit_predict(files, labels, files[:1])


def test_a_folder_without_val_classes_trains_with_validation_off(tmp_path, capsys, monkeypatch):
    """train/ and test/ part folders, no val/: refused with validation on (one line naming the
    way out), trained and tested with --val-every 0."""
    monkeypatch.setenv("METALEARN_CACHE", str(tmp_path / "cache"))
    rng = np.random.default_rng(0)
    for part, first, n in (("train", 0, 6), ("test", 6, 4)):
        for c in range(first, first + n):
            folder = tmp_path / "data" / part / f"class{c}"
            folder.mkdir(parents=True)
            for i in range(3):
                draw_shape(SHAPES[c % len(SHAPES)], (200, 40 * (c % 5), 0), 20, rng).save(folder / f"{i}.png")
    options = ["train", "protonet", "--dataset", "folder", "--data-dir", tmp_path / "data", "--image-size", 16,
               "--ways", 3, "--shots", 1, "--query", 1, "--steps", 2, "--eval-episodes", 4, "--no-progress"]
    code, out, err = run([*options, "--run-dir", tmp_path / "refused"], capsys)
    one_line_error(code, out, err, "no val classes: add a val/ folder of classes; or train without validation "
                                   "(metalearn train --val-every 0)")
    code, out, err = run([*options, "--val-every", 0, "--run-dir", tmp_path / "run"], capsys)
    assert code == 0, err
    assert (tmp_path / "run" / "eval.json").exists()


def test_a_small_class_folder_names_its_split_options_and_eval_splits_another_folder(tmp_path, capsys, monkeypatch):
    """12 classes under the default split give val and test 2 each: 5-way training is refused in
    one line; no split gives train, val and test 5 each (15 classes), so none is offered for the
    three, only for two of them, the other left out; with 0.5,0,0.5 and no validation it trains. Another folder
    of 5 classes lacks classes of the run's split (refused, naming eval's --split-fractions
    0,0,1); split 0.5,0,0.5 it has 2 test classes (refused so too); it is scored under
    --split-fractions 0,0,1 or a split file, each written
    to a file of its own beside eval.json. A run on Omniglot has no split to change."""
    monkeypatch.setenv("METALEARN_CACHE", str(tmp_path / "cache"))
    rng = np.random.default_rng(0)
    for root, n in (("photos", 12), ("other", 5)):
        for c in range(n):
            folder = tmp_path / root / f"class{c:02d}"
            folder.mkdir(parents=True)
            for i in range(2):
                draw_shape(SHAPES[c % len(SHAPES)], (200, 20 * c, 0), 20, rng).save(folder / f"{i}.png")
    options = ["train", "protonet", "--dataset", "folder", "--data-dir", tmp_path / "photos", "--image-size", 16,
               "--ways", 5, "--shots", 1, "--query", 1, "--steps", 1, "--eval-episodes", 4, "--no-progress"]
    code, out, err = run([*options, "--run-dir", tmp_path / "refused"], capsys)
    one_line_error(code, out, err, "the default split 0.64,0.16,0.2 gives the val part 2 of the folder's 12 classes "
                                   "(train 8, val 2, test 2); --test-ways 5")
    assert err.endswith("needs 5: no split of its 12 classes can give train 5, val 5, test 5 (15 in all); train "
                        "without validation (metalearn train --val-every 0) on a split (--split-fractions or "
                        "--split-file) that gives train 5, test 5; train without the test (metalearn train "
                        "--no-eval) on a split (--split-fractions or --split-file) that gives train 5, val 5; lower "
                        "--test-ways to 2 or fewer\n"), err  # --val-every 0 alone leaves the test part short
    code, out, err = run([*options, "--ways", 8, "--run-dir", tmp_path / "refused"], capsys)  # 24 classes needed
    one_line_error(code, out, err, "--test-ways 8 (it defaults to --ways; in metalearn eval and compare: --ways) "
                                   "needs 8: no split of its 12 classes can give train 8, val 8, test 8 (24 in all); "
                                   "lower --test-ways to 2 or fewer")
    assert "--split-fractions" not in err
    # a split whose train and test parts hold 5 but val 1: training without validation needs no
    # new split, and is offered once, as such
    code, out, err = run([*options, "--split-fractions", "0.42,0.08,0.5", "--run-dir", tmp_path / "refused"], capsys)
    one_line_error(code, out, err, "--split-fractions 0.42,0.08,0.5 gives the val part 1 of the folder's 12 classes")
    assert err.count("--val-every 0") == 1 and err.endswith(
        "(15 in all); train without the test (metalearn train --no-eval) on a split (--split-fractions or "
        "--split-file) that gives train 5, val 5; train without validation (metalearn train --val-every 0); "
        "--test-ways cannot go below 2, so this part cannot make an episode\n"), err
    run_dir = tmp_path / "run"
    code, out, err = run([*options, "--split-fractions", "0.5,0,0.5", "--val-every", 0, "--run-dir", run_dir], capsys)
    assert code == 0, err
    scored = ["eval", run_dir, "--data-dir", tmp_path / "other", "--episodes", 3, "--no-progress"]
    code, out, err = run(scored, capsys)  # the run's split names classes the other folder lacks
    one_line_error(code, out, err, "trained on classes that this folder lacks (7 of them, e.g. 'class06'")
    assert "for a folder of classes the run never saw, --split-fractions 0,0,1 in metalearn eval scores every " \
           "class)" in err
    code, out, err = run([*scored, "--split-fractions", "0.5,0,0.5"], capsys)
    one_line_error(code, out, err, "--split-fractions 0.5,0,0.5 gives the test part 2 of the folder's 5 classes "
                                   "(train 3, val 0, test 2)")
    assert "for another folder, of classes the run never trained on, metalearn eval --split-fractions 0,0,1 scores " \
           "every class" in err
    code, out, err = run([*scored, "--split-fractions", "0,0,1"], capsys)
    assert code == 0, err
    # named by the folder scored, another than the run's: the run's own evaluations stay apart
    scored_all = json.loads(one_file(run_dir, "eval-data=other-*-episodes=3-split_fractions=0,0,1.json").read_text())
    assert scored_all["ways"] == 5 and scored_all["split_fractions"] == "0,0,1"
    split = tmp_path / "five.json"
    split.write_text(json.dumps({"test": [f"class{c:02d}" for c in range(5)]}))
    code, out, err = run([*scored, "--split-file", split], capsys)
    assert code == 0, err
    assert json.loads(one_file(run_dir, "eval-data=other-*-episodes=3-split_file=five.json").read_text())[
        "split_file"] == str(split)
    code, out, err = run([*scored, "--split-file", split, "--split-fractions", "0,0,1"], capsys)
    one_line_error(code, out, err, "give --split-fractions or --split-file, not both")
    for missing, what in ((tmp_path / "nope.json", "no such file"), (tmp_path, "a folder")):
        code, out, err = run([*scored, "--split-file", missing], capsys)
        one_line_error(code, out, err, f"--split-file {missing}: {what}; give the JSON file")
    config = RunDir(run_dir).read_config()
    omniglot = dataclasses.replace(config, task=dataclasses.replace(config.task, dataset="omniglot"))
    with pytest.raises(MetalearnError, match="applies to runs on class folders .* dataset is omniglot"):
        with_split(omniglot, "0,0,1")
    assert with_split(config) == (config, {})


def test_a_missing_data_dir_and_a_tiny_image_size_are_named(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("METALEARN_CACHE", str(tmp_path / "cache"))
    options = ["train", "protonet", "--dataset", "folder", "--steps", 1, "--print-config"]
    code, out, err = run([*options, "--data-dir", tmp_path / "photo40"], capsys)
    one_line_error(code, out, err, f"--data-dir {tmp_path / 'photo40'} does not exist; give the folder")
    (tmp_path / "a-file").write_text("x")
    code, out, err = run([*options, "--data-dir", tmp_path / "a-file"], capsys)
    one_line_error(code, out, err, "is a file, not a folder")
    code, out, err = run([*options, "--data-dir", tmp_path, "--image-size", 0], capsys)
    one_line_error(code, out, err, "--image-size must be at least 4 pixels, got 0")


def test_the_skipped_files_warning_is_given_once_per_folder(tmp_path, capsys, monkeypatch):
    """train reads the folder for each part it builds (train, val, test): one warning, not three."""
    monkeypatch.setenv("METALEARN_CACHE", str(tmp_path / "cache"))
    rng = np.random.default_rng(0)
    for c in range(12):
        (tmp_path / "data" / f"class{c}").mkdir(parents=True)
        for i in range(2):
            draw_shape(SHAPES[c % len(SHAPES)], (200, 20 * c, 0), 20, rng).save(tmp_path / "data" / f"class{c}" / f"{i}.png")
    (tmp_path / "data" / "class3" / "IMG_1.HEIC").write_bytes(b"x")
    code, out, err = run(["train", "protonet", "--dataset", "folder", "--data-dir", tmp_path / "data", "--image-size", 16,
                          "--ways", 2, "--shots", 1, "--query", 1, "--steps", 1, "--eval-episodes", 2, "--val-episodes",
                          2, "--run-dir", tmp_path / "run", "--no-progress"], capsys)
    assert code == 0, err
    assert err.count("skipped 1 file that is not an image by its name") == 1, err


def test_no_eval_trains_on_every_class_and_eval_scores_another_folder(tmp_path, capsys, monkeypatch):
    """--no-eval does not build the test part: a folder whose classes all train (1,0,0) trains,
    and eval --split-fractions 0,0,1 scores another folder's classes."""
    monkeypatch.setenv("METALEARN_CACHE", str(tmp_path / "cache"))
    rng = np.random.default_rng(0)
    for root, first in (("all", 0), ("other", 6)):
        for c in range(first, first + 3):
            (tmp_path / root / f"class{c}").mkdir(parents=True)
            for i in range(2):
                draw_shape(SHAPES[c % len(SHAPES)], (200, 20 * c, 0), 20, rng).save(tmp_path / root / f"class{c}" / f"{i}.png")
    options = ["train", "protonet", "--dataset", "folder", "--data-dir", tmp_path / "all", "--image-size", 16, "--ways", 3,
               "--shots", 1, "--query", 1, "--steps", 1, "--split-fractions", "1,0,0", "--val-every", 0]
    code, out, err = run([*options, "--run-dir", tmp_path / "tested", "--no-progress"], capsys)
    one_line_error(code, out, err, "the image folder has no test classes")
    code, out, err = run([*options, "--no-eval", "--run-dir", tmp_path / "run", "--no-progress"], capsys)
    assert code == 0, err
    code, out, err = run(["eval", tmp_path / "run", "--data-dir", tmp_path / "other", "--split-fractions", "0,0,1",
                          "--episodes", 2, "--no-progress"], capsys)
    assert code == 0 and "written to" in out, err


def test_a_run_keeps_its_split_when_its_folder_changes(shapes, tmp_path, capsys, monkeypatch):
    """A run on class folders writes split.json (its split, as a split file; a run without it
    gets it at its resume). Classes added to the folder reshuffle the split by fractions so that
    classes the run trained on would be tested; eval keeps to the run's test classes: the same
    episodes, the same score. A folder without one of the run's classes is refused in one line
    (its classes are scored on request), and compare refuses runs of different splits. A
    relative --split-file is recorded absolute: the run resumes from another working folder,
    and without the file, from its split.json."""
    monkeypatch.setenv("METALEARN_CACHE", str(tmp_path / "cache"))
    photos = tmp_path / "photos"
    shutil.copytree(shapes, photos)
    args = ["protonet", "--dataset", "folder", "--image-size", 16, "--ways", 3, "--shots", 1, "--query", 2,
            "--val-every", 0, "--eval-episodes", 6, "--no-progress", "--data-dir", photos]
    run_dir = tmp_path / "run"
    assert run(["train", *args, "--steps", 1, "--no-eval", "--run-dir", run_dir], capsys)[0] == 0
    recorded = json.loads((run_dir / "split.json").read_text())
    assert recorded == class_split(load_image_folder(photos, 16, 3))  # the default split, as a split file
    assert sorted(map(len, recorded.values())) == [12, 14, 46]
    (run_dir / "split.json").unlink()  # a run from before split.json
    code, out, err = run(["train", "protonet", "--resume", "--run-dir", run_dir, "--steps", 2, "--data-dir", photos,
                          "--no-progress"], capsys)
    assert code == 0, err
    assert json.loads((run_dir / "split.json").read_text()) == recorded
    own = json.loads((run_dir / "eval.json").read_text())

    for i in range(3):  # new classes, sorted before every old one
        shutil.copytree(photos / "red-circle", photos / f"aa-new{i}")
    now = class_split(load_image_folder(photos, 16, 3))
    assert set(now["test"]) & set(recorded["train"])  # the folder's split now would test trained classes
    code, out, err = run(["eval", run_dir, "--data-dir", photos, "--no-progress"], capsys)
    assert code == 0, err
    again = json.loads((run_dir / "eval.json").read_text())
    assert again["mean"] == own["mean"] and again["scores"] == own["scores"]
    assert run(["export", run_dir, tmp_path / "record"], capsys)[0] == 0
    assert json.loads((tmp_path / "record" / "summary.json").read_text())["split"] == recorded

    other = tmp_path / "other-run"  # trained on the folder as it is now: another split
    assert run(["train", *args, "--steps", 1, "--no-eval", "--run-dir", other], capsys)[0] == 0
    code, out, err = run(["compare", run_dir, other, "--data-dir", photos, "--episodes", 2], capsys)
    one_line_error(code, out, err, "split their class folders differently (see split.json in each)")

    lost = recorded["test"][0]
    shutil.rmtree(photos / lost)
    code, out, err = run(["eval", run_dir, "--data-dir", photos, "--no-progress"], capsys)
    one_line_error(code, out, err, f"the run in {run_dir} trained on classes that this folder lacks (1 of them, e.g. "
                                   f"{lost!r}; its split.json lists its classes): give --data-dir the folder it")
    code, out, err = run(["eval", run_dir, "--data-dir", photos, "--split-fractions", "0,0,1", "--episodes", 2,
                          "--no-progress"], capsys)
    assert code == 0, err

    names = sorted(p.name for p in shapes.iterdir() if p.is_dir())
    (tmp_path / "mine.json").write_text(json.dumps({"train": names[:40], "test": names[40:]}))
    monkeypatch.chdir(tmp_path)
    by_file = tmp_path / "by-file"
    code, out, err = run(["train", *args[:-1], shapes, "--steps", 1, "--no-eval", "--split-file", "mine.json",
                          "--run-dir", by_file], capsys)
    assert code == 0, err
    assert RunDir(by_file).read_config().task.split_file == str(tmp_path / "mine.json")
    assert json.loads((by_file / "split.json").read_text()) == {"train": names[:40], "val": [], "test": names[40:]}
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    code, out, err = run(["train", "protonet", "--resume", "--run-dir", by_file, "--steps", 2, "--data-dir", shapes,
                          "--no-eval", "--no-progress"], capsys)
    assert code == 0, err
    (tmp_path / "mine.json").unlink()  # the split file gone: the run's split.json stands in, to its test
    code, out, err = run(["train", "protonet", "--resume", "--run-dir", by_file, "--steps", 3, "--data-dir", shapes,
                          "--no-progress"], capsys)
    assert code == 0 and (by_file / "eval.json").is_file(), err
    assert RunDir(by_file).read_config().task.split_file == str(tmp_path / "mine.json")  # the config as it was


def test_the_recorded_split_meets_part_folders_restarts_and_other_runs(tmp_path, capsys, monkeypatch):
    """A class-folder run scored on a folder of train/ test/ folders takes that folder's split.
    Too few test classes under the recorded split are reported as the run's split, counting the
    classes in no part. A run trained with another run's split.json compares with it, and an
    eval with that file is labelled by the run's folder (the run's own split.json, by any path:
    its own eval.json); on part folders it is refused as any split file is, and a split.json
    that is no run's is a plain split file. compare refuses a run with a recorded split beside
    one without; a run trained on every class is told how to score others. A folder restarted
    on part folders after an attempt that died before its first checkpoint keeps no split.json
    of that attempt."""
    monkeypatch.setenv("METALEARN_CACHE", str(tmp_path / "cache"))
    rng = np.random.default_rng(0)

    def draw(folder: Path, c: int) -> None:
        folder.mkdir(parents=True)
        for i in range(3):
            draw_shape(SHAPES[c % len(SHAPES)], (200, 12 * c, 0), 20, rng).save(folder / f"{i}.png")

    classes, parts = tmp_path / "classes", tmp_path / "parts"
    for c in range(12):
        draw(classes / f"c{c:02d}", c)
    for part, numbers in (("train", range(12, 16)), ("test", range(16, 20))):
        for c in numbers:
            draw(parts / part / f"c{c:02d}", c)
    options = ["protonet", "--dataset", "folder", "--image-size", 16, "--ways", 3, "--shots", 1, "--query", 1,
               "--steps", 1, "--val-every", 0, "--eval-episodes", 2, "--no-progress"]
    run_a = tmp_path / "a"
    code, out, err = run(["train", *options, "--data-dir", classes, "--split-fractions", "0.5,0,0.5", "--run-dir",
                          run_a, "--no-eval"], capsys)
    assert code == 0, err
    code, out, err = run(["eval", run_a, "--data-dir", parts, "--no-progress"], capsys)
    assert code == 0, err
    assert json.loads(one_file(run_a, "eval-data=parts-*.json").read_text())["ways"] == 3

    draw(classes / "c12", 12)  # a class the run never saw: in no part of its split
    code, out, err = run(["eval", run_a, "--data-dir", classes, "--ways", 7, "--no-progress"], capsys)
    one_line_error(code, out, err, f"the run's split ({run_a / 'split.json'}) gives the test part 6 of the folder's "
                                   "13 classes (train 6, val 0, test 6, in no part 1); --ways 7 needs 7")
    assert "lower --ways to 6 or fewer to score the run on its own test classes; for another folder, of classes " \
           "the run never trained on, metalearn eval --split-fractions 0,0,1 scores every class" in err
    assert "--val-every" not in err

    run_c = tmp_path / "c"
    code, out, err = run(["train", *options, "--data-dir", classes, "--split-file", run_a / "split.json",
                          "--run-dir", run_c, "--no-eval"], capsys)
    assert code == 0, err
    code, out, err = run(["compare", run_a, run_c, "--data-dir", classes, "--episodes", 2], capsys)
    assert code == 0, err
    # eval's and compare's own options set the episode shape (they have no --test-*): their refusals name them
    code, out, err = run(["compare", run_a, run_c, "--data-dir", classes, "--ways", 7, "--episodes", 2], capsys)
    one_line_error(code, out, err, "(train 6, val 0, test 6, in no part 1); --ways 7 needs 7: lower --ways to 6 or "
                                   "fewer to score the run on its own test classes")
    code, out, err = run(["eval", run_a, "--data-dir", classes, "--shots", 2, "--query", 2], capsys)
    one_line_error(code, out, err, "has 3 images; --shots 2 with --query 2 needs 4 per class: add images, or lower "
                                   "--query to 1 or --shots to 1")
    code, out, err = run(["eval", run_a, "--data-dir", classes, "--split-fractions", "0,0,1", "--ways", 20], capsys)
    one_line_error(code, out, err, "--ways 20 needs 20: no split of its 13 classes can give the test part 20; lower "
                                   "--ways to 13 or fewer")  # no new split offered: none has 20 classes
    assert "test-" not in err
    code, out, err = run(["eval", run_c, "--data-dir", classes, "--split-file", run_a / "split.json",
                          "--no-progress"], capsys)
    assert code == 0 and "eval-split_file=a.json" in out, (out, err)
    assert not (run_a / "eval.json").exists()  # its scores so far were of another folder (parts)
    code, out, err = run(["eval", run_a, "--data-dir", classes, "--split-file", tmp_path / "c" / ".." / "a" /
                          "split.json", "--no-progress"], capsys)
    assert code == 0, err
    assert "split_file" not in json.loads((run_a / "eval.json").read_text())
    code, out, err = run(["train", *options, "--data-dir", parts, "--split-file", run_a / "split.json", "--run-dir",
                          tmp_path / "refused"], capsys)  # a run's split is a split file like any other here
    one_line_error(code, out, err, "--split-file cannot apply: this folder's train/ val/ test/ folders set the split")
    project = tmp_path / "project"  # a split.json beside a config.json of something else: a plain split file
    project.mkdir()
    (project / "config.json").write_text("{}")
    (project / "split.json").write_text(json.dumps({"train": ["c00", "owl"], "test": ["c01"]}))
    code, out, err = run(["eval", run_a, "--data-dir", classes, "--split-file", project / "split.json"], capsys)
    one_line_error(code, out, err, f"--split-file {project / 'split.json'} names class 'owl', which the folder lacks")
    parts_run = tmp_path / "on-parts"
    assert run(["train", *options, "--data-dir", parts, "--run-dir", parts_run, "--no-eval"], capsys)[0] == 0
    code, out, err = run(["compare", run_a, parts_run, "--data-dir", classes, "--episodes", 2], capsys)
    one_line_error(code, out, err, "run 'a' recorded the split of its class folders (split.json) and 'on-parts' none")
    every = tmp_path / "every"  # trained on every class: its split has no test part
    assert run(["train", *options, "--data-dir", classes, "--split-fractions", "1,0,0", "--run-dir", every,
                "--no-eval"], capsys)[0] == 0
    code, out, err = run(["eval", every, "--data-dir", classes], capsys)
    one_line_error(code, out, err, f"the run's split ({every / 'split.json'}) has no test classes: every class it "
                                   "names was trained or validated on; for another folder, of classes the run never "
                                   "trained on, metalearn eval --split-fractions 0,0,1 scores every class")
    code, out, err = run(["status", every], capsys)
    assert code == 0 and f"metalearn eval {every} --data-dir NEW_CLASSES_FOLDER --split-fractions 0,0,1" in out, (out, err)

    run_b = tmp_path / "b"  # an attempt killed before its first checkpoint: config.json and split.json
    run_b.mkdir()
    for name in ("config.json", "split.json"):
        shutil.copy(run_a / name, run_b / name)
    code, out, err = run(["train", *options, "--data-dir", parts, "--run-dir", run_b], capsys)
    assert code == 0, err
    assert not (run_b / "split.json").exists() and (run_b / "checkpoint.pt").exists()


def test_a_statisticians_picture_fits_a_folder_of_small_classes(tmp_path, capsys, monkeypatch):
    """The conditional-samples picture takes sets of 5 images and one more per class; a
    folder's test classes of 4 images give sets of 3 (plot and export drew nothing before)."""
    monkeypatch.setenv("METALEARN_CACHE", str(tmp_path / "cache"))
    rng = np.random.default_rng(0)
    for c in range(12):
        (tmp_path / "glyphs" / f"c{c:02d}").mkdir(parents=True)
        for i in range(4):
            image = Image.new("L", (28, 28))
            ImageDraw.Draw(image).line((int(rng.integers(0, 28)), int(rng.integers(0, 28)), 2 * c, 27 - 2 * c),
                                       fill=255, width=2)
            image.save(tmp_path / "glyphs" / f"c{c:02d}" / f"{i}.png")
    run_dir = tmp_path / "run"
    code, out, err = run(["train", "statistician", "--dataset", "folder", "--data-dir", tmp_path / "glyphs",
                          "--image-size", 28, "--channels", 1, "--shots", 3, "--query", 1, "--test-query", 1,
                          "--steps", 1, "--meta-batch-size", 2, "--val-every", 0, "--no-eval", "--split-fractions",
                          "0.5,0,0.5", "--run-dir", run_dir, "--no-progress"], capsys)
    assert code == 0, err
    code, out, err = run(["plot", run_dir, "--data-dir", tmp_path / "glyphs"], capsys)
    assert code == 0 and "conditional_samples.png" in out, err
    from metalearn.api import _fit_picture

    task = RunDir(run_dir).with_own_split(RunDir(run_dir).read_config()).task
    assert _fit_picture(task, tmp_path / "glyphs", 6, 5) == (6, 3)  # 6 test classes of 4 images: sets of 3
    assert _fit_picture(task, tmp_path / "glyphs", 8, 2) == (6, 2)


# -- the audit of a new user's own folder: advice, early checks, large images, messages --------


def fake_run(root: Path, split: dict[str, list[str]]) -> Path:
    """A folder that reads as a trained run's (split.json beside config.json and checkpoint.pt)."""
    root.mkdir(parents=True)
    (root / "config.json").write_text("{}")
    (root / "checkpoint.pt").write_bytes(b"")
    (root / "split.json").write_text(json.dumps(split))
    return root / "split.json"


def named_folder(n: int, layout: str = "classes", parts: tuple[str, ...] | None = None):
    from metalearn.data.folder import ImageFolder

    return ImageFolder(np.zeros((n, 1, 4, 4), np.uint8), tuple(f"c{i:02d}" for i in range(n)),
                       np.ones(n, np.int64), parts or ("",) * n, layout, "")


def test_no_hint_scores_a_run_on_the_classes_it_trained_on(tmp_path):
    """--split-fractions 0,0,1 makes every class of a folder a test class: offered only for
    another folder of new classes. On the run's own folder (its recorded split) the fix for too
    few test classes is fewer ways; eval --part val of a run without val classes is told to
    score its test classes, not to resplit; --val-every 0 is named as metalearn train's. Each
    option and command is named as the caller spells it: Python's arguments, the command line's
    flags."""
    from metalearn.data.folder import check_part_classes

    folder = named_folder(13)
    names = list(folder.class_names)
    own = fake_run(tmp_path / "a", {"train": names[:6], "test": names[6:12]})
    task = TaskConfig(dataset="folder", split_file=str(own))
    pool = folder_split(folder, "test", split_file=str(own))
    with pytest.raises(OptionError) as caught:
        check_part_classes(folder, pool, "test", 7, task, "test_ways", note=(" (it defaults to ways)",
                                                                             " (it defaults to --ways)"))
    assert str(caught.value) == (
        f"the run's split ({own}) gives the test part 6 of the folder's 13 classes (train 6, val 0, test 6, in no "
        "part 1); test_ways=7 (it defaults to ways) needs 7: lower test_ways to 6 or fewer to score the run on its "
        "own test classes; for another folder, of classes the run never trained on, evaluate_run with "
        "split_fractions='0,0,1' scores every class (on the folder it trained on, that would score its training "
        "classes too)")
    assert caught.value.with_flags() == (
        f"the run's split ({own}) gives the test part 6 of the folder's 13 classes (train 6, val 0, test 6, in no "
        "part 1); --test-ways 7 (it defaults to --ways) needs 7: lower --test-ways to 6 or fewer to score the run on "
        "its own test classes; for another folder, of classes the run never trained on, metalearn eval "
        "--split-fractions 0,0,1 scores every class (on the folder it trained on, that would score its training "
        "classes too)")
    every = fake_run(tmp_path / "every", {"train": names[:10], "val": names[10:]})  # nothing left to score
    with pytest.raises(MetalearnError) as caught:
        folder_split(folder, "test", split_file=str(every))
    message = str(caught.value)
    assert message.startswith(f"the run's split ({every}) has no test classes: every class it names was trained or "
                              "validated on; for another folder, of classes the run never trained on"), message
    no_val = fake_run(tmp_path / "no-val", {"train": names[:6], "test": names[6:]})
    with pytest.raises(MetalearnError) as caught:  # metalearn eval --part val
        folder_split(folder, "val", split_file=str(no_val))
    message = str(caught.value)
    assert "0,0,1" not in message and "evaluate_run scores its test classes without part='val'" in message, message
    assert "metalearn eval scores its test classes without --part val" in caught.value.with_flags()
    parts = named_folder(4, "parts", ("train", "train", "test", "test"))
    with pytest.raises(OptionError) as caught:
        folder_split(parts, "val")
    assert str(caught.value) == ("the image folder has no val classes: add a val/ folder of classes; or train without "
                                 "validation (val_every=0), or score the test classes (evaluate_run without "
                                 "part='val')")
    assert caught.value.with_flags().endswith("; or train without validation (metalearn train --val-every 0), or "
                                              "score the test classes (metalearn eval without --part val)")
    mine = TaskConfig(dataset="folder", split_fractions="0.5,0,0.5")  # the user's own split, of a new folder
    with pytest.raises(OptionError) as caught:
        check_part_classes(named_folder(5), folder_split(named_folder(5), "test", "0.5,0,0.5"), "test", 5, mine,
                           "test_ways")
    message = str(caught.value)
    assert message.startswith("split_fractions 0.5,0,0.5 gives the test part 2 of the folder's 5 classes (train 3, "
                              "val 0, test 2); test_ways=5 needs 5: "), message
    assert "give it 5 or more with split_fractions or split_file; lower test_ways to 2 or fewer; for another " \
           "folder, of classes the run never trained on, evaluate_run with split_fractions='0,0,1'" in message, message
    message = caught.value.with_flags()
    assert "--test-ways 5 needs 5: give it 5 or more with --split-fractions or --split-file; lower --test-ways to 2 " \
           "or fewer; for another folder, of classes the run never trained on, metalearn eval --split-fractions " \
           "0,0,1" in message, message


def test_the_advice_for_a_small_part_holds_for_every_part_its_option_sets(tmp_path, capsys, monkeypatch):
    """10 classes split 0.7,0.15,0.15 give 7 / 2 / 1. --test-ways sets the ways of val and test,
    so metalearn train's advice for val's 2 classes holds for test's 1 too: the split options
    first, and no value of --test-ways alone (the test part's 1 class makes no episode); the
    advice it gives trains. metalearn train names train's remedies only, eval eval's."""
    from metalearn.data.folder import check_part_classes

    monkeypatch.setenv("METALEARN_CACHE", str(tmp_path / "cache"))
    write_tiny(tmp_path / "c10", {f"class{c}": 3 for c in range(10)})
    options = ["train", "protonet", "--dataset", "folder", "--data-dir", tmp_path / "c10", "--image-size", 16,
               "--ways", 2, "--shots", 1, "--query", 1, "--steps", 1, "--eval-episodes", 2, "--no-progress",
               "--split-fractions", "0.7,0.15,0.15"]
    code, out, err = run([*options, "--test-ways", 3, "--run-dir", tmp_path / "refused"], capsys)
    one_line_error(code, out, err, "--split-fractions 0.7,0.15,0.15 gives the val part 2 of the folder's 10 classes "
                                   "(train 7, val 2, test 1); --test-ways 3 (in metalearn eval and compare: --ways) needs 3: give "
                                   "val and test 3 or more each with --split-fractions or --split-file; train without "
                                   "validation or the test (metalearn train --val-every 0 --no-eval); lower --test-ways "
                                   "to 2 or fewer and train without the test (metalearn train --no-eval), whose 1 "
                                   "class cannot make an episode")
    code, out, err = run([*options, "--test-ways", 2, "--run-dir", tmp_path / "refused"], capsys)
    one_line_error(code, out, err, "gives the test part 1 of the folder's 10 classes (train 7, val 2, test 1); "
                                   "--test-ways 2 (in metalearn eval and compare: --ways) needs 2: give it 2 or more with "
                                   "--split-fractions or --split-file; train without the test (metalearn train "
                                   "--no-eval); --test-ways cannot go below 2, so this part cannot make an episode")
    assert "0,0,1" not in err  # metalearn eval's advice for another folder
    code, out, err = run([*options, "--test-ways", 2, "--no-eval", "--run-dir", tmp_path / "run"], capsys)
    assert code == 0, err
    # a test part of 2 to 3 classes: one value of --test-ways serves both parts
    folder = named_folder(20)
    task = TaskConfig(dataset="folder", split_fractions="0.7,0.1,0.2")  # 14 / 2 / 4
    with pytest.raises(OptionError) as caught:
        check_part_classes(folder, folder_split(folder, "val", "0.7,0.1,0.2"), "val", 5, task, "test_ways", "train")
    assert caught.value.with_flags().endswith(
        "needs 5: give val and test 5 or more each with --split-fractions or --split-file; train without validation "
        "(metalearn train --val-every 0) and with --test-ways 4 or fewer; lower --test-ways to 2 or fewer"), caught.value
    assert str(caught.value).endswith(  # from Python: the fields of TaskConfig and TrainConfig
        "test_ways=5 needs 5: give val and test 5 or more each with split_fractions or split_file; train without "
        "validation (val_every=0) and with test_ways 4 or fewer; lower test_ways to 2 or fewer"), caught.value
    task = TaskConfig(dataset="folder", split_fractions="0.6,0.25,0.15")  # 12 / 5 / 3
    with pytest.raises(OptionError, match=r"needs 6: give val and test 6 or more each with split_fractions or "
                                          r"split_file; lower test_ways to 3 or fewer \(the test part has 3\)$"):
        check_part_classes(folder, folder_split(folder, "val", "0.6,0.25,0.15"), "val", 6, task, "test_ways", "train")
    with pytest.raises(OptionError, match=r"needs 6: give it 6 or more with split_fractions or split_file; "
                                          r"lower test_ways to 5 or fewer$"):  # eval --part val: val alone
        check_part_classes(folder, folder_split(folder, "val", "0.6,0.25,0.15"), "val", 6, task, "test_ways", "eval")
    # a val fraction of 0 trains without validation, as a split without a val part does; asked for,
    # validation is refused with the reason
    code, out, err = run([*options[:-1], "0.5,0,0.5", "--run-dir", tmp_path / "unvalidated"], capsys)
    assert code == 0, err
    assert json.loads((tmp_path / "unvalidated" / "config.json").read_text())["train"]["val_every"] == 0
    code, out, err = run([*options[:-1], "0.5,0,0.5", "--val-every", 1, "--run-dir", tmp_path / "refused"], capsys)
    one_line_error(code, out, err, "--val-every cannot apply: --split-fractions 0.5,0,0.5 gives validation no classes")
    # so does a split file without "val" classes
    split = tmp_path / "no-val.json"
    split.write_text(json.dumps({"train": [f"class{c}" for c in range(5)],
                                 "test": [f"class{c}" for c in range(5, 10)]}))
    by_file = [*options[:-2], "--split-file", split]
    code, out, err = run([*by_file, "--run-dir", tmp_path / "unvalidated-by-file"], capsys)
    assert code == 0, err
    assert json.loads((tmp_path / "unvalidated-by-file" / "config.json").read_text())["train"]["val_every"] == 0
    code, out, err = run([*by_file, "--val-every", 1, "--run-dir", tmp_path / "refused"], capsys)
    one_line_error(code, out, err, f'--val-every cannot apply: --split-file {split} lists no validation ("val") classes')
    # no val classes where validation is on (a split built in Python): metalearn eval --part val is
    # told of its test classes
    parts = named_folder(4, "parts", ("train", "train", "test", "test"))
    with pytest.raises(OptionError) as caught:
        folder_split(parts, "val", command="eval")
    assert caught.value.with_flags().endswith("no val classes: add a val/ folder of classes; or score the test "
                                              "classes (metalearn eval without --part val)"), caught.value
    assert str(caught.value).endswith("; or score the test classes (evaluate_run without part='val')"), caught.value
    with pytest.raises(OptionError) as caught:
        folder_split(named_folder(4, "parts", ("train",) * 4), "test", command="train")
    assert caught.value.with_flags().endswith("no test classes: add a test/ folder of classes, or train without the "
                                              "test (metalearn train --no-eval)"), caught.value
    assert str(caught.value).endswith(", or train without the test (evaluate_after=False)"), caught.value


def test_too_few_classes_or_images_are_refused_before_any_image_is_decoded(tmp_path, monkeypatch):
    """The class counts come from the file names: a folder that cannot serve --ways or --shots
    is refused without decoding (minutes for a large folder); one that can is decoded when its
    images are used, once."""
    monkeypatch.setenv("METALEARN_CACHE", str(tmp_path / "cache"))
    write_tiny(tmp_path / "d", {f"c{i:02d}": 3 for i in range(10)})
    decoded = []
    real = folder_module.decode_image
    monkeypatch.setattr(folder_module, "decode_image", lambda *args: decoded.append(args[0]) or real(*args))
    folder_module._LOADED.clear()
    task = TaskConfig(dataset="folder", ways=8, shots=1, query=1, image_size=8, channels=1)
    with pytest.raises(MetalearnError, match="gives the train part 6 of the folder's 10 classes"):
        build_task_source(task, "train", data_dir=tmp_path / "d", progress=False)
    with pytest.raises(OptionError) as caught:  # named as the TaskConfig's fields; on the command line as flags
        build_task_source(dataclasses.replace(task, ways=3, shots=2, query=2), "train", data_dir=tmp_path / "d",
                          progress=False)
    assert re.fullmatch(r"class c0. has 3 images; shots=2 with query=2 \(query defaults to shots\) needs 4 per "
                        r"class: add images, or lower query to 1 or shots to 1", str(caught.value)), caught.value
    assert re.fullmatch(r"class c0. has 3 images; --shots 2 with --query 2 \(--query defaults to --shots\) needs 4 "
                        r"per class: add images, or lower --query to 1 or --shots to 1", caught.value.with_flags())
    assert decoded == []
    source = build_task_source(dataclasses.replace(task, ways=3), "train", data_dir=tmp_path / "d", progress=False)
    assert len(decoded) == 30
    for seed in (0, 1):  # sampling reads the decoded images: nothing is decoded again
        batch = source.sample(2, gen(seed))
        assert (batch.support_x.shape, batch.query_x.shape, batch.ways) == ((2, 3, 1, 8, 8), (2, 3, 1, 8, 8), 3)
        assert sorted(batch.support_y[0].tolist()) == sorted(batch.query_y[1].tolist()) == [0, 1, 2]
    assert len(decoded) == 30 and len(set(decoded)) == 30
    # training: the validation and test parts' shapes too are checked before the training part is read
    decoded.clear()
    folder_module._LOADED.clear()
    from metalearn.api import resolve_config
    from metalearn.training import build_trainer

    config = resolve_config("protonet", {"dataset": "folder", "ways": 2, "test_ways": 3, "image_size": 16,
                                         "channels": 1}, train={"steps": 1, "val_every": 0})
    with pytest.raises(MetalearnError, match="gives the test part 2 of the folder's 10 classes"):
        build_trainer(config, data_dir=tmp_path / "d")
    assert decoded == []
    # a setup lists the folder once for every part's check and build (network storage: slow)
    scans = []
    real_scan = folder_module.scan_folder
    monkeypatch.setattr(folder_module, "scan_folder", lambda root: scans.append(root) or real_scan(root))
    build_trainer(dataclasses.replace(config, task=dataclasses.replace(config.task, test_ways=2)),
                  data_dir=tmp_path / "d")
    assert len(scans) == 1



def test_too_few_images_name_where_the_query_came_from_and_the_values_that_fit(tmp_path, capsys, monkeypatch):
    """A user who never set --query is told it follows --shots, and every refusal names the
    largest --query (or --shots) the smallest class can serve, for training and test episodes
    alike; where neither alone fits, both are named."""
    monkeypatch.setenv("METALEARN_CACHE", str(tmp_path / "cache"))
    write_tiny(tmp_path / "photos", {f"class_{i:02d}": 8 for i in range(6)})
    common = ["train", "protonet", "--dataset", "folder", "--data-dir", tmp_path / "photos", "--ways", 3,
              "--image-size", 16, "--split-fractions", "0.5,0.5,0", "--no-eval", "--steps", 1, "--no-progress",
              "--run-dir", tmp_path / "run"]
    code, out, err = run([*common, "--shots", 5], capsys)
    one_line_error(code, out, err, "class class_01 has 8 images; --shots 5 with --query 5 (--query defaults to "
                                   "--shots) needs 10 per class: add images, or lower --query to 3 or --shots to 3")
    code, out, err = run([*common, "--shots", 5, "--query", 4], capsys)  # a --query that differs was given
    one_line_error(code, out, err, "--shots 5 with --query 4 needs 9 per class: add images, or lower --query to 3 "
                                   "or --shots to 4")
    code, out, err = run([*common, "--shots", 2, "--test-shots", 7], capsys)
    one_line_error(code, out, err, "--test-shots 7 with --test-query 2 (--test-query defaults to --query; in "
                                   "metalearn eval and compare: --shots, --query) needs 9 per class: add images, or "
                                   "lower --test-query to 1 or --test-shots to 6")
    assert not (tmp_path / "cache").exists()  # refused from the file names, before any image is decoded
    folder = named_folder(4)
    pool = ClassPool("train", torch.arange(4), torch.zeros(4, dtype=torch.long))
    folder.class_sizes = np.array([8, 8, 4, 8])
    with pytest.raises(OptionError) as caught:
        folder_module.check_class_sizes(folder, pool, 5, 5, note=" (S)")
    assert str(caught.value) == ("class c02 has 4 images; shots=5 with query=5 (S) needs 10 per class: add images, or "
                                 "lower shots plus query to 4 or fewer (e.g. shots=3 with query=1)")
    assert caught.value.with_flags() == ("class c02 has 4 images; --shots 5 with --query 5 (S) needs 10 per class: add "
                                         "images, or lower --shots plus --query to 4 or fewer (e.g. --shots 3 with "
                                         "--query 1)")
    folder.class_sizes = np.array([8, 1, 8, 8])
    with pytest.raises(OptionError) as caught:
        folder_module.check_class_sizes(folder, pool, 1, 1, test=True, note=(" (P)", " (C)"))
    assert str(caught.value) == ("class c01 has 1 image; test_shots=1 with test_query=1 (P) needs 2 per class: add "
                                 "images: an episode takes 2 or more of each class (1 shot, 1 query), or remove the "
                                 "class")
    assert caught.value.with_flags().startswith("class c01 has 1 image; --test-shots 1 with --test-query 1 (C) needs 2")
    folder.class_names = ("c00", "{shots}", "c02", "c03")  # a class name is quoted as it is, never read for options
    with pytest.raises(OptionError, match=r"^class \{shots\} has 1 image; test_shots=1"):
        folder_module.check_class_sizes(folder, pool, 1, 1, test=True)
    folder_module.check_class_sizes(folder, ClassPool("train", torch.tensor([0, 2]), torch.zeros(2, dtype=torch.long)),
                                    4, 4)  # a pool without the small class fits


def test_a_cache_folder_that_is_a_file_is_named_as_such(tmp_path, monkeypatch):
    """METALEARN_CACHE naming a file (or a path through one) is said in those words, not as
    mkdir's "File exists"; the images stay readable once it names a folder."""
    write_tiny(tmp_path / "photos", {"a": 2, "b": 2})
    afile = tmp_path / "afile"
    afile.write_text("not a folder")
    for cache, said in ((afile, f"METALEARN_CACHE {afile} is a file, not a folder"),
                        (afile / "sub", f"METALEARN_CACHE {afile / 'sub'}: {afile} is a file, not a folder")):
        monkeypatch.setenv("METALEARN_CACHE", str(cache))
        folder_module._LOADED.clear()
        with pytest.raises(MetalearnError) as caught:
            load_image_folder(tmp_path / "photos", 8, 1).images
        message = str(caught.value)
        assert message.startswith(f"cannot write {cache}/folder-photos-") and \
            message.endswith(f": {said}; point METALEARN_CACHE at a folder"), message
        assert "File exists" not in message and "Not a directory" not in message
    monkeypatch.delenv("METALEARN_CACHE")
    folder_module._LOADED.clear()
    with pytest.raises(MetalearnError, match=f"the cache folder {re.escape(str(afile))} is a file, not a folder; "):
        load_image_folder(tmp_path / "photos", 8, 1, cache_dir=afile).images
    assert afile.read_text() == "not a folder"
    assert fresh_load(tmp_path / "photos", tmp_path / "cache").images.shape == (4, 1, 8, 8)


@pytest.mark.parametrize("workers", [1, 2])
def test_every_unreadable_image_is_named_in_one_refusal_and_nothing_is_cached(tmp_path, monkeypatch, workers):
    """A damaged file and an empty one are refused together (not one per run), the empty one as
    such; past five the rest are counted; files skipped by their names are still only warned of;
    no cache is written; one unreadable file keeps decode_image's message, advice and all."""
    monkeypatch.setattr(folder_module, "PARALLEL_FROM", 1)  # workers=2: the processes' path
    monkeypatch.setattr(folder_module, "CHUNK", 3)
    root, cache = tmp_path / "photos", tmp_path / "cache"
    write_tiny(root, {"a": 4, "b": 4, "c": 4})
    (root / "a" / "broken.jpg").write_bytes(b"garbage, not a JPEG")
    (root / "b" / "empty.png").write_bytes(b"")
    (root / "c" / "notes.txt").write_text("skipped by its name, warned of")

    def load():
        folder_module._LOADED.clear()
        return load_image_folder(root, 8, 1, cache_dir=cache, workers=workers).images

    with pytest.warns(MetalearnWarning, match="skipped 1 file that is not an image by its name"):
        with pytest.raises(MetalearnError) as caught:
            load()
    assert str(caught.value) == (f"cannot read 2 images of image folder {root}: {root / 'a' / 'broken.jpg'}: not an "
                                 f"image file PIL can decode; {root / 'b' / 'empty.png'}: it is empty (0 bytes). "
                                 "Replace or remove them")
    assert not cache.exists() or list(cache.iterdir()) == []
    for i in range(5):
        (root / "c" / f"empty{i}.png").write_bytes(b"")
    with pytest.raises(MetalearnError) as caught:
        load()
    message = str(caught.value)
    assert message.startswith("cannot read 7 images of image folder ") and "\n" not in message
    assert message.count(": it is empty (0 bytes)") == 4 and message.endswith("; and 2 more. Replace or remove them")
    for path in [root / "a" / "broken.jpg", root / "b" / "empty.png", *root.glob("c/empty*.png")]:
        path.unlink()
    headed_png(root / "c" / "huge.png", 20000, 20000)
    with pytest.raises(MetalearnError, match=rf"^cannot read image {re.escape(str(root / 'c' / 'huge.png'))}: "
                                             r"20000x20000 is 400 megapixels, .*; shrink it"):
        load()
    assert not cache.exists() or list(cache.iterdir()) == []
    (root / "c" / "huge.png").unlink()
    assert load().shape == (12, 1, 8, 8) and len(list(cache.glob("*.npz"))) == 1

def headed_png(path: Path, width: int, height: int) -> Path:
    """A PNG whose header claims ``width`` x ``height`` (its pixels are an 8x8 image's): the size
    checks read the header only."""
    import io
    import struct
    import zlib

    buffer = io.BytesIO()
    Image.new("L", (8, 8)).save(buffer, "PNG")
    data = bytearray(buffer.getvalue())
    struct.pack_into(">II", data, 16, width, height)  # IHDR's width and height
    struct.pack_into(">I", data, 29, zlib.crc32(bytes(data[12:29])))
    path.write_bytes(bytes(data))
    return path


def test_large_images_are_read_without_warnings_and_huge_ones_refused_by_name(tmp_path, monkeypatch):
    """PIL warns past 89.5 megapixels (naming its own source file) and refuses past 179; images
    are read up to MAX_PIXELS (300 megapixels) with no warning, and past it refused in one line
    naming the file, its size and the fix. PIL's own limit is left as it was. (The bounds are
    scaled down here so that the test decodes small images.)"""
    from metalearn.data import images as images_module

    assert images_module.MAX_PIXELS == 300_000_000
    huge = headed_png(tmp_path / "huge.png", 20000, 20000)
    with pytest.raises(MetalearnError, match=rf"^cannot read image {re.escape(str(huge))}: 20000x20000 is 400 "
                                             r"megapixels, more than the 300 metalearn decodes; shrink it"):
        decode_image(huge, 16, 3)
    limit = Image.MAX_IMAGE_PIXELS
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # PIL: a warning past 1000 pixels, an error past 2000
    monkeypatch.setattr(images_module, "MAX_PIXELS", 10_000)
    Image.new("RGB", (80, 80), (200, 10, 10)).save(tmp_path / "large.png")  # 6400 pixels
    Image.new("RGB", (120, 100), (200, 10, 10)).save(tmp_path / "larger.png")  # 12000 pixels
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert decode_image(tmp_path / "large.png", 16, 3)[0].min() == 200
        with pytest.raises(MetalearnError, match=r"larger.png: 120x100 is 0.012 megapixels, more than the 0.01"):
            decode_image(tmp_path / "larger.png", 16, 3)
    assert Image.MAX_IMAGE_PIXELS == 1000
    monkeypatch.undo()
    assert Image.MAX_IMAGE_PIXELS == limit


def test_split_file_mistakes_are_named(tmp_path):
    folder = named_folder(4)
    split = tmp_path / "split.json"
    split.write_text(json.dumps({"train": ["c00", "c01", "c00"], "test": ["c02"]}))
    with pytest.raises(MetalearnError, match=r"lists class 'c00' twice in train; list each class once$"):
        class_parts(folder, split_file=str(split))
    split.write_text(json.dumps({"train": ["c00"], "test": ["c00"]}))
    with pytest.raises(MetalearnError, match="puts class 'c00' in both train and test"):
        class_parts(folder, split_file=str(split))
    split.write_text(json.dumps({"train": ["c00"], "tset": ["c01"], "vla": []}))
    with pytest.raises(MetalearnError, match=r'unknown keys "tset", "vla"; the keys are "train", "val" and "test"'):
        class_parts(folder, split_file=str(split))
    # a part given twice: JSON would keep its last list, dropping c00 from training without a word
    split.write_text('{"train": ["c00"], "test": ["c02"],\n "train": ["c01"]}')
    with pytest.raises(OptionError) as caught:
        class_parts(folder, split_file=str(split))
    assert str(caught.value) == (f'split_file {split}: "train" is given twice, and only its last list would be read; '
                                 "give each part once, with all its classes in one list")
    assert caught.value.with_flags().startswith(f'--split-file {split}: "train" is given twice')
    split.write_text('{"train": ["c00", "c01"], "test": [{"c02": 1, "c02": 2}]}')  # not a part: not a class name
    with pytest.raises(OptionError, match=r'test lists \{"c02": 2\}, not a class name'):
        class_parts(folder, split_file=str(split))
    split.write_text('{"train": ["c00", "c01"], "test": ["c02"]}')
    assert class_parts(folder, split_file=str(split)) == ("train", "train", "test", "")


def test_support_and_query_paths_are_named_as_they_are_and_queries_counted_once(tmp_path):
    """support and query say the same of a missing path, each named as Python names it; an empty
    one (the working directory) is refused; an image given twice is classified once, with one
    warning."""
    from metalearn.prediction import read_query, read_support

    missing = tmp_path / "nonexist"
    for read, option in ((read_support, "support"), (lambda p: read_query([p]), "query")):
        with pytest.raises(MetalearnError, match=rf"^{option} {re.escape(str(missing))} does not exist; give"):
            read(missing)
        with pytest.raises(MetalearnError, match=rf"^{option} is empty; give an image file or folder"):
            read("")
    (tmp_path / "file.txt").write_text("x")
    with pytest.raises(MetalearnError, match="file.txt is a file, not a folder; give a folder with one sub-folder"):
        read_support(tmp_path / "file.txt")
    write_tiny(tmp_path / "q", {"a": 2})
    (tmp_path / "link.png").symlink_to(tmp_path / "q" / "a" / "01.png")
    with pytest.warns(MetalearnWarning, match=r"^2 query images were given twice \(e\.g\. \S*q/a/00\.png\): "
                                              "each is classified and counted once$") as caught:
        files = read_query([tmp_path / "q", tmp_path / "q" / "a" / "00.png", tmp_path / "link.png"])
    assert len(caught) == 1
    with pytest.warns(MetalearnWarning, match=r"^1 query image was given twice \(e\.g\. \S*link\.png, the same file as "
                                              r"\S*q/a/01\.png\)"):
        assert read_query([tmp_path / "q", tmp_path / "link.png"]) == files
    assert files == [tmp_path / "q" / "a" / "00.png", tmp_path / "q" / "a" / "01.png"]


def test_a_folder_without_images_names_what_it_holds(tmp_path, capsys, monkeypatch):
    """--query, a support class and a training class folder without images say what they
    hold instead: the files that are not images by their names (three and a count), or that
    they are empty or hold only hidden files."""
    from metalearn.prediction import read_query, read_support

    query = tmp_path / "pq1"
    query.mkdir()
    (query / "a.txt").write_text("x")
    with pytest.raises(MetalearnError, match=rf"^query {re.escape(str(query))} holds no images \(PNG or JPEG\); it "
                                             r"holds 1 file that is not an image by its name: a\.txt$"):
        read_query([query])
    for name in ("b.heic", "c.doc", "sub/d.raw", "sub/e.txt"):
        (query / name).parent.mkdir(exist_ok=True)
        (query / name).write_text("x")
    with pytest.raises(MetalearnError, match=r"holds no images \(PNG or JPEG\); it holds 5 files that are not images "
                                             r"by their names: a\.txt, b\.heic, c\.doc and 2 more$"):
        read_query([query])
    (tmp_path / "hidden").mkdir()
    (tmp_path / "hidden" / ".DS_Store").write_bytes(b"")
    (tmp_path / "empty").mkdir()
    for folder, held in (("hidden", r"it holds only hidden files, which are skipped \(\.DS_Store\)"),
                         ("empty", "it is empty")):
        with pytest.raises(MetalearnError, match=rf"holds no images \(PNG or JPEG\); {held}$"):
            read_query([tmp_path / folder])
    write_tiny(tmp_path / "support", {"cat": 1, "dog": 0})
    (tmp_path / "support" / "dog" / "IMG_1.HEIC").write_bytes(b"x")
    with pytest.raises(MetalearnError, match=r"^support class folder \S*dog has no images \(PNG or JPEG\); it holds 1 "
                                             r"file that is not an image by its name: IMG_1\.HEIC$"):
        read_support(tmp_path / "support")
    monkeypatch.setenv("METALEARN_CACHE", str(tmp_path / "cache"))
    code, out, err = run(["train", "protonet", "--dataset", "folder", "--data-dir", tmp_path / "support",
                          "--image-size", 16, "--ways", 2, "--run-dir", tmp_path / "run"], capsys)
    one_line_error(code, out, err, f"class folder dog ({tmp_path / 'support' / 'dog'}) has no images (PNG or JPEG); "
                                   "it holds 1 file that is not an image by its name: IMG_1.HEIC; remove it or add "
                                   "images")


def test_a_contact_sheet_of_large_folders_shows_a_readable_part_and_says_what_it_leaves_out(monkeypatch):
    """40 shots a class and 150 query images: 12 images a row, the first 120 queries, and a title
    that says what is not shown (every prediction is in --json and --csv)."""
    import matplotlib.figure

    from metalearn.prediction import SHEET_CLASSES, SHEET_COLUMNS, SHEET_QUERIES, Predictions, contact_sheet

    def result(shots: int, queries: int) -> Predictions:
        support_y = torch.arange(2).repeat_interleave(shots)
        made = Predictions(classes=["a", "b"], shots=[shots, shots],
                           predictions=[{"label": "a", "probability": 0.9}] * queries)
        made.images = (torch.rand(2 * shots, 3, 8, 8), support_y, torch.rand(queries, 3, 8, 8))
        return made

    titles, sheets = [], []
    real = matplotlib.figure.Figure.suptitle
    monkeypatch.setattr(matplotlib.figure.Figure, "suptitle",
                        lambda self, text, **kw: (titles.append(text), real(self, text, **kw))[1])
    # the figure as it would be saved, without encoding its PNG (the names' test encodes one)
    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", lambda self, target, **kw: sheets.append((self, kw)))

    def drawn() -> tuple[tuple[int, int], int]:
        """The last sheet's size in pixels and the number of images on it."""
        figure, kw = sheets[-1]
        width, height = figure.get_size_inches() * kw["dpi"]
        return (round(width), round(height)), sum(len(ax.images) for ax in figure.axes)

    contact_sheet(result(3, 10), "small")
    small = drawn()
    assert small == ((8 * 130, 4 * 145), 2 * 3 + 10)  # at least 8 columns; 2 support rows and 2 query rows
    many = result(1, 4)
    many.update(classes=[f"c{i}" for i in range(SHEET_CLASSES + 5)], shots=[1] * (SHEET_CLASSES + 5))
    many.images = (torch.rand(SHEET_CLASSES + 5, 3, 8, 8), torch.arange(SHEET_CLASSES + 5), torch.rand(4, 3, 8, 8))
    contact_sheet(many, "")
    assert titles[-1] == f"not shown: the support images of 5 of {SHEET_CLASSES + 5} classes"
    assert drawn()[1] == SHEET_CLASSES + 4
    assert titles[0] == "small"
    contact_sheet(result(40, 150), "large")
    assert titles[-1] == (f"large\nnot shown: support images past the first {SHEET_COLUMNS} of a class; "
                          f"{150 - SHEET_QUERIES} of 150 query images (all are in --json and --csv)")
    rows = 2 + SHEET_QUERIES // SHEET_COLUMNS
    assert drawn() == ((SHEET_COLUMNS * 130, rows * 145), 2 * SHEET_COLUMNS + SHEET_QUERIES)
    assert all(kw == {"format": "png", "dpi": 100} for _, kw in sheets)


def test_names_of_undecodable_bytes_reach_the_csv_as_bytes_and_the_sheet_as_replacement_characters():
    """A file or class name that is not UTF-8 (Python holds its bytes as surrogates) failed the
    CSV's encoding and the sheet's text: the CSV writes the name's own bytes back, the sheet
    draws U+FFFD for them."""
    from metalearn.prediction import Predictions, as_csv, contact_sheet

    name = os.fsdecode(b"n\xffu.png")
    made = Predictions(classes=[os.fsdecode(b"c\xff"), "b"], shots=[1, 1],
                       predictions=[{"file": name, "label": os.fsdecode(b"c\xff"), "probability": 0.9}])
    assert b"n\xffu.png,c\xff,0.900000" in as_csv(made)
    made.images = (torch.rand(2, 1, 8, 8), torch.arange(2), torch.rand(1, 1, 8, 8))
    assert contact_sheet(made, os.fsdecode(b"title \xff")).startswith(b"\x89PNG")


def test_a_folder_and_classes_named_in_bytes_that_are_not_utf8_train_resume_and_record(tmp_path, capsys):
    """A data folder and a class folder whose names are not UTF-8 (a Latin-1 disk, Python holds
    their bytes as surrogates): the cache key, the fingerprint and split.json failed with a
    UnicodeEncodeError traceback. They train, resume and record the names, which read back."""
    rng = np.random.default_rng(0)
    root = Path(os.fsdecode(os.fsencode(tmp_path) + b"/d\xe9j\xe0"))
    for c in range(8):
        folder = root / (os.fsdecode(b"caf\xe9") if c == 0 else f"class{c}")
        folder.mkdir(parents=True)
        for i in range(4):
            draw_shape(SHAPES[c % len(SHAPES)], (200, 0, 0), 20, rng).save(folder / f"{i}.png")
    run_dir = tmp_path / "run"
    common = ["--ways", 2, "--shots", 1, "--query", 1, "--image-size", 16, "--val-every", 0,
              "--eval-episodes", 2, "--no-progress"]
    code, _, err = run(["train", "protonet", "--dataset", "folder", "--data-dir", root, "--steps", 1,
                        "--run-dir", run_dir, *common], capsys)
    assert code == 0, err
    split = RunDir(run_dir).read_split()
    assert os.fsdecode(b"caf\xe9") in [name for names in split.values() for name in names]
    code, _, err = run(["train", "protonet", "--run-dir", run_dir, "--resume", "--steps", 2, *common[-5:]], capsys)
    assert code == 0, err
