"""Train recipe variants over several seeds; score each model on MNIST and on the UCI digits.

A variant is a recipe name, optionally with settings changed: `robust`, or
`robust:clean_epochs=2,low_res=0.3`. Each (variant, seed) is trained as
`digitlab train` trains it (`digitlab.runs.run_training`: the run directory
OUT/runs/VARIANT-seedN with its model.safetensors and model card), then scored:
validation accuracy (last epoch, when there is a split), MNIST test accuracy,
and the UCI digits (`benchmarks/uci_digits.py`'s 64×64 dark-on-white PNG files)
read through the path of `digitlab predict` (`prepare_image` then `classify`), so
the digits equal what `digitlab predict` prints. The table and the mean ± standard
deviation per variant are printed and written to OUT/results.json, with the MNIST
test accuracy of each variant's seeds as an ensemble (their mean probabilities).
`--teacher MODEL` (repeatable) distils every variant from those models (`digitlab
train --teacher`), for instance from the models of an earlier run of this script.

Needs torch, numpy, Pillow, scikit-learn, tqdm, safetensors (no web service packages).

    python benchmarks/train_candidates.py --variants best robust --seeds 0 1 2 --device cuda --out cand/
    python benchmarks/train_candidates.py --variants robust robust:distill=0.8 --seeds 0 1 2 --device cuda \\
        --teacher cand/runs/robust-seed1{0,1,2,3}/model.safetensors --out students/
    python benchmarks/train_candidates.py --variants robust --seeds 0 --limit 2000 --epochs 1 --uci-count 50 \\
        --device cpu --out /tmp/smoke                                        # a smoke test
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from dataclasses import fields, replace
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import torch  # noqa: E402
from uci_digits import render, uci_digits  # noqa: E402

from digitlab.config import RECIPES, TrainConfig  # noqa: E402
from digitlab.data import load_mnist  # noqa: E402
from digitlab.devices import resolve_device  # noqa: E402
from digitlab.errors import DigitlabError  # noqa: E402
from digitlab.inference import batched_logits  # noqa: E402
from digitlab.model import as_model_input  # noqa: E402
from digitlab.predict import ImagePrediction, classify, load_recognizer, prepare_image  # noqa: E402
from digitlab.runs import run_training  # noqa: E402
from digitlab.serialization import load_model  # noqa: E402

COLUMNS = ("variant", "seed", "train_seconds", "val_accuracy", "test_accuracy", "uci_accuracy")


def parse_variant(spec: str) -> tuple[str, dict[str, Any]]:
    """`RECIPE[:key=value,...]` → the recipe and its changed settings (values read as JSON, else as text)."""
    recipe, _, changes = spec.partition(":")
    if recipe not in RECIPES:
        raise DigitlabError(f"variant {spec!r}: unknown recipe {recipe!r}; use one of {', '.join(RECIPES)}")
    known = {f.name for f in fields(TrainConfig)}
    overrides: dict[str, Any] = {}
    for item in filter(None, changes.split(",")):
        key, equals, text = item.partition("=")
        if not equals or key not in known:
            raise DigitlabError(f"variant {spec!r}: {item!r} is not SETTING=VALUE with a TrainConfig setting")
        try:
            overrides[key] = json.loads(text)
        except json.JSONDecodeError:
            overrides[key] = text
    return recipe, overrides


def score_uci(model_path: Path, prepared: list[ImagePrediction], labels: np.ndarray) -> float:
    """The fraction of the prepared UCI pictures whose digit, as `digitlab predict` gives it, is the label."""
    results = [replace(result) for result in prepared]  # classify fills them in: a fresh copy per model
    classify(load_recognizer(model_path), results)
    return float(np.mean(np.array([result.digit for result in results]) == labels))


def probabilities(model_path: str, images: np.ndarray, device: str) -> torch.Tensor:
    """The model's probabilities for uint8 images (its own calibration ignored)."""
    inputs = as_model_input(torch.from_numpy(images))
    return batched_logits(load_model(model_path)[0], inputs, device=resolve_device(device)).softmax(1)


def ensemble_accuracy(members: list[torch.Tensor], labels: np.ndarray) -> float:
    """The accuracy of the members' mean probabilities (each N×10, for the same N images)."""
    return float((torch.stack(members).mean(0).argmax(1).numpy() == labels).mean())


def summarise(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per variant: the number of seeds and each metric's mean, standard deviation, minimum and maximum."""
    summary = []
    for variant in dict.fromkeys(row["variant"] for row in rows):
        chosen = [row for row in rows if row["variant"] == variant]
        record: dict[str, Any] = {"variant": variant, "seeds": len(chosen)}
        for metric in COLUMNS[2:]:
            values = [row[metric] for row in chosen if row[metric] is not None]
            if values:
                record[metric] = {
                    "mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0,
                    "min": min(values), "max": max(values),
                }  # fmt: skip
        summary.append(record)
    return summary


def format_table(rows: list[dict[str, Any]], summary: list[dict[str, Any]]) -> str:
    """The runs, one line each, then each variant's mean ± standard deviation."""
    width = max(len("variant"), *(len(row["variant"]) for row in rows))

    def pct(value: float | None) -> str:
        return "-" if value is None else f"{value:.2%}"

    lines = [f"{'variant':<{width}} {'seed':>4} {'train s':>8} {'val acc':>8} {'MNIST test':>10} {'UCI':>8}"]
    for row in rows:
        lines.append(f"{row['variant']:<{width}} {row['seed']:>4} {row['train_seconds']:>8.1f} "
                     f"{pct(row['val_accuracy']):>8} {pct(row['test_accuracy']):>10} {pct(row['uci_accuracy']):>8}")  # fmt: skip
    lines.append("")
    lines.append(f"{'variant':<{width}} {'seeds':>5}  {'val acc':>16} {'MNIST test':>16} {'UCI':>16} "
                 f"{'ensemble test':>13}   (mean ± std)")  # fmt: skip
    for record in summary:
        cells = []
        for metric in ("val_accuracy", "test_accuracy", "uci_accuracy"):
            stats = record.get(metric)
            cells.append("-" if stats is None else f"{stats['mean']:.2%} ± {stats['std']:.2%}")
        lines.append(f"{record['variant']:<{width}} {record['seeds']:>5}  {cells[0]:>16} {cells[1]:>16} {cells[2]:>16} "
                     f"{pct(record.get('ensemble_test_accuracy')):>13}")  # fmt: skip
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variants", nargs="+", default=["best", "robust"], metavar="RECIPE[:K=V,...]",
                        help="recipes, each optionally with settings changed (default: best robust)")  # fmt: skip
    parser.add_argument("--seeds", nargs="+", type=int, default=[0], help="seeds (default: 0)")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps (default: auto)")
    parser.add_argument("--epochs", type=int, help="train every variant this many epochs (default: its own)")
    parser.add_argument("--limit", type=int, help="train on the first N training images only (smoke tests)")
    parser.add_argument("--val-split", type=float, default=0.1, help="held-out fraction (default 0.1, as the bundled model)")
    parser.add_argument("--uci-count", type=int, help="score the first N UCI digits (default: all 1,797)")
    parser.add_argument("--data-dir", help="MNIST directory (default: as digitlab train finds it)")
    parser.add_argument("--out", type=Path, required=True, help="directory for the runs, the UCI pictures, results.json")
    parser.add_argument("--teacher", action="append", default=[], metavar="MODEL",
                        help="distil every variant from this model (repeatable: their mean probabilities)")  # fmt: skip
    parser.add_argument("--overwrite", action="store_true", help="replace runs already in --out")
    parser.add_argument("--quiet", action="store_true", help="no progress bars or per-epoch lines")
    args = parser.parse_args(argv)

    try:
        variants = {spec: parse_variant(spec) for spec in args.variants}
        configs = {
            (spec, seed): TrainConfig.from_recipe(recipe, **{**overrides, "seed": seed, "device": args.device,
                                                             "epochs": args.epochs or overrides.get("epochs"),
                                                             "teacher": args.teacher or overrides.get("teacher")})
            for spec, (recipe, overrides) in variants.items() for seed in args.seeds
        }  # fmt: skip
    except DigitlabError as error:
        parser.error(str(error))
    x_test, y_test = load_mnist(args.data_dir, progress=False)[1]
    test_probabilities: dict[str, torch.Tensor] = {}  # each model's, computed once, for the ensembles
    images, labels = uci_digits(args.uci_count)
    paths = render(images, labels, args.out / "uci")
    prepared = [prepare_image(path) for path in paths]

    rows: list[dict[str, Any]] = []
    for (spec, seed), config in configs.items():
        name = f"{spec.replace(':', '-').replace(',', '-').replace('=', '')}-seed{seed}"
        result = run_training(
            config, data_dir=args.data_dir, val_split=args.val_split, limit=args.limit,
            run_dir=args.out / "runs" / name, overwrite=args.overwrite, progress=not args.quiet,
            command=" ".join(["python", *sys.argv]),
        )  # fmt: skip
        last = result.history.epochs[-1]
        rows.append({
            "variant": spec, "seed": seed, "train_seconds": result.card["training_seconds"],
            "val_accuracy": last.get("val_accuracy"), "test_accuracy": result.test.accuracy,
            "uci_accuracy": score_uci(result.model_path, prepared, labels), "model": str(result.model_path),
            "config": result.card["config"],
        })  # fmt: skip
        print(f"{name}: MNIST test {rows[-1]['test_accuracy']:.2%}, UCI {rows[-1]['uci_accuracy']:.2%}", flush=True)
        test_probabilities[str(result.model_path)] = probabilities(str(result.model_path), x_test, args.device)
        summary = summarise(rows)
        for record in summary:
            members = [test_probabilities[row["model"]] for row in rows if row["variant"] == record["variant"]]
            if len(members) > 1:
                record["ensemble_test_accuracy"] = ensemble_accuracy(members, y_test)
        report = {"rows": rows, "summary": summary, "uci_digits": len(paths), "val_split": args.val_split,
                  "limit": args.limit, "device": args.device}  # fmt: skip
        (args.out / "results.json").write_text(json.dumps(report, indent=2) + "\n")  # after each run: nothing lost
    print(format_table(rows, summary))


if __name__ == "__main__":
    main()
