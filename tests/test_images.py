"""Images read for prediction (metalearn.data.images): transparency laid on white, tensors whose
shape reads two ways refused, and a set of blank images warned of."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from metalearn.algorithms import build_learner
from metalearn.config import TaskConfig
from metalearn.data.images import decode_image, prepare_drawings, prepare_images
from metalearn.errors import MetalearnError, MetalearnWarning
from metalearn.tasks import Problem, problem_of


def ink() -> np.ndarray:
    """A drawing as a scan has it: black strokes (a cross) on white, 40x40 grey."""
    pixels = np.full((40, 40), 255, np.uint8)
    pixels[8:32, 18:23] = 0
    pixels[17:22, 6:34] = 0
    return pixels


def canvas(ground: int = 0) -> np.ndarray:
    """The drawing as an HTML canvas exports it: RGBA, black ink opaque, the rest transparent
    with RGB ``ground`` (0: black, as canvases leave it)."""
    pixels = np.full((40, 40, 4), ground, np.uint8)
    pixels[..., :3] = np.where(ink()[..., None] == 0, 0, ground)
    pixels[..., 3] = np.where(ink() == 0, 255, 0)
    return pixels


def transparent_copies(tmp_path):
    """The scan, and PNG files of it with transparency in each way PIL reads it: RGBA (a canvas's
    export), LA, P with a transparent palette entry, L with a transparent grey (tRNS)."""
    scan = tmp_path / "scan.png"
    Image.fromarray(ink(), "L").save(scan)
    copies = {"RGBA": tmp_path / "rgba.png", "LA": tmp_path / "la.png", "P": tmp_path / "p.png",
              "L": tmp_path / "l.png"}
    Image.fromarray(canvas(), "RGBA").save(copies["RGBA"])
    Image.fromarray(np.stack([np.zeros((40, 40), np.uint8), canvas()[..., 3]], -1), "LA").save(copies["LA"])
    # palette: entry 0 black ink, entry 1 the ground (black too), transparent
    palette = Image.fromarray(np.where(ink() == 0, 0, 1).astype(np.uint8), "P")
    palette.putpalette([0, 0, 0, 0, 0, 0])
    palette.save(copies["P"], transparency=1)
    Image.fromarray(np.where(ink() == 0, 0, 7).astype(np.uint8), "L").save(copies["L"], transparency=7)
    for mode, path in copies.items():
        with Image.open(path) as img:
            assert img.mode == mode and (mode in ("RGBA", "LA") or "transparency" in img.info)
    return scan, copies


def test_transparency_is_laid_on_white_so_a_canvas_drawing_reads_as_its_scan(tmp_path):
    """Black ink on a transparent (black) ground, as a canvas exports it, decodes as the opaque
    scan does (dark ink on white), in every transparent mode, as a file or a PIL image, grey or
    RGB; Omniglot's preparation then inverts it as it inverts the scan."""
    scan, copies = transparent_copies(tmp_path)
    for channels in (1, 3):
        expected = decode_image(scan, 28, channels)
        assert expected.mean() > 128  # white ground
        for mode, path in copies.items():
            assert np.array_equal(decode_image(path, 28, channels), expected), (mode, channels)
            with Image.open(path) as img:
                assert torch.equal(prepare_images(img, 28, channels), prepare_images(scan, 28, channels)), mode
    drawn = prepare_drawings([scan], 28)
    assert drawn.mean() < 0.5  # inverted: strokes bright on dark
    for mode, path in copies.items():
        assert torch.equal(prepare_drawings([path], 28), drawn), mode
        with Image.open(path) as img:
            assert torch.equal(prepare_drawings(img, 28), drawn), mode
    # an Omniglot run's learner prepares them alike (its dataset's preparation, prepare_drawings)
    learner = build_learner("protonet", {}, problem_of(TaskConfig(dataset="omniglot", ways=2, shots=1)))
    batch = learner.task_batch([scan, copies["RGBA"]], [0, 1], [copies["LA"], copies["P"]])
    assert all(torch.equal(image, drawn[0]) for image in (*batch.support_x[0], *batch.query_x[0]))


def test_partial_transparency_blends_with_white_and_rgba_tensors_are_laid_on_white_too():
    """alpha a: colour * a + white * (1 - a); a uint8 RGBA tensor is read as the RGBA image is."""
    pixels = np.zeros((2, 2, 4), np.uint8)
    pixels[..., 0] = [[0, 100], [200, 50]]
    pixels[..., 3] = [[0, 255], [128, 64]]
    red, alpha = pixels[..., 0].astype(float), pixels[..., 3] / 255
    expected = np.rint(red * alpha + 255 * (1 - alpha))
    got = prepare_images(Image.fromarray(pixels, "RGBA"), 2, 3).mul(255).round()[0, 0].numpy()
    assert np.abs(got - expected).max() <= 1  # PIL's integer blend
    tensor = torch.from_numpy(canvas()).permute(2, 0, 1)[None]  # (1, 4, H, W)
    assert torch.equal(prepare_images(tensor, 28, 1), prepare_images(Image.fromarray(ink(), "L"), 28, 1))
    assert torch.equal(prepare_images(tensor.float() / 255, 28, 3), prepare_images(Image.fromarray(ink()), 28, 3))


def test_16_bit_grey_with_a_transparent_value_is_scaled_and_laid_on_white(tmp_path):
    values = np.where(ink() == 0, 257 * 40, 1000).astype(np.uint16)
    path = tmp_path / "deep.png"
    Image.fromarray(values).save(path, transparency=1000)
    with Image.open(path) as img:
        assert img.mode in ("I;16", "I") and img.info.get("transparency") == 1000
    expected = np.where(ink() == 0, 40, 255).astype(np.uint8)
    assert np.array_equal(decode_image(path, 40, 1)[0], expected)


@pytest.mark.parametrize("count", [3, 4])
def test_three_or_four_images_without_a_channel_axis_are_refused_naming_both_readings(count):
    """(3, H, W) and (4, H, W) are n grey images or one RGB / RGBA image: refused in one line with
    both spellings, each of which is then taken; in a list (one image per item) it is one image."""
    stack = (torch.arange(count * 28 * 28) % 251).to(torch.uint8).view(count, 28, 28)
    colour = "RGB" if count == 3 else "RGBA"
    said = (rf"^image tensors are \(n, C, H, W\), got shape \({count}, 28, 28\), which reads two ways: give "
            rf"x\[:, None\] for {count} grey images, or x\[None\] for one {colour} image$")
    for channels in (1, 3):
        for given in (stack, stack.numpy(), stack.float() / 255):
            with pytest.raises(MetalearnError, match=said):
                prepare_images(given, 28, channels)
        assert prepare_images(stack[:, None], 28, channels).shape == (count, channels, 28, 28)
        assert prepare_images(stack[None], 28, channels).shape == (1, channels, 28, 28)
        assert torch.equal(prepare_images([stack], 28, channels), prepare_images(stack[None], 28, channels))
    with pytest.raises(MetalearnError, match=said):
        prepare_drawings(stack, 28)
    # fit_predict of a 1-channel learner: refused, where it answered one row for three queries
    learner = build_learner("protonet", {}, Problem((1, 28, 28), 5, True))
    support = (torch.arange(5 * 28 * 28) % 253).to(torch.uint8).view(5, 1, 28, 28)
    with pytest.raises(MetalearnError, match=said):
        learner.fit_predict(support, range(5), stack)
    assert learner.fit_predict(support, range(5), stack[:, None]).shape == (count, 5)
    # one grey image without its channel axis reads one way
    assert prepare_images(stack[0], 28, 1).shape == prepare_images(stack[:1], 28, 1).shape == (1, 1, 28, 28)


def test_a_set_of_one_blank_image_is_warned_of_once():
    """Images all of one value (a transparent canvas in light ink, laid on white) warn once per
    call; flat images of different values, one image alone, and images prepared before do not."""
    light = canvas(ground=255)
    light[..., :3] = 255  # white ink on a transparent white ground
    with pytest.warns(MetalearnWarning, match=r"^all 3 images given are blank, one value in every pixel") as caught:
        prepared = prepare_drawings([Image.fromarray(light, "RGBA")] * 3, 28)
    assert len([w for w in caught if issubclass(w.category, MetalearnWarning)]) == 1
    with pytest.warns(MetalearnWarning, match="blank"):
        prepare_images(torch.zeros(2, 1, 28, 28, dtype=torch.uint8), 28, 1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        prepare_images(prepared, 28, 1)  # floats of the prepared shape: prepared before, as they are
        prepare_images(torch.arange(2, dtype=torch.uint8).view(2, 1, 1, 1).expand(2, 1, 8, 8), 8, 1)
        prepare_images([Image.new("L", (8, 8), 0)], 8, 1)
        prepare_drawings([Image.fromarray(canvas(), "RGBA")] * 2, 28)
