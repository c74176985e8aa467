"""The Omniglot reader, its cache, the named splits and the errors a user can run into."""

from __future__ import annotations

import json
import random
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
import torch

from metalearn.data.omniglot import (
    ARCHIVES,
    CONTENT_DIGESTS,
    Omniglot,
    _read_cache,
    _write_cache,
    cache_path,
    decode_drawing,
    hash_arrays,
    load_omniglot,
    locate_sources,
    parse_name,
    read_release,
    source_fingerprint,
    verify_release,
)
from metalearn.data.splits import (
    MAML_SPLIT_SIZES,
    PARTS,
    RANDOM_ROTATION,
    SPLITS,
    ClassPool,
    has_part,
    omniglot_split,
)
from metalearn.errors import MetalearnError
from metalearn.tasks.episodes import EpisodeSampler

VINYALS_ROOT = Path(__file__).resolve().parents[1] / "src" / "metalearn" / "data" / "splits" / "vinyals"


# --------------------------------------------------------------------------------------------
# The array


def test_counts_shape_and_dtype(omniglot):
    assert isinstance(omniglot, Omniglot)
    assert omniglot.images.shape == (1623, 20, 28, 28)
    assert omniglot.images.dtype == np.uint8
    assert omniglot.image_size == 28
    assert omniglot.images[:, :, 0, 0].size == 32_460  # drawings
    assert len(omniglot.names) == len(set(omniglot.names)) == 1623
    assert omniglot.background.dtype == bool and omniglot.background.shape == (1623,)
    assert int(omniglot.background.sum()) == 964
    # characters are in number order: 0001..0964 background, 0965..1623 evaluation
    assert omniglot.background[:964].all() and not omniglot.background[964:].any()
    assert len(set(omniglot.alphabets)) == 50
    assert len({a for a, bg in zip(omniglot.alphabets, omniglot.background) if bg}) == 30
    assert all(len(name.split("/")) == 2 and name.split("/")[1].startswith("character") for name in omniglot.names)
    # each character is drawn once by each of the 20 drawers, stored in drawer order
    assert omniglot.drawers.shape == (1623, 20)
    assert (omniglot.drawers == np.arange(1, 21)).all()


def test_strokes_are_bright_on_a_dark_background(omniglot):
    flat = omniglot.images.reshape(-1, 28 * 28)
    assert np.median(flat) == 0
    assert (flat == 0).mean() > 0.6  # mostly background
    assert flat.max(axis=1).min() > 128  # every drawing has strokes
    assert ((flat > 128).mean(axis=1) < 0.5).all()  # ... and is not inverted


def test_drawings_land_at_their_character_and_drawer(omniglot, omniglot_data_dir):
    """A few PNGs picked from the zips, decoded on their own, equal their slot in the array."""
    index = omniglot.index_of()
    rng = random.Random(0)
    for archive in ARCHIVES:
        with zipfile.ZipFile(Path(omniglot_data_dir) / f"{archive}.zip") as zipped:
            names = [n for n in zipped.namelist() if n.endswith(".png")]
            for name in rng.sample(names, 5):
                character, number, drawer = parse_name(name)
                assert index[character] == number - 1
                image = decode_drawing(name, zipped.read(name), 28)
                np.testing.assert_array_equal(omniglot.images[number - 1, drawer - 1], image)


def test_known_duplicate_drawings_of_braille(omniglot):
    """The release's own quirk: Braille/character01 drawings 0192_03 and 0192_19 are the same."""
    braille = omniglot.index_of()["Braille/character01"]
    assert braille == 191
    np.testing.assert_array_equal(omniglot.images[braille, 2], omniglot.images[braille, 18])
    assert not np.array_equal(omniglot.images[braille, 2], omniglot.images[braille, 3])


def test_content_digests_verify(omniglot_data_dir):
    assert verify_release(omniglot_data_dir) == {archive: True for archive in ARCHIVES}
    assert set(CONTENT_DIGESTS) == set(ARCHIVES)


def test_second_load_comes_from_the_cache(omniglot, omniglot_data_dir, omniglot_cache_dir, monkeypatch):
    """Once cached, the release is not read again: with its reader broken the load still
    succeeds, from the cache file, which is left as it was."""
    cached = cache_path(omniglot_cache_dir, 28)
    before = cached.stat()

    def no_reading(*args, **kwargs):
        raise AssertionError("the release was read again despite the cache")

    monkeypatch.setattr("metalearn.data.omniglot.read_release", no_reading)
    again = load_omniglot(omniglot_data_dir, 28, cache_dir=omniglot_cache_dir)
    np.testing.assert_array_equal(again.images, omniglot.images)
    np.testing.assert_array_equal(again.background, omniglot.background)
    np.testing.assert_array_equal(again.drawers, omniglot.drawers)
    assert again.names == omniglot.names
    assert again.content_hash == omniglot.content_hash == hash_arrays(omniglot.images, omniglot.names)
    # not rewritten (the folder may be a $METALEARN_CACHE shared with other files and runs)
    assert (cached.stat().st_mtime_ns, cached.stat().st_size) == (before.st_mtime_ns, before.st_size)


def test_a_cache_of_other_sources_is_stale_and_rebuilt(tmp_path, monkeypatch):
    """The cache records the fingerprint of the sources it was made from: read with another
    (an archive replaced, a PNG changed) it is ignored, and the release is read and cached anew."""

    def tiny(seed: int) -> Omniglot:
        images = np.random.default_rng(seed).integers(0, 256, (2, 20, 4, 4), dtype=np.uint8)
        names = ("Alpha/character01", "Beta/character01")
        drawers = np.tile(np.arange(1, 21, dtype=np.int16), (2, 1))
        return Omniglot(images, names, np.array([True, False]), drawers, hash_arrays(images, names))

    def assert_same(a: Omniglot, b: Omniglot):
        np.testing.assert_array_equal(a.images, b.images)
        np.testing.assert_array_equal(a.background, b.background)
        np.testing.assert_array_equal(a.drawers, b.drawers)
        assert a.names == b.names and a.content_hash == b.content_hash

    old, new = tiny(0), tiny(1)
    path = cache_path(tmp_path / "cache", 4)
    _write_cache(path, old, "fingerprint-a")
    assert _read_cache(path, "fingerprint-b") is None
    assert_same(_read_cache(path, "fingerprint-a"), old)

    # through load_omniglot, on a tree whose fingerprint is in the cache until one PNG changes
    for archive in ARCHIVES:
        png = tmp_path / "data" / archive / "Alpha" / "character01" / "0001_01.png"
        png.parent.mkdir(parents=True)
        png.write_bytes(b"one")
    _write_cache(path, old, source_fingerprint(locate_sources(tmp_path / "data")))
    reads = []
    monkeypatch.setattr("metalearn.data.omniglot.read_release", lambda *args, **kwargs: reads.append(args) or new)
    assert_same(load_omniglot(tmp_path / "data", 4, cache_dir=tmp_path / "cache"), old)
    assert reads == []
    png.write_bytes(b"two, longer")
    assert_same(load_omniglot(tmp_path / "data", 4, cache_dir=tmp_path / "cache"), new)
    assert len(reads) == 1
    assert_same(load_omniglot(tmp_path / "data", 4, cache_dir=tmp_path / "cache"), new)  # the rebuilt cache
    assert len(reads) == 1


def test_damaged_cache_is_not_trusted(tmp_path):
    bad = tmp_path / "omniglot-28x28-v1.npz"
    bad.write_bytes(b"PK\x03\x04 not really")
    assert _read_cache(bad, "anything") is None
    bad.write_bytes(b"")  # an empty file: np.load raises EOFError, which click would call an interruption
    assert _read_cache(bad, "anything") is None
    assert _read_cache(tmp_path / "missing.npz", "anything") is None
    np.savez(tmp_path / "list-meta.npz", meta=np.array("[1, 2]"))  # valid JSON, not an object
    assert _read_cache(tmp_path / "list-meta.npz", "anything") is None
    # the right fingerprint, arrays that do not fit together: rebuilt, not read out of bounds later
    names = ("Alpha/character01", "Beta/character01")
    meta = np.array(json.dumps({"fingerprint": "f", "names": names, "content_hash": "h"}))
    drawers = np.arange(40, dtype=np.int16).reshape(2, 20)
    fine = (np.arange(2 * 20 * 4 * 4) % 251).astype(np.uint8).reshape(2, 20, 4, 4)
    np.savez(tmp_path / "fine.npz", images=fine, background=np.array([True, False]), drawers=drawers, meta=meta)
    read = _read_cache(tmp_path / "fine.npz", "f", 4)
    assert (read.names, read.content_hash, read.background.tolist()) == (names, "h", [True, False])
    np.testing.assert_array_equal(read.images, fine)
    np.testing.assert_array_equal(read.drawers, drawers)
    assert read.images.dtype == np.uint8
    assert _read_cache(tmp_path / "fine.npz", "f", 28) is None  # another image size
    for images in (np.zeros((1, 100, 4, 4), np.uint8), np.zeros((2, 20, 4, 4), np.float32), np.zeros((2, 20, 4), np.uint8)):
        np.savez(tmp_path / "odd.npz", images=images, background=np.array([True, False]), drawers=drawers, meta=meta)
        assert _read_cache(tmp_path / "odd.npz", "f", 4) is None, images.shape


# --------------------------------------------------------------------------------------------
# Splits


def test_vinyals_split_sizes(omniglot):
    sizes = {part: omniglot_split(omniglot, "vinyals", part) for part in PARTS}
    assert {p: pool.num_characters for p, pool in sizes.items()} == {"train": 1028, "val": 172, "test": 423}
    assert {p: len(pool) for p, pool in sizes.items()} == {"train": 4112, "val": 688, "test": 1692}
    for pool in sizes.values():
        # every character comes with its four rotations, each once
        pairs = set(zip(pool.characters.tolist(), pool.rotations.tolist()))
        assert len(pairs) == len(pool)
        assert pairs == {(c, k) for c in set(pool.characters.tolist()) for k in range(4)}
    # the test alphabets come from images_evaluation
    assert not omniglot.background[sizes["test"].characters.numpy()].any()


def test_vinyals_split_matches_its_files(omniglot):
    names = omniglot.names
    for part in PARTS:
        pool = omniglot_split(omniglot, "vinyals", part)
        lines = (VINYALS_ROOT / f"{part}.txt").read_text().split()
        read = [f"{names[c]}/rot{90 * k:03d}" for c, k in zip(pool.characters.tolist(), pool.rotations.tolist())]
        assert read == lines


def test_lake_split(omniglot):
    train = omniglot_split(omniglot, "lake", "train")
    test = omniglot_split(omniglot, "lake", "test")
    assert (train.num_characters, len(train)) == (964, 964)
    assert (test.num_characters, len(test)) == (659, 659)
    assert omniglot.background[train.characters.numpy()].all()
    assert not omniglot.background[test.characters.numpy()].any()
    assert (train.rotations == 0).all() and (test.rotations == 0).all()
    assert not has_part("lake", "val") and has_part("vinyals", "val") and has_part("maml", "val")
    with pytest.raises(MetalearnError, match="no validation part"):
        omniglot_split(omniglot, "lake", "val")


def test_maml_split(omniglot):
    pools = {part: omniglot_split(omniglot, "maml", part) for part in PARTS}
    assert tuple(len(pools[p]) for p in PARTS) == MAML_SPLIT_SIZES == (1100, 100, 423)
    assert tuple(pools[p].num_characters for p in PARTS) == (1100, 100, 423)
    for pool in pools.values():
        assert (pool.rotations == RANDOM_ROTATION).all()
    # seeded: the same on every call
    again = omniglot_split(omniglot, "maml", "train")
    assert torch.equal(again.characters, pools["train"].characters)


@pytest.mark.parametrize("split", SPLITS)
def test_no_character_in_two_parts(omniglot, split):
    parts = [set(omniglot_split(omniglot, split, p).characters.tolist()) for p in PARTS if has_part(split, p)]
    for i in range(len(parts)):
        for j in range(i + 1, len(parts)):
            assert not parts[i] & parts[j], f"{split}: a character is in two parts"
    assert set().union(*parts) == set(range(1623))  # and every character is used


def test_unknown_split_or_part_lists_the_valid_ones(omniglot):
    with pytest.raises(MetalearnError) as info:
        omniglot_split(omniglot, "omniglot-2000", "train")
    assert "'omniglot-2000'" in str(info.value)
    assert all(s in str(info.value) for s in SPLITS)
    with pytest.raises(MetalearnError) as info:
        omniglot_split(omniglot, "vinyals", "trainval")
    assert "'trainval'" in str(info.value) and all(p in str(info.value) for p in PARTS)


# --------------------------------------------------------------------------------------------
# Rotated classes are real rotations


def _match(image: torch.Tensor, raw: torch.Tensor, pool: ClassPool) -> set[tuple[int, int]]:
    """The (pool class, drawing) pairs whose rotated raw drawing equals ``image`` (H, W uint8)."""
    found = set()
    for cls, (c, k) in enumerate(zip(pool.characters.tolist(), pool.rotations.tolist())):
        rotated = torch.rot90(raw[c], k, dims=(-2, -1))  # (drawings, H, W)
        for d in torch.nonzero((rotated == image).flatten(1).all(1)).flatten().tolist():
            found.add((cls, d))
    return found


def test_vinyals_rotation_classes_are_rotated_drawings(omniglot):
    """Sampled images of a rot090 (rot180, rot270) class are torch.rot90 of the raw drawing by
    one (two, three) quarter turns; each label's images come from one (character, rotation)."""
    train = omniglot_split(omniglot, "vinyals", "train")
    raw = torch.from_numpy(omniglot.images)
    # a small pool of real vinyals classes: two characters (neither symmetric under rotation)
    # with all four rotations, so each class is told apart from the other rotations
    chosen = []
    for c in train.characters.unique().tolist():
        if all(not torch.equal(torch.rot90(raw[c, 0], k), raw[c, 0]) for k in (1, 2, 3)):
            chosen.append(c)
        if len(chosen) == 2:
            break
    rows = torch.nonzero(torch.isin(train.characters, torch.tensor(chosen))).flatten()
    pool = ClassPool("vinyals/train-subset", train.characters[rows], train.rotations[rows])
    assert sorted(pool.rotations.tolist()) == [0, 0, 1, 1, 2, 2, 3, 3]

    sampler = EpisodeSampler(raw, pool, ways=8, shots=2, query=3)
    batch = sampler.sample(3, torch.Generator().manual_seed(0))
    for t in range(3):
        images = torch.cat([batch.support_x[t], batch.query_x[t]]).mul(255).round().to(torch.uint8)[:, 0]
        labels = torch.cat([batch.support_y[t], batch.query_y[t]])
        classes_seen = []
        for label in range(8):
            matches = [_match(img, raw, pool) for img in images[labels == label]]
            assert all(matches), "a sampled image is not a rotated drawing of the pool"
            classes = set.intersection(*({cls for cls, _ in m} for m in matches))
            assert len(classes) == 1  # unambiguous: these characters have no rotational symmetry
            classes_seen.append(classes.pop())
            drawings = [next(iter(m))[1] for m in matches]
            assert len(set(drawings)) == 5  # shots + query distinct drawings
        assert sorted(classes_seen) == list(range(8))  # ways == pool size: every class once

    # and directly: a rot090 class is the counter-clockwise quarter turn of the raw drawing
    rot090 = int(torch.nonzero(pool.rotations == 1)[0])
    c = int(pool.characters[rot090])
    bank = sampler.bank.view(len(pool), 20, 28, 28)
    assert torch.equal(bank[rot090], torch.rot90(raw[c], 1, dims=(-2, -1)))
    assert torch.equal(bank[rot090][0], torch.from_numpy(np.rot90(omniglot.images[c, 0]).copy()))


# --------------------------------------------------------------------------------------------
# Errors a user can run into


def test_missing_data_dir_says_where_to_put_the_archives(tmp_path):
    with pytest.raises(MetalearnError) as info:
        load_omniglot(tmp_path / "nowhere", cache_dir=tmp_path / "cache")
    message = str(info.value)
    assert str(tmp_path / "nowhere") in message
    assert "images_background.zip" in message and "images_evaluation.zip" in message
    assert "METALEARN_DATA" in message and "--data-dir" in message
    assert "metalearn data prepare --download" in message
    assert not (tmp_path / "cache").exists()


def test_one_missing_archive_is_named(tmp_path, omniglot_data_dir):
    (tmp_path / "images_evaluation.zip").symlink_to(Path(omniglot_data_dir) / "images_evaluation.zip")
    with pytest.raises(MetalearnError) as info:
        locate_sources(tmp_path)
    assert "images_background.zip" in str(info.value)
    assert "images_evaluation.zip" not in str(info.value)


def test_extracted_tree_is_preferred_over_the_zip(tmp_path, omniglot_data_dir):
    (tmp_path / "images_background").mkdir()
    (tmp_path / "images_evaluation.zip").symlink_to(Path(omniglot_data_dir) / "images_evaluation.zip")
    sources = locate_sources(tmp_path)
    assert sources == {
        "images_background": tmp_path / "images_background",
        "images_evaluation": tmp_path / "images_evaluation.zip",
    }


def test_corrupt_zip_is_named(tmp_path, omniglot_data_dir):
    (tmp_path / "images_background.zip").write_bytes(b"\x00garbage, not a zip\xff" * 100)
    (tmp_path / "images_evaluation.zip").symlink_to(Path(omniglot_data_dir) / "images_evaluation.zip")
    with pytest.raises(MetalearnError) as info:
        load_omniglot(tmp_path, cache_dir=tmp_path / "cache")
    message = str(info.value)
    assert str(tmp_path / "images_background.zip") in message
    assert "not a readable zip" in message and "download it again" in message


def test_truncated_zip_is_named(tmp_path, omniglot_data_dir):
    data = (Path(omniglot_data_dir) / "images_background.zip").read_bytes()
    (tmp_path / "images_background.zip").write_bytes(data[: len(data) // 2])
    (tmp_path / "images_evaluation.zip").symlink_to(Path(omniglot_data_dir) / "images_evaluation.zip")
    with pytest.raises(MetalearnError) as info:
        load_omniglot(tmp_path, cache_dir=tmp_path / "cache")
    message = str(info.value)
    assert str(tmp_path / "images_background.zip") in message
    assert "truncated or corrupt" in message


def _real_png(omniglot_data_dir) -> tuple[str, bytes]:
    with zipfile.ZipFile(Path(omniglot_data_dir) / "images_background.zip") as archive:
        name = sorted(n for n in archive.namelist() if n.endswith(".png"))[0]
        return name, archive.read(name)


@pytest.mark.parametrize("compression", [zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED])
def test_damaged_member_of_a_zip_is_named(tmp_path, omniglot_data_dir, compression):
    """A zip whose directory is intact but whose member bytes are damaged: a bad CRC (stored),
    or a broken deflate stream, which zlib reports with its own exception (the official
    archives are deflated)."""
    name, png = _real_png(omniglot_data_dir)
    path = tmp_path / "images_background.zip"
    with zipfile.ZipFile(path, "w", compression) as archive:
        archive.writestr(name, png)
    data = bytearray(path.read_bytes())
    member = zipfile.ZipFile(path).getinfo(name)
    member_start = member.header_offset + 30 + len(member.filename.encode()) + len(member.extra)
    data[member_start] ^= 0xFF  # the first byte of the member's data: a deflate block header
    path.write_bytes(bytes(data))
    (tmp_path / "images_evaluation").mkdir()
    with pytest.raises(MetalearnError) as info:
        read_release(tmp_path)
    message = str(info.value)
    assert str(path) in message and name in message and "corrupt" in message


def test_a_png_replaced_inside_an_extracted_tree_makes_the_cache_stale(tmp_path):
    from metalearn.data.omniglot import locate_sources, source_fingerprint

    for archive in ("images_background", "images_evaluation"):
        png = tmp_path / archive / "Alpha" / "character01" / "0001_01.png"
        png.parent.mkdir(parents=True)
        png.write_bytes(b"one")
    before = source_fingerprint(locate_sources(tmp_path))
    png.write_bytes(b"two, longer")  # the folders' sizes and times stay as they were
    assert source_fingerprint(locate_sources(tmp_path)) != before


def test_corrupt_png_in_an_extracted_tree_is_named(tmp_path):
    png = tmp_path / "images_background" / "Alpha" / "character01" / "0001_01.png"
    png.parent.mkdir(parents=True)
    png.write_bytes(b"\x89PNG\r\n\x1a\n but then nothing sensible")
    (tmp_path / "images_evaluation").mkdir()
    with pytest.raises(MetalearnError) as info:
        load_omniglot(tmp_path, cache_dir=tmp_path / "cache")
    assert "corrupt image images_background/Alpha/character01/0001_01.png: not a readable image" in str(info.value)
    assert "BytesIO" not in str(info.value) and "metalearn data verify" in str(info.value)


def test_incomplete_tree_is_reported(tmp_path, omniglot_data_dir):
    name, png = _real_png(omniglot_data_dir)
    path = tmp_path / name
    path.parent.mkdir(parents=True)
    path.write_bytes(png)
    (tmp_path / "images_evaluation").mkdir()
    with pytest.raises(MetalearnError) as info:
        read_release(tmp_path)
    assert "holds 1 characters, expected 964" in str(info.value)
    assert "incomplete" in str(info.value)


def test_decode_drawing_names_the_file():
    with pytest.raises(MetalearnError, match="corrupt image Alpha/character01/0001_01.png"):
        decode_drawing("Alpha/character01/0001_01.png", b"definitely not a png", 28)


def test_decode_drawing_resizes_and_inverts(omniglot_data_dir):
    name, png = _real_png(omniglot_data_dir)
    big = decode_drawing(name, png, 105)  # the native size: no resampling, just inverted
    assert big.shape == (105, 105) and big.dtype == np.uint8
    assert set(np.unique(big).tolist()) <= {0, 255} and big.mean() < 128
    small = decode_drawing(name, png, 28)
    assert small.shape == (28, 28)
    assert len(np.unique(small)) > 2  # antialiased, not nearest-neighbour


def test_new_drawings_are_prepared_as_the_cache_prepares_the_release(omniglot_data_dir, tmp_path):
    """predict, fit_predict and sample on an Omniglot run see a user's drawing (dark pen on
    white, any size) exactly as training saw the release's: the dataset's own preparation,
    strokes bright on dark; a drawing already bright on dark is not inverted again."""
    from PIL import Image

    from metalearn.algorithms import build_learner
    from metalearn.config import TaskConfig
    from metalearn.data.images import prepare_drawings
    from metalearn.tasks import problem_of

    name, png = _real_png(omniglot_data_dir)
    scan = tmp_path / "scan.png"
    scan.write_bytes(png)
    expected = torch.from_numpy(decode_drawing(name, png, 28)).float().div(255)[None, None]
    assert torch.equal(prepare_drawings([scan], 28), expected)
    assert torch.equal(prepare_drawings(Image.open(scan), 28), expected)
    bright = tmp_path / "bright.png"
    Image.fromarray(decode_drawing(name, png, 105)).save(bright)  # as `metalearn sample` writes them
    assert torch.equal(prepare_drawings([bright], 28), expected)

    problem = problem_of(TaskConfig(dataset="omniglot", ways=2, shots=1))
    learner = build_learner("protonet", {}, problem)
    batch = learner.task_batch([scan, bright], [0, 1], [scan])
    assert torch.equal(batch.support_x[0, 0], expected[0]) and torch.equal(batch.query_x[0, 0], expected[0])
    with pytest.raises(MetalearnError, match="grey"):
        prepare_drawings([scan], 28, channels=3)


def test_unexpected_file_name():
    with pytest.raises(MetalearnError, match="expected XXXX_YY.png"):
        parse_name("images_background/Alpha/character01/readme.png")
    assert parse_name("images_background/Alpha/character07/0123_09.png") == ("Alpha/character07", 123, 9)


def test_too_small_image_size(tmp_path):
    with pytest.raises(MetalearnError, match="at least 4 pixels, got 2"):
        load_omniglot(tmp_path, image_size=2, cache_dir=tmp_path)


def test_building_the_cache_removes_what_a_killed_build_left_and_waits_for_a_running_one(tmp_path, monkeypatch):
    """A kill during `data prepare` leaves omniglot-...npz.tmp<pid> (megabytes): the next build,
    which holds the cache's lock, removes it; a second process meanwhile waits for the lock and
    reads the cache the first wrote instead of building it again."""
    from metalearn.locking import FolderLock

    images = np.random.default_rng(0).integers(0, 256, (2, 20, 4, 4), dtype=np.uint8)
    names = ("Alpha/character01", "Beta/character01")
    tiny = Omniglot(images, names, np.array([True, False]), np.tile(np.arange(1, 21, dtype=np.int16), (2, 1)),
                    hash_arrays(images, names))
    for archive in ARCHIVES:
        png = tmp_path / "data" / archive / "Alpha" / "character01" / "0001_01.png"
        png.parent.mkdir(parents=True)
        png.write_bytes(b"one")
    path = cache_path(tmp_path / "cache", 4)
    path.parent.mkdir()
    litter = path.with_name(f"{path.name}.tmp{2**22 + 13}")  # of a process that no longer exists
    litter.write_bytes(b"\0" * 10_000)
    reads = []
    monkeypatch.setattr("metalearn.data.omniglot.read_release", lambda *args, **kwargs: reads.append(args) or tiny)
    load_omniglot(tmp_path / "data", 4, cache_dir=tmp_path / "cache")
    assert reads and not litter.exists()
    assert sorted(p.name for p in path.parent.iterdir()) == [path.name]  # nor its lock file

    # another build holds the lock (a thread here: locks of two open files exclude each other
    # as those of two processes do): this one waits, then reads the cache the other wrote
    import threading
    import time

    path.unlink()
    held = FolderLock.take(path.with_name(path.name + ".lock"), "another build")

    def the_other_build():
        time.sleep(0.5)
        _write_cache(path, tiny, source_fingerprint(locate_sources(tmp_path / "data")))
        held.release()

    other = threading.Thread(target=the_other_build)
    other.start()
    reads.clear()
    load_omniglot(tmp_path / "data", 4, cache_dir=tmp_path / "cache")
    other.join()
    assert reads == []


def test_a_cache_folder_that_is_a_file_is_named_as_such(omniglot_data_dir, tmp_path, monkeypatch):
    # as for image folders (tests/test_folder.py): the variable's file, not mkdir's "File exists"
    afile = tmp_path / "afile"
    afile.write_text("not a folder")
    monkeypatch.setenv("METALEARN_CACHE", str(afile))
    with pytest.raises(MetalearnError) as caught:
        load_omniglot(omniglot_data_dir, 28)
    assert str(caught.value) == (f"cannot write {afile / 'omniglot-28x28-v1.npz'}: METALEARN_CACHE {afile} is a "
                                 "file, not a folder; point METALEARN_CACHE at a folder")
    assert afile.read_text() == "not a folder"


def test_the_characters_two_splits_share_are_those_the_init_from_warning_counts(omniglot):
    """SHARED_CHARACTERS, recounted on the release: a run's validation and test characters that
    are training characters of the split its starting weights learned, and its test characters
    that are that split's validation characters; a split shares none with itself."""
    from metalearn.data.splits import SHARED_CHARACTERS, SPLITS, has_part

    def characters(split, parts):
        return {int(c) for part in parts if has_part(split, part)
                for c in omniglot_split(omniglot, split, part).characters}

    counted = {(a, b): len(characters(a, ("train",)) & characters(b, ("val", "test"))
                           | characters(a, ("val",)) & characters(b, ("test",)))
               for a in SPLITS for b in SPLITS}
    assert {pair: n for pair, n in counted.items() if n} == SHARED_CHARACTERS


def test_an_image_size_whose_arrays_exceed_the_memory_is_refused_before_they_are_filled(tmp_path, monkeypatch):
    """Omniglot at 2000x2000 pixels is 130 GB: refused in one line, naming the size and the
    memory available, instead of an out-of-memory kill while its drawings are decoded (and so
    is an image folder of the same sort)."""
    import metalearn.memory_budget as memory_budget
    from metalearn.data.folder import load_image_folder

    for archive in ("images_background", "images_evaluation"):
        (tmp_path / archive).mkdir()
    monkeypatch.setattr(memory_budget, "_meminfo_bytes", lambda field: 8 * 10**9)
    monkeypatch.setattr(memory_budget, "_cgroup_limits", lambda: [(4 * 10**9, 10**9)])  # a job's limit: 3 GB left
    with pytest.raises(MetalearnError, match=r"^Omniglot at 2000x2000 pixels takes 130 GB of memory, more than the "
                                             r"3 GB available; give a smaller image_size \(the papers' is 28\)$"):
        read_release(tmp_path, 2000)
    folder = tmp_path / "folder"
    for c in range(2):
        (folder / f"c{c}").mkdir(parents=True)
        Image.new("RGB", (8, 8)).save(folder / f"c{c}" / "0.png")
    with pytest.raises(MetalearnError, match=r"^2 images at 30000x30000 pixels takes 5.4 GB of memory"):
        load_image_folder(folder, 30000, 3, cache_dir=tmp_path / "cache").images
    monkeypatch.setattr(memory_budget, "_meminfo_bytes", lambda field: 10**12)
    monkeypatch.setattr(memory_budget, "_cgroup_limits", lambda: [])
    assert load_image_folder(folder, 16, 3, cache_dir=tmp_path / "cache").images.shape == (2, 3, 16, 16)
    # memory that is not there after all (taken meanwhile, or not known): the same line, not the run's options
    from metalearn.data import cache as cache_module
    from metalearn.data import folder as folder_module

    def no_memory(*args, **kwargs):
        raise MemoryError("Unable to allocate")

    monkeypatch.setattr(np, "empty", no_memory)  # allocate_images takes numpy's, as every caller
    folder_module._LOADED.clear()
    with pytest.raises(MetalearnError, match=r"^2 images at 24x24 pixels takes 3.46e-06 GB of memory, more than this "
                                             r"process could allocate; give a smaller image_size$"):
        load_image_folder(folder, 24, 3, cache_dir=tmp_path / "cache").images
    monkeypatch.undo()
    monkeypatch.setattr(cache_module.np, "load", no_memory)
    folder_module._LOADED.clear()
    with pytest.raises(MetalearnError, match=r"^reading the cache .*folder-folder-.* GB\) ran out of memory: the "
                                             r"images at this size do not fit; give a smaller image_size"):
        load_image_folder(folder, 16, 3, cache_dir=tmp_path / "cache").images
