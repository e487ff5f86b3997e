"""MNIST and Fashion-MNIST: find, download, verify, load and describe them.

``load_mnist()`` is a drop-in for ``keras.datasets.mnist.load_data()``. It reads
the four canonical IDX files (gzipped or not) or Keras' ``mnist.npz`` from the
first place that has them: the ``data_dir`` argument, ``$DIGITLAB_DATA_DIR`` (either
one directly or in torchvision's ``MNIST/raw/`` layout below it), the per-user cache,
Debian's ``/usr/share/datasets/<dataset>``, Keras' ``~/.keras/datasets``; failing those
it downloads the files into the cache, checking each against its published SHA-256.
A copy in torchvision's or Keras' layout is checked against the published data
each time it is read: these are other programs' files.

Two digests are kept per file: the SHA-256 of the ``.gz`` the mirrors serve
(checked while downloading) and the SHA-256 of the decompressed IDX content
(checked by ``verify_dataset``), so a copy that was recompressed (as Debian's
Fashion-MNIST was), decompressed, or converted to ``.npz`` still verifies.
"""

from __future__ import annotations

import gzip
import hashlib
import http.client
import math
import os
import socket
import struct
import tempfile
import urllib.error
import urllib.request
import zipfile
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from digitlab.errors import DigitlabError

DATA_DIR_ENV = "DIGITLAB_DATA_DIR"
MIRRORS_ENV = "DIGITLAB_MIRRORS"
SYSTEM_DATASETS_DIR = Path("/usr/share/datasets")
IMAGE_SHAPE = (28, 28)

# Keras' array names, in load order, and the IDX file that holds each array.
ARRAY_FILES = {
    "x_train": "train-images-idx3-ubyte",
    "y_train": "train-labels-idx1-ubyte",
    "x_test": "t10k-images-idx3-ubyte",
    "y_test": "t10k-labels-idx1-ubyte",
}
OFFLINE_HINT = (
    "to work offline, put the four files ({files}) in a directory and set "
    f"{DATA_DIR_ENV}=/path/to/dir or pass --data-dir /path/to/dir"
)


@dataclass(frozen=True)
class DatasetSpec:
    """Where a dataset is published and how to recognise its files."""

    name: str
    mirrors: tuple[str, ...]
    gz_sha256: Mapping[str, str]  # file name -> SHA-256 of the .gz the mirrors serve
    content_sha256: Mapping[str, str]  # array name -> SHA-256 of the decompressed IDX file
    class_names: tuple[str, ...]
    npz_name: str
    torchvision_name: str  # torchvision keeps the four files in <root>/<this>/raw/
    keras_subdir: str  # Keras keeps them in ~/.keras/datasets/<this>
    npz_sha256: str | None = None  # the SHA-256 of the npz file Keras downloads

    def file_names(self) -> list[str]:
        """The four canonical ``.gz`` file names."""
        return [f"{stem}.gz" for stem in ARRAY_FILES.values()]


DATASETS: dict[str, DatasetSpec] = {
    spec.name: spec
    for spec in (
        DatasetSpec(
            name="mnist",
            mirrors=(
                "https://ossci-datasets.s3.amazonaws.com/mnist/",
                "https://storage.googleapis.com/cvdf-datasets/mnist/",
                "http://yann.lecun.com/exdb/mnist/",
            ),
            gz_sha256={
                "train-images-idx3-ubyte.gz": "440fcabf73cc546fa21475e81ea370265605f56be210a4024d2ca8f203523609",
                "train-labels-idx1-ubyte.gz": "3552534a0a558bbed6aed32b30c495cca23d567ec52cac8be1a0730e8010255c",
                "t10k-images-idx3-ubyte.gz": "8d422c7b0a1c1c79245a5bcf07fe86e33eeafee792b84584aec276f5a2dbc4e6",
                "t10k-labels-idx1-ubyte.gz": "f7ae60f92e00ec6debd23a6088c31dbd2371eca3ffa0defaefb259924204aec6",
            },
            content_sha256={
                "x_train": "ba891046e6505d7aadcbbe25680a0738ad16aec93bde7f9b65e87a2fc25776db",
                "y_train": "65a50cbbf4e906d70832878ad85ccda5333a97f0f4c3dd2ef09a8a9eef7101c5",
                "x_test": "0fa7898d509279e482958e8ce81c8e77db3f2f8254e26661ceb7762c4d494ce7",
                "y_test": "ff7bcfd416de33731a308c3f266cc351222c34898ecbeaf847f06e48f7ec33f2",
            },
            class_names=tuple(str(digit) for digit in range(10)),
            npz_name="mnist.npz",
            torchvision_name="MNIST",
            keras_subdir="",
            # keras/src/datasets/mnist.py, file_hash of tf-keras-datasets/mnist.npz
            npz_sha256="731c5ac602752760c8e48fbffcf8c3b850d9dc2a2aedcf2cc48468fc17b673d1",
        ),
        DatasetSpec(
            name="fashion-mnist",
            mirrors=(
                "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",
                "https://storage.googleapis.com/tensorflow/tf-keras-datasets/",
            ),
            # The mirrors' files as published in TensorFlow Datasets' checksum table; Debian's
            # package recompressed them, so only their decompressed content matches ours.
            gz_sha256={
                "train-images-idx3-ubyte.gz": "3aede38d61863908ad78613f6a32ed271626dd12800ba2636569512369268a84",
                "train-labels-idx1-ubyte.gz": "a04f17134ac03560a47e3764e11b92fc97de4d1bfaf8ba1a3aa29af54cc90845",
                "t10k-images-idx3-ubyte.gz": "346e55b948d973a97e58d2351dde16a484bd415d4595297633bb08f03db6a073",
                "t10k-labels-idx1-ubyte.gz": "67da17c76eaffca5446c3361aaab5c3cd6d1c2608764d35dfb1850b086bf8dd5",
            },
            content_sha256={
                "x_train": "c59f468a2f672dc815687fe0f83887768d799fd8a3f3276145d20f83aa44d888",
                "y_train": "bad3541b69d912435c50bb6ba87bec294ff4f6a2e1246121d8633921760443d9",
                "x_test": "5b4141f0afbad91edebe8549f8fcffe087ea10ca49f1dbef5c9a5cd8815ce37b",
                "y_test": "0402a96d92fd2663957122ceb108a494c5af83dab82d92729df917d7dec38c34",
            },
            class_names=(
                "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
            ),
            npz_name="fashion-mnist.npz",
            torchvision_name="FashionMNIST",
            keras_subdir="fashion-mnist",
        ),
    )
}

Arrays = dict[str, np.ndarray]
Split = tuple[np.ndarray, np.ndarray]


def dataset_spec(dataset: str) -> DatasetSpec:
    """The registry entry of ``dataset``; a DigitlabError names the known ones."""
    try:
        return DATASETS[dataset]
    except KeyError:
        raise DigitlabError(
            f"unknown dataset {dataset!r}; choose one of: {', '.join(DATASETS)}"
        ) from None


def class_names(dataset: str = "mnist") -> list[str]:
    """The names of the ten classes, indexed by label."""
    return list(dataset_spec(dataset).class_names)


def cache_dir(dataset: str = "mnist") -> Path:
    """The per-user cache directory: ``$XDG_CACHE_HOME/digitlab/<dataset>`` (default ``~/.cache``)."""
    xdg_cache = os.environ.get("XDG_CACHE_HOME", "")
    root = Path(xdg_cache) if os.path.isabs(xdg_cache) else Path.home() / ".cache"
    return root / "digitlab" / dataset_spec(dataset).name


def keras_dir(dataset: str = "mnist") -> Path:
    """Where Keras keeps ``dataset``: ``$KERAS_HOME/datasets`` (default ``~/.keras/datasets``)."""
    root = Path(os.environ.get("KERAS_HOME") or Path.home() / ".keras")
    return root / "datasets" / dataset_spec(dataset).keras_subdir


# --- IDX and npz decoding ------------------------------------------------------------------


def decode_idx(data: bytes, ndim: int, source: str = "IDX data") -> np.ndarray:
    """Decode an IDX file of unsigned bytes with ``ndim`` dimensions into a writeable array.

    Checks the magic number (0x00000801 for labels, 0x00000803 for images), the
    dimensions and that the length is exactly header plus data.
    """
    kind = "labels" if ndim == 1 else "images" if ndim == 3 else f"{ndim}-d"
    expected_magic = 0x0800 | ndim
    header_size = 4 * (1 + ndim)
    if len(data) < header_size:
        raise DigitlabError(
            f"{source} is truncated: {len(data)} bytes, shorter than an IDX {kind} header ({header_size} bytes)"
        )
    magic = int.from_bytes(data[:4], "big")
    if magic != expected_magic:
        raise DigitlabError(
            f"{source} has the wrong IDX magic number 0x{magic:08x}; IDX {kind} files start with "
            f"0x{expected_magic:08x}"
        )
    shape = struct.unpack(f">{ndim}I", data[4:header_size])
    expected_size = header_size + math.prod(shape)
    if len(data) != expected_size:
        problem = "is truncated" if len(data) < expected_size else "has trailing bytes"
        raise DigitlabError(
            f"{source} {problem}: {len(data)} bytes, but its header announces "
            f"{'x'.join(map(str, shape))} {kind} ({expected_size} bytes)"
        )
    return np.frombuffer(data, dtype=np.uint8, offset=header_size).reshape(shape).copy()


def _read_file(path: Path) -> bytes:
    """The bytes of ``path``, decompressed when its name ends in ``.gz``."""
    try:
        data = path.read_bytes()
    except OSError as error:
        raise DigitlabError(f"cannot read {path}: {error.strerror or error}") from None
    if path.suffix != ".gz":
        return data
    try:
        return gzip.decompress(data)
    except gzip.BadGzipFile:
        raise DigitlabError(
            f"{path} is not gzip data; if it is an uncompressed IDX file, remove the .gz suffix"
        ) from None
    except EOFError:
        raise DigitlabError(f"{path} is a truncated gzip file; replace it with a complete copy") from None
    except zlib.error as error:
        raise DigitlabError(f"{path} is a corrupt gzip file ({error}); replace it") from None


def _read_idx_files(files: Mapping[str, Path]) -> Arrays:
    return {
        key: decode_idx(_read_file(path), 3 if key.startswith("x") else 1, str(path))
        for key, path in files.items()
    }


def _read_npz(path: Path) -> Arrays:
    if not zipfile.is_zipfile(path):
        raise DigitlabError(f"{path} is not an .npz archive (a zip file of arrays, as Keras' mnist.npz)")
    try:
        with np.load(path, allow_pickle=False) as archive:
            missing = [key for key in ARRAY_FILES if key not in archive.files]
            if missing:
                raise DigitlabError(
                    f"{path} lacks the arrays {', '.join(missing)}; expected x_train, y_train, "
                    "x_test and y_test as in Keras' mnist.npz"
                )
            arrays = {key: archive[key] for key in ARRAY_FILES}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as error:
        raise DigitlabError(f"{path} is not a readable .npz archive ({error})") from None
    for key, array in arrays.items():
        if array.dtype != np.uint8:
            raise DigitlabError(f"{path}: {key} has dtype {array.dtype}; expected uint8")
        expected_ndim = 3 if key.startswith("x") else 1
        if array.ndim != expected_ndim:
            raise DigitlabError(
                f"{path}: {key} has shape {array.shape}; expected {expected_ndim} dimensions"
            )
    return {key: np.ascontiguousarray(array) for key, array in arrays.items()}


def _check_arrays(arrays: Arrays, sources: Mapping[str, str], spec: DatasetSpec) -> None:
    """Check image size, label range and that each split has as many labels as images."""
    for split in ("train", "test"):
        images, labels = arrays[f"x_{split}"], arrays[f"y_{split}"]
        if images.shape[1:] != IMAGE_SHAPE:
            raise DigitlabError(
                f"{sources[f'x_{split}']} holds {images.shape[1]}x{images.shape[2]} images; "
                f"{spec.name} images are {IMAGE_SHAPE[0]}x{IMAGE_SHAPE[1]}"
            )
        if len(images) != len(labels):
            raise DigitlabError(
                f"count mismatch: {sources[f'x_{split}']} has {len(images)} images but "
                f"{sources[f'y_{split}']} has {len(labels)} labels"
            )
        if labels.size and labels.max() >= len(spec.class_names):
            raise DigitlabError(
                f"{sources[f'y_{split}']} holds label {labels.max()}; {spec.name} labels are "
                f"0..{len(spec.class_names) - 1}"
            )


def content_sha256(array: np.ndarray) -> str:
    """SHA-256 of ``array`` written as an uncompressed IDX file (what ``gunzip`` of the .gz gives)."""
    digest = hashlib.sha256(struct.pack(f">I{array.ndim}I", 0x0800 | array.ndim, *array.shape))
    digest.update(np.ascontiguousarray(array, dtype=np.uint8).data)
    return digest.hexdigest()


# --- locating a copy -------------------------------------------------------------------------


def _find_files(directory: Path, spec: DatasetSpec) -> tuple[dict[str, Path], Path | None]:
    """The IDX file present for each array (``.gz`` preferred) and the npz archive, if any."""
    found = {}
    for key, stem in ARRAY_FILES.items():
        for name in (f"{stem}.gz", stem):
            if (directory / name).is_file():
                found[key] = directory / name
                break
    npz_path = directory / spec.npz_name
    return found, npz_path if npz_path.is_file() else None


def _has_copy(directory: Path, spec: DatasetSpec) -> bool:
    idx_files, npz_path = _find_files(directory, spec)
    return len(idx_files) == len(ARRAY_FILES) or npz_path is not None


def _explicit_dir(data_dir: str | os.PathLike | None) -> tuple[Path, str] | None:
    """The directory the user named (argument, then environment) and how they named it."""
    if data_dir is not None:
        return Path(data_dir).expanduser(), "data directory"
    if os.environ.get(DATA_DIR_ENV):
        return Path(os.environ[DATA_DIR_ENV]).expanduser(), f"{DATA_DIR_ENV} directory"
    return None


def locate_dataset(
    data_dir: str | os.PathLike | None = None,
    dataset: str = "mnist",
    download: bool = True,
    progress: bool = True,
) -> Path:
    """The directory holding ``dataset``, downloading it into the cache when no copy is found.

    Looks in ``data_dir``, else ``$DIGITLAB_DATA_DIR`` (either one must hold the
    files: no fallback), else the cache, else ``/usr/share/datasets/<dataset>``.
    """
    spec = dataset_spec(dataset)
    explicit = _explicit_dir(data_dir)
    if explicit is not None:
        directory, described = explicit
        torchvision = directory / spec.torchvision_name / "raw"
        if not _has_copy(directory, spec) and len(_find_files(torchvision, spec)[0]) == len(ARRAY_FILES):
            return torchvision
        if not _has_copy(directory, spec):
            idx_files, _ = _find_files(directory, spec)
            if not directory.is_dir():
                state = "does not exist"
            elif not idx_files:
                state = f"has no {spec.name} files"
            else:
                state = "lacks " + ", ".join(
                    f"{stem}[.gz]" for key, stem in ARRAY_FILES.items() if key not in idx_files
                )
            raise DigitlabError(
                f"{described} {directory} {state}; expected {', '.join(spec.file_names())} "
                f"(gzipped or not, also in {spec.torchvision_name}/raw/) or {spec.npz_name}; "
                f"`digitlab data download --dataset {spec.name} --data-dir {directory}` fetches them"
            )
        return directory
    candidates = [cache_dir(spec.name), SYSTEM_DATASETS_DIR / spec.name, keras_dir(spec.name)]
    for directory in candidates:
        if _has_copy(directory, spec):
            return directory
    if not download:
        raise DigitlabError(
            f"no copy of {spec.name} in {' or '.join(map(str, candidates))}; run "
            f"`digitlab data download --dataset {spec.name}`, or "
            + OFFLINE_HINT.format(files=", ".join(spec.file_names()))
        )
    return download_dataset(spec.name, dest=candidates[0], progress=progress)


def _read_arrays(directory: Path, spec: DatasetSpec) -> tuple[Arrays, dict[str, str]]:
    """The four arrays in ``directory`` (IDX files, else npz) and the source of each."""
    idx_files, npz_path = _find_files(directory, spec)
    if len(idx_files) < len(ARRAY_FILES) and npz_path is not None:
        arrays, sources = _read_npz(npz_path), {key: f"{npz_path}[{key}]" for key in ARRAY_FILES}
    else:
        arrays, sources = _read_idx_files(idx_files), {key: str(path) for key, path in idx_files.items()}
    _check_arrays(arrays, sources, spec)
    return arrays, sources


def _check_not_other_dataset(arrays: Arrays, directory: Path, spec: DatasetSpec) -> None:
    """Refuse the canonical files of another dataset (e.g. MNIST asked for as Fashion-MNIST)."""
    digest = content_sha256(arrays["y_train"])
    for other in DATASETS.values():
        if other is not spec and digest == other.content_sha256["y_train"]:
            raise DigitlabError(
                f"{directory} holds {other.name}, not {spec.name}; point --data-dir or "
                f"{DATA_DIR_ENV} at a copy of {spec.name}, or unset {DATA_DIR_ENV}"
            )


def load_mnist(
    data_dir: str | os.PathLike | None = None,
    dataset: str = "mnist",
    download: bool = True,
    progress: bool = True,
) -> tuple[Split, Split]:
    """``(x_train, y_train), (x_test, y_test)`` exactly as ``keras.datasets.mnist.load_data()``.

    Images are N×28×28 uint8, labels N uint8; all four arrays are writeable and C-contiguous.
    """
    _, arrays = _load_arrays(data_dir, dataset_spec(dataset), download, progress)
    return (arrays["x_train"], arrays["y_train"]), (arrays["x_test"], arrays["y_test"])


def _load_arrays(
    data_dir: str | os.PathLike | None, spec: DatasetSpec, download: bool, progress: bool
) -> tuple[Path, Arrays]:
    """The directory found for ``spec`` and its four arrays, checked (in full for other programs' copies)."""
    directory = locate_dataset(data_dir, spec.name, download=download, progress=progress)
    arrays, sources = _read_arrays(directory, spec)
    _check_not_other_dataset(arrays, directory, spec)
    if _other_programs_copy(directory, spec) and not _is_keras_download(directory, spec):
        _check_content(arrays, sources, spec)
    return directory, arrays


def _other_programs_copy(directory: Path, spec: DatasetSpec) -> bool:
    """Whether ``directory`` is torchvision's ``MNIST/raw`` or Keras' datasets directory."""
    return directory.parts[-2:] == (spec.torchvision_name, "raw") or directory == keras_dir(spec.name)


def _is_keras_download(directory: Path, spec: DatasetSpec) -> bool:
    """Whether ``directory`` holds the npz file Keras downloads (its SHA-256 matches) and no IDX files."""
    idx_files, npz_path = _find_files(directory, spec)
    if npz_path is None or len(idx_files) == len(ARRAY_FILES) or spec.npz_sha256 is None:
        return False
    return _file_sha256(npz_path) == spec.npz_sha256


def _check_content(arrays: Arrays, sources: Mapping[str, str], spec: DatasetSpec) -> dict[str, str]:
    """The content SHA-256 of each array; DigitlabError naming each array that is not the published data."""
    digests = {key: content_sha256(array) for key, array in arrays.items()}
    mismatched = [key for key in ARRAY_FILES if digests[key] != spec.content_sha256[key]]
    if mismatched:
        raise DigitlabError(
            f"checksum mismatch: {', '.join(sources[key] for key in mismatched)} "
            f"{'does' if len(mismatched) == 1 else 'do'} not hold the published {spec.name} data; "
            f"delete {'it' if len(mismatched) == 1 else 'them'} and run "
            f"`digitlab data download --dataset {spec.name}`"
        )
    return digests


def verify_dataset(data_dir: str | os.PathLike | None = None, dataset: str = "mnist") -> dict[str, str]:
    """Check the local copy of ``dataset`` against the published data; never downloads.

    Returns the SHA-256 of each file's decompressed IDX content keyed by source
    (``path/train-images-idx3-ubyte.gz`` or ``path/mnist.npz[x_train]``); raises
    DigitlabError naming every file that does not match.
    """
    spec = dataset_spec(dataset)
    directory = locate_dataset(data_dir, spec.name, download=False)
    arrays, sources = _read_arrays(directory, spec)
    _check_not_other_dataset(arrays, directory, spec)
    digests = _check_content(arrays, sources, spec)
    return {sources[key]: digests[key] for key in ARRAY_FILES}


# --- downloading ---------------------------------------------------------------------------


class _TransferError(Exception):
    """A download that completed at the HTTP level but delivered the wrong bytes."""


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as file:
        while chunk := file.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def _fetch(url: str, target: Path, expected_sha256: str, timeout: float, progress: bool) -> None:
    """Download ``url`` to ``target`` through a temporary file, renamed only once verified."""
    handle, temp_name = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".part")
    temp_path = Path(temp_name)
    try:
        request = urllib.request.Request(url, headers={"User-Agent": "digitlab"})
        with os.fdopen(handle, "wb") as out, urllib.request.urlopen(request, timeout=timeout) as response:
            announced = int(response.headers.get("Content-Length") or 0) or None
            digest, received = hashlib.sha256(), 0
            with tqdm(
                total=announced, desc=target.name, unit="B", unit_scale=True, leave=False,
                disable=None if progress else True,
            ) as bar:
                while chunk := response.read(1 << 16):
                    out.write(chunk)
                    digest.update(chunk)
                    received += len(chunk)
                    bar.update(len(chunk))
            out.flush()
            os.fsync(out.fileno())
        if announced is not None and received != announced:
            raise _TransferError(f"transfer ended after {received} of {announced} bytes")
        if digest.hexdigest() != expected_sha256:
            raise _TransferError(
                f"checksum mismatch (sha256 {digest.hexdigest()[:16]}…, expected {expected_sha256[:16]}…)"
            )
        os.replace(temp_path, target)
    except BaseException:
        temp_path.unlink(missing_ok=True)
        raise


def _describe_failure(error: BaseException, timeout: float) -> str:
    if isinstance(error, urllib.error.HTTPError):
        error.close()
        return f"HTTP {error.code} {error.reason}"
    if isinstance(error, urllib.error.URLError):
        if not isinstance(error.reason, BaseException):
            return str(error.reason)
        error = error.reason
    if isinstance(error, TimeoutError):
        return f"timed out (no data for {timeout:g} s)"
    if isinstance(error, ConnectionRefusedError):
        return "connection refused"
    if isinstance(error, socket.gaierror):
        return f"cannot resolve the host ({error.strerror})"
    return str(error) or type(error).__name__


def _mirrors(spec: DatasetSpec, mirrors: Sequence[str] | None) -> list[str]:
    if mirrors is None and os.environ.get(MIRRORS_ENV):
        mirrors = [base.strip() for base in os.environ[MIRRORS_ENV].split(",") if base.strip()]
    return list(mirrors if mirrors is not None else spec.mirrors)


def download_dataset(
    dataset: str = "mnist",
    dest: str | os.PathLike | None = None,
    mirrors: list[str] | None = None,
    timeout: float = 30,
    progress: bool = True,
) -> Path:
    """Download the four ``.gz`` files of ``dataset`` into ``dest`` and return it.

    ``dest`` defaults to ``$DIGITLAB_DATA_DIR``, else the cache. ``mirrors`` (base
    URLs, default ``$DIGITLAB_MIRRORS`` split on commas, else the dataset's own) are
    tried in turn for each file; a file is kept only once its SHA-256 matches.
    Files already present and verified are not fetched again.
    """
    spec = dataset_spec(dataset)
    explicit = _explicit_dir(dest)
    directory = explicit[0] if explicit is not None else cache_dir(spec.name)
    bases = _mirrors(spec, mirrors)
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise DigitlabError(f"cannot create {directory}: {error.strerror or error}") from None
    for name, expected_sha256 in spec.gz_sha256.items():
        target = directory / name
        if target.exists():
            if _file_sha256(target) == expected_sha256:
                continue
            raise DigitlabError(
                f"{target} exists but is not the published {spec.name} file; move it away and retry"
            )
        failures = []
        for base in bases:
            url = base.rstrip("/") + "/" + name
            try:
                _fetch(url, target, expected_sha256, timeout, progress)
                break
            except (_TransferError, urllib.error.URLError, http.client.HTTPException, OSError, ValueError) as error:
                failures.append(f"{url}: {_describe_failure(error, timeout)}")
        else:
            tried = "; ".join(failures) if failures else "no mirrors given"
            raise DigitlabError(
                f"could not download {spec.name}'s {name} ({tried}); "
                + OFFLINE_HINT.format(files=", ".join(spec.file_names()))
            )
    return directory


# --- inspection ----------------------------------------------------------------------------


@dataclass(frozen=True)
class SplitFacts:
    """What the lab prints about one split."""

    name: str
    images_shape: tuple[int, ...]
    images_dtype: str
    labels_shape: tuple[int, ...]
    labels_dtype: str
    pixel_min: int
    pixel_max: int
    class_counts: tuple[int, ...]


@dataclass(frozen=True)
class DatasetFacts:
    """Shapes, dtypes, pixel range and class balance of both splits."""

    dataset: str
    directory: Path
    class_names: tuple[str, ...]
    splits: tuple[SplitFacts, ...]


def _split_facts(name: str, images: np.ndarray, labels: np.ndarray, num_classes: int) -> SplitFacts:
    return SplitFacts(
        name=name,
        images_shape=images.shape,
        images_dtype=str(images.dtype),
        labels_shape=labels.shape,
        labels_dtype=str(labels.dtype),
        pixel_min=int(images.min()) if images.size else 0,
        pixel_max=int(images.max()) if images.size else 0,
        class_counts=tuple(int(count) for count in np.bincount(labels, minlength=num_classes)),
    )


def inspect_dataset(
    data_dir: str | os.PathLike | None = None,
    dataset: str = "mnist",
    download: bool = True,
    progress: bool = True,
) -> DatasetFacts:
    """Load ``dataset`` as ``load_mnist`` does and describe each split."""
    spec = dataset_spec(dataset)
    directory, arrays = _load_arrays(data_dir, spec, download, progress)
    splits = tuple(
        _split_facts(split, arrays[f"x_{split}"], arrays[f"y_{split}"], len(spec.class_names))
        for split in ("train", "test")
    )
    return DatasetFacts(spec.name, directory, spec.class_names, splits)


def format_dataset_facts(facts: DatasetFacts) -> str:
    """A plain-text report of ``facts``: one table of arrays, one of class counts."""
    lines = [f"{facts.dataset} from {facts.directory}", ""]
    rows = [("split", "images", "dtype", "labels", "dtype", "pixels")] + [
        (s.name, str(s.images_shape), s.images_dtype, str(s.labels_shape), s.labels_dtype,
         f"{s.pixel_min}..{s.pixel_max}")
        for s in facts.splits
    ]
    widths = [max(len(row[column]) for row in rows) for column in range(len(rows[0]))]
    lines += ["  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip() for row in rows]
    lines.append("")
    name_width = max(len("label"), *(len(name) for name in facts.class_names)) + 4
    header = "label".ljust(name_width) + "".join(f"{s.name:>16}" for s in facts.splits)
    lines.append(header)
    for label, class_name in enumerate(facts.class_names):
        cells = []
        for split in facts.splits:
            share = 100 * split.class_counts[label] / max(1, sum(split.class_counts))
            cells.append(f"{split.class_counts[label]} {share:5.1f}%")
        title = class_name if class_name == str(label) else f"{label} {class_name}"
        lines.append(title.ljust(name_width) + "".join(f"{cell:>16}" for cell in cells))
    return "\n".join(lines)
