"""Tests of digitlab.data and `digitlab data`: genuine MNIST, Fashion-MNIST, downloads, bad input."""

from __future__ import annotations

import argparse
import gzip
import hashlib
import socket
import struct
from pathlib import Path

import numpy as np
import pytest
from conftest import mnist_dir
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays
from mirror_server import MirrorServer

from digitlab import data
from digitlab.cli import main
from digitlab.cli.data import add_data_arguments
from digitlab.errors import DigitlabError

GENUINE_DIR = mnist_dir().resolve()
FASHION_DIR = Path("/usr/share/datasets/fashion-mnist")
MNIST_TRAIN_COUNTS = [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]
CLIENT_TIMEOUT = 0.25
BAD_MIRRORS = ("missing", "corrupt", "hang", "truncated")


def idx_bytes(array: np.ndarray) -> bytes:
    """An IDX file of unsigned bytes, written independently of digitlab."""
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(struct.pack(">I", size) for size in array.shape)
    return header + array.astype(np.uint8).tobytes()


def write_idx(path: Path, array: np.ndarray) -> None:
    content = idx_bytes(array)
    path.write_bytes(gzip.compress(content) if path.suffix == ".gz" else content)


def write_small_dataset(directory: Path, suffix: str = ".gz", train: int = 12, test: int = 6) -> dict:
    """A valid made-up dataset of random images; returns its arrays by Keras name."""
    rng = np.random.default_rng(0)
    arrays_by_key = {
        "x_train": rng.integers(0, 256, (train, 28, 28), dtype=np.uint8),
        "y_train": rng.integers(0, 10, train, dtype=np.uint8),
        "x_test": rng.integers(0, 256, (test, 28, 28), dtype=np.uint8),
        "y_test": rng.integers(0, 10, test, dtype=np.uint8),
    }
    directory.mkdir(parents=True, exist_ok=True)
    for key, array in arrays_by_key.items():
        write_idx(directory / (data.ARRAY_FILES[key] + suffix), array)
    return arrays_by_key


def files_under(path: Path) -> list[str]:
    return sorted(str(p.relative_to(path)) for p in path.rglob("*") if not p.is_dir())


MNIST_GZ_SHA256 = dict(data.DATASETS["mnist"].gz_sha256)  # checked against SHA256SUMS where one is present


def published_sha256() -> dict[str, str]:
    lines = (GENUINE_DIR / "SHA256SUMS").read_text().split("\n")
    return {name: digest for digest, name in (line.split() for line in lines if line.strip())}


@pytest.fixture(autouse=True)
def isolated(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """No data directory or mirrors from the environment, an empty cache, an empty system dir."""
    monkeypatch.delenv(data.DATA_DIR_ENV, raising=False)
    monkeypatch.delenv(data.MIRRORS_ENV, raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setattr(data, "SYSTEM_DATASETS_DIR", tmp_path / "system")
    monkeypatch.setenv("KERAS_HOME", str(tmp_path / "keras"))
    return tmp_path / "cache"


@pytest.fixture(scope="module")
def genuine() -> tuple:
    return data.load_mnist(GENUINE_DIR, progress=False)


@pytest.fixture(scope="module")
def mirrors():
    files = {name: (GENUINE_DIR / name).read_bytes() for name in data.DATASETS["mnist"].gz_sha256}
    with MirrorServer(files, hang_seconds=5.0) as server:
        yield server


@pytest.fixture
def closed_port_url() -> str:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    return f"http://127.0.0.1:{port}/"


# --- genuine MNIST ------------------------------------------------------------------------


def test_genuine_mnist_has_the_keras_shapes_dtypes_and_counts(genuine):
    (x_train, y_train), (x_test, y_test) = genuine
    assert [a.shape for a in (x_train, y_train, x_test, y_test)] == [(60000, 28, 28), (60000,), (10000, 28, 28), (10000,)]
    for array in (x_train, y_train, x_test, y_test):
        assert array.dtype == np.uint8
        assert array.flags.c_contiguous and array.flags.writeable
    assert np.bincount(y_train).tolist() == MNIST_TRAIN_COUNTS
    assert np.bincount(y_test, minlength=10).sum() == 10000 and y_test.max() == 9
    assert (x_train.min(), x_train.max(), x_test.min(), x_test.max()) == (0, 255, 0, 255)


def test_checksum_constants_match_the_published_files():
    if not (GENUINE_DIR / "SHA256SUMS").is_file():
        pytest.skip(f"{GENUINE_DIR} has no SHA256SUMS list to compare with (a downloaded cache has none)")
    published = published_sha256()
    assert dict(data.DATASETS["mnist"].gz_sha256) == published
    for name, digest in published.items():
        assert hashlib.sha256((GENUINE_DIR / name).read_bytes()).hexdigest() == digest


def test_genuine_mnist_verifies():
    digests = data.verify_dataset(GENUINE_DIR)
    assert digests == {
        str(GENUINE_DIR / f"{stem}.gz"): data.DATASETS["mnist"].content_sha256[key]
        for key, stem in data.ARRAY_FILES.items()
    }
    for source, digest in digests.items():
        assert hashlib.sha256(gzip.decompress(Path(source).read_bytes())).hexdigest() == digest


def test_environment_variable_names_the_directory(monkeypatch, genuine):
    monkeypatch.setenv(data.DATA_DIR_ENV, str(GENUINE_DIR))
    (x_train, y_train), (x_test, y_test) = data.load_mnist(progress=False)
    assert np.array_equal(y_train, genuine[0][1]) and np.array_equal(x_test, genuine[1][0])


def test_uncompressed_idx_files_give_identical_arrays(tmp_path, genuine):
    for stem in data.ARRAY_FILES.values():
        (tmp_path / stem).write_bytes(gzip.decompress((GENUINE_DIR / f"{stem}.gz").read_bytes()))
    loaded = data.load_mnist(tmp_path, download=False)
    for expected, actual in zip(sum(genuine, ()), sum(loaded, ())):
        assert np.array_equal(expected, actual) and actual.dtype == expected.dtype
    assert sorted(data.verify_dataset(tmp_path).values()) == sorted(data.verify_dataset(GENUINE_DIR).values())


def test_keras_npz_gives_identical_arrays(tmp_path, genuine):
    (x_train, y_train), (x_test, y_test) = genuine
    np.savez(tmp_path / "mnist.npz", x_train=x_train, y_train=y_train, x_test=x_test, y_test=y_test)
    loaded = data.load_mnist(tmp_path, download=False)
    for expected, actual in zip(sum(genuine, ()), sum(loaded, ())):
        assert np.array_equal(expected, actual) and actual.flags.c_contiguous and actual.flags.writeable
    digests = data.verify_dataset(tmp_path)
    assert set(digests) == {f"{tmp_path / 'mnist.npz'}[{key}]" for key in data.ARRAY_FILES}


@pytest.mark.parametrize("compressed", [True, False], ids=["gz", "uncompressed"])
def test_torchvision_layout_below_the_data_directory_is_found(tmp_path, genuine, compressed):
    raw = tmp_path / "root" / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for stem in data.ARRAY_FILES.values():
        if compressed:
            (raw / f"{stem}.gz").symlink_to(GENUINE_DIR / f"{stem}.gz")
        else:
            (raw / stem).write_bytes(gzip.decompress((GENUINE_DIR / f"{stem}.gz").read_bytes()))
    assert data.locate_dataset(tmp_path / "root", download=False) == raw
    loaded = data.load_mnist(tmp_path / "root", download=False)
    for expected, actual in zip(sum(genuine, ()), sum(loaded, ())):
        assert np.array_equal(expected, actual)


def test_torchvision_layout_with_altered_data_is_refused_in_one_line(tmp_path):
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for key, stem in data.ARRAY_FILES.items():
        if key != "x_test":
            (raw / f"{stem}.gz").symlink_to(GENUINE_DIR / f"{stem}.gz")
    images = bytearray(gzip.decompress((GENUINE_DIR / "t10k-images-idx3-ubyte.gz").read_bytes()))
    images[-1] ^= 0xFF
    (raw / "t10k-images-idx3-ubyte").write_bytes(images)
    with pytest.raises(DigitlabError) as raised:
        data.load_mnist(tmp_path, download=False)
    message = str(raised.value)
    assert message.startswith(f"checksum mismatch: {raw / 't10k-images-idx3-ubyte'} does not hold the published")
    assert "\n" not in message


def test_keras_npz_in_keras_home_is_found_without_naming_it(monkeypatch, tmp_path, genuine):
    (x_train, y_train), (x_test, y_test) = genuine
    datasets = tmp_path / "keras" / "datasets"
    datasets.mkdir(parents=True)
    np.savez(datasets / "mnist.npz", x_train=x_train, y_train=y_train, x_test=x_test, y_test=y_test)
    monkeypatch.setenv(data.MIRRORS_ENV, "http://127.0.0.1:9/")  # a download would fail
    assert data.locate_dataset(download=False) == datasets
    loaded = data.load_mnist(progress=False)
    for expected, actual in zip(sum(genuine, ()), sum(loaded, ())):
        assert np.array_equal(expected, actual)


def test_keras_npz_with_a_wrong_checksum_is_refused_in_one_line(tmp_path, genuine, capsys):
    (x_train, y_train), (x_test, y_test) = genuine
    datasets = tmp_path / "keras" / "datasets"
    datasets.mkdir(parents=True)
    altered = x_train.copy()
    altered[0, 14, 14] ^= 0xFF
    np.savez(datasets / "mnist.npz", x_train=altered, y_train=y_train, x_test=x_test, y_test=y_test)
    assert main(["data", "inspect"]) == 2
    error = capsys.readouterr().err
    assert error == (
        f"digitlab: error: checksum mismatch: {datasets / 'mnist.npz'}[x_train] does not hold the published "
        "mnist data; delete it and run `digitlab data download --dataset mnist`\n"
    )


def test_argument_beats_environment_and_an_empty_environment_directory_is_an_error(monkeypatch, tmp_path):
    monkeypatch.setenv(data.DATA_DIR_ENV, str(tmp_path / "empty"))
    (_, y_train), _ = data.load_mnist(GENUINE_DIR, download=False)
    assert np.bincount(y_train).tolist() == MNIST_TRAIN_COUNTS
    with pytest.raises(DigitlabError, match=f"DIGITLAB_DATA_DIR directory {tmp_path / 'empty'} does not exist"):
        data.load_mnist()


# --- Fashion-MNIST ------------------------------------------------------------------------


@pytest.mark.system_package("dataset-fashion-mnist")
def test_fashion_mnist_is_found_in_debians_directory(monkeypatch):
    monkeypatch.setattr(data, "SYSTEM_DATASETS_DIR", FASHION_DIR.parent)
    (x_train, y_train), (x_test, y_test) = data.load_mnist(dataset="fashion-mnist", download=False)
    assert (x_train.shape, y_train.shape, x_test.shape, y_test.shape) == ((60000, 28, 28), (60000,), (10000, 28, 28), (10000,))
    assert np.bincount(y_train).tolist() == [6000] * 10
    assert np.bincount(y_test).tolist() == [1000] * 10
    assert len(data.verify_dataset(dataset="fashion-mnist")) == 4
    assert data.class_names("fashion-mnist")[:2] == ["T-shirt/top", "Trouser"]
    assert data.class_names() == [str(digit) for digit in range(10)]


def test_mnist_files_are_not_taken_for_fashion_mnist(monkeypatch):
    monkeypatch.setenv(data.DATA_DIR_ENV, str(GENUINE_DIR))
    with pytest.raises(DigitlabError, match="holds mnist, not fashion-mnist"):
        data.load_mnist(dataset="fashion-mnist")
    with pytest.raises(DigitlabError, match="unknown dataset 'kmnist'; choose one of: mnist, fashion-mnist"):
        data.load_mnist(dataset="kmnist")


# --- downloads ----------------------------------------------------------------------------


def test_download_skips_bad_mirrors_and_verifies(mirrors, tmp_path):
    dest = tmp_path / "downloaded"
    bases = [mirrors.url(mode) for mode in (*BAD_MIRRORS, "good")]
    assert data.download_dataset(dest=dest, mirrors=bases, timeout=CLIENT_TIMEOUT, progress=False) == dest
    assert files_under(dest) == sorted(MNIST_GZ_SHA256)
    for name, digest in MNIST_GZ_SHA256.items():
        assert hashlib.sha256((dest / name).read_bytes()).hexdigest() == digest
    assert len(data.verify_dataset(dest)) == 4


def test_download_with_only_bad_mirrors_reports_each_and_leaves_nothing(mirrors, tmp_path):
    dest = tmp_path / "downloaded"
    bases = [mirrors.url(mode) for mode in BAD_MIRRORS]
    with pytest.raises(DigitlabError) as raised:
        data.download_dataset(dest=dest, mirrors=bases, timeout=CLIENT_TIMEOUT, progress=False)
    message = str(raised.value)
    name = "train-images-idx3-ubyte.gz"
    assert f"{mirrors.url('missing')}{name}: HTTP 404" in message
    assert f"{mirrors.url('corrupt')}{name}: checksum mismatch" in message
    assert f"{mirrors.url('hang')}{name}: timed out" in message
    assert f"{mirrors.url('truncated')}{name}: transfer ended after 4956211 of 9912422 bytes" in message
    assert "DIGITLAB_DATA_DIR=/path/to/dir" in message and "--data-dir" in message
    assert "\n" not in message
    assert dest.is_dir() and files_under(dest) == []


def test_download_keeps_verified_files_and_never_overwrites_others(mirrors, tmp_path):
    dest = tmp_path / "downloaded"
    dest.mkdir()
    (dest / "train-images-idx3-ubyte.gz").symlink_to(GENUINE_DIR / "train-images-idx3-ubyte.gz")
    before = len(mirrors.requests)
    data.download_dataset(dest=dest, mirrors=[mirrors.url("good")], progress=False)
    fetched = mirrors.requests[before:]
    assert sorted(fetched) == sorted(f"/good/{name}" for name in MNIST_GZ_SHA256 if not name.startswith("train-images"))

    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "train-images-idx3-ubyte.gz").write_bytes(b"my own file")
    with pytest.raises(DigitlabError, match="exists but is not the published mnist file; move it away"):
        data.download_dataset(dest=foreign, mirrors=[mirrors.url("good")], progress=False)
    assert (foreign / "train-images-idx3-ubyte.gz").read_bytes() == b"my own file"
    assert files_under(foreign) == ["train-images-idx3-ubyte.gz"]


def test_load_downloads_into_the_cache_once(monkeypatch, mirrors, isolated, genuine, closed_port_url):
    monkeypatch.setenv(data.MIRRORS_ENV, f"{mirrors.url('missing')},{mirrors.url('good')}")
    (x_train, y_train), _ = data.load_mnist(progress=False)
    assert np.array_equal(x_train, genuine[0][0]) and np.array_equal(y_train, genuine[0][1])
    assert files_under(isolated) == sorted(f"digitlab/mnist/{name}" for name in MNIST_GZ_SHA256)
    monkeypatch.setenv(data.MIRRORS_ENV, closed_port_url)
    (_, y_train), _ = data.load_mnist(progress=False)
    assert np.array_equal(y_train, genuine[0][1])


def test_no_network_and_no_copy_says_how_to_provide_the_files(monkeypatch, isolated, closed_port_url):
    monkeypatch.setenv(data.MIRRORS_ENV, closed_port_url)
    with pytest.raises(DigitlabError) as raised:
        data.load_mnist(progress=False)
    message = str(raised.value)
    assert f"{closed_port_url}train-images-idx3-ubyte.gz: connection refused" in message
    assert "set DIGITLAB_DATA_DIR=/path/to/dir or pass --data-dir /path/to/dir" in message
    assert files_under(isolated) == []
    with pytest.raises(DigitlabError, match="no copy of mnist in .* run `digitlab data download --dataset mnist`"):
        data.load_mnist(download=False)


# --- IDX parsing and bad input ------------------------------------------------------------


@settings(max_examples=60, deadline=None)
@given(arrays(np.uint8, st.one_of(
    st.tuples(st.integers(0, 40)),
    st.tuples(st.integers(0, 5), st.integers(0, 6), st.integers(0, 6)),
)), st.data())
def test_idx_round_trip_and_every_truncation_is_refused(array, draw):
    encoded = idx_bytes(array)
    decoded = data.decode_idx(encoded, array.ndim)
    assert decoded.shape == array.shape and np.array_equal(decoded, array)
    assert decoded.flags.writeable and decoded.flags.c_contiguous
    assert data.content_sha256(array) == hashlib.sha256(encoded).hexdigest()
    cut = draw.draw(st.integers(0, len(encoded) - 1))
    with pytest.raises(DigitlabError, match="is truncated"):
        data.decode_idx(encoded[:cut], array.ndim, "f")


@pytest.mark.parametrize("suffix", [".gz", ""])
def test_users_own_idx_files_load_but_do_not_verify(tmp_path, suffix):
    written = write_small_dataset(tmp_path / "own", suffix)
    (x_train, y_train), (x_test, y_test) = data.load_mnist(tmp_path / "own", download=False)
    for key, loaded in zip(data.ARRAY_FILES, (x_train, y_train, x_test, y_test)):
        assert np.array_equal(loaded, written[key])
    with pytest.raises(DigitlabError) as raised:
        data.verify_dataset(tmp_path / "own")
    message = str(raised.value)
    assert message.startswith("checksum mismatch: ") and "do not hold the published mnist data" in message
    assert all(str(tmp_path / "own" / (stem + suffix)) in message for stem in data.ARRAY_FILES.values())


def _missing_file(directory: Path) -> None:
    (directory / "t10k-labels-idx1-ubyte.gz").unlink()


def _labels_in_images_slot(directory: Path) -> None:
    write_idx(directory / "train-images-idx3-ubyte.gz", np.zeros(12, np.uint8))


def _truncated_idx(directory: Path) -> None:
    path = directory / "train-images-idx3-ubyte.gz"
    content = gzip.decompress(path.read_bytes())
    path.unlink()
    (directory / "train-images-idx3-ubyte").write_bytes(content[:-100])


def _trailing_bytes(directory: Path) -> None:
    path = directory / "t10k-labels-idx1-ubyte.gz"
    path.write_bytes(gzip.compress(gzip.decompress(path.read_bytes()) + b"\0"))


def _truncated_gzip(directory: Path) -> None:
    path = directory / "train-images-idx3-ubyte.gz"
    path.write_bytes(path.read_bytes()[:-20])


def _not_gzip(directory: Path) -> None:
    path = directory / "train-labels-idx1-ubyte.gz"
    path.write_bytes(gzip.decompress(path.read_bytes()))


def _count_mismatch(directory: Path) -> None:
    write_idx(directory / "train-labels-idx1-ubyte.gz", np.zeros(11, np.uint8))


def _label_out_of_range(directory: Path) -> None:
    write_idx(directory / "t10k-labels-idx1-ubyte.gz", np.full(6, 10, np.uint8))


def _wrong_image_size(directory: Path) -> None:
    write_idx(directory / "t10k-images-idx3-ubyte.gz", np.zeros((6, 32, 32), np.uint8))


@pytest.mark.parametrize("damage, message", [
    (_missing_file, r"data directory .*/own lacks t10k-labels-idx1-ubyte\[\.gz\]; expected train-images-idx3-ubyte\.gz, "
                    r"train-labels-idx1-ubyte\.gz, t10k-images-idx3-ubyte\.gz, t10k-labels-idx1-ubyte\.gz"),
    (_labels_in_images_slot, r"train-images-idx3-ubyte\.gz has the wrong IDX magic number 0x00000801; "
                             r"IDX images files start with 0x00000803"),
    (_truncated_idx, r"train-images-idx3-ubyte is truncated: 9324 bytes, but its header announces 12x28x28 images"),
    (_trailing_bytes, r"t10k-labels-idx1-ubyte\.gz has trailing bytes: 15 bytes"),
    (_truncated_gzip, r"train-images-idx3-ubyte\.gz is a truncated gzip file"),
    (_not_gzip, r"train-labels-idx1-ubyte\.gz is not gzip data; if it is an uncompressed IDX file, remove the \.gz suffix"),
    (_count_mismatch, r"count mismatch: .*train-images-idx3-ubyte\.gz has 12 images but .*train-labels-idx1-ubyte\.gz has 11 labels"),
    (_label_out_of_range, r"t10k-labels-idx1-ubyte\.gz holds label 10; mnist labels are 0\.\.9"),
    (_wrong_image_size, r"t10k-images-idx3-ubyte\.gz holds 32x32 images; mnist images are 28x28"),
])
def test_bad_input_is_one_clear_error_and_writes_nothing(tmp_path, isolated, damage, message):
    write_small_dataset(tmp_path / "own")
    damage(tmp_path / "own")
    before = files_under(tmp_path)
    for operation in (data.load_mnist, data.verify_dataset, data.inspect_dataset):
        with pytest.raises(DigitlabError, match=message) as raised:
            operation(tmp_path / "own")
        assert "\n" not in str(raised.value)
    assert files_under(tmp_path) == before
    assert not isolated.exists()


@pytest.mark.parametrize("content, message", [
    (b"not a zip archive", r"mnist\.npz is not an \.npz archive"),
    (None, r"mnist\.npz lacks the arrays y_test; expected x_train, y_train, x_test and y_test"),
])
def test_bad_npz_is_one_clear_error(tmp_path, content, message):
    path = tmp_path / "mnist.npz"
    if content is None:
        images, labels = np.zeros((3, 28, 28), np.uint8), np.zeros(3, np.uint8)
        np.savez(path, x_train=images, y_train=labels, x_test=images)
    else:
        path.write_bytes(content)
    with pytest.raises(DigitlabError, match=message):
        data.load_mnist(tmp_path)


def test_verify_names_only_the_altered_file(tmp_path):
    for key, stem in data.ARRAY_FILES.items():
        if key != "y_train":
            (tmp_path / f"{stem}.gz").symlink_to(GENUINE_DIR / f"{stem}.gz")
    labels = bytearray(gzip.decompress((GENUINE_DIR / "train-labels-idx1-ubyte.gz").read_bytes()))
    labels[-1] = (labels[-1] + 1) % 10
    (tmp_path / "train-labels-idx1-ubyte").write_bytes(labels)
    with pytest.raises(DigitlabError) as raised:
        data.verify_dataset(tmp_path)
    assert str(raised.value).startswith(
        f"checksum mismatch: {tmp_path / 'train-labels-idx1-ubyte'} does not hold the published mnist data; "
        "delete it and run `digitlab data download --dataset mnist`"
    )


# --- command line -------------------------------------------------------------------------


def test_cli_inspect_prints_shapes_pixel_range_and_class_counts(monkeypatch, capsys):
    monkeypatch.setenv(data.DATA_DIR_ENV, str(GENUINE_DIR))
    assert main(["data", "inspect"]) == 0
    out = capsys.readouterr().out
    assert "train  (60000, 28, 28)  uint8  (60000,)  uint8  0..255" in out
    assert "test   (10000, 28, 28)  uint8  (10000,)  uint8  0..255" in out
    rows = {line.split()[0]: line.split()[1:] for line in out.splitlines()[-10:]}
    assert [int(rows[str(digit)][0]) for digit in range(10)] == MNIST_TRAIN_COUNTS
    assert sum(int(rows[str(digit)][2]) for digit in range(10)) == 10000


def test_cli_verify_lists_each_file(capsys):
    assert main(["data", "verify", "--data-dir", str(GENUINE_DIR)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in out[:4]] == ["OK"] * 4
    assert out[0].split()[1] == data.DATASETS["mnist"].content_sha256["x_train"]


def test_cli_errors_are_one_line_with_exit_status_2(tmp_path, capsys):
    assert main(["data", "inspect", "--data-dir", str(tmp_path / "nowhere")]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.startswith(f"digitlab: error: data directory {tmp_path / 'nowhere'} does not exist;")
    assert captured.err.count("\n") == 1 and "Traceback" not in captured.err
    with pytest.raises(SystemExit) as raised:
        main(["data", "inspect", "--dataset", "kmnist"])
    assert raised.value.code == 2


def test_cli_download_uses_mirrors_from_the_environment(monkeypatch, mirrors, tmp_path, capsys):
    monkeypatch.setenv(data.MIRRORS_ENV, f"{mirrors.url('missing')}, {mirrors.url('good')}")
    assert main(["data", "download", "--data-dir", str(tmp_path / "dl")]) == 0
    assert f"verified in {tmp_path / 'dl'}" in capsys.readouterr().out
    assert files_under(tmp_path / "dl") == sorted(MNIST_GZ_SHA256)

    monkeypatch.setenv(data.MIRRORS_ENV, mirrors.url("corrupt"))
    assert main(["data", "download", "--dataset", "fashion-mnist", "--data-dir", str(tmp_path / "f")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("digitlab: error: could not download fashion-mnist's train-images-idx3-ubyte.gz (")
    assert err.count("\n") == 1 and files_under(tmp_path / "f") == []


def test_add_data_arguments_defaults_and_values():
    parser = argparse.ArgumentParser()
    add_data_arguments(parser)
    defaults = parser.parse_args([])
    assert (defaults.dataset, defaults.data_dir) == ("mnist", None)
    given_args = parser.parse_args(["--dataset", "fashion-mnist", "--data-dir", "some/dir"])
    assert (given_args.dataset, given_args.data_dir) == ("fashion-mnist", Path("some/dir"))
