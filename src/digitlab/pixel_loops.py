"""Compiled loops over pixels for `digitlab.preprocess`: the steps that numpy does in many passes.

The functions take float32 pictures (one H×W, or a C-contiguous stack N×H×W)
and are compiled by numba on their first call, then cached on disk, so that
later processes load them in a fraction of a second. They let go of Python's
lock while they run, so the service's preprocessing threads and its event loop
run side by side. A service's pictures are small: numpy spent more on its
per-call cost and temporaries than on arithmetic, where one compiled pass over
the pixels costs a fraction (`benchmarks/load.py --breakdown`).
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit


@njit(cache=True, nogil=True)
def denoise(stack: np.ndarray, jump: float) -> np.ndarray:
    """`digitlab.preprocess.denoise` of each picture: an isolated speck takes the mean of its eight neighbours
    (the stack itself comes back when it has none).

    A pixel is a speck when its eight neighbours lie within `jump` of each
    other and it lies more than `jump` above or below all of them; outside
    neighbours mirror inside ones (numpy's "reflect" padding).
    """
    count, height, width = stack.shape
    step = np.float32(jump)  # numpy compares a float32 picture with a Python number in float32
    cleaned = stack  # copied at the first speck
    padded = np.empty((height + 2, width + 2), np.float32)
    specks = np.empty(width, np.bool_)
    for picture in range(count):
        _pad_reflecting(stack[picture], padded)
        for row in range(height):
            above, middle, below = padded[row], padded[row + 1], padded[row + 2]
            for col in range(width):  # branch-free, so that it runs on vectors
                highest = max(max(max(above[col], above[col + 1]), max(above[col + 2], middle[col])),
                              max(max(middle[col + 2], below[col]), max(below[col + 1], below[col + 2])))
                lowest = min(min(min(above[col], above[col + 1]), min(above[col + 2], middle[col])),
                             min(min(middle[col + 2], below[col]), min(below[col + 1], below[col + 2])))
                value = middle[col + 1]
                specks[col] = (highest - lowest < step) & ((value > highest + step) | (value < lowest - step))
            for col in range(width if _count(specks) else 0):
                if not specks[col]:
                    continue
                total = above[col] + above[col + 1] + above[col + 2] + middle[col] + middle[col + 2]
                total = total + below[col] + below[col + 1] + below[col + 2]  # numpy's order of additions
                if cleaned is stack:
                    cleaned = _copy(stack)
                cleaned[picture, row, col] = total / np.float32(8)
    return cleaned


@njit(cache=True, nogil=True)
def _copy(stack: np.ndarray) -> np.ndarray:
    copied = np.empty(stack.shape, np.float32)
    for picture in range(stack.shape[0]):
        for row in range(stack.shape[1]):
            for col in range(stack.shape[2]):
                copied[picture, row, col] = stack[picture, row, col]
    return copied


@njit(cache=True, nogil=True)
def _pad_reflecting(picture: np.ndarray, padded: np.ndarray) -> None:
    """`picture` with a one-pixel border that mirrors the pixels inside (numpy's "reflect" padding) into `padded`."""
    height, width = picture.shape
    for row in range(height + 2):
        source = picture[min(abs(row - 1), 2 * height - 1 - row)]  # rows -1 and height mirror rows 1 and height-2
        line = padded[row]
        for col in range(width):
            line[col + 1] = source[col]
        line[0], line[width + 1] = source[1], source[width - 2]


@njit(cache=True, nogil=True)
def specks_and_pieces(
    stack: np.ndarray, speck_fraction: float, piece_fraction: float
) -> tuple[np.ndarray, np.ndarray]:
    """The stack without its specks (the stack itself when it has none), and the boxes of its large pieces.

    Pieces are the 8-connected groups of pixels above zero, numbered in raster
    order of their first pixel; a piece's mass is the sum of its pixels (float64,
    in raster order). A speck is a piece lighter than `speck_fraction` of its
    picture's heaviest; a large piece has at least `piece_fraction` of it. Boxes
    come as rows of (picture, top, left, bottom, right), bottom and right exclusive.
    """
    count, height, width = stack.shape
    cleaned = stack
    labels = np.zeros((height, width), np.int64)
    parents = np.empty(height * ((width + 1) // 2) + 1, np.int64)  # at most one new piece in two pixels a row
    found = []
    for picture in range(count):
        image = stack[picture]
        pieces, final = _label(image, labels, parents)
        if pieces == 0:
            continue
        masses = np.zeros(pieces + 1)
        extents = np.zeros((pieces + 1, 4), np.int64)
        for label in range(pieces + 1):
            extents[label, 0], extents[label, 1] = height, width
        for row in range(height):
            for col in range(width):
                label = final[labels[row, col]]
                if label > 0:
                    masses[label] += image[row, col]
                    extents[label, 0] = min(extents[label, 0], row)
                    extents[label, 1] = min(extents[label, 1], col)
                    extents[label, 2] = max(extents[label, 2], row + 1)
                    extents[label, 3] = max(extents[label, 3], col + 1)
        heaviest = masses.max()
        specks = masses < speck_fraction * heaviest
        specks[0] = False  # the background
        if specks.any():
            if cleaned is stack:
                cleaned = _copy(stack)
            for row in range(height):
                for col in range(width):
                    if specks[final[labels[row, col]]]:
                        cleaned[picture, row, col] = 0.0
        for label in range(1, pieces + 1):
            if masses[label] >= piece_fraction * heaviest:
                found.append((picture, extents[label, 0], extents[label, 1], extents[label, 2], extents[label, 3]))
    boxes = np.empty((len(found), 5), np.int64)
    for index, box in enumerate(found):
        for side in range(5):
            boxes[index, side] = box[side]
    return cleaned, boxes


@njit(cache=True, nogil=True)
def _label(image: np.ndarray, labels: np.ndarray, parents: np.ndarray) -> tuple[int, np.ndarray]:
    """Label the 8-connected pieces of the pixels above zero: returns how many there are and the map from the
    provisional labels left in `labels` (0 for background) to pieces 1, 2, ... in raster order of their first
    pixel. `parents` is scratch space for the union-find."""
    height, width = image.shape
    provisional = 0
    for row in range(height):
        line = image[row]
        if not _any_above_zero(line):
            labels[row] = 0
            continue
        for col in range(width):
            if not line[col] > 0:
                labels[row, col] = 0
                continue
            label = 0
            for d_row, d_col in ((0, -1), (-1, -1), (-1, 0), (-1, 1)):  # the neighbours already visited
                r, c = row + d_row, col + d_col
                if 0 <= r and 0 <= c < width and labels[r, c] > 0:
                    other = _root(parents, labels[r, c])
                    if label == 0:
                        label = other
                    elif other != label:
                        low, high = min(label, other), max(label, other)
                        parents[high] = low
                        label = low
            if label == 0:
                provisional += 1
                parents[provisional] = provisional
                label = provisional
            labels[row, col] = label
    final = np.zeros(provisional + 1, np.int64)
    pieces = 0
    for label in range(1, provisional + 1):  # roots are numbered before the labels joined to them
        root = _root(parents, label)
        if root == label:
            pieces += 1
            final[label] = pieces
        else:
            final[label] = final[root]
    return pieces, final


@njit(cache=True, nogil=True, inline="always")
def _root(parents: np.ndarray, label: int) -> int:
    while parents[label] != label:
        parents[label] = parents[parents[label]]
        label = parents[label]
    return label


@njit(cache=True, nogil=True)
def lanczos_resize(
    image: np.ndarray, width: int, height: int, left: float, top: float, right: float, bottom: float
) -> np.ndarray:
    """The region (left, top, right, bottom) of a float32 picture scaled to width × height by Lanczos-3.

    Pillow's convolution for 32-bit float pictures (`Image.resize(..., LANCZOS, box=...)`): the filter
    widened by the scale factor when shrinking, weights normalised to sum 1 within the picture, rows first,
    sums in float64, and float32 in between; a region of whole pixels at its own size is copied as it is.
    """
    left, top, right, bottom = np.float32(left), np.float32(top), np.float32(right), np.float32(bottom)
    if left == int(left) and top == int(top) and right - left == width and bottom - top == height:
        return _shifted_copy(image, -int(top), -int(left), height, width)  # whole pixels at their size: a crop
    source_height, source_width = image.shape
    row_weights, row_spans = _lanczos_weights(source_width, left, right, width)
    col_weights, col_spans = _lanczos_weights(source_height, top, bottom, height)
    first = col_spans[0, 0]
    last = col_spans[height - 1, 0] + col_spans[height - 1, 1]
    # Each pass sums along the first axis of a contiguous array, so one sum's steps run across many sums at once
    across = _weighted_sums(_transposed(image, first, last), row_weights, row_spans, 0)  # width × the rows read
    return _weighted_sums(_transposed(across, 0, len(across)), col_weights, col_spans, first)


@njit(cache=True, nogil=True)
def _transposed(image: np.ndarray, first: int, last: int) -> np.ndarray:
    """Rows `first` to `last` of an image, transposed, as a new C-contiguous array."""
    transposed = np.empty((image.shape[1], last - first), image.dtype)
    for row in range(first, last):
        for col in range(image.shape[1]):
            transposed[col, row - first] = image[row, col]
    return transposed


@njit(cache=True, nogil=True)
def _weighted_sums(lines: np.ndarray, weights: np.ndarray, spans: np.ndarray, first: int) -> np.ndarray:
    """For each output: the sum of `lines` (L×M, line 0 being line `first` of the spans) from its span's start,
    weighted by its weights (float64 sums, each in the order of its weights), as an outputs × M float32 array."""
    sums = np.empty((len(spans), lines.shape[1]), np.float32)
    total = np.empty(lines.shape[1])
    for out in range(len(spans)):
        start = spans[out, 0] - first
        for position in range(len(total)):
            total[position] = 0.0
        for k in range(spans[out, 1]):
            weight = weights[out, k]
            line = lines[start + k]
            for position in range(len(total)):
                total[position] += line[position] * weight
        for position in range(len(total)):
            sums[out, position] = total[position]
    return sums


@njit(cache=True, nogil=True)
def _lanczos_weights(size: int, start: float, stop: float, out_size: int) -> tuple[np.ndarray, np.ndarray]:
    """For each output sample: the weights of the input samples it reads, and where they start and how many.

    An output's taps lie at equal steps, so the sines of the Lanczos kernel,
    sin(πx)·sin(πx/3) / (πx·πx/3), are stepped along by rotation: four sines and cosines an output sample
    instead of two sines a tap (Pillow's way, which cost most of the scaling's time).
    """
    scale = np.float64(np.float32(stop) - np.float32(start)) / out_size  # Pillow takes the box in float32
    stretch = max(scale, 1.0)
    support = 3.0 * stretch
    step = 1.0 / stretch
    turn_sin, turn_cos = math.sin(math.pi * step), math.cos(math.pi * step)
    third_sin, third_cos = math.sin(math.pi * step / 3.0), math.cos(math.pi * step / 3.0)
    weights = np.zeros((out_size, int(math.ceil(support)) * 2 + 1))
    spans = np.zeros((out_size, 2), np.int64)
    for out in range(out_size):
        center = np.float64(np.float32(start)) + (out + 0.5) * scale
        first = max(int(center - support + 0.5), 0)
        count = min(int(center + support + 0.5), size) - first
        x = (first - center + 0.5) * step
        sine, cosine = math.sin(math.pi * x), math.cos(math.pi * x)
        sine3, cosine3 = math.sin(math.pi * x / 3.0), math.cos(math.pi * x / 3.0)
        total = 0.0
        for k in range(count):
            x = (k + first - center + 0.5) * step
            if -3.0 <= x < 3.0:
                weight = 1.0 if abs(x) < 1e-6 else 3.0 * sine * sine3 / (math.pi * x) ** 2
                weights[out, k] = weight
                total += weight
            sine, cosine = sine * turn_cos + cosine * turn_sin, cosine * turn_cos - sine * turn_sin
            sine3, cosine3 = sine3 * third_cos + cosine3 * third_sin, cosine3 * third_cos - sine3 * third_sin
        if total != 0.0:
            for k in range(count):
                weights[out, k] /= total
        spans[out, 0], spans[out, 1] = first, count
    return weights, spans


@njit(cache=True, nogil=True)
def percentiles(rows: np.ndarray, percents: np.ndarray) -> np.ndarray:
    """`np.percentile(rows, percents, axis=1)` (its "linear" method, the same float64 values) for percents near 0
    and 100, as percents × N: the few ranks they read are found in one pass over a row, where `np.partition`
    orders the whole row around them."""
    count, size = rows.shape
    position = (size - 1) * (percents / 100)  # numpy's index for its "linear" method
    below = np.minimum(np.maximum(np.floor(position), 0), size - 1).astype(np.int64)
    above = np.minimum(below + 1, size - 1)
    lowest = highest = 0
    for rank in np.concatenate((below, above)):
        if rank < size / 2:
            lowest = max(lowest, rank + 1)
        else:
            highest = max(highest, size - rank)
    smallest, largest = np.empty(lowest, rows.dtype), np.empty(highest, rows.dtype)
    result = np.empty((len(percents), count))
    for row in range(count):
        _smallest(rows[row], smallest)
        _largest(rows[row], largest)
        for index in range(len(percents)):
            low = smallest[below[index]] if below[index] < lowest else largest[below[index] - size + highest]
            high = smallest[above[index]] if above[index] < lowest else largest[above[index] - size + highest]
            step, gamma = high - low, position[index] - below[index]  # step in the rows' dtype, as numpy's
            result[index, row] = high - step * (1 - gamma) if gamma >= 0.5 else low + step * gamma
    return result


@njit(cache=True, nogil=True)
def _smallest(values: np.ndarray, kept: np.ndarray) -> None:
    """The len(kept) smallest of `values`, ascending, into `kept`: a sorted buffer most values pass by."""
    size = len(kept)
    for index in range(len(values) if size else 0):
        value = values[index]
        if index >= size and not value < kept[size - 1]:
            continue
        position = min(index, size - 1)  # the buffer fills from its start
        while position > 0 and kept[position - 1] > value:
            kept[position] = kept[position - 1]
            position -= 1
        kept[position] = value


@njit(cache=True, nogil=True)
def _largest(values: np.ndarray, kept: np.ndarray) -> None:
    """The len(kept) largest of `values`, ascending, into `kept`."""
    size = len(kept)
    for index in range(len(values) if size else 0):
        value = values[index]
        if index >= size and not value > kept[0]:
            continue
        position = max(size - 1 - index, 0)  # the buffer fills from its end
        while position < size - 1 and kept[position + 1] < value:
            kept[position] = kept[position + 1]
            position += 1
        kept[position] = value


@njit(cache=True, nogil=True)
def ink_boxes(stack: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The bounding box (top, left, bottom, right; bottom and right exclusive) of each picture's pixels above
    zero, N×4 (zeros where there are none), and which pictures have any."""
    count, height, width = stack.shape
    boxes = np.zeros((count, 4), np.int64)
    inked = np.zeros(count, np.bool_)
    for picture in range(count):
        top, left, bottom, right = height, width, 0, 0
        for row in range(height):
            line = stack[picture, row]
            if not _any_above_zero(line):
                continue
            top, bottom = min(top, row), row + 1
            first, last = 0, width - 1
            while not line[first] > 0:
                first += 1
            while not line[last] > 0:
                last -= 1
            left, right = min(left, first), max(right, last + 1)
        if bottom > 0:
            boxes[picture, 0], boxes[picture, 1], boxes[picture, 2], boxes[picture, 3] = top, left, bottom, right
            inked[picture] = True
    return boxes, inked


@njit(cache=True, nogil=True, inline="always")
def _count(flags: np.ndarray) -> int:
    total = 0
    for flag in flags:
        total += flag
    return total


@njit(cache=True, nogil=True, inline="always")
def _any_above_zero(line: np.ndarray) -> bool:
    above = 0
    for value in line:  # a count, not an early exit, so that it runs on vectors
        above += value > 0
    return above > 0


@njit(cache=True, nogil=True)
def stretch(ink: np.ndarray, background: np.ndarray, min_contrast: float) -> tuple[np.ndarray, np.ndarray]:
    """Each picture's pixels from its `background` level (0) to its brightest (1), clipped to [0, 1] (float32,
    as numpy computes it), and which pictures are blank: brightest less than `min_contrast` above the background
    (those are only shifted)."""
    count = ink.shape[0]
    stretched = np.empty(ink.shape, np.float32)
    blank = np.zeros(count, np.bool_)
    for picture in range(count):
        image = ink[picture]
        peak = image[0, 0]
        for row in range(image.shape[0]):
            for col in range(image.shape[1]):
                peak = max(peak, image[row, col])
        contrast = np.float64(peak) - background[picture]
        blank[picture] = contrast < min_contrast
        level = np.float32(background[picture])
        scale = np.float32(1.0 if blank[picture] else contrast)
        for row in range(image.shape[0]):
            for col in range(image.shape[1]):
                value = (image[row, col] - level) / scale
                stretched[picture, row, col] = min(max(value, np.float32(0.0)), np.float32(1.0))
    return stretched, blank


@njit(cache=True, nogil=True)
def keep_near_strokes(stretched: np.ndarray, cut: np.ndarray, faint_too: np.ndarray, blank: np.ndarray) -> np.ndarray:
    """Each picture's pixels that lie within one pixel (8 neighbours) of one at or above its `cut`, and are at
    least half the cut (any level where `faint_too`); the rest, and blank pictures, 0."""
    count, height, width = stretched.shape
    kept = np.zeros(stretched.shape, np.float32)
    strong = np.zeros((height + 2, width), np.bool_)  # a row of False above and below
    across = np.zeros((height + 2, width), np.bool_)
    for picture in range(count):
        if blank[picture]:
            continue
        level, half = np.float32(cut[picture]), np.float32(cut[picture] / 2)
        image = stretched[picture]
        for row in range(height):
            for col in range(width):
                strong[row + 1, col] = image[row, col] >= level
        for row in range(1, height + 1):
            line, wide = strong[row], across[row]
            wide[0] = line[0] | line[min(1, width - 1)]
            for col in range(1, width - 1):
                wide[col] = line[col - 1] | line[col] | line[col + 1]
            wide[width - 1] = line[width - 1] | line[max(width - 2, 0)]
        for row in range(height):
            for col in range(width):
                near = across[row, col] | across[row + 1, col] | across[row + 2, col]
                value = image[row, col]
                if near and (faint_too[picture] or value >= half):
                    kept[picture, row, col] = value
    return kept


@njit(cache=True, nogil=True)
def inked_per_line(stack: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """How many pixels above zero each row (N×H) and each column (N×W) of each picture has."""
    count, height, width = stack.shape
    rows = np.zeros((count, height), np.int64)
    cols = np.zeros((count, width), np.int64)
    for picture in range(count):
        for row in range(height):
            line, total = stack[picture, row], 0
            for col in range(width):
                above = line[col] > 0
                total += above
                cols[picture, col] += above
            rows[picture, row] = total
    return rows, cols


@njit(cache=True, nogil=True)
def zero_differences(stack: np.ndarray) -> np.ndarray:
    """How many horizontal neighbours are exactly equal, in each picture."""
    count, height, width = stack.shape
    zeros = np.zeros(count, np.int64)
    for picture in range(count):
        equal = 0
        for row in range(height):
            line = stack[picture, row]
            for col in range(width - 1):
                equal += line[col + 1] - line[col] == 0
        zeros[picture] = equal
    return zeros


@njit(cache=True, nogil=True)
def unsharp(
    picture: np.ndarray, top: int, left: int, bottom: int, right: int, down: np.ndarray, across: np.ndarray,
    amount: float, floor: float,
) -> None:
    """Unsharp masking of a picture's box, in place: box + amount × (box − blur), clipped to [0, 1], and values
    under `floor` to 0. The blur is down @ box @ across (Gaussian matrices; BLAS in float32, as numpy's)."""
    box = picture[top:bottom, left:right]
    blurred = down @ (np.ascontiguousarray(box) @ across)
    strength, low = np.float32(amount), np.float32(floor)
    for row in range(box.shape[0]):
        for col in range(box.shape[1]):
            value = box[row, col] + strength * (box[row, col] - blurred[row, col])
            value = min(max(value, np.float32(0.0)), np.float32(1.0))
            box[row, col] = value if value >= low else 0.0


@njit(cache=True, nogil=True)
def crop(ink: np.ndarray, top: int, left: int, bottom: int, right: int, margin: float) -> tuple[np.ndarray, int]:
    """The box of `ink` with `margin` × its longer side (plus one pixel) of zeros around it, and that width."""
    pad = math.ceil(margin * max(bottom - top, right - left)) + 1
    inside = ink[top:bottom, left:right]
    return _shifted_copy(inside, pad, pad, bottom - top + 2 * pad, right - left + 2 * pad), pad


@njit(cache=True, nogil=True)
def fit(ink: np.ndarray, top: int, left: int, bottom: int, right: int, box: int, pad: int) -> np.ndarray:
    """The ink's box scaled (Lanczos-3) so that its longer side is `box` pixels, `pad` pixels of zeros around
    it, clipped to [0, 1]: the source region is widened to the output's size, centred on the box."""
    height, width = bottom - top, right - left
    scale = box / max(height, width)
    out_height = math.ceil(height * scale - 1e-6) + 2 * pad
    out_width = math.ceil(width * scale - 1e-6) + 2 * pad
    source_height, source_width = out_height / scale, out_width / scale
    source_top, source_left = (top + bottom - source_height) / 2, (left + right - source_width) / 2
    beyond = max(0.0, -source_top, -source_left, source_top + source_height - ink.shape[0],
                 source_left + source_width - ink.shape[1])  # fmt: skip
    margin = math.ceil(beyond) + 1  # the region, inside the zeros around the ink
    padded = _shifted_copy(ink, margin, margin, ink.shape[0] + 2 * margin, ink.shape[1] + 2 * margin)
    scaled = lanczos_resize(padded, out_width, out_height, source_left + margin, source_top + margin,
                            source_left + margin + source_width, source_top + margin + source_height)  # fmt: skip
    for row in range(scaled.shape[0]):
        for col in range(scaled.shape[1]):
            scaled[row, col] = min(max(scaled[row, col], np.float32(0.0)), np.float32(1.0))
    return scaled


@njit(cache=True, nogil=True)
def center_of_mass(image: np.ndarray) -> tuple[float, float, float]:
    """The intensity-weighted mean row and column of an image's pixels, and their total (sums in float64)."""
    total = row_moment = col_moment = 0.0
    for row in range(image.shape[0]):
        for col in range(image.shape[1]):
            value = np.float64(image[row, col])
            total += value
            row_moment += row * value
            col_moment += col * value
    if total <= 0:
        return 0.0, 0.0, total
    return row_moment / total, col_moment / total, total


@njit(cache=True, nogil=True)
def center_by_mass(image: np.ndarray, size: int) -> tuple[np.ndarray, bool]:
    """The image pasted into a size×size field of zeros, shifted by whole pixels so that its centre of mass
    lands at (size/2, size/2) (half-way cases to even), and whether it had any mass."""
    com_row, com_col, total = center_of_mass(image)
    if total <= 0:
        return np.zeros((size, size), np.float32), False
    shift_row, shift_col = int(np.rint(size / 2 - com_row)), int(np.rint(size / 2 - com_col))
    return _shifted_copy(image, shift_row, shift_col, size, size), True


@njit(cache=True, nogil=True)
def _shifted_copy(image: np.ndarray, down: int, right: int, height: int, width: int) -> np.ndarray:
    """A height × width float32 array of zeros with `image` pasted `down` rows and `right` columns from its
    corner (negative: from above or left of it); what falls outside is cut off."""
    pasted = np.zeros((height, width), np.float32)
    for row in range(max(0, down), min(height, down + image.shape[0])):
        for col in range(max(0, right), min(width, right + image.shape[1])):
            pasted[row, col] = image[row - down, col - right]
    return pasted


@njit(cache=True, nogil=True)
def digit_fields(
    stack: np.ndarray, boxes: np.ndarray, chosen: np.ndarray, margin: float, box: int, pad: int, size: int
) -> tuple[np.ndarray, np.ndarray]:
    """`crop`, `fit` and `center_by_mass` for each chosen picture of a stack, given its ink's box: the N fields,
    and which were placed (chosen, with mass left after scaling)."""
    fields = np.zeros((len(stack), size, size), np.float32)
    placed = np.zeros(len(stack), np.bool_)
    for picture in range(len(stack)):
        if not chosen[picture]:
            continue
        top, left, bottom, right = boxes[picture, 0], boxes[picture, 1], boxes[picture, 2], boxes[picture, 3]
        cropped, around = crop(stack[picture], top, left, bottom, right, margin)
        scaled = fit(cropped, around, around, around + bottom - top, around + right - left, box, pad)
        field, placed[picture] = center_by_mass(scaled, size)
        for row in range(size):
            for col in range(size):
                fields[picture, row, col] = field[row, col]
    return fields, placed
