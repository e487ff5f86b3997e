"""`digitlab show heatmap|grid|predictions|confusion|mistakes|calibration|history|filters|activations`: pictures as files."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from digitlab.cli._options import MODEL_HELP, add_model_argument
from digitlab.cli.data import add_data_arguments
from digitlab.errors import DigitlabError


def register(subparsers: argparse._SubParsersAction) -> None:
    show = subparsers.add_parser(
        "show",
        help="draw the data and the model as PNG, SVG or PDF: heatmap, grid, predictions, confusion, ...",
        description="Draw a picture of the data or of a model and write it to a file.",
    )
    pictures = show.add_subparsers(dest="picture", metavar="PICTURE", required=True)

    def picture(name: str, help_text: str, handler, *, model: bool, data: bool) -> argparse.ArgumentParser:
        parser = pictures.add_parser(name, help=help_text, description=help_text)
        if model:
            add_model_argument(parser)
        parser.add_argument("-o", "--output", type=Path, help="PNG, SVG or PDF file (default: a name like NAME.png)")
        parser.add_argument("--dpi", type=float, default=100, help="resolution in dots per inch (default: %(default)s)")
        if data:
            add_data_arguments(parser)
        parser.set_defaults(handler=handler)
        return parser

    heatmap = picture("heatmap", "one image as a heatmap of its pixel values, label in the title",
                      show_heatmap, model=False, data=True)  # fmt: skip
    heatmap.add_argument("--split", choices=("train", "test"), default="train", help="which split (default: %(default)s)")
    heatmap.add_argument("--index", type=int, default=0, help="which image (default: %(default)s)")

    grid = picture("grid", "images in rows of five with their labels (the lab's plot_imgs)",
                   show_grid, model=False, data=True)  # fmt: skip
    grid.add_argument("--split", choices=("train", "test"), default="train", help="which split (default: %(default)s)")
    grid.add_argument("--start", type=int, default=0, help="first image (default: %(default)s)")
    grid.add_argument("--count", type=int, default=10, help="how many images (default: %(default)s)")

    predictions = picture("predictions", "test images with the predicted class and probability; wrong ones red",
                          show_predictions, model=True, data=True)  # fmt: skip
    predictions.add_argument("--start", type=int, default=0, help="first test image (default: %(default)s)")
    predictions.add_argument("--count", type=int, default=25, help="how many images (default: %(default)s)")

    confusion = picture("confusion", "the confusion matrix on the test set",
                        show_confusion, model=True, data=True)  # fmt: skip
    confusion.add_argument("--normalize", action="store_true", help="percentages of each true class instead of counts")
    confusion.add_argument("--limit", type=int, help="use only the first N test images")

    mistakes = picture("mistakes", "the most confident wrong predictions on the test set",
                       show_mistakes, model=True, data=True)  # fmt: skip
    mistakes.add_argument("--count", type=int, default=25, help="at most this many (default: %(default)s)")
    mistakes.add_argument("--limit", type=int, help="search only the first N test images")

    calibration = picture("calibration", "reliability diagram on the test set, before and after the card's temperature",
                          show_calibration, model=True, data=True)  # fmt: skip
    calibration.add_argument("--limit", type=int, help="use only the first N test images")

    history = picture("history", "loss and accuracy per epoch and per step, from the model's training history "
                      "or from a run directory (also while it trains)", show_history, model=False, data=False)
    add_model_argument(history, help=f"{MODEL_HELP}, or a run directory (also while it trains)")
    picture("filters", "the first convolution layer's 16 kernels (needs a .safetensors model)",
            show_filters, model=True, data=False)  # fmt: skip

    activations = picture("activations", "the feature maps of each conv block for one image",
                          show_activations, model=True, data=True)  # fmt: skip
    activations.add_argument("--split", choices=("train", "test"), default="test",
                             help="which split (default: %(default)s)")  # fmt: skip
    activations.add_argument("--index", type=int, default=0, help="which image (default: %(default)s)")


def _split(args: argparse.Namespace) -> tuple[np.ndarray, np.ndarray]:
    from digitlab.data import load_mnist

    train, test = load_mnist(args.data_dir, dataset=args.dataset)
    return train if getattr(args, "split", "test") == "train" else test


def _split_name(args: argparse.Namespace) -> str:
    return "training" if getattr(args, "split", "test") == "train" else "test"


def _check_index(index: int, total: int, split: str) -> None:
    if not 0 <= index < total:
        raise DigitlabError(f"index {index} is out of range: the {split} split has {total:,} images (0-{total - 1})")


def _check_range(start: int, count: int, total: int, split: str) -> None:
    if count < 1:
        raise DigitlabError(f"--count must be at least 1, got {count}")
    if count > total:
        raise DigitlabError(f"--count {count} is larger than the {split} split ({total:,} images)")
    _check_index(start, total, split)
    if start + count > total:
        raise DigitlabError(
            f"images {start}-{start + count - 1} run past the end of the {split} split "
            f"({total:,} images); lower --start or --count"
        )


def _limited(images: np.ndarray, labels: np.ndarray, limit: int | None) -> tuple[np.ndarray, np.ndarray]:
    if limit is None:
        return images, labels
    if not 1 <= limit <= len(images):
        raise DigitlabError(f"--limit must be between 1 and {len(images):,} (the test split), got {limit}")
    return images[:limit], labels[:limit]


def _recognizer(args: argparse.Namespace, needs_network: bool = False):
    from digitlab.predict import load_recognizer

    if needs_network and args.model and Path(args.model).suffix == ".onnx":
        raise DigitlabError(
            f"`digitlab show {args.picture}` needs the PyTorch network, which {Path(args.model).name} "
            "(ONNX) does not hold; pass the .safetensors model file"
        )
    return load_recognizer(args.model)


def _class_names(args: argparse.Namespace) -> list[str]:
    from digitlab.data import class_names

    return class_names(args.dataset)


def _save(figure, args: argparse.Namespace, default_name: str) -> int:
    from digitlab.plots import save_figure

    path = save_figure(figure, args.output or Path(default_name), dpi=args.dpi)
    print(f"wrote {path}")
    return 0


def show_heatmap(args: argparse.Namespace) -> int:
    from digitlab.plots import plot_heatmap

    images, labels = _split(args)
    _check_index(args.index, len(images), _split_name(args))
    label = _class_names(args)[labels[args.index]]
    title = f"{_split_name(args).capitalize()} image {args.index}: label {label}"
    return _save(plot_heatmap(images[args.index], label, title=title), args, f"heatmap-{args.split}-{args.index}.png")


def show_grid(args: argparse.Namespace) -> int:
    from digitlab.plots import plot_imgs

    images, labels = _split(args)
    _check_range(args.start, args.count, len(images), _split_name(args))
    chosen = slice(args.start, args.start + args.count)
    figure = plot_imgs(images[chosen], labels[chosen], class_names=_class_names(args))
    return _save(figure, args, f"grid-{args.split}-{args.start}-{args.count}.png")


def show_predictions(args: argparse.Namespace) -> int:
    from digitlab.plots import plot_predictions

    recognizer = _recognizer(args)
    images, labels = _split(args)
    _check_range(args.start, args.count, len(images), "test")
    chosen = slice(args.start, args.start + args.count)
    prediction = recognizer.predict(images[chosen])
    figure = plot_predictions(images[chosen], prediction, labels[chosen], class_names=_class_names(args))
    return _save(figure, args, "predictions.png")


def show_confusion(args: argparse.Namespace) -> int:
    from digitlab.evaluate import evaluate
    from digitlab.plots import plot_confusion

    recognizer = _recognizer(args)
    images, labels = _limited(*_split(args), args.limit)
    evaluation = evaluate(recognizer, images, labels)
    figure = plot_confusion(evaluation.confusion, normalize=args.normalize, class_names=_class_names(args))
    return _save(figure, args, "confusion.png")


def show_mistakes(args: argparse.Namespace) -> int:
    from digitlab.plots import plot_mistakes

    recognizer = _recognizer(args)
    images, labels = _limited(*_split(args), args.limit)
    _check_range(0, args.count, len(images), "test")
    prediction = recognizer.predict(images)
    figure = plot_mistakes(images, prediction, labels, count=args.count, class_names=_class_names(args))
    return _save(figure, args, "mistakes.png")


def show_history(args: argparse.Namespace) -> int:
    from digitlab.live import live_history, read_records
    from digitlab.plots import plot_history

    run_dir = Path(args.model) if args.model else None
    if run_dir is not None and any((run_dir / name).is_file() for name in ("metrics.jsonl", "metrics.json")):
        history, name = live_history(read_records(run_dir)), run_dir.name
        if not history["steps"] and (run_dir / "metrics.json").is_file():  # a run from before the live files
            history = json.loads((run_dir / "metrics.json").read_text())
    else:
        card = _recognizer(args).card
        history = card.get("history", {})
        name = card.get("name") or (Path(args.model).name if args.model else "the bundled model")
    figure = plot_history(history, title=f"Training history of {name}")
    return _save(figure, args, "history.png")


def show_filters(args: argparse.Namespace) -> int:
    from digitlab.plots import plot_filters

    return _save(plot_filters(_recognizer(args, needs_network=True)), args, "filters.png")


def show_activations(args: argparse.Namespace) -> int:
    from digitlab.plots import plot_activations

    recognizer = _recognizer(args, needs_network=True)
    images, labels = _split(args)
    _check_index(args.index, len(images), _split_name(args))
    figure = plot_activations(recognizer, images[args.index], labels[args.index], class_names=_class_names(args))
    return _save(figure, args, f"activations-{args.split}-{args.index}.png")


def show_calibration(args: argparse.Namespace) -> int:
    from digitlab.plots import plot_reliability, reliability_sets

    recognizer = _recognizer(args)
    images, labels = _limited(*_split(args), args.limit)
    figure = plot_reliability(labels, reliability_sets(recognizer.logits(images), recognizer.temperature))
    return _save(figure, args, "calibration.png")
