"""Picture files made from MNIST digits the ways people make them: scans, drawings, photos.

Each style turns a 28×28 MNIST digit (white on black, uint8) into a PIL image
and says how to save it; `write_digit_files` writes a set of them to disk.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image, ImageFilter

Rendering = tuple[Image.Image, str, dict]  # picture, file suffix, Pillow save options


def _scaled(digit: np.ndarray, size: int) -> np.ndarray:
    """The whole 28×28 field enlarged (or reduced) to size×size, as floats in [0, 1] (1 = ink)."""
    image = Image.fromarray(digit).resize((size, size), Image.Resampling.BICUBIC)
    return np.clip(np.asarray(image, dtype=np.float32) / 255.0, 0.0, 1.0)


def _on_canvas(ink: np.ndarray, height: int, width: int, top: int, left: int) -> np.ndarray:
    canvas = np.zeros((height, width), dtype=np.float32)
    canvas[top : top + ink.shape[0], left : left + ink.shape[1]] = ink
    return canvas


def _ink_box_values(ink: np.ndarray) -> np.ndarray:
    """The part of the picture holding ink (above 2%), cut out."""
    mask = ink > 0.02
    rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    return ink[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1]


def _grey(ink: np.ndarray, dark_on_light: bool = True) -> Image.Image:
    values = 1.0 - ink if dark_on_light else ink
    return Image.fromarray(np.round(values * 255).astype(np.uint8))


def black_on_white(digit: np.ndarray, rng: np.random.Generator) -> Rendering:
    """A digit drawn in black on a white page, 112×112 PNG."""
    return _grey(_scaled(digit, 112)), ".png", {}


def white_on_black(digit: np.ndarray, rng: np.random.Generator) -> Rendering:
    """White chalk on a blackboard, 96×96 BMP."""
    return _grey(_scaled(digit, 96), dark_on_light=False), ".bmp", {}


def off_centre(digit: np.ndarray, rng: np.random.Generator) -> Rendering:
    """A 60-px digit somewhere near a corner of a 200×150 page (GIF)."""
    ink = _ink_box_values(_scaled(digit, 84))
    top = int(rng.integers(0, 150 - ink.shape[0]))
    left = int(rng.choice([int(rng.integers(0, 30)), int(rng.integers(200 - ink.shape[1] - 30, 200 - ink.shape[1]))]))
    return _grey(_on_canvas(ink, 150, 200, top, left)), ".gif", {}


def small(digit: np.ndarray, rng: np.random.Generator) -> Rendering:
    """A tiny picture: the digit 14 px tall in a 24×24 PNG."""
    ink = _ink_box_values(_scaled(digit, 20))
    return _grey(_on_canvas(ink, 24, 24, (24 - ink.shape[0]) // 2, (24 - ink.shape[1]) // 2)), ".png", {}


def large(digit: np.ndarray, rng: np.random.Generator) -> Rendering:
    """A high-resolution scan: 800×600 TIFF, the digit about 400 px tall."""
    ink = _ink_box_values(_scaled(digit, 560))
    top, left = (800 - ink.shape[0]) // 2, (600 - ink.shape[1]) // 2
    return _grey(_on_canvas(ink, 800, 600, top, left)), ".tif", {}


def tight_crop(digit: np.ndarray, rng: np.random.Generator) -> Rendering:
    """Cropped right to the ink, a 2-px margin at most (WebP, lossless)."""
    ink = np.pad(_ink_box_values(_scaled(digit, 84)), 2)
    return _grey(ink), ".webp", {"lossless": True}


def transparent(digit: np.ndarray, rng: np.random.Generator) -> Rendering:
    """A paint program's layer: black ink whose opacity is the stroke, on a transparent background."""
    ink = _scaled(digit, 80)
    rgba = np.zeros((80, 80, 4), dtype=np.uint8)
    rgba[:, :, 3] = np.round(ink * 255).astype(np.uint8)
    return Image.fromarray(rgba, mode="RGBA"), ".png", {}


def jpeg(digit: np.ndarray, rng: np.random.Generator) -> Rendering:
    """Black on white, 64×64, saved as a JPEG at quality 40 (blocky, ringing)."""
    return _grey(_scaled(digit, 64)).convert("RGB"), ".jpg", {"quality": 40}


def framed(digit: np.ndarray, rng: np.random.Generator) -> Rendering:
    """A digit written in a form's box: a thin black frame 2 px inside the edge of a 120×120 PNG."""
    ink = _scaled(digit, 120)
    ink[2:5, 2:-2], ink[-5:-2, 2:-2], ink[2:-2, 2:5], ink[2:-2, -5:-2] = 1.0, 1.0, 1.0, 1.0
    return _grey(ink), ".png", {}


def noisy(digit: np.ndarray, rng: np.random.Generator) -> Rendering:
    """A grainy scan: Gaussian noise (σ = 0.08) and 2% salt-and-pepper specks, 112×112 PNG."""
    paper = 1.0 - _scaled(digit, 112) + rng.normal(0.0, 0.08, (112, 112))
    specks = rng.random((112, 112))
    paper[specks < 0.01], paper[specks > 0.99] = 0.0, 1.0
    return Image.fromarray(np.round(np.clip(paper, 0, 1) * 255).astype(np.uint8)), ".png", {}


def photo(digit: np.ndarray, rng: np.random.Generator) -> Rendering:
    """A phone photo: blue ink on cream paper lit unevenly, slightly blurred, 160×120 JPEG."""
    ink = _ink_box_values(_scaled(digit, 90))
    ink = _on_canvas(ink, 160, 120, (160 - ink.shape[0]) // 2 + 8, (120 - ink.shape[1]) // 2 - 6)
    light = np.linspace(0.75, 1.0, 120)[None, :] * np.linspace(0.9, 1.0, 160)[:, None]
    paper = np.array([0.97, 0.93, 0.82])[None, None, :] * light[:, :, None]
    pen = np.array([0.1, 0.15, 0.45])
    rgb = paper * (1.0 - ink[:, :, None]) + pen * ink[:, :, None]
    picture = Image.fromarray(np.round(rgb * 255).astype(np.uint8)).filter(ImageFilter.GaussianBlur(1.0))
    return picture, ".jpg", {"quality": 85}


STYLES: dict[str, Callable[[np.ndarray, np.random.Generator], Rendering]] = {
    "black_on_white": black_on_white,
    "white_on_black": white_on_black,
    "off_centre": off_centre,
    "small": small,
    "large": large,
    "tight_crop": tight_crop,
    "transparent": transparent,
    "jpeg": jpeg,
    "framed": framed,
    "noisy": noisy,
    "photo": photo,
}


def write_digit_files(digits: np.ndarray, directory: Path, style: str, seed: int = 0) -> list[Path]:
    """Render each digit in `style` and save it as `directory/<style>-<i><suffix>`; the paths in order."""
    rng = np.random.default_rng(seed)
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for index, digit in enumerate(digits):
        picture, suffix, options = STYLES[style](digit, rng)
        path = directory / f"{style}-{index:04d}{suffix}"
        picture.save(path, **options)
        paths.append(path)
    return paths
