"""Evaluation: loss, accuracy, per-class figures and the confusion matrix on labelled images."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from digitlab import devices
from digitlab.errors import DigitlabError
from digitlab.inference import DigitRecognizer, batched_logits
from digitlab.model import NUM_CLASSES, as_model_input


@dataclass
class Evaluation:
    """Summed cross-entropy and the confusion matrix (rows: true label, columns: predicted)."""

    loss_sum: float
    confusion: np.ndarray

    @property
    def count(self) -> int:
        return int(self.confusion.sum())

    @property
    def loss(self) -> float:
        return self.loss_sum / max(1, self.count)

    @property
    def accuracy(self) -> float:
        return float(np.trace(self.confusion)) / max(1, self.count)

    def per_class(self) -> dict[str, list[float]]:
        """Accuracy (= recall), precision and F1 of each class."""
        hits = np.diag(self.confusion).astype(float)
        recall = hits / np.maximum(1, self.confusion.sum(axis=1))
        precision = hits / np.maximum(1, self.confusion.sum(axis=0))
        f1 = np.where(
            precision + recall > 0, 2 * precision * recall / np.maximum(1e-12, precision + recall), 0.0
        )
        return {"recall": recall.tolist(), "precision": precision.tolist(), "f1": f1.tolist()}

    def to_dict(self) -> dict[str, object]:
        return {
            "loss": self.loss,
            "accuracy": self.accuracy,
            "count": self.count,
            "per_class": self.per_class(),
            "confusion": self.confusion.tolist(),
        }


def evaluation_from_logits(logits: torch.Tensor, labels: torch.Tensor) -> Evaluation:
    labels = labels.to(torch.long).cpu()
    loss_sum = F.cross_entropy(logits, labels, reduction="sum").item()
    confusion = torch.bincount(labels * NUM_CLASSES + logits.argmax(1), minlength=NUM_CLASSES**2)
    return Evaluation(loss_sum=loss_sum, confusion=confusion.view(NUM_CLASSES, NUM_CLASSES).numpy())


def evaluate_sharded(
    model: nn.Module,
    x: np.ndarray,
    y: np.ndarray,
    *,
    ranks: devices.Ranks,
    precision: str = "auto",
    device: torch.device | str = "cpu",
) -> Evaluation:
    """Evaluate with each rank taking every world_size-th image, then sum over ranks."""
    shard = slice(ranks.rank, None, ranks.world_size)
    logits = batched_logits(model, as_model_input(x[shard]), precision=precision, device=device)
    part = evaluation_from_logits(logits, torch.as_tensor(np.asarray(y[shard]), dtype=torch.long))
    if ranks.world_size == 1:
        return part
    totals = torch.tensor([part.loss_sum, *part.confusion.flatten().tolist()], dtype=torch.float64)
    totals = devices.all_reduce_sum(totals.to(device)).cpu()
    confusion = totals[1:].round().to(torch.int64).view(NUM_CLASSES, NUM_CLASSES).numpy()
    return Evaluation(loss_sum=totals[0].item(), confusion=confusion)


def evaluate(model: nn.Module | DigitRecognizer, x: np.ndarray, y: np.ndarray) -> Evaluation:
    """Test loss, accuracy and confusion matrix of a model on images (uint8 or [0, 1]) and labels.

    `model` is a network from `build_model`/`load_model`, or a recogniser
    (`Recognizer`, or `OnnxRecognizer` for an exported ONNX model).
    """
    labels = torch.as_tensor(np.asarray(y)).to(torch.long)
    if len(labels) != len(x):
        raise DigitlabError(f"{len(x)} images but {len(labels)} labels; pass matching arrays")
    if labels.numel() and (labels.min() < 0 or labels.max() >= NUM_CLASSES):
        raise DigitlabError(f"labels must be digits 0-{NUM_CLASSES - 1}")
    if isinstance(model, nn.Module):
        logits = batched_logits(model, as_model_input(x))
    else:
        logits = torch.from_numpy(model.logits(x))
    return evaluation_from_logits(logits, labels)


def format_evaluation(evaluation: Evaluation, class_names: list[str] | None = None) -> str:
    """Loss and accuracy as the lab printed them, then accuracy per class."""
    names = class_names or [str(d) for d in range(NUM_CLASSES)]
    lines = [
        f"Loss: {evaluation.loss:.4f}  Accuracy: {evaluation.accuracy:.4f}  ({evaluation.count:,} images)"
    ]
    per_class = evaluation.per_class()
    lines.append(f"{'class':>12}  {'accuracy':>8}  {'precision':>9}  {'f1':>6}  {'count':>6}")
    for i, name in enumerate(names):
        lines.append(
            f"{name:>12}  {per_class['recall'][i]:8.4f}  {per_class['precision'][i]:9.4f}  "
            f"{per_class['f1'][i]:6.4f}  {int(evaluation.confusion[i].sum()):6d}"
        )
    return "\n".join(lines)
