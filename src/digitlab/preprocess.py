"""MNIST-style preprocessing: turn a picture of a handwritten digit into what the network expects.

MNIST digits are white ink on black, the ink's bounding box scaled (keeping its
aspect ratio, with anti-aliasing) so that its longer side is 20 pixels, and
pasted into a 28×28 field so that the ink's centre of mass sits at the centre.
A scan, a phone photo or a paint-program drawing is none of that, so
`preprocess` applies these steps, each a small public function:

1. `to_greyscale`: luminance in [0, 1] (1 = white); transparent pixels are laid over white.
2. `limit_size`: very large pictures are first reduced (area average) to at most 512 px; pictures
   over twice that are already shrunk as 8-bit greyscale (and large JPEGs decoded at a reduced
   scale by `load_image`), so no full-size float copy of a large picture is ever made.
3. `denoise`: replace isolated specks (salt-and-pepper noise) by their neighbours' mean.
4. `ink_is_dark` and `to_ink`: decide the polarity from the background (the picture's outer band)
   and invert dark-on-light pictures, so that ink is bright.
5. `flatten_background` (uneven lighting only) and `threshold`: subtract the background, stretch
   the ink to 1, and zero faint pixels that are not next to ink (the strokes' anti-aliased rim stays).
6. `remove_border_lines` and `remove_specks`: drop a frame drawn around the digit and small
   specks of noise (the ink's 8-connected pieces, labelled by SciPy).
7. `sharpen`: when the digit will be shrunk well down to fit the box, sharpen it at the box's scale (unsharp
   masking), which gives back the gaps and corners that a blurry or enlarged low-resolution digit lost.
8. `crop_to_ink`: crop to the ink's bounding box, with a margin of background.
9. `fit_to_box`: scale the longer side of the ink to 20 px, keeping the aspect ratio.
10. `center_by_mass`: paste into 28×28 so that the centre of mass is at the centre.

A 28×28 MNIST digit (white on black, uint8 or floats in [0, 1]) goes through
these steps essentially unchanged. `load_image` opens untrusted files safely.

Steps 3 to 7 take one picture (H×W) or a stack of pictures of one size
(N×H×W), each treated as if alone: `preprocess_many` puts many pictures
through them as stacks, which costs about half as much per picture as one
at a time, since each numpy call then does the work of many.
"""

from __future__ import annotations

import functools
import io
import math
import os
import re
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from digitlab import pixel_loops
from digitlab.errors import DigitlabError

MAX_PIXELS = 12_000_000
"""Largest image (width × height) `load_image` decodes: a 12-megapixel phone photo is plenty for a digit.

Decoded as 8-bit RGBA it holds 48 MB; nothing larger is ever decoded (no decompression bombs)."""

IMAGE_FORMATS = ("PNG", "JPEG", "BMP", "GIF", "TIFF", "WEBP")
"""Pillow formats `load_image` decodes (JPEG includes phone cameras' multi-picture JPEGs); no others."""

FIELD_SIZE = 28
BOX_SIZE = 20
FIT_PAD = 2
WORKING_SIZE = 512
MIN_CONTRAST = 0.08
MIN_INK_LEVEL = 0.1
SPECK_FRACTION = 0.05
DIGIT_FRACTION = 0.25
SHARPEN_SIGMA = 2.0
SHARPEN_AMOUNT = 1.0
SHARPEN_ABOVE = 1.5
"""`sharpen` acts on ink more than 1.5 times the box's size: never on a 28×28 digit, anti-aliased rim and all."""
MAX_SINGLE_DIGIT_ASPECT = 1.5
CROP_MARGIN = 0.15
NO_INK_MESSAGE = "no ink found in the image: it is blank or has too little contrast; crop it to the digit"
MULTIPLE_DIGITS_WARNING = "may contain more than one digit"
LUMINANCE = np.array([0.299, 0.587, 0.114], dtype=np.float32)
STACK_PIXELS = 1 << 20
"""`preprocess_many` puts pictures of one size through the array steps together, this many pixels at a time
(4 MB of float32: 256 pictures of 64×64, four of the largest working size)."""


@dataclass
class PreprocessReport:
    """What `preprocess_with_report` found in a picture."""

    inverted: bool
    """The picture was dark ink on a light background and was inverted."""
    ink_box: tuple[int, int, int, int]
    """The ink's bounding box (top, left, bottom, right; bottom and right exclusive) in the picture's pixels."""
    components: int
    """Separate pieces of ink large enough to be (part of) a digit."""
    multiple_digits: bool
    """The ink looks like more than one digit: pieces side by side, or a very wide shape."""
    warnings: list[str] = field(default_factory=list)


# --- loading -----------------------------------------------------------------------------------


def load_image(source: str | os.PathLike | bytes | BinaryIO, max_pixels: int = MAX_PIXELS) -> Image.Image:
    """Open and fully decode an image file, bytes or binary stream, rejecting anything unsafe or broken.

    The size the file declares is checked against `max_pixels` before any pixel
    is decoded; a JPEG whose longer side is 1024 px or more is decoded at a reduced
    scale (longer side still at least 512 px); a photo's EXIF orientation is applied. Raises `DigitlabError` for missing, empty, non-image, truncated
    or oversized data; messages about a path start with the path.
    """
    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        try:
            stream = open(path, "rb")  # one system call for the usual case; the checks below explain failures
        except FileNotFoundError:
            raise DigitlabError(f"{path}: no such file") from None
        except OSError as error:
            if path.is_dir():
                raise DigitlabError(f"{path}: is a directory, not an image file") from None
            raise DigitlabError(f"{path}: cannot be read ({error.strerror}); check its permissions") from None
        with stream:
            data = stream.read()  # at once: Pillow's many small reads from a file cost more than its decoding
        if not data:
            raise DigitlabError(f"{path}: the file is empty")
        return _load(_open(io.BytesIO(data), f"{path}: ", max_pixels), f"{path}: ")
    if isinstance(source, (bytes, bytearray, memoryview)):
        data = bytes(source)
    elif hasattr(source, "read"):
        data = source.read()
    else:
        raise DigitlabError(f"cannot read an image from a {type(source).__name__}; pass a path, bytes or a file")
    return decode_image(open_image(data, max_pixels))


def open_image(data: bytes, max_pixels: int = MAX_PIXELS) -> Image.Image:
    """Image file bytes opened as `load_image` opens them: the header read and checked (`DigitlabError` for
    empty, non-image or oversized data), no pixel decoded yet: `decode_image` does that."""
    if not data:
        raise DigitlabError("the image data is empty")
    return _open(io.BytesIO(data), "", max_pixels)


def decode_image(image: Image.Image) -> Image.Image:
    """The pixels of a picture `open_image` opened, decoded and turned upright (`DigitlabError` when truncated
    or corrupt)."""
    return _load(image, "")


def _open(stream: BinaryIO, prefix: str, max_pixels: int) -> Image.Image:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(stream, formats=IMAGE_FORMATS)
    except Image.DecompressionBombError as error:
        declared = re.search(r"(\d+) pixels", str(error))
        size = f"{int(declared.group(1)):,} pixels" if declared else "too many pixels"
        raise DigitlabError(f"{prefix}{_too_large(size, max_pixels)}") from None
    except UnidentifiedImageError:
        raise DigitlabError(f"{prefix}not an image digitlab can read (PNG, JPEG, BMP, GIF, TIFF, WebP)") from None
    except Exception as error:  # Pillow's parsers raise many types on malformed headers
        raise DigitlabError(f"{prefix}cannot read the image header ({error})") from None
    width, height = image.size
    if width * height > max_pixels:
        raise DigitlabError(f"{prefix}{_too_large(f'{width}×{height} = {width * height:,} pixels', max_pixels)}")
    if width == 0 or height == 0:
        raise DigitlabError(f"{prefix}the image has no pixels ({width}×{height})")
    if image.format == "JPEG" and max(width, height) >= 2 * WORKING_SIZE:
        # decode at 1/2, 1/4 or 1/8 scale (in the DCT), keeping the longer side at least WORKING_SIZE
        scale = WORKING_SIZE / max(width, height)
        image.draft(image.mode, (math.ceil(width * scale), math.ceil(height * scale)))
    return image


def _load(image: Image.Image, prefix: str) -> Image.Image:
    try:
        image.load()
        ImageOps.exif_transpose(image, in_place=True)  # phone photos: turn upright as the camera was held
        return image
    except Exception as error:
        raise DigitlabError(f"{prefix}the image data is truncated or corrupt ({error})") from None


def _too_large(size: str, max_pixels: int) -> str:
    return f"the image is too large ({size}, the limit is {max_pixels:,}); scale it down first"


# --- the pipeline ------------------------------------------------------------------------------


def preprocess(image: Image.Image | np.ndarray) -> np.ndarray:
    """A 28×28 float32 image, white ink on black in [0, 1], as the network expects; see the module doc."""
    return preprocess_with_report(image)[0]


def preprocess_with_report(image: Image.Image | np.ndarray) -> tuple[np.ndarray, PreprocessReport]:
    """`preprocess`, and a report of the polarity, the ink's box and whether there may be several digits.

    Raises `DigitlabError` when there is no ink.
    """
    outcome = preprocess_many([image])[0]
    if isinstance(outcome, DigitlabError):
        raise outcome
    return outcome


def preprocess_many(
    images: Sequence[Image.Image | np.ndarray],
) -> list[tuple[np.ndarray, PreprocessReport] | DigitlabError]:
    """`preprocess_with_report` for each picture: its digit and report, or the `DigitlabError` it raised.

    Pictures of one size (once `limit_size` has reduced them) go through the
    steps up to `remove_specks` together, as one stack of up to `STACK_PIXELS`
    pixels: many small pictures cost a fraction of what they cost one at a time.
    Each picture's result is the one it gets alone.
    """
    outcomes: list[tuple[np.ndarray, PreprocessReport] | DigitlabError | None] = [None] * len(images)
    sizes: dict[tuple[int, ...], list[tuple[int, np.ndarray, tuple[int, ...]]]] = {}
    for index, image in enumerate(images):
        try:
            grey = to_greyscale(image)
        except DigitlabError as error:
            outcomes[index] = error
            continue
        reduced = limit_size(grey)
        sizes.setdefault(reduced.shape, []).append((index, reduced, grey.shape))
    for shape, members in sizes.items():
        per_stack = max(1, STACK_PIXELS // (shape[0] * shape[1]))
        for start in range(0, len(members), per_stack):
            part = members[start : start + per_stack]
            stack = np.stack([grey for _, grey, _ in part])
            results = _preprocess_stack(stack, [original for _, _, original in part])
            for (index, _, _), result in zip(part, results):
                outcomes[index] = result
    return outcomes  # type: ignore[return-value]  # every picture has its outcome now


def compile_loops() -> None:
    """Put a drawn digit through the pipeline, so that its compiled loops (`digitlab.pixel_loops`) are ready:
    compiled now, or loaded from numba's cache where an earlier run left them, not on a user's first picture."""
    rows, cols = np.mgrid[:64, :64]
    ring = np.abs(np.hypot(rows - 32, cols - 30) - 18) < 4
    ring[2:4, 60:62] = True  # a speck, to be removed
    preprocess_many([np.where(ring, 0.1, 0.9).astype(np.float32)])  # dark ink on light paper


def _preprocess_stack(
    grey: np.ndarray, original_shapes: list[tuple[int, ...]]
) -> list[tuple[np.ndarray, PreprocessReport] | DigitlabError]:
    """Steps 3 to 10 for a stack of greyscale pictures of one size (N×H×W)."""
    grey = denoise(grey)
    dark = ink_is_dark(grey)
    inks, pieces = _specks_and_pieces(remove_border_lines(threshold(flatten_background(to_ink(grey, dark)))))
    boxes, inked = _ink_boxes(inks)
    sharpened = _sharpen(inks, boxes, inked)
    sharp_boxes, sharp_inked = _ink_boxes(sharpened)
    digits, placed = pixel_loops.digit_fields(
        sharpened, sharp_boxes, inked & sharp_inked, CROP_MARGIN, BOX_SIZE, FIT_PAD, FIELD_SIZE
    )
    height, width = inks.shape[-2:]
    outcomes: list[tuple[np.ndarray, PreprocessReport] | DigitlabError] = []
    for index, (original_height, original_width) in enumerate(original_shapes):
        if not placed[index]:
            outcomes.append(DigitlabError(NO_INK_MESSAGE))
            continue
        top, left, bottom, right = (int(side) for side in boxes[index])
        multiple = _several_digits((top, left, bottom, right), pieces[index])
        digit = digits[index]
        row_scale, col_scale = original_height / height, original_width / width
        report = PreprocessReport(
            inverted=bool(dark[index]),
            ink_box=(
                int(top * row_scale),
                int(left * col_scale),
                math.ceil(bottom * row_scale),
                math.ceil(right * col_scale),
            ),
            components=len(pieces[index]),
            multiple_digits=multiple,
            warnings=[MULTIPLE_DIGITS_WARNING] if multiple else [],
        )
        outcomes.append((digit, report))
    return outcomes


def to_greyscale(image: Image.Image | np.ndarray) -> np.ndarray:
    """Luminance as float32 in [0, 1] (1 = white), with transparent pixels laid over white.

    A picture that is uniform once laid over white (light ink drawn on a transparent
    background) uses its opacity as the ink instead. Arrays may be H×W, H×W×1,
    H×W×3 or H×W×4, uint8 or floats in [0, 1].
    """
    if isinstance(image, Image.Image):
        return _pil_to_greyscale(image)
    array = np.asarray(image)
    if array.ndim == 3 and array.shape[2] == 1:
        array = array[:, :, 0]
    if array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[2] not in (3, 4)):
        raise DigitlabError(f"an image array must be H×W, H×W×1, H×W×3 or H×W×4, got shape {array.shape}")
    if min(array.shape[:2]) == 0:
        raise DigitlabError(f"the image has no pixels (shape {array.shape})")
    values = _unit_range(array)
    if values.ndim == 2:
        return values
    return _composite_over_white(values[:, :, :3], values[:, :, 3] if values.shape[2] == 4 else None)


def _pil_to_greyscale(image: Image.Image) -> np.ndarray:
    factor = max(image.size) // WORKING_SIZE
    if image.mode in ("I", "F") or image.mode.startswith("I;16"):
        image = image.convert("F") if image.mode != "F" else image
        return _unit_range(np.asarray(image.reduce(factor) if factor >= 2 else image))
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in image.info:
        if factor < 2:
            rgba = np.asarray(image.convert("RGBA"), dtype=np.float32) / 255.0
            return _composite_over_white(rgba[:, :, :3], rgba[:, :, 3])
        # a large picture: greyscale and average in 8 bits before any float copy is made
        grey_alpha = np.asarray(image.convert("RGBA").convert("LA").reduce(factor), dtype=np.float32) / 255.0
        return _composite_over_white(grey_alpha[:, :, :1], grey_alpha[:, :, 1], weights=np.ones(1, np.float32))
    grey = image.convert("L") if image.mode != "L" else image
    if factor >= 2:
        grey = grey.reduce(factor)
    # its bytes, not `np.asarray`: Pillow's array interface costs more than a small picture's conversion
    return np.frombuffer(grey.tobytes(), np.uint8).reshape(grey.height, grey.width).astype(np.float32) / 255.0


def _unit_range(array: np.ndarray) -> np.ndarray:
    """Pixel values scaled to [0, 1]: uint8 by 255, 16-bit by 65535, floats kept if already in [0, 1]."""
    if array.dtype == np.bool_:
        return array.astype(np.float32)
    if array.dtype == np.uint8:
        return array.astype(np.float32) / 255.0
    if not np.issubdtype(array.dtype, np.number):
        raise DigitlabError(f"image pixels must be numbers, got {array.dtype}")
    values = array.astype(np.float32)
    if not np.isfinite(values).all() or values.min() < 0:
        raise DigitlabError("image pixels must be finite and not negative")
    peak = float(values.max())
    if peak <= 1.0 and np.issubdtype(array.dtype, np.floating):
        return values
    return values / (255.0 if peak <= 255 else 65535.0)


def _composite_over_white(
    rgb: np.ndarray, alpha: np.ndarray | None, weights: np.ndarray = LUMINANCE
) -> np.ndarray:
    luminance = rgb @ weights
    if alpha is None:
        return luminance.astype(np.float32)
    grey = alpha * luminance + (1.0 - alpha)
    if np.ptp(grey) < MIN_CONTRAST <= np.ptp(alpha):
        grey = 1.0 - alpha
    return grey.astype(np.float32)


def limit_size(grey: np.ndarray, max_side: int = WORKING_SIZE) -> np.ndarray:
    """Reduce a picture whose longer side exceeds `max_side`, averaging areas (anti-aliased)."""
    height, width = grey.shape
    if max(height, width) <= max_side:
        return grey
    scale = max_side / max(height, width)
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    return np.asarray(Image.fromarray(grey.astype(np.float32)).resize(size, Image.Resampling.BOX))


def denoise(grey: np.ndarray, jump: float = 0.25) -> np.ndarray:
    """Remove salt-and-pepper noise: lone pixels brighter or darker by `jump` than all eight neighbours.

    A pixel counts as a speck only where its neighbours are alike (within
    `jump` of each other): it then takes their mean. Unlike a median filter,
    this never touches a stroke, however thin (a stroke pixel has neighbours
    like itself, and a stroke's edge has unlike neighbours), so MNIST's 28×28
    digits come through intact; specks of two or more pixels are left to
    `remove_specks`. Like the steps after it, it takes a picture or a stack of them (…×H×W).
    """
    height, width = grey.shape[-2:]
    if min(height, width) < 2:
        return grey
    cleaned = pixel_loops.denoise(_as_stack(grey), jump)
    return cleaned.reshape(grey.shape)


def _as_stack(image: np.ndarray) -> np.ndarray:
    """A picture (H×W) or stack (…×H×W) as the C-contiguous float32 N×H×W stack `pixel_loops` reads."""
    return np.ascontiguousarray(image, dtype=np.float32).reshape(-1, *image.shape[-2:])


def _median(values: np.ndarray, likely: float | None = None) -> np.ndarray:
    """`np.median` over the last axis (same values and dtype), from one sort: cheaper than `np.median` on
    small arrays and than `np.partition` on the many equal values of a picture's background.

    With `likely`, rows whose middle values are all `likely` (the zeros of mostly blank differences) are
    recognised by counting, and only the others are sorted.
    """
    count = values.shape[-1]
    middle = count // 2
    if likely is not None:
        rows = values.reshape(-1, count)
        below = (rows < likely).sum(axis=-1)
        settled = (below <= middle - 1 + count % 2) & (below + (rows == likely).sum(axis=-1) > middle)
        medians = np.full(len(rows), likely, dtype=values.dtype)
        if not settled.all():
            medians[~settled] = _median(rows[~settled])
        return medians.reshape(values.shape[:-1])
    ordered = np.sort(values, axis=-1)
    if count % 2:
        return ordered[..., middle]
    return (ordered[..., middle - 1] + ordered[..., middle]) / values.dtype.type(2)


def _percentiles(values: np.ndarray, percents: tuple[float, ...]) -> np.ndarray:
    """`np.percentile(values, percents, axis=-1)` (linear interpolation: the same float64 values) for percents
    near 0 and 100 (`pixel_loops.percentiles`)."""
    rows = np.ascontiguousarray(values).reshape(-1, values.shape[-1])
    found = pixel_loops.percentiles(rows, np.asarray(percents, dtype=np.float64))
    return found.reshape(len(percents), *values.shape[:-1])


def _pixels(image: np.ndarray) -> np.ndarray:
    """The pixels of a picture in one row, or of each picture of a stack in its own row."""
    return image.reshape(*image.shape[:-2], -1)


def _per_picture(values: np.ndarray) -> Any:
    """A picture's value as a Python number or bool; a stack's as the array of them."""
    return values if values.ndim else values.item()


def _outer_band(image: np.ndarray) -> np.ndarray:
    """The pixels within 10% of the picture's edges (in one row per picture): mostly background in any picture
    of a digit."""
    height, width = image.shape[-2:]
    rows, cols = max(1, round(0.1 * height)), max(1, round(0.1 * width))
    if 2 * rows >= height or 2 * cols >= width:
        return _pixels(image)
    middle = image[..., rows:-rows, :]
    parts = (image[..., :rows, :], image[..., -rows:, :], middle[..., :cols], middle[..., -cols:])
    return np.concatenate([_pixels(part) for part in parts], axis=-1)


def background_level(image: np.ndarray) -> float | np.ndarray:
    """The background's value: the median of the picture's outer band (an array of them for a stack)."""
    return _per_picture(_median(_outer_band(image)).astype(np.float64))


def ink_is_dark(grey: np.ndarray) -> bool | np.ndarray:
    """Whether the ink is darker than the background (dark on light), from a greyscale picture.

    The background is the outer band's median; the ink is whichever extreme (the
    darkest or the lightest 0.5% of pixels) lies farther from it. When neither
    clearly does, a light background means dark ink. A stack gets an array of answers.
    """
    background = np.asarray(background_level(grey))
    darkest, lightest = _percentiles(_pixels(grey), (0.5, 99.5))
    darker, lighter = background - darkest, lightest - background
    return _per_picture(np.where(np.abs(darker - lighter) < 0.1, background > 0.5, darker > lighter))


def to_ink(grey: np.ndarray, dark_ink: bool | np.ndarray) -> np.ndarray:
    """Bright ink on a dark background: the greyscale picture, inverted if its ink is dark (per picture)."""
    return np.where(np.asarray(dark_ink)[..., None, None], 1.0 - grey, grey)


def flatten_background(ink: np.ndarray, grid: int = 6, spread: float = 0.08) -> np.ndarray:
    """Subtract an unevenly lit background (a photo's shadow or gradient) from the ink map.

    Only done when the picture's four edges differ in level by more than
    `spread`; the background is then the 25th percentile of each cell of a
    grid×grid split, the lowest of each cell's neighbours, interpolated smoothly.
    """
    height, width = ink.shape[-2:]
    if min(height, width) < 2 * grid:
        return ink
    stack = _as_stack(ink)
    band = _outer_band(stack)  # the edges' pixels (all of a small picture's)
    varied = np.flatnonzero(band.max(axis=-1).astype(np.float64) - band.min(axis=-1) > spread)
    if not len(varied):
        return ink  # in each picture, the edges' levels lie within the spread of their pixels
    rows, cols = max(1, round(0.1 * height)), max(1, round(0.1 * width))
    candidates = stack[varied]
    edges = [candidates[:, :rows, :], candidates[:, -rows:, :], candidates[..., :cols], candidates[..., -cols:]]
    levels = np.stack([_median(_pixels(edge)) for edge in edges])
    uneven = varied[levels.max(axis=0).astype(np.float64) - levels.min(axis=0) > spread]
    if not len(uneven):
        return ink
    flattened = stack.copy()
    for index in uneven:
        flattened[index] = _without_background(stack[index], grid)
    return flattened.reshape(ink.shape)


def _without_background(ink: np.ndarray, grid: int) -> np.ndarray:
    height, width = ink.shape
    cells = np.array(
        [[np.percentile(cell, 25) for cell in np.array_split(band, grid, axis=1)]
         for band in np.array_split(ink, grid, axis=0)],
        dtype=np.float32,
    )  # fmt: skip
    cells = -_neighbourhood_max(-cells)  # neighbourhood minimum: cells full of ink take their neighbours' level
    background = Image.fromarray(cells).resize((width, height), Image.Resampling.BILINEAR)
    return np.clip(ink - np.asarray(background), 0.0, 1.0).astype(np.float32)


def _neighbourhood_max(values: np.ndarray) -> np.ndarray:
    """Each element's maximum over its 3×3 neighbourhood, the edges repeated outside (a 2-D array)."""
    padded = np.pad(values, 1, mode="edge")
    return np.lib.stride_tricks.sliding_window_view(padded, (3, 3)).max(axis=(-2, -1))


def threshold(ink: np.ndarray) -> np.ndarray:
    """Background to 0, brightest ink to 1, and faint pixels away from the strokes to 0.

    The cut-off is 10% of the ink's level, or four times the noise (estimated
    from the median absolute deviation) if that is higher. Pixels below it are
    kept when they touch a stroke (in a noisy picture, only those above half
    the cut-off), so the anti-aliased rim survives. Raises `DigitlabError` for
    a picture with (almost) no contrast; in a stack, such a picture is left without ink.
    """
    background = np.asarray(background_level(ink), dtype=np.float64)
    stretched, blank = pixel_loops.stretch(_as_stack(ink), background.reshape(-1), MIN_CONTRAST)
    if ink.ndim == 2 and blank[0]:
        raise DigitlabError(NO_INK_MESSAGE)
    noise = np.asarray(pixel_noise(stretched)).reshape(-1)
    cut = np.minimum(0.5, np.maximum(MIN_INK_LEVEL, 4.0 * noise))
    return pixel_loops.keep_near_strokes(stretched, cut, noise <= 0.02, blank).reshape(ink.shape)


def pixel_noise(image: np.ndarray) -> float | np.ndarray:
    """The standard deviation of pixel noise, from the median absolute difference of horizontal neighbours.

    Differences cancel smooth ink and background alike, so a digit that covers
    most of the picture (a low-resolution scan enlarged) does not count as noise.
    """
    stack = _as_stack(image)
    if image.shape[-1] < 2:
        return _per_picture(np.zeros(image.shape[:-2]))
    deviation = np.zeros(len(stack))
    # most differences exactly zero (a clean picture's flat background and ink): the median deviation is zero
    count = stack.shape[1] * (stack.shape[2] - 1)
    uneven = np.flatnonzero(pixel_loops.zero_differences(stack) <= count // 2)
    if uneven.size:
        differences = _pixels(np.diff(stack[uneven], axis=-1))
        deviation[uneven] = _median(np.abs(differences - _median(differences, 0.0)[..., None]), 0.0)
    return _per_picture((1.4826 * deviation / math.sqrt(2)).reshape(image.shape[:-2]))


def remove_border_lines(ink: np.ndarray, coverage: float = 0.8) -> np.ndarray:
    """Erase a frame around the digit: lines along at least two edges, covering most of their length.

    Only rows and columns within 15% of an edge count; everything from the edge
    to the innermost such line (and one pixel more, its rim) becomes background.
    """
    height, width = ink.shape[-2:]
    band_rows, band_cols = max(1, math.ceil(0.15 * height)), max(1, math.ceil(0.15 * width))
    row_counts, col_counts = pixel_loops.inked_per_line(_as_stack(ink))
    row_full = (row_counts / width >= coverage).reshape(*ink.shape[:-2], height)
    col_full = (col_counts / height >= coverage).reshape(*ink.shape[:-2], width)
    near_edges = np.concatenate(
        [row_full[..., :band_rows], row_full[..., -band_rows:], col_full[..., :band_cols], col_full[..., -band_cols:]],
        axis=-1,
    )
    if not near_edges.any():
        return ink
    cleaned = ink.copy()
    for picture in np.argwhere(near_edges.any(axis=-1)) if ink.ndim > 2 else [()]:
        index = tuple(picture)
        rows, cols = row_full[index], col_full[index]
        top, bottom = _lines_to_clear(rows, band_rows), _lines_to_clear(rows[::-1], band_rows)
        left, right = _lines_to_clear(cols, band_cols), _lines_to_clear(cols[::-1], band_cols)
        if sum(side > 0 for side in (top, bottom, left, right)) >= 2:
            framed = cleaned[index]
            framed[:top], framed[height - bottom :], framed[:, :left], framed[:, width - right :] = 0, 0, 0, 0
    return cleaned


def _lines_to_clear(full: np.ndarray, band: int) -> int:
    """How many lines from this edge to clear: 0 if no full line in the band, else up to the innermost plus one."""
    hits = np.flatnonzero(full[:band])
    return int(hits[-1]) + 2 if hits.size else 0


def remove_specks(ink: np.ndarray, fraction: float = SPECK_FRACTION) -> np.ndarray:
    """Erase pieces of ink whose mass is below `fraction` of the largest piece's (noise, dust)."""
    return _specks_and_pieces(ink, fraction)[0]


def digit_pieces(ink: np.ndarray, fraction: float = DIGIT_FRACTION) -> list[tuple[int, int, int, int]]:
    """Bounding boxes (top, left, bottom, right) of the pieces of ink with at least `fraction` of the largest's mass.

    One digit is usually one piece, sometimes two or three (a pen lifted mid-stroke).
    """
    return _specks_and_pieces(ink, piece_fraction=fraction)[1]


def _specks_and_pieces(
    ink: np.ndarray, speck_fraction: float = SPECK_FRACTION, piece_fraction: float = DIGIT_FRACTION
) -> tuple[np.ndarray, Any]:
    """The ink without specks, and the boxes of its large pieces, from one labelling of the pieces.

    For a stack (N×H×W): the stack without specks and a list of boxes per picture.
    """
    cleaned, boxes = pixel_loops.specks_and_pieces(_as_stack(ink), speck_fraction, piece_fraction)
    pieces: list[list[tuple[int, int, int, int]]] = [[] for _ in cleaned]
    for picture, top, left, bottom, right in boxes.tolist():
        pieces[picture].append((top, left, bottom, right))
    if ink.ndim == 2:
        return cleaned[0], pieces[0]
    return cleaned.reshape(ink.shape), pieces


def looks_like_several_digits(ink: np.ndarray, pieces: list[tuple[int, int, int, int]] | None = None) -> bool:
    """Whether the ink looks like several digits rather than one.

    True when two large pieces (`digit_pieces`, computed unless given) stand
    side by side, their columns overlapping by under 20% of the narrower one's
    width, or when the ink is over 1.5 times as wide as it is tall.
    """
    return _several_digits(ink_box(ink), digit_pieces(ink) if pieces is None else pieces)


def _several_digits(box: tuple[int, int, int, int], pieces: list[tuple[int, int, int, int]]) -> bool:
    top, left, bottom, right = box
    if right - left > MAX_SINGLE_DIGIT_ASPECT * (bottom - top):
        return True
    for index, (_, left_a, _, right_a) in enumerate(pieces):
        for _, left_b, _, right_b in pieces[index + 1 :]:
            overlap = min(right_a, right_b) - max(left_a, left_b)
            if overlap < 0.2 * min(right_a - left_a, right_b - left_b):
                return True
    return False


def ink_box(ink: np.ndarray) -> tuple[int, int, int, int]:
    """The bounding box of the nonzero pixels: (top, left, bottom, right), bottom and right exclusive.

    Raises `DigitlabError` when there is no ink.
    """
    boxes, inked = _ink_boxes(ink[None])
    if not inked[0]:
        raise DigitlabError(NO_INK_MESSAGE)
    top, left, bottom, right = (int(side) for side in boxes[0])
    return top, left, bottom, right


def _ink_boxes(stack: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """`ink_box` of each picture of a stack (N×4; meaningless where there is no ink), and which have ink."""
    return pixel_loops.ink_boxes(_as_stack(stack))


def sharpen(ink: np.ndarray, sigma: float = SHARPEN_SIGMA, amount: float = SHARPEN_AMOUNT) -> np.ndarray:
    """Unsharp masking at the scale of the 20-pixel box: ink + amount × (ink − Gaussian blur), in [0, 1].

    `sigma` is in pixels of the box: the blur follows the ink's size, so a digit
    gets the same sharpening however large the picture. Blurred and enlarged
    low-resolution digits (an 8×8 scan blown up to 64×64) have their thick, soft
    strokes run together at loops and corners; sharpening opens them again.
    Ink that is not much larger than the box (`SHARPEN_ABOVE`: a 28×28 MNIST digit) is returned unchanged;
    in a stack, each picture is sharpened (or not) at its own ink's scale.
    """
    stack = ink.reshape(-1, *ink.shape[-2:])
    boxes, inked = _ink_boxes(stack)
    if ink.ndim == 2 and not inked[0]:
        raise DigitlabError(NO_INK_MESSAGE)
    return _sharpen(stack, boxes, inked, sigma, amount).reshape(ink.shape)


def _sharpen(
    stack: np.ndarray,
    boxes: np.ndarray,
    inked: np.ndarray,
    sigma: float = SHARPEN_SIGMA,
    amount: float = SHARPEN_AMOUNT,
) -> np.ndarray:
    """`sharpen` of a stack (N×H×W) given its ink's boxes and which pictures have ink (`_ink_boxes`)."""
    sides = np.maximum(boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1])
    chosen = np.flatnonzero(inked & (sides > SHARPEN_ABOVE * BOX_SIZE))
    if chosen.size == 0:
        return stack
    result = stack.astype(np.float32)  # a copy
    for index in chosen:
        # pixels outside the ink's box are zero, and stay zero (ink - blur <= 0): the blur is needed only inside
        top, left, bottom, right = (int(side) for side in boxes[index])
        spread = sigma * int(sides[index]) / BOX_SIZE
        down, across = _gaussian_matrix(bottom - top, spread), _gaussian_matrix(right - left, spread)
        pixel_loops.unsharp(result[index], top, left, bottom, right, down, across, amount, MIN_INK_LEVEL / 2)
    return result


@functools.lru_cache(maxsize=256)
def _gaussian_matrix(size: int, sigma: float) -> np.ndarray:
    """The matrix of a 1-D Gaussian blur of `size` samples, with zeros beyond the edges (symmetric, read-only,
    cached: similar digits ask for the same few)."""
    offsets = np.arange(size, dtype=np.float32)
    weights = np.exp(-((offsets[:, None] - offsets[None, :]) ** 2) / np.float32(2 * sigma**2))
    reach = np.arange(-math.ceil(4 * sigma), math.ceil(4 * sigma) + 1, dtype=np.float32)
    matrix = weights / np.exp(-(reach**2) / np.float32(2 * sigma**2)).sum()
    matrix.setflags(write=False)
    return matrix


def crop_to_ink(ink: np.ndarray, margin: float = CROP_MARGIN) -> np.ndarray:
    """The ink's bounding box with a background margin of `margin` × its longer side (plus one pixel).

    The margin gives the anti-aliasing filter of `fit_to_box` real background
    around the strokes.
    """
    return pixel_loops.crop(_as_stack(ink)[0], *ink_box(ink), margin)[0]


def fit_to_box(ink: np.ndarray, box: int = BOX_SIZE, pad: int = FIT_PAD) -> np.ndarray:
    """Scale so that the ink's longer side is `box` pixels, keeping the aspect ratio (Lanczos, anti-aliased).

    The result holds the scaled ink with `pad` pixels of background around it;
    ink at exactly the right size comes back unchanged.
    """
    return pixel_loops.fit(_as_stack(ink)[0], *ink_box(ink), box, pad)


def center_of_mass(image: np.ndarray) -> tuple[float, float]:
    """The intensity-weighted mean position (row, col) of an image's pixels."""
    row, col, total = pixel_loops.center_of_mass(_as_stack(image)[0])
    if total <= 0:
        raise DigitlabError(NO_INK_MESSAGE)
    return row, col


def center_by_mass(image: np.ndarray, size: int = FIELD_SIZE) -> np.ndarray:
    """Paste into a size×size black field, shifted by whole pixels so the centre of mass lands at (14, 14).

    MNIST's digits have their centre of mass at row 14, column 14 on average
    (measured on the training set), i.e. half a pixel below and right of the
    geometric centre 13.5; anything falling outside the field is cut off.
    """
    field, placed = pixel_loops.center_by_mass(_as_stack(image)[0], size)
    if not placed:
        raise DigitlabError(NO_INK_MESSAGE)
    return field
