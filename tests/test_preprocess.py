"""The MNIST-style preprocessing pipeline, step by step, and safe image loading."""

from __future__ import annotations

import io
import struct
import zlib
from collections import deque

import numpy as np
import pytest
from image_factory import STYLES
from PIL import Image

from digitlab import preprocess as pp
from digitlab.errors import DigitlabError
from digitlab.predict import load_recognizer


def png_declaring(width: int, height: int) -> bytes:
    """A PNG file whose header declares width×height RGB pixels, followed by a scrap of pixel data."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    pixels = zlib.compress(b"\x00" * 64)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", pixels) + chunk(b"IEND", b"")


def png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def flood_fill_labels(mask: np.ndarray) -> list[set[tuple[int, int]]]:
    """Reference 8-connected components by breadth-first search: the set of pixels of each."""
    seen = np.zeros_like(mask)
    regions = []
    for start in zip(*np.nonzero(mask)):
        if seen[start]:
            continue
        seen[start] = True
        region, queue = set(), deque([start])
        while queue:
            r, c = queue.popleft()
            region.add((int(r), int(c)))
            for dr in (-1, 0, 1):
                for dc in (-1, 0, 1):
                    nr, nc = r + dr, c + dc
                    if 0 <= nr < mask.shape[0] and 0 <= nc < mask.shape[1] and mask[nr, nc] and not seen[nr, nc]:
                        seen[nr, nc] = True
                        queue.append((nr, nc))
        regions.append(region)
    return regions


# --- MNIST digits go through unchanged --------------------------------------------------------


def test_mnist_digits_pass_through_essentially_unchanged(mnist, bundled_model_path):
    _, (x_test, y_test) = mnist
    digits, labels = x_test[:500], y_test[:500]
    processed = np.stack([pp.preprocess(digit) for digit in digits])
    assert processed.shape == (500, 28, 28) and processed.dtype == np.float32
    assert processed.min() >= 0.0 and processed.max() <= 1.0
    difference = np.abs(processed - digits / 255.0)
    # Measured: 90% of digits come back identical, mean absolute difference 0.0000x.
    assert np.mean(difference.max(axis=(1, 2)) < 1e-6) > 0.8
    assert difference.mean() < 0.005
    recognizer = load_recognizer(bundled_model_path)
    raw, through = recognizer.predict(digits).labels, recognizer.predict(processed).labels
    # Measured: predictions agree on 99.9% of digits; accuracy the same to within 0.1 point.
    assert np.mean(raw == through) >= 0.99
    assert abs(np.mean(through == labels) - np.mean(raw == labels)) <= 0.01


def test_uint8_and_unit_float_digits_give_the_same_result(mnist):
    _, (x_test, _) = mnist
    for digit in x_test[:20]:
        np.testing.assert_allclose(pp.preprocess(digit), pp.preprocess(digit / 255.0), atol=1e-5)


def test_polarity_and_position_do_not_change_the_result(mnist):
    _, (x_test, _) = mnist
    digit = x_test[0]
    expected = pp.preprocess(digit)
    page = np.full((90, 120), 255, dtype=np.uint8)
    page[50:78, 10:38] = 255 - digit  # black on white, off-centre
    np.testing.assert_allclose(pp.preprocess(page), expected, atol=0.02)
    image, report = pp.preprocess_with_report(Image.fromarray(page))
    assert report.inverted and not report.multiple_digits and report.components == 1
    top, left, bottom, right = report.ink_box
    assert 50 <= top < bottom <= 78 and 10 <= left < right <= 38


# --- the steps ------------------------------------------------------------------------------


def test_to_greyscale_lays_transparency_over_white():
    rgba = np.zeros((4, 4, 4), dtype=np.uint8)
    rgba[1, 1] = (0, 0, 0, 255)  # opaque black ink
    rgba[2, 2] = (255, 0, 0, 255)  # opaque red
    grey = pp.to_greyscale(Image.fromarray(rgba, mode="RGBA"))
    assert grey.dtype == np.float32 and grey.shape == (4, 4)
    assert grey[0, 0] == pytest.approx(1.0)  # transparent: white
    assert grey[1, 1] == pytest.approx(0.0)
    assert grey[2, 2] == pytest.approx(0.299, abs=0.01)
    np.testing.assert_allclose(pp.to_greyscale(rgba), grey, atol=1e-6)


def test_to_greyscale_uses_opacity_when_light_ink_is_drawn_on_transparency():
    rgba = np.zeros((6, 6, 4), dtype=np.uint8)
    rgba[:, :, :3] = 255  # white everywhere: laid over white, nothing would show
    rgba[2:4, 2:4, 3] = 255
    grey = pp.to_greyscale(rgba)
    assert grey[0, 0] == pytest.approx(1.0) and grey[2, 2] == pytest.approx(0.0)


def test_to_greyscale_scales_16_bit_and_rejects_bad_arrays():
    deep = Image.fromarray(np.array([[0, 65535]], dtype=np.uint16))
    np.testing.assert_allclose(pp.to_greyscale(deep), [[0.0, 1.0]], atol=1e-6)
    with pytest.raises(DigitlabError, match="H×W"):
        pp.to_greyscale(np.zeros((2, 3, 3, 3)))
    with pytest.raises(DigitlabError, match="negative"):
        pp.to_greyscale(np.full((3, 3), -1.0))


def test_ink_is_dark_decides_polarity_from_the_background():
    light_page = np.ones((40, 40), dtype=np.float32)
    light_page[10:30, 18:22] = 0.1
    assert pp.ink_is_dark(light_page)
    assert not pp.ink_is_dark(1.0 - light_page)
    # A dim photo: grey paper darker than 0.5, but the ink is darker still.
    dim = light_page * 0.4
    assert pp.ink_is_dark(dim)
    np.testing.assert_allclose(pp.to_ink(light_page, True), 1.0 - light_page)


def test_flatten_background_removes_uneven_lighting_only():
    ink = np.zeros((60, 60), dtype=np.float32)
    ink[20:40, 28:32] = 1.0
    shaded = np.clip(ink + np.linspace(0.0, 0.3, 60)[None, :], 0, 1)
    flat = pp.flatten_background(shaded)
    assert flat[:, :10].max() < 0.05 and flat[:, -10:].max() < 0.1
    assert flat[20:40, 28:32].min() > 0.7
    np.testing.assert_array_equal(pp.flatten_background(ink), ink)  # even background: untouched


def test_threshold_keeps_strokes_and_their_rim_and_drops_faint_specks():
    ink = np.zeros((20, 20), dtype=np.float32)
    ink[5:15, 9:11] = 0.8
    ink[5:15, 8] = 0.05  # anti-aliased rim beside the stroke
    ink[2, 2] = 0.05  # faint dust away from it
    result = pp.threshold(ink)
    assert result[10, 9] == pytest.approx(1.0)
    assert result[10, 8] > 0
    assert result[2, 2] == 0
    with pytest.raises(DigitlabError, match="no ink found"):
        pp.threshold(np.full((20, 20), 0.5, dtype=np.float32))


def test_denoise_removes_salt_and_pepper_but_keeps_thin_strokes():
    page = np.ones((80, 80), dtype=np.float32)
    page[0:35:7, 0:35:7] = 0.0  # 25 dark specks, edges and corners included
    page[50:80:6, 60:80:6] = 0.6  # fainter ones
    page[10:70, 40] = 0.0  # strokes one pixel wide
    page[40, 10:30] = 0.0
    page[45:47, 10:12] = 1.0 - page[45:47, 10:12]  # a 2×2 blot is not isolated noise
    cleaned = pp.denoise(page)
    assert cleaned[:35, :35].min() == 1.0 and cleaned[50:, 60:].min() == 1.0
    np.testing.assert_array_equal(cleaned[10:70, 40], 0.0)
    np.testing.assert_array_equal(cleaned[40, 10:30], 0.0)
    np.testing.assert_array_equal(cleaned[45:47, 10:12], 0.0)


def test_percentiles_are_numpys_to_the_bit():
    rng = np.random.default_rng(2)
    for size in (1, 2, 3, 7, 199, 200, 4096, 4097):
        for values in (rng.random(size, dtype=np.float32), np.round(rng.random(size) * 3).astype(np.float32) / 3):
            for percents in ((0.5, 99.5), (25,), (0, 50, 100)):
                found, expected = pp._percentiles(values, percents), np.percentile(values, percents)
                assert found.dtype == expected.dtype and np.array_equal(found, expected), (size, percents)


def test_medians_are_numpys_to_the_bit():
    """Also when most values are one value, which `_median` may recognise by counting instead of sorting."""
    rng = np.random.default_rng(6)
    for size in (1, 2, 3, 8, 101, 4032):
        for blank in (0.0, 0.5, 0.9, 1.0):
            values = (rng.random((6, size)) >= blank) * rng.normal(size=(6, size)).astype(np.float32)
            expected = np.median(values, axis=-1)
            for likely in (None, 0.0):
                found = pp._median(values, likely)
                assert found.dtype == expected.dtype and np.array_equal(found, expected), (size, blank, likely)
                assert pp._median(values[0], likely) == expected[0]


def test_neighbourhood_maximum_matches_the_nine_shifts():
    rng = np.random.default_rng(3)
    for shape in ((1, 1), (1, 5), (4, 1), (7, 9), (30, 40)):
        values = rng.random(shape, dtype=np.float32)
        height, width = shape
        padded = np.pad(values, 1, mode="edge")
        shifts = [padded[r : r + height, c : c + width] for r in range(3) for c in range(3)]
        assert np.array_equal(pp._neighbourhood_max(values), np.max(shifts, axis=0))


def test_the_outer_band_is_the_pixels_near_the_edges():
    rng = np.random.default_rng(4)
    for height, width in ((1, 1), (3, 8), (10, 10), (64, 48), (28, 28)):
        image = rng.random((height, width), dtype=np.float32)
        rows, cols = max(1, round(0.1 * height)), max(1, round(0.1 * width))
        near = np.zeros((height, width), dtype=bool)
        near[:rows], near[-rows:], near[:, :cols], near[:, -cols:] = True, True, True, True
        assert np.array_equal(np.sort(pp._outer_band(image)), np.sort(image[near]))


def test_digit_pieces_are_the_boxes_of_the_8_connected_pieces_of_a_flood_fill():
    rng = np.random.default_rng(1)
    for density in (0.1, 0.3, 0.5):
        ink = (rng.random((30, 40)) < density).astype(np.float32)
        expected = [
            (min(r for r, _ in piece), min(c for _, c in piece), max(r for r, _ in piece) + 1, max(c for _, c in piece) + 1)
            for piece in flood_fill_labels(ink > 0)
        ]
        assert sorted(pp.digit_pieces(ink, fraction=0.0)) == sorted(expected)
    assert pp.digit_pieces(np.zeros((5, 5), dtype=np.float32)) == []


def test_remove_specks_and_border_lines():
    ink = np.zeros((50, 50), dtype=np.float32)
    ink[15:35, 20:26] = 1.0
    ink[3, 45] = 1.0  # a speck
    assert pp.remove_specks(ink)[3, 45] == 0 and pp.remove_specks(ink)[20, 22] == 1
    framed = ink.copy()
    framed[1, 1:49], framed[48, 1:49], framed[1:49, 1], framed[1:49, 48] = 1, 1, 1, 1
    cleaned = pp.remove_border_lines(framed)
    assert cleaned[1].max() == 0 and cleaned[:, 48].max() == 0
    np.testing.assert_array_equal(cleaned[15:35, 20:26], 1.0)
    # A single line along one edge (the bar of a tightly cropped 7) is not a frame.
    seven = ink.copy()
    seven[0, :] = 1.0
    np.testing.assert_array_equal(pp.remove_border_lines(seven), seven)


def test_crop_scale_and_centre_by_mass_geometry():
    ink = np.zeros((100, 100), dtype=np.float32)
    ink[10:90, 40:60] = 1.0  # an upright bar, 80 tall and 20 wide
    cropped = pp.crop_to_ink(ink)
    top, left, bottom, right = pp.ink_box(cropped)
    assert (bottom - top, right - left) == (80, 20)
    assert top == left == 13  # a margin of 15% of the longer side, plus one pixel
    scaled = pp.fit_to_box(cropped)
    top, left, bottom, right = pp.ink_box(scaled > 0.5)
    assert bottom - top == 20 and right - left == 5  # longer side 20 px, aspect ratio kept
    one_pixel = np.zeros((7, 9), dtype=np.float32)
    one_pixel[1, 6] = 1.0
    assert pp.center_of_mass(one_pixel) == (1.0, 6.0)  # (row, col)
    field = pp.center_by_mass(one_pixel)
    assert field.shape == (28, 28) and field[14, 14] == 1.0 and field.sum() == 1.0


def test_sharpen_reopens_the_gap_between_blurred_strokes_and_leaves_small_digits_alone(mnist):
    _, (x_test, _) = mnist
    small = x_test[0].astype(np.float32) / 255
    np.testing.assert_array_equal(pp.sharpen(small), small)  # a 28×28 digit: no larger than 1.5 boxes
    scan = np.zeros((16, 16), np.float32)
    scan[2:14, 5:7], scan[2:14, 7], scan[2:14, 8:10] = 1, 0.3, 1  # two strokes, a faint gap: a closed-up loop
    blurry = np.asarray(Image.fromarray(scan).resize((96, 96), Image.Resampling.BILINEAR))
    sharp = pp.sharpen(blurry)
    gap = slice(40, 48)
    # Measured: the gap falls from 36% of the strokes' level to 0.
    assert sharp[48, gap].min() < 0.5 * blurry[48, gap].min() and sharp[48].max() == 1.0
    assert sharp.min() >= 0 and not sharp[blurry == 0].any()  # no ink where there was none


def test_fit_to_box_leaves_a_digit_of_the_right_size_unchanged():
    ink = np.zeros((30, 30), dtype=np.float32)
    ink[5:25, 8:20] = np.random.default_rng(2).random((20, 12)) * 0.9 + 0.1
    scaled = pp.fit_to_box(ink)
    top, left, bottom, right = pp.ink_box(scaled)
    np.testing.assert_allclose(scaled[top:bottom, left:right], ink[5:25, 8:20], atol=1e-5)


def test_blank_pictures_have_no_ink():
    for blank in (np.zeros((40, 40), np.uint8), np.full((40, 40), 255, np.uint8), np.full((9, 9), 0.5)):
        with pytest.raises(DigitlabError, match="no ink found"):
            pp.preprocess(blank)


def test_several_digits_are_flagged_and_single_digits_rarely(mnist):
    _, (x_test, _) = mnist
    pairs = [np.concatenate([x_test[i], x_test[i + 1]], axis=1) for i in range(0, 200, 2)]
    flagged_pairs = np.mean([pp.preprocess_with_report(pair)[1].multiple_digits for pair in pairs])
    flagged_singles = np.mean([pp.preprocess_with_report(digit)[1].multiple_digits for digit in x_test[:500]])
    # Measured: 100% of pairs and 0.4% of single MNIST digits.
    assert flagged_pairs >= 0.95
    assert flagged_singles <= 0.02
    report = pp.preprocess_with_report(pairs[0])[1]
    assert report.warnings == [pp.MULTIPLE_DIGITS_WARNING] and report.components >= 2


def test_pictures_preprocessed_together_get_what_each_gets_alone(mnist, monkeypatch):
    """`preprocess_many` stacks pictures of one size: no picture's result depends on the others in its stack."""
    _, (x_test, _) = mnist
    rng = np.random.default_rng(5)
    pictures = []
    for index, style in enumerate(STYLES):  # every style, two of each: many sizes, some shared
        for digit in x_test[2 * index : 2 * index + 2]:
            picture, _, _ = STYLES[style](digit, rng)
            pictures.append(picture)
    pictures += [x_test[100], x_test[101].astype(np.float32) / 255, np.zeros((28, 28), np.uint8)]  # no ink
    pictures += [np.concatenate([x_test[102], x_test[103]], axis=1), np.ones((2, 3, 5))]  # two digits; bad shape
    pictures += [np.full((28, 28), 9, np.uint8), x_test[104]]  # no contrast, beside a digit of its size
    alone = []
    for picture in pictures:
        try:
            alone.append(pp.preprocess_with_report(picture))
        except DigitlabError as error:
            alone.append(error)
    monkeypatch.setattr(pp, "STACK_PIXELS", 3 * 112 * 112)  # stacks of one to several pictures, split
    order = rng.permutation(len(pictures))
    together = pp.preprocess_many([pictures[i] for i in order])
    assert len(together) == len(pictures)
    for index, outcome in zip(order, together):
        expected = alone[index]
        if isinstance(expected, DigitlabError):
            assert isinstance(outcome, DigitlabError) and str(outcome) == str(expected)
        else:
            assert np.array_equal(outcome[0], expected[0]) and outcome[1] == expected[1], index
    assert sum(isinstance(outcome, DigitlabError) for outcome in together) == 3
    assert together[list(order).index(len(pictures) - 4)][1].multiple_digits


def test_steps_take_a_stack_of_pictures_one_at_a_time():
    light_page = np.ones((3, 40, 40), dtype=np.float32)
    light_page[0, 10:30, 18:22] = 0.1  # dark ink
    light_page[1] = 1.0 - light_page[0]  # light ink
    light_page[2] = 0.7  # nothing
    assert pp.ink_is_dark(light_page).tolist() == [True, False, True] == [pp.ink_is_dark(page) for page in light_page]
    ink = pp.to_ink(light_page, pp.ink_is_dark(light_page))
    stretched = pp.threshold(ink)
    np.testing.assert_array_equal(stretched[0], pp.threshold(ink[0]))
    np.testing.assert_array_equal(stretched[1], pp.threshold(ink[1]))
    assert not stretched[2].any()  # alone, it raises "no ink found"; in a stack it is left without ink
    cleaned, pieces = pp._specks_and_pieces(stretched)
    assert pieces == [[(10, 18, 30, 22)], [(10, 18, 30, 22)], []]


# --- loading untrusted files ------------------------------------------------------------------


def test_load_image_reads_paths_bytes_and_streams(tmp_path):
    picture = Image.fromarray(np.arange(12, dtype=np.uint8).reshape(3, 4))
    path = tmp_path / "digit.png"
    picture.save(path)
    for source in (path, str(path), path.read_bytes(), io.BytesIO(path.read_bytes())):
        loaded = pp.load_image(source)
        np.testing.assert_array_equal(np.asarray(loaded), np.asarray(picture))


def test_load_image_turns_phone_photos_upright():
    picture = Image.fromarray(np.zeros((20, 40), dtype=np.uint8))
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: the camera was turned a quarter
    buffer = io.BytesIO()
    picture.save(buffer, format="JPEG", exif=exif)
    assert pp.load_image(buffer.getvalue()).size == (20, 40)


def test_load_image_rejects_empty_files_and_data(tmp_path):
    empty = tmp_path / "empty.png"
    empty.write_bytes(b"")
    with pytest.raises(DigitlabError, match=r"empty\.png: the file is empty"):
        pp.load_image(empty)
    with pytest.raises(DigitlabError, match="the image data is empty"):
        pp.load_image(b"")


def test_load_image_rejects_a_truncated_png(tmp_path):
    rng = np.random.default_rng(3)
    data = png_bytes(Image.fromarray(rng.integers(0, 256, (64, 64), dtype=np.uint8)))
    path = tmp_path / "cut.png"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(DigitlabError, match=r"cut\.png: the image data is truncated or corrupt"):
        pp.load_image(path)


def test_load_image_rejects_text_named_png(tmp_path):
    path = tmp_path / "notes.png"
    path.write_text("shopping list: eggs, milk\n")
    with pytest.raises(DigitlabError, match=r"notes\.png: not an image digitlab can read \(PNG, JPEG"):
        pp.load_image(path)


def test_load_image_refuses_huge_declared_sizes_before_decoding(tmp_path):
    path = tmp_path / "bomb.png"
    path.write_bytes(png_declaring(100_000, 100_000))
    with pytest.raises(DigitlabError, match=r"bomb\.png: the image is too large \(10,000,000,000 pixels"):
        pp.load_image(path)
    # Within Pillow's own limit but above digitlab's.
    with pytest.raises(DigitlabError, match=r"too large \(4000×4000 = 16,000,000 pixels, the limit is 12,000,000\)"):
        pp.load_image(png_declaring(4000, 4000))
    with pytest.raises(DigitlabError, match="the limit is 100"):
        pp.load_image(png_bytes(Image.new("L", (20, 20))), max_pixels=100)


def test_open_image_reads_the_header_only_and_decode_image_the_pixels():
    """A file's size is known, and checked, before any pixel is decoded; broken pixel data fails only then."""
    data = png_bytes(Image.new("L", (300, 200), 255))
    opened = pp.open_image(data[: len(data) // 2])  # the header is whole, the pixel data cut short
    assert opened.size == (300, 200)
    with pytest.raises(DigitlabError, match="truncated or corrupt"):
        pp.decode_image(opened)
    assert np.asarray(pp.decode_image(pp.open_image(data))).min() == 255
    with pytest.raises(DigitlabError, match="too large"):
        pp.open_image(png_declaring(4000, 4000))
    with pytest.raises(DigitlabError, match="empty"):
        pp.open_image(b"")


def test_load_image_rejects_missing_paths_directories_and_other_formats(tmp_path):
    with pytest.raises(DigitlabError, match="no such file"):
        pp.load_image(tmp_path / "missing.png")
    with pytest.raises(DigitlabError, match="is a directory"):
        pp.load_image(tmp_path)
    buffer = io.BytesIO()
    Image.new("L", (8, 8)).save(buffer, format="PPM")  # Pillow reads it, digitlab does not accept it
    with pytest.raises(DigitlabError, match="not an image digitlab can read"):
        pp.load_image(buffer.getvalue())


def test_large_jpegs_are_decoded_at_a_reduced_scale_that_still_covers_the_working_size():
    buffer = io.BytesIO()
    Image.new("RGB", (3000, 2000), "white").save(buffer, format="JPEG")
    loaded = pp.load_image(buffer.getvalue())
    assert loaded.size == (750, 500)  # 1/4 scale: the longer side stays at least 512
    assert max(pp.to_greyscale(loaded).shape) >= 512


def test_large_transparent_pictures_become_small_greyscale_with_the_same_digit(mnist):
    """A 2,800×2,800 RGBA digit is averaged in 8 bits before any float copy; it reads like a small one."""
    (_, _), (x_test, _) = mnist
    small = Image.fromarray(x_test[0]).resize((280, 280), Image.Resampling.BILINEAR)
    rgba = Image.new("RGBA", small.size, (0, 0, 0, 0))
    rgba.putalpha(small)
    large = rgba.resize((2800, 2800), Image.Resampling.NEAREST)
    grey = pp.to_greyscale(large)
    assert grey.dtype == np.float32 and grey.shape == (560, 560)
    assert np.abs(pp.preprocess(large) - pp.preprocess(rgba)).max() < 0.1
