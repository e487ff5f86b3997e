"""Pictures of the data and the model: rendered, decoded and checked, from the API and the CLI."""

from __future__ import annotations

import io
import re

import numpy as np
import pytest
from conftest import mnist_dir
from PIL import Image

import digitlab.data
from digitlab import plots
from digitlab.cli import main
from digitlab.errors import DigitlabError
from digitlab.evaluate import evaluate
from digitlab.predict import Prediction, load_recognizer

SAMPLE = 120  # test images the small model predicts for these tests


@pytest.fixture(scope="module")
def small(small_model_path, mnist):
    """The small model, the first test images, their labels and the model's predictions."""
    (_, _), (x_test, y_test) = mnist
    recognizer = load_recognizer(small_model_path)
    images, labels = x_test[:SAMPLE], y_test[:SAMPLE]
    return recognizer, images, labels, recognizer.predict(images)


def with_mistakes(labels: np.ndarray, wrong: list[int]) -> Prediction:
    """A prediction right everywhere except at ``wrong``, each image with its own confidence."""
    predicted = labels.astype(np.int64)
    predicted[wrong] = (predicted[wrong] + 1) % 10
    confidence = np.linspace(1.0, 6.0, len(labels), dtype=np.float32)[np.random.default_rng(0).permutation(len(labels))]
    return Prediction.from_logits(np.eye(10, dtype=np.float32)[predicted] * confidence[:, None])


def rendered(figure, dpi: float = 60) -> Image.Image:
    """The figure as a decoded PNG, checked to have the figure's size at `dpi` and to show something."""
    image = Image.open(io.BytesIO(plots.figure_png(figure, dpi)))
    image.load()
    assert image.format == "PNG"
    width, height = figure.get_size_inches()
    assert image.size == (round(width * dpi), round(height * dpi))
    pixels = np.asarray(image.convert("L"), dtype=np.float64)
    assert pixels.std() > 20, "the picture is (nearly) blank"
    return image


def image_axes(figure) -> list:
    return [ax for ax in figure.axes if ax.images]


def caption_texts(figure) -> list[str]:
    return [ax.get_xlabel() for ax in image_axes(figure)]


def test_heatmap_shows_one_image_with_colour_bar_and_label(mnist):
    (x_train, y_train), _ = mnist
    figure = plots.plot_heatmap(x_train[5], int(y_train[5]))
    rendered(figure)
    (ax,) = image_axes(figure)
    assert np.array_equal(ax.images[0].get_array(), x_train[5])
    assert ax.get_title() == f"Label: {y_train[5]}"
    assert len(figure.axes) == 2  # the image and its colour bar


@pytest.mark.parametrize("count, rows", [(8, 2), (5, 1), (13, 3)])
def test_grid_has_one_panel_per_image_in_rows_of_five(mnist, count, rows):
    (x_train, y_train), _ = mnist
    figure = plots.plot_imgs(x_train[:count], y_train[:count])
    image = rendered(figure)
    panels = image_axes(figure)
    assert len(panels) == count
    assert caption_texts(figure) == [str(label) for label in y_train[:count]]
    assert all(not ax.get_xticks().size and not ax.get_yticks().size for ax in panels)
    assert image.size[1] == round(rows * plots.PANEL_INCHES * 60)
    assert {ax.get_subplotspec().rowspan.start for ax in panels} == set(range(rows))


def test_grid_uses_class_names(mnist):
    (x_train, y_train), _ = mnist
    names = digitlab.data.class_names("fashion-mnist")
    figure = plots.plot_imgs(x_train[:3], y_train[:3], class_names=names)
    assert caption_texts(figure) == [names[label] for label in y_train[:3]]


def test_predictions_mark_the_wrong_ones_in_red_with_the_true_label(small):
    _, images, labels, _ = small
    count = 25
    chosen = with_mistakes(labels[:count], [1, 7, 12])
    figure = plots.plot_predictions(images[:count], chosen, labels[:count])
    rendered(figure)
    panels = image_axes(figure)
    assert len(panels) == count
    wrong = np.flatnonzero(chosen.labels != labels[:count])
    assert wrong.tolist() == [1, 7, 12]
    red = [i for i, ax in enumerate(panels) if ax.xaxis.label.get_color() == plots.WRONG_COLOR]
    assert red == wrong.tolist()
    for i, ax in enumerate(panels):
        digit = chosen.labels[i]
        assert ax.get_xlabel().startswith(f"{digit} ({plots.percent(chosen.probabilities[i, digit])})")
        assert ("true:" in ax.get_xlabel()) == (i in wrong)
        if i in wrong:
            assert ax.get_xlabel().endswith(f"true: {labels[i]}")
    assert f"{count - len(wrong)} of {count} correct" in figure.texts[0].get_text()


def test_percent_never_rounds_an_uncertain_prediction_to_certainty():
    assert plots.percent(0.996) == ">99%"
    assert plots.percent(1.0) == "100%"
    assert plots.percent(0.9996, 1) == ">99.9%"
    assert plots.percent(0.42) == "42%"


def cell_values(figure) -> np.ndarray:
    (ax,) = image_axes(figure)
    return np.array([float(text.get_text()) for text in ax.texts])


def test_confusion_counts_sum_to_the_number_of_test_images(small):
    recognizer, images, labels, _ = small
    evaluation = evaluate(recognizer, images, labels)
    figure = plots.plot_confusion(evaluation.confusion)
    rendered(figure)
    assert cell_values(figure).sum() == len(images)
    (ax,) = image_axes(figure)
    diagonal = {(round(t.get_position()[1]), round(t.get_position()[0])): t.get_text() for t in ax.texts}
    for digit in range(10):
        hits = evaluation.confusion[digit, digit]
        assert diagonal.get((digit, digit), "0") == str(hits)
    assert f"{evaluation.accuracy:.2%}" in ax.get_title()


def test_normalized_confusion_rows_are_percentages(small):
    recognizer, images, labels, _ = small
    confusion = evaluate(recognizer, images, labels).confusion
    figure = plots.plot_confusion(confusion, normalize=True)
    rendered(figure)
    (ax,) = image_axes(figure)
    rows: dict[int, float] = {}
    for text in ax.texts:
        row = round(text.get_position()[1])
        rows[row] = rows.get(row, 0.0) + float(text.get_text())
    present = [digit for digit in range(10) if confusion[digit].sum()]
    assert sorted(rows) == present
    assert all(abs(total - 100) < 0.6 for total in rows.values())


def test_mistakes_are_the_most_confident_wrong_predictions(small):
    _, images, labels, _ = small
    prediction = with_mistakes(labels, [0, 3, 5, 9])
    wrong_total = 4
    indices = plots.most_confident_mistakes(prediction, labels, count=wrong_total + 10)
    assert len(indices) == wrong_total
    assert np.all(prediction.labels[indices] != labels[indices])
    confidence = prediction.probabilities[indices, prediction.labels[indices]]
    assert np.all(np.diff(confidence) <= 0)

    figure = plots.plot_mistakes(images, prediction, labels, count=3)
    rendered(figure)
    captions = caption_texts(figure)
    assert len(captions) == 3
    for index, caption in zip(indices[:3], captions):
        assert caption.startswith(f"#{index}: true {labels[index]}\npredicted {prediction.labels[index]} (")


def test_mistakes_without_mistakes_say_so(small):
    _, images, _, prediction = small
    figure = plots.plot_mistakes(images[:4], prediction.probabilities[:4], prediction.labels[:4])
    assert image_axes(figure) == []
    assert figure.texts[0].get_text() == "No mistakes among 4 images"


def test_history_plots_epochs_and_steps_from_the_card(small):
    recognizer = small[0]
    history = recognizer.card["history"]
    figure = plots.plot_history(recognizer.card)
    rendered(figure)
    loss_ax, accuracy_ax = figure.axes
    for ax, key in ((loss_ax, "loss"), (accuracy_ax, "accuracy")):
        running, per_epoch = ax.get_lines()
        assert per_epoch.get_xdata().tolist() == [e["epoch"] for e in history["epochs"]]
        assert per_epoch.get_ydata().tolist() == [e[key] for e in history["epochs"]]
        steps = [y for y in running.get_ydata() if not np.isnan(y)]
        assert steps == [s[key] for s in history["steps"]]
    assert np.nanmax(running.get_xdata()) == pytest.approx(len(history["epochs"]))


def test_history_shows_validation_when_recorded():
    history = {"epochs": [{"epoch": 1, "loss": 0.5, "accuracy": 0.8, "val_loss": 0.6, "val_accuracy": 0.75},
                          {"epoch": 2, "loss": 0.3, "accuracy": 0.9, "val_loss": 0.4, "val_accuracy": 0.85}]}  # fmt: skip
    figure = plots.plot_history(history)
    rendered(figure)
    assert [line.get_label() for line in figure.axes[1].get_lines()] == ["train, epoch", "validation"]
    assert figure.axes[1].get_lines()[1].get_ydata().tolist() == [0.75, 0.85]


def test_history_without_records_is_an_error():
    with pytest.raises(DigitlabError, match="no training history"):
        plots.plot_history({"epochs": [], "steps": []})


def test_filters_show_the_first_layer_kernels(small):
    recognizer = small[0]
    figure = plots.plot_filters(recognizer)
    rendered(figure)
    panels = image_axes(figure)
    kernels = recognizer.model.conv1.weight.detach().numpy()[:, 0]
    assert len(panels) == 16
    for ax, kernel in zip(panels, kernels):
        assert np.allclose(ax.images[0].get_array(), kernel)


def test_activations_show_each_conv_block(small):
    recognizer, images, labels, prediction = small
    figure = plots.plot_activations(recognizer, images[0], labels[0], maps_per_block=6)
    rendered(figure)
    assert len(image_axes(figure)) == 1 + 4 * 6
    row_labels = [ax.get_ylabel() for ax in figure.axes if ax.get_ylabel()]
    assert row_labels == ["block 1\n16×26×26", "block 2\n32×24×24", "block 3\n64×22×22", "block 4\n128×20×20"]
    blocks, probabilities = plots.block_activations(recognizer, images[0])
    assert np.allclose(probabilities, prediction.probabilities[0], atol=5e-2)
    assert all(block.min() >= 0 for block in blocks)  # taken after the ReLUs
    assert f"predicted {prediction.labels[0]}" in figure.axes[0].get_xlabel()


@pytest.mark.slow
def test_filters_and_activations_need_the_pytorch_network(small, tmp_path):
    from digitlab.export import export_model

    recognizer, images, _, _ = small
    onnx_path = export_model(recognizer, tmp_path / "small.onnx", check_images=images[:4]).path
    exported = load_recognizer(onnx_path)
    with pytest.raises(DigitlabError, match="pass the .safetensors model file"):
        plots.plot_filters(exported)
    with pytest.raises(DigitlabError, match="pass the .safetensors model file"):
        plots.plot_activations(exported, images[0])


@pytest.mark.parametrize("suffix, magic", [(".png", b"\x89PNG"), (".svg", b"<?xml"), (".pdf", b"%PDF")])
def test_save_figure_writes_the_format_of_the_extension(tmp_path, mnist, suffix, magic):
    (x_train, y_train), _ = mnist
    path = plots.save_figure(plots.plot_imgs(x_train[:2], y_train[:2]), tmp_path / f"grid{suffix}", dpi=50)
    assert path.read_bytes().startswith(magic)
    assert [p.name for p in tmp_path.iterdir()] == [f"grid{suffix}"]  # no temporary file left behind


def test_save_figure_png_size_follows_dpi(tmp_path, mnist):
    (x_train, _), _ = mnist
    figure = plots.plot_heatmap(x_train[0])
    for dpi in (50, 120):
        with Image.open(plots.save_figure(figure, tmp_path / f"h{dpi}.png", dpi)) as image:
            assert image.size == (round(5.6 * dpi), round(4.8 * dpi))


def test_failed_save_keeps_the_old_file(tmp_path, mnist, monkeypatch):
    (x_train, _), _ = mnist
    target = tmp_path / "picture.png"
    target.write_bytes(b"old picture")
    figure = plots.plot_heatmap(x_train[0])

    def broken_savefig(*args, **kwargs):
        with open(args[0], "wb") as f:
            f.write(b"half a PNG")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(figure, "savefig", broken_savefig)
    with pytest.raises(DigitlabError, match="No space left on device"):
        plots.save_figure(figure, target)
    assert target.read_bytes() == b"old picture"
    assert [p.name for p in tmp_path.iterdir()] == ["picture.png"]


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda x, y, p: plots.save_figure(plots.plot_heatmap(x[0]), "picture.jpg"), "ending in .png, .svg, .pdf"),
        (lambda x, y, p: plots.plot_heatmap(x[:2]), "must be 28×28"),
        (lambda x, y, p: plots.plot_imgs(x[:0]), "no images"),
        (lambda x, y, p: plots.plot_imgs(x[:3], y[:2]), "3 images but 2 labels"),
        (lambda x, y, p: plots.plot_predictions(x[:3], p.probabilities[:4]), "probabilities for 3 images"),
        (lambda x, y, p: plots.plot_mistakes(x, p, y, count=0), "count must be at least 1"),
        (lambda x, y, p: plots.plot_confusion(np.ones((3, 4))), "square"),
    ],
)
def test_bad_input_is_a_clear_error(small, call, message):
    _, images, labels, prediction = small
    with pytest.raises(DigitlabError, match=re.escape(message)):
        call(images, labels, prediction)


# --- the `digitlab show` commands -------------------------------------------------------------


@pytest.fixture
def fast_data(mnist, monkeypatch):
    """Let the CLI load MNIST from the session's arrays instead of decompressing the files again."""
    monkeypatch.setattr(digitlab.data, "load_mnist", lambda *args, **kwargs: mnist)


def run_cli(capsys, *argv: str) -> tuple[int, str, str]:
    status = main(list(argv))
    out, err = capsys.readouterr()
    return status, out, err


@pytest.mark.parametrize(
    "argv",
    [
        ["heatmap", "--index", "5"],
        ["grid", "--split", "train", "--start", "0", "--count", "8"],
        ["predictions", "MODEL", "--count", "10"],
        ["confusion", "MODEL", "--limit", "200"],
        ["confusion", "MODEL", "--limit", "200", "--normalize"],
        ["mistakes", "MODEL", "--count", "5", "--limit", "300"],
        ["history", "MODEL"],
        ["filters", "MODEL"],
        ["activations", "MODEL", "--index", "3"],
    ],
)
def test_show_writes_a_png(tmp_path, capsys, fast_data, small_model_path, argv):
    argv = [str(small_model_path) if a == "MODEL" else a for a in argv]
    output = tmp_path / f"{argv[0]}.png"
    status, out, err = run_cli(capsys, "show", *argv, "-o", str(output), "--dpi", "40")
    assert (status, err) == (0, "")
    assert out == f"wrote {output}\n"
    with Image.open(output) as image:
        image.load()
        assert image.format == "PNG"
        assert np.asarray(image.convert("L"), dtype=np.float64).std() > 20
        assert min(image.size) >= 100


def test_show_reads_the_data_dir(tmp_path, capsys):
    output = tmp_path / "heatmap.png"
    status, out, _ = run_cli(capsys, "show", "heatmap", "--index", "5", "--data-dir", str(mnist_dir()), "-o", str(output))
    assert (status, out) == (0, f"wrote {output}\n")
    assert Image.open(output).size == (560, 480)


def test_show_without_output_writes_the_default_name(tmp_path, capsys, fast_data, monkeypatch):
    monkeypatch.chdir(tmp_path)
    status, out, _ = run_cli(capsys, "show", "heatmap", "--split", "test", "--index", "7", "--dpi", "30")
    assert status == 0
    assert out == "wrote heatmap-test-7.png\n"
    with Image.open(tmp_path / "heatmap-test-7.png") as image:
        assert image.size == (round(5.6 * 30), round(4.8 * 30))


def test_show_writes_svg_and_pdf(tmp_path, capsys, fast_data):
    for name, magic in (("grid.svg", b"<?xml"), ("grid.pdf", b"%PDF")):
        status, _, _ = run_cli(capsys, "show", "grid", "--count", "3", "-o", str(tmp_path / name))
        assert status == 0
        assert (tmp_path / name).read_bytes().startswith(magic)


@pytest.mark.parametrize(
    "argv, message",
    [
        (["heatmap", "--index", "60000"], "index 60000 is out of range: the training split has 60,000 images (0-59999)"),
        (["heatmap", "--index", "-1"], "index -1 is out of range"),
        (["activations", "MODEL", "--index", "10000"], "index 10000 is out of range: the test split has 10,000 images"),
        (["grid", "--count", "0"], "--count must be at least 1, got 0"),
        (["grid", "--count", "60001"], "--count 60001 is larger than the training split (60,000 images)"),
        (["grid", "--start", "59999", "--count", "2"], "run past the end of the training split"),
        (["predictions", "MODEL", "--count", "10001"], "--count 10001 is larger than the test split"),
        (["mistakes", "MODEL", "--count", "0"], "--count must be at least 1"),
        (["confusion", "MODEL", "--limit", "0"], "--limit must be between 1 and 10,000"),
        (["predictions", "MISSING"], "model file not found"),
        (["filters", "model.onnx"], "`digitlab show filters` needs the PyTorch network, which model.onnx (ONNX)"),
        (["grid", "--count", "2", "-o", "grid.jpg"], "use a file name ending in .png, .svg, .pdf"),
        (["grid", "--count", "2", "--dpi", "0"], "dpi must be positive, got 0"),
    ],
)
def test_show_bad_input_exits_2_with_one_line(tmp_path, capsys, fast_data, small_model_path, argv, message, monkeypatch):
    monkeypatch.chdir(tmp_path)
    stand_ins = {"MODEL": str(small_model_path), "MISSING": str(tmp_path / "missing.safetensors")}
    argv = [stand_ins.get(a, a) for a in argv]
    status, out, err = run_cli(capsys, "show", *argv)
    assert status == 2
    assert err.startswith("digitlab: error: ") and err.count("\n") == 1
    assert message in err
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow
def test_figures_show_in_a_notebook_without_pyplot():
    """A returned figure displays as a PNG in Jupyter, once, whether or not pyplot was imported."""
    import nbclient
    import nbformat

    code = "import numpy as np\nfrom digitlab.plots import plot_heatmap\nplot_heatmap(np.eye(28) * 0.5, 1)"
    notebook = nbformat.v4.new_notebook(
        cells=[nbformat.v4.new_code_cell(code), nbformat.v4.new_code_cell("%matplotlib inline\n" + code)]
    )
    nbclient.NotebookClient(notebook, timeout=120, kernel_name="python3").execute()
    for cell in notebook.cells:
        pngs = [o for o in cell.outputs if "image/png" in o.get("data", {})]
        assert len(pngs) == 1, cell.outputs
