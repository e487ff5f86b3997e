"""The compiled loops behind the preprocessing, each against a plain numpy, SciPy or Pillow version of its step."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image
from scipy import ndimage

from digitlab import pixel_loops


def pictures(rng: np.random.Generator, count: int, height: int, width: int, ink: float = 0.3) -> np.ndarray:
    """A stack of float32 pictures: zeros, with a share `ink` of random levels in (0, 1]."""
    levels = rng.random((count, height, width), dtype=np.float32) + np.float32(1e-3)
    return np.where(rng.random((count, height, width)) < ink, np.minimum(levels, 1), 0).astype(np.float32)


@given(seed=st.integers(0, 2**32 - 1), height=st.integers(2, 12), width=st.integers(2, 12))
@settings(max_examples=60, deadline=None)
def test_denoise_replaces_exactly_the_isolated_specks_by_their_neighbours_mean(seed, height, width):
    rng = np.random.default_rng(seed)
    stack = np.where(rng.random((2, height, width)) < 0.5, 0.2, 0.3).astype(np.float32)
    stack[rng.random(stack.shape) < 0.1] = 1.0  # specks, lone or touching
    padded = np.pad(stack, ((0, 0), (1, 1), (1, 1)), mode="reflect")
    ring = np.stack([padded[:, r : r + height, c : c + width] for r in range(3) for c in range(3) if (r, c) != (1, 1)])
    highest, lowest = ring.max(axis=0), ring.min(axis=0)
    jump = np.float32(0.25)
    isolated = ((stack > highest + jump) | (stack < lowest - jump)) & (highest - lowest < jump)
    expected = np.where(isolated, ring.mean(axis=0), stack)
    np.testing.assert_array_equal(pixel_loops.denoise(stack, 0.25), expected)


def test_denoise_gives_back_a_stack_without_specks_as_it_is():
    stack = np.zeros((2, 6, 6), np.float32)
    stack[:, 1:5, 2:4] = 1.0  # a stroke, no speck
    assert pixel_loops.denoise(stack, 0.25) is stack
    stack[1, 0, 5] = 1.0  # a speck in the second picture only
    cleaned = pixel_loops.denoise(stack, 0.25)
    assert cleaned is not stack and cleaned[1, 0, 5] == 0 and stack[1, 0, 5] == 1
    np.testing.assert_array_equal(cleaned[0], stack[0])


@given(seed=st.integers(0, 2**32 - 1), height=st.integers(1, 20), width=st.integers(1, 20), ink=st.floats(0, 1))
@settings(max_examples=80, deadline=None)
def test_pieces_are_scipys_8_connected_labels_with_their_masses_and_boxes(seed, height, width, ink):
    stack = pictures(np.random.default_rng(seed), 3, height, width, ink)
    cleaned, boxes = pixel_loops.specks_and_pieces(stack, 0.05, 0.25)
    expected_boxes, expected_cleaned = [], stack.copy()
    for index, picture in enumerate(stack):
        labels, count = ndimage.label(picture > 0, structure=np.ones((3, 3)))
        if count == 0:
            continue
        masses = np.array([picture[labels == label].astype(np.float64).sum() for label in range(1, count + 1)])
        expected_cleaned[index][np.isin(labels, np.flatnonzero(masses < 0.05 * masses.max()) + 1)] = 0
        for label, (rows, cols) in enumerate(ndimage.find_objects(labels)):
            if masses[label] >= 0.25 * masses.max():
                expected_boxes.append((index, rows.start, cols.start, rows.stop, cols.stop))
    np.testing.assert_array_equal(cleaned, expected_cleaned)
    assert sorted(map(tuple, boxes.tolist())) == sorted(expected_boxes)


def test_a_stack_without_specks_comes_back_as_it_is():
    stack = np.zeros((1, 9, 9), np.float32)
    stack[0, 2:7, 3:5] = 1.0
    cleaned, boxes = pixel_loops.specks_and_pieces(stack, 0.05, 0.25)
    assert cleaned is stack and boxes.tolist() == [[0, 2, 3, 7, 5]]


@given(
    seed=st.integers(0, 2**32 - 1),
    size=st.tuples(st.integers(3, 60), st.integers(3, 60)),
    out=st.tuples(st.integers(1, 30), st.integers(1, 30)),
    corners=st.tuples(*[st.floats(0, 1)] * 4),
)
@settings(max_examples=150, deadline=None)
def test_lanczos_resize_is_pillows_lanczos_for_float_pictures(seed, size, out, corners):
    height, width = size
    image = pictures(np.random.default_rng(seed), 1, height, width, 0.5)[0]
    left, right = sorted((corners[0] * width, corners[1] * width))
    top, bottom = sorted((corners[2] * height, corners[3] * height))
    if right - left < 0.5 or bottom - top < 0.5:
        return
    box = (left, top, right, bottom)
    expected = np.asarray(Image.fromarray(image).resize(out, Image.Resampling.LANCZOS, box=box))
    np.testing.assert_allclose(pixel_loops.lanczos_resize(image, *out, *box), expected, rtol=0, atol=3e-7)


def test_lanczos_resize_copies_whole_pixels_at_their_own_size():
    image = pictures(np.random.default_rng(1), 1, 9, 7)[0]
    np.testing.assert_array_equal(pixel_loops.lanczos_resize(image, 4, 5, 2.0, 3.0, 6.0, 8.0), image[3:8, 2:6])


@pytest.mark.parametrize("percents", [(0.5, 99.5), (0.0, 100.0), (3.0, 97.0, 50.0)])
@pytest.mark.parametrize("shape", [(4, 4096), (3, 1), (2, 2), (5, 37)])
def test_percentiles_are_numpys(percents, shape):
    rng = np.random.default_rng(5)
    rows = np.round(rng.random(shape, dtype=np.float32) * 20) / 20  # many ties, as a picture's pixels have
    found = pixel_loops.percentiles(rows, np.asarray(percents))
    np.testing.assert_array_equal(found, np.percentile(rows, percents, axis=1))


def test_percentiles_of_rows_in_descending_order():
    rows = np.sort(np.random.default_rng(6).random((2, 500)))[:, ::-1].copy()  # every value a new smallest
    np.testing.assert_array_equal(pixel_loops.percentiles(rows, np.array([0.5, 99.5])),
                                  np.percentile(rows, [0.5, 99.5], axis=1))  # fmt: skip


@given(seed=st.integers(0, 2**32 - 1), height=st.integers(1, 15), width=st.integers(1, 15), ink=st.floats(0, 0.3))
@settings(max_examples=60, deadline=None)
def test_ink_boxes_bound_the_pixels_above_zero(seed, height, width, ink):
    stack = pictures(np.random.default_rng(seed), 3, height, width, ink)
    boxes, inked = pixel_loops.ink_boxes(stack)
    for picture, box, has_ink in zip(stack, boxes.tolist(), inked):
        rows, cols = np.nonzero(picture)
        assert has_ink == bool(rows.size)
        if rows.size:
            assert box == [rows.min(), cols.min(), rows.max() + 1, cols.max() + 1]


def test_unsharp_is_the_matrix_formula_inside_the_box():
    rng = np.random.default_rng(7)
    picture = np.zeros((30, 40), np.float32)
    picture[5:25, 8:30] = rng.random((20, 22), dtype=np.float32)
    distance = np.subtract.outer(np.arange(30.0), np.arange(30.0))
    down = np.exp(-(distance[:20, :20] ** 2) / 8).astype(np.float32) / 5
    across = np.exp(-(distance[:22, :22] ** 2) / 8).astype(np.float32) / 5
    box = picture[5:25, 8:30].copy()
    expected = np.clip(box + 1.5 * (box - down @ box @ across), 0, 1)
    expected[expected < 0.05] = 0
    pixel_loops.unsharp(picture, 5, 8, 25, 30, down, across, 1.5, 0.05)
    np.testing.assert_allclose(picture[5:25, 8:30], expected, atol=1e-6)
    assert not picture[:5].any() and not picture[:, :8].any() and not picture[25:].any() and not picture[:, 30:].any()


def test_keep_near_strokes_keeps_the_rim_of_strokes_only():
    stretched = np.zeros((1, 7, 7), np.float32)
    stretched[0, 3, 3] = 0.9  # a stroke
    stretched[0, 2, 2] = stretched[0, 4, 3] = 0.06  # faint, touching it
    stretched[0, 3, 5] = 0.06  # faint, two pixels away
    stretched[0, 2, 4] = 0.01  # fainter than half the cut
    kept = pixel_loops.keep_near_strokes(stretched, np.array([0.1]), np.array([False]), np.array([False]))
    assert sorted(zip(*np.nonzero(kept[0]))) == [(2, 2), (3, 3), (4, 3)]
    faint_too = pixel_loops.keep_near_strokes(stretched, np.array([0.1]), np.array([True]), np.array([False]))
    assert sorted(zip(*np.nonzero(faint_too[0]))) == [(2, 2), (2, 4), (3, 3), (4, 3)]
    blank = pixel_loops.keep_near_strokes(stretched, np.array([0.1]), np.array([True]), np.array([True]))
    assert not blank.any()


def test_zero_differences_count_equal_horizontal_neighbours():
    stack = np.array([[[0, 0, 1], [2, 2, 2]], [[0, 1, 2], [3, 4, 5]]], np.float32)
    assert pixel_loops.zero_differences(stack).tolist() == [3, 0]


def test_inked_per_line_counts_the_pixels_above_zero_of_each_row_and_column():
    stack = pictures(np.random.default_rng(8), 3, 6, 9)
    rows, cols = pixel_loops.inked_per_line(stack)
    np.testing.assert_array_equal(rows, (stack > 0).sum(axis=2))
    np.testing.assert_array_equal(cols, (stack > 0).sum(axis=1))
