"""Images as the networks see them: one decoding for the cache and for prediction, one
conversion to float for the samplers and for :func:`prepare_images`.

A training run sees every image (a file, any size, grey or colour) decoded by
:func:`decode_image` into ``(C, S, S)`` uint8 and cached; the episode samplers turn those
bytes into floats with :func:`to_float`. :func:`prepare_images` does the same to new images
(files, PIL images, uint8 or float tensors), so that a prediction sees what training saw.
"""

from __future__ import annotations

import contextlib
import io
import threading
import warnings
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError
from torch import Tensor

from metalearn.errors import MetalearnError, MetalearnWarning, caller_level, check_count

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")
CHANNEL_MODES = {1: "L", 3: "RGB"}
ORIENTATION_TAG = 0x0112  # EXIF Orientation: 1 upright, 2-8 mirrored and / or rotated
# The largest image decode_image reads, in pixels. PIL's own guard against decompression bombs
# warns past 89.5 megapixels and refuses past 179, which turns away ordinary scans and
# panoramas (every image is shrunk to the run's image size anyway). Up to this bound they are
# read (a 300-megapixel RGB image takes about 0.9 GB while decoded, in each decoding process);
# past it an image is refused in one line naming it and its size, never with PIL's warning.
MAX_PIXELS = 300_000_000
# Images of more than this many pixels are decoded a few at a time (see LARGE_IMAGE_GATE): a
# 300-megapixel image is 0.9 GB of RGB pixels, more while converted (a bilevel PNG of 36 KB can
# be one), so 16 decoding processes meeting such files together could need tens of GB.
LARGE_PIXELS = 50_000_000
# Where set (a decoding process of a folder, by its pool: a semaphore shared by the pool's
# processes), held while an image of more than LARGE_PIXELS is decoded.
LARGE_IMAGE_GATE = None


def is_image_file(path: Path) -> bool:
    """Whether ``path`` names an image by its suffix (macOS ``._`` droppings excluded)."""
    return path.suffix.lower() in IMAGE_SUFFIXES and not path.name.startswith(".")


def check_channels(channels: int) -> None:
    if channels not in CHANNEL_MODES:
        raise MetalearnError(f"channels must be 1 (grey) or 3 (RGB), got {channels!r}")


def pil_to_array(img: Image.Image, image_size: int, channels: int) -> np.ndarray:
    """A PIL image -> ``(channels, S, S)`` uint8: turned upright by its EXIF orientation (as
    viewers show a phone photo), laid on a white ground where it has transparency (see
    :func:`_on_white`), converted to grey or RGB (grey is repeated into three channels), then
    stretched to ``S x S`` (no crop, as the mini-ImageNet images of Ravi & Larochelle) with
    Lanczos antialiasing. Images of more than 8 bits are scaled by their type's range (see
    :func:`_to_8_bits`), never by their own maximum."""
    check_channels(channels)
    img = _on_white(_upright(img))
    if img.mode.startswith("I") or img.mode == "F":
        img = _to_8_bits(img)
    img = img.convert(CHANNEL_MODES[channels])
    if img.size != (image_size, image_size):
        img = img.resize((image_size, image_size), Image.Resampling.LANCZOS)
    array = np.asarray(img, dtype=np.uint8)
    return array[None] if channels == 1 else np.ascontiguousarray(array.transpose(2, 0, 1))


def _upright(img: Image.Image) -> Image.Image:
    """``img`` rotated / mirrored as its EXIF orientation tag says (``ImageOps.exif_transpose``);
    unchanged (no copy) without the tag, or when the EXIF block cannot be parsed."""
    try:
        orientation = img.getexif().get(ORIENTATION_TAG, 1)
    except Exception:  # a damaged EXIF block: the pixels are still good, shown unrotated
        return img
    if orientation in (2, 3, 4, 5, 6, 7, 8):
        return ImageOps.exif_transpose(img)
    return img


# Modes with an alpha channel ("RGBa", "La": premultiplied), and modes in which one value or one
# palette entry can be marked transparent (``img.info["transparency"]``: PNG's tRNS, GIF's
# transparent index); PIL's convert to "LA" / "RGBA" turns either into an alpha channel.
ALPHA_MODES = ("RGBA", "RGBa", "LA", "La", "PA")
KEYED_MODES = ("1", "L", "P", "RGB", "I", "I;16", "I;16L", "I;16B", "I;16N")
GREY_MODES = ("1", "L", "LA", "I", "I;16", "I;16L", "I;16B", "I;16N")


def _on_white(img: Image.Image) -> Image.Image:
    """``img`` composited onto a white ground where it has transparency (an alpha channel, or a
    transparent value or palette entry), grey (``L``) or RGB; unchanged (no copy) where it has
    none. Alpha is not dropped: what a transparent pixel holds is not what was meant (an HTML
    canvas exports black ink on a transparent ground whose pixels are black too, so without its
    alpha the drawing is black on black). White is the ground such an image is meant for: the
    paper of scanned drawings (Omniglot's release) and the usual ground of photographs and
    documents, so a canvas drawing is read as its opaque scan would be. Light ink on a
    transparent ground is lost on white (:func:`_prepare` warns of images that come out blank)."""
    if not (img.mode in ALPHA_MODES or (img.mode in KEYED_MODES and "transparency" in img.info)):
        return img
    if img.mode in ("RGBa", "La"):  # premultiplied: the colour unpremultiplied, as composite takes it
        img = img.convert(img.mode.upper())
    grey = img.mode in GREY_MODES
    if img.mode.startswith("I"):  # more than 8 bits: PIL's convert would clip them at 255, then match the key
        alpha = Image.fromarray(np.where(np.asarray(img) == img.info["transparency"], 0, 255).astype(np.uint8), "L")
        colour = _to_8_bits(img)
    else:
        alpha = img.getchannel("A") if img.mode in ALPHA_MODES else img.convert("LA" if grey else "RGBA").getchannel("A")
        colour = img.convert("L" if grey else "RGB")
    ground = Image.new(colour.mode, img.size, 255 if grey else (255, 255, 255))
    ground.paste(colour, (0, 0), alpha)  # colour * alpha + white * (1 - alpha), alpha in [0, 1]
    return ground


def _to_8_bits(img: Image.Image) -> Image.Image:
    """A grey image of more than 8 bits -> mode ``L`` by a fixed rule, so one value always gives
    one grey whatever else is in the image (a uniform 16-bit 1000 is 1000/65535 of full scale,
    ``round(1000 / 257)`` = 4, not white):

    - ``I;16``, ``I;16L``, ``I;16B``, ``I;16N`` (16-bit unsigned, any byte order):
      ``round(value / 257)``, i.e. ``value / 65535`` of 255.
    - ``I`` (32-bit signed, as older Pillow opens 16-bit PNGs): values in 0..65535 are taken as
      16-bit, as above; an image with values outside that range is refused (no fixed range
      would show it faithfully; convert it to 8 or 16 bits first).
    - ``F`` (32-bit float): taken as intensities in [0, 1], the convention of float images
      elsewhere in metalearn (``to_float``, ``prepare_images``): ``round(value * 255)``, values
      outside [0, 1] clipped.
    """
    values = np.asarray(img)  # native values whatever the byte order (I;16B reads as big-endian uint16)
    if img.mode == "F":
        scaled = np.clip(np.nan_to_num(values.astype(np.float64)), 0.0, 1.0) * 255.0
    else:
        if img.mode == "I" and values.size and (values.min() < 0 or values.max() > 65535):
            raise MetalearnError(f"32-bit integer pixels from {values.min()} to {values.max()} are outside the "
                                 "16-bit range 0..65535; convert the image to 8 or 16 bits")
        scaled = values.astype(np.float64) / 257.0
    return Image.fromarray(np.rint(scaled).astype(np.uint8), "L")


def decode_image(source: Path | str | bytes, image_size: int, channels: int, name: str | None = None) -> np.ndarray:
    """One image file (a path or its bytes) -> ``(channels, S, S)`` uint8; an unreadable file is a
    :class:`MetalearnError` naming it (``name``, else the path), and so is an image of more than
    :data:`MAX_PIXELS` pixels (its size is read from the header, before any pixel is decoded).

    PIL's decompression-bomb limit is replaced by :data:`MAX_PIXELS` for the duration of the
    call only (``Image.MAX_IMAGE_PIXELS`` is restored afterwards). That limit and the warning
    filter are process-wide, so calls from several threads (a threaded server's predictions)
    decode one at a time: interleaved, one could restore another's None and leave PIL's guard off
    for the whole process. The folder readers decode in processes, one thread each."""
    with _PIL_SETTINGS:
        return _decode_image(source, image_size, channels, name)


_PIL_SETTINGS = threading.Lock()  # held while decode_image changes PIL's process-wide settings


def _decode_image(source: Path | str | bytes, image_size: int, channels: int, name: str | None) -> np.ndarray:
    label = name or str(source if not isinstance(source, bytes) else "<bytes>")
    saved = Image.MAX_IMAGE_PIXELS
    try:
        stream = io.BytesIO(source) if isinstance(source, bytes) else open(source, "rb")
        # open reads the header only: the size is checked below, with the file's name, rather
        # than by PIL's warning (which names PIL's source file) or PIL's error
        Image.MAX_IMAGE_PIXELS = None
        with stream, Image.open(stream) as img:
            _check_pixels(img.size)
            # frames read later (a GIF's, a TIFF's pages) are held to the same bound by PIL
            Image.MAX_IMAGE_PIXELS = MAX_PIXELS
            gate = LARGE_IMAGE_GATE if img.size[0] * img.size[1] > LARGE_PIXELS else None
            with gate if gate is not None else contextlib.nullcontext(), warnings.catch_warnings():
                warnings.simplefilter("error", Image.DecompressionBombWarning)
                if img.format == "JPEG":  # decode at a reduced scale when the image is far larger (fast, exact enough)
                    img.draft(CHANNEL_MODES[channels], (image_size, image_size))
                return pil_to_array(img, image_size, channels)
    except UnidentifiedImageError:
        raise MetalearnError(f"cannot read image {label}: not an image file PIL can decode") from None
    except MetalearnError as err:  # decoded, but pixels metalearn cannot take: name the file
        raise MetalearnError(f"cannot read image {label}: {err}") from None
    except (Image.DecompressionBombWarning, Image.DecompressionBombError):  # a frame past the bound
        raise MetalearnError(f"cannot read image {label}: it holds a frame of more than {MAX_PIXELS / 1e6:.3g} "
                             f"megapixels, the most metalearn decodes; {_SHRINK}") from None
    except (OSError, SyntaxError, ValueError) as err:
        raise MetalearnError(f"cannot read image {label}: {err}") from None
    finally:
        Image.MAX_IMAGE_PIXELS = saved


_SHRINK = "shrink it (e.g. to 4000 pixels on its longer side: it is shrunk to the run's image size anyway) or remove it"


def _check_pixels(size: tuple[int, int]) -> None:
    width, height = size
    if width * height > MAX_PIXELS:
        raise MetalearnError(f"{width}x{height} is {width * height / 1e6:.3g} megapixels, more than the "
                             f"{MAX_PIXELS / 1e6:.3g} metalearn decodes; {_SHRINK}")


def to_float(images: Tensor, dtype: torch.dtype = torch.float32) -> Tensor:
    """uint8 pixels -> floats in [0, 1] (float32 unless ``dtype`` says otherwise), the networks'
    input (the samplers' conversion)."""
    return images.to(dtype).div_(255.0)


def prepare_images(images: Any, image_size: int, channels: int) -> Tensor:
    """New images, prepared exactly as a run's training images were: ``(n, channels, S, S)``
    float32 in [0, 1].

    ``images``: a path or a list of paths (decoded as the dataset cache decodes files), a PIL
    image or a list of them, or a tensor / NumPy array of ``n`` images shaped ``(n, C, H, W)``
    with C 1 (grey), 3 (RGB) or 4 (RGBA) (or one grey image ``(1, H, W)`` / ``(H, W)``): uint8
    pixels 0-255, or floats in [0, 1]; a list may mix all of these, one image per tensor or
    array (there ``(C, H, W)`` is one image of C channels). A tensor of another size or channel
    count is converted and resized as a file would be (floats are rounded to 8 bits first, as a
    saved file would be). Transparent pixels (files, PIL images, RGBA tensors) are laid on
    white (see :func:`_on_white`). Refused in one line: channels last (``(H, W, C)``, as NumPy
    arrays from PIL come: the message says how to permute them), a tensor ``(3, H, W)`` or
    ``(4, H, W)`` (3 or 4 grey images, or one colour image? the message gives both spellings),
    no images, NaN or values outside [0, 1], an ``image_size`` that is not a whole number of
    pixels. A :class:`MetalearnWarning` says when the images are all one blank image (one value
    throughout; float tensors of the prepared shape, images prepared before, pass unchecked).

    ``image_size``: the side ``S`` of the square images made; ``channels``: 1 (grey) or 3 (RGB),
    both the run's (its ``TaskConfig``'s).

    >>> x = prepare_images(["cat/1.jpg", "cat/2.png"], image_size=84, channels=3)   # (2, 3, 84, 84)
    """
    return _prepare(images, image_size, channels, lambda array: array)


def prepare_drawings(images: Any, image_size: int, channels: int = 1) -> Tensor:
    """New drawings prepared as Omniglot's training images are: ``(n, 1, S, S)`` float32 in
    [0, 1], grey, strokes bright on a dark ground (the cache inverts the release's black-on-white
    scans). A file or PIL image on a light ground (transparency counts as white: a canvas's dark
    ink on a transparent ground is read as its opaque scan) is inverted; one already bright on
    dark (as ``metalearn sample`` writes them) is kept. Tensors and arrays are never inverted:
    they are taken as the training arrays are, strokes bright (see :func:`prepare_images`), so a
    tensor of black-on-white scans must be inverted by its caller (``255 - x``)."""
    if channels != 1:
        raise MetalearnError(f"drawings are grey (1 channel), got channels {channels}")
    return _prepare(images, image_size, 1, lambda array: 255 - array if array.mean() >= 128 else array)


def _prepare(images: Any, image_size: int, channels: int, ground: Any) -> Tensor:
    """prepare_images with ``ground(uint8 array)`` applied to each decoded file or PIL image."""
    check_channels(channels)
    image_size = check_count(image_size, "image_size",
                             message="{name} must be a whole number of pixels of at least 1, got {value!r}")
    if isinstance(images, (str, Path, Image.Image)):
        images = [images]
    if isinstance(images, (np.ndarray, Tensor)):
        images = _as_tensor(images)
        prepared = _prepare_tensor(images, image_size, channels)
        # floats of the prepared shape pass as they are: images prepared before (metalearn predict
        # prepares its files, then fit_predict is given the result), warned of then if blank
        already = torch.is_floating_point(images) and tuple(images.shape[1:]) == (channels, image_size, image_size)
        return prepared if already else _warn_if_blank(prepared)
    prepared = []
    for item in _as_list(images):
        if isinstance(item, Image.Image):
            prepared.append(to_float(_as_tensor(ground(pil_to_array(item, image_size, channels))[None])))
        elif isinstance(item, (str, Path)):
            prepared.append(to_float(_as_tensor(ground(decode_image(Path(item), image_size, channels))[None])))
        elif isinstance(item, (np.ndarray, Tensor)):  # one image (C, H, W) or (H, W): a list holds one per item
            prepared.append(_prepare_tensor(_as_tensor(item), image_size, channels, one_image=True))
        else:
            raise MetalearnError(f"prepare_images takes image files, PIL images, arrays or tensors, got "
                                 f"{type(item).__name__}")
    if not prepared:
        raise MetalearnError("prepare_images: no images given")
    return _warn_if_blank(torch.cat(prepared))


def _warn_if_blank(prepared: Tensor) -> Tensor:
    """``prepared`` as it is, with a :class:`MetalearnWarning` where its images, two or more,
    are all one value in every pixel: the same blank image, from which no network can tell
    classes apart (a support set) and which all get one prediction (queries), with no error
    to show it. The cause is in how the images were made: an empty canvas, light ink on a
    transparent ground (laid on white by :func:`_on_white`). Flat images of different values are not warned of (their values tell them apart), nor is one
    image alone. One warning per call; a min and a max of the images, cheap beside decoding."""
    values = prepared.detach()  # read only: images that require grad keep it
    if values.shape[0] >= 2 and bool(values.amin() == values.amax()):
        warnings.warn(MetalearnWarning(
            f"all {values.shape[0]} images given are blank, one value in every pixel of every image: they carry "
            "nothing to tell classes apart by, and all get one prediction; look at the images (a drawing in light "
            "ink on a transparent ground is blank: transparency is read as white)"), stacklevel=caller_level())
    return prepared


def _as_tensor(images: np.ndarray | Tensor) -> Tensor:
    """A copy of an array (PIL's are read-only, which torch.from_numpy warns of), a tensor as is."""
    return torch.tensor(images) if isinstance(images, np.ndarray) else images


def _as_list(images: Any) -> list:
    if isinstance(images, Iterable):
        return list(images)
    raise MetalearnError(f"prepare_images takes image files, PIL images, arrays or tensors, got "
                         f"{type(images).__name__}")


def _prepare_tensor(images: Tensor, image_size: int, channels: int, one_image: bool = False) -> Tensor:
    """A tensor of images ``(n, C, H, W)``, or of one image ``(H, W)`` or ``(1, H, W)``, prepared.
    ``(3, H, W)`` and ``(4, H, W)`` read two ways, 3 or 4 grey images or one RGB or RGBA image,
    and are refused naming both, unless ``one_image`` (an item of a list, one image each)."""
    given = tuple(images.shape)  # as the caller gave it: the message names that, not our reshaping
    if images.dim() == 2:
        images = images[None, None]
    elif images.dim() == 3:
        if given[0] in (3, 4) and not one_image:
            colour = "RGB" if given[0] == 3 else "RGBA"
            raise MetalearnError(f"image tensors are (n, C, H, W), got shape {given}, which reads two ways: give "
                                 f"x[:, None] for {given[0]} grey images, or x[None] for one {colour} image")
        images = images[None]
    if images.dim() != 4 or images.shape[1] not in (1, 3, 4):
        if len(given) in (3, 4) and given[-1] in (1, 3, 4):
            hint = ": channels last? give x.permute(0, 3, 1, 2) (one image: x.permute(2, 0, 1)[None])"
        elif len(given) == 3:  # (n, H, W): grey images without their channel axis
            hint = f": {given[0]} grey images? give x[:, None], (n, 1, H, W)"
        else:
            hint = ""
        raise MetalearnError(f"image tensors are (n, C, H, W) with 1, 3 or 4 channels (one image: (1, C, H, W), or "
                             f"(H, W) grey), got shape {given}{hint}")
    if images.shape[0] == 0:
        raise MetalearnError("prepare_images: no images given (a tensor of 0 images)")
    if torch.is_floating_point(images):
        values = images.detach()  # read for the checks only: images that require grad keep it (an attack's)
        if not bool(torch.isfinite(values).all()):
            raise MetalearnError("float images must be in [0, 1] (pixels / 255), got NaN or infinite values")
        low, high = float(values.min()), float(values.max())
        if low < 0 or high > 1:
            raise MetalearnError(f"float images must be in [0, 1] (pixels / 255), got values in [{low:.3g}, {high:.3g}]")
        if tuple(images.shape[1:]) == (channels, image_size, image_size):
            return images.to(torch.float32)
        images = (images * 255.0).round().to(torch.uint8)
    elif images.dtype != torch.uint8:
        raise MetalearnError(f"image tensors are uint8 (0-255) or float (0-1), got {images.dtype}")
    if tuple(images.shape[1:]) == (channels, image_size, image_size):
        return to_float(images)
    modes = {1: "L", 3: "RGB", 4: "RGBA"}
    arrays = []
    for image in images.cpu():
        pixels = image.numpy()
        pixels = pixels[0] if pixels.shape[0] == 1 else pixels.transpose(1, 2, 0)
        arrays.append(pil_to_array(Image.fromarray(np.ascontiguousarray(pixels), modes[image.shape[0]]),
                                   image_size, channels))
    return to_float(torch.from_numpy(np.stack(arrays)))
