"""The Hugging Face layout of a model: `model.safetensors`, `config.json` and a `README.md` card.

`model.safetensors` holds the plain PyTorch state dict (safetensors format
"pt"), so the weights load into an ordinary `nn.Sequential` without digitlab
(README.md, "Without digitlab"). `config.json` describes the network and its
input and keeps the digitlab model card; `README.md` is the model card people
read on the Hub, with YAML metadata (library, dataset, test accuracy, data
checksums, the training command and the machine). digitlab loads the directory
back with `serialization.load_model`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from safetensors.torch import save_file
from torch import nn

from digitlab.inference import PREPROCESSING, card_temperature
from digitlab.model import FILTERS, KERAS_BN_EPSILON, NUM_CLASSES, input_size_of
from digitlab.serialization import HF_CARD_KEY, HF_CONFIG, HF_WEIGHTS, check_finite

HF_README = "README.md"
HF_FILES = frozenset({HF_WEIGHTS, HF_CONFIG, HF_README})


def write_hf_directory(model: nn.Module, card: dict[str, Any], directory: Path) -> None:
    """Write the three files of the Hugging Face layout into an existing `directory`."""
    card = {**card, "input_size": input_size_of(model)}  # what loading it back builds
    state = {name: tensor.detach().cpu().contiguous() for name, tensor in model.state_dict().items()}
    check_finite(state, directory / HF_WEIGHTS)
    save_file(state, directory / HF_WEIGHTS, metadata={"format": "pt"})
    (directory / HF_CONFIG).write_text(json.dumps(hf_config(card), indent=2) + "\n", encoding="utf-8")
    (directory / HF_README).write_text(model_card(card), encoding="utf-8")


def hf_config(card: dict[str, Any]) -> dict[str, Any]:
    """`config.json`: what the network is, what it takes, and the digitlab card (with its `input_size`)."""
    return {
        "library_name": "digitlab",
        "model_type": "digitlab-cnn",
        "architecture": "input resized to input_size (antialiased bilinear, below 28), "
        "4 x (Conv2d 3x3 valid + BatchNorm2d + ReLU), global average pooling, Linear",
        "input_size": card["input_size"],
        "filters": list(FILTERS),
        "kernel_size": 3,
        "batchnorm_eps": KERAS_BN_EPSILON,
        "num_classes": NUM_CLASSES,
        "temperature": card_temperature(card),  # calibrated probabilities: softmax(logits / temperature)
        "preprocessing": PREPROCESSING,
        HF_CARD_KEY: card,
    }


def _yaml(value: Any) -> str:
    """A scalar as YAML: JSON's quoting is valid YAML."""
    return json.dumps(value, ensure_ascii=False)


def _front_matter(card: dict[str, Any]) -> list[str]:
    """The YAML metadata the Hub reads: library, dataset, metrics, and where the model came from."""
    name, dataset = card.get("name", "digitlab-model"), card.get("dataset", "mnist")
    lines = ["---", "library_name: digitlab", "license: mit", "pipeline_tag: image-classification",
             "tags:", "- image-classification", "- pytorch", "- safetensors", "datasets:", f"- {dataset}"]  # fmt: skip
    accuracy = card.get("test", {}).get("accuracy")
    if accuracy is not None:
        lines += ["metrics:", "- accuracy", "model-index:", f"- name: {_yaml(name)}", "  results:",
                  "  - task:", "      type: image-classification", "    dataset:", f"      name: {_yaml(dataset)}",
                  f"      type: {_yaml(dataset)}", "      split: test", "    metrics:", "    - type: accuracy",
                  f"      value: {accuracy}"]  # fmt: skip
    digitlab = {key: card[key] for key in ("data_sha256", "command", "environment") if card.get(key)}
    if digitlab:
        lines.append("digitlab:")
        for key, value in digitlab.items():
            if isinstance(value, dict):
                lines.append(f"  {key}:")
                lines += [f"    {inner}: {_yaml(item)}" for inner, item in value.items()]
            else:
                lines.append(f"  {key}: {_yaml(value)}")
    return [*lines, "---"]


def model_card(card: dict[str, Any]) -> str:
    """`README.md`: YAML metadata, then what the model is and how to use it."""
    test = card.get("test", {})
    body = [
        "",
        f"# {card.get('name', 'digitlab model')}",
        "",
        "The classic Keras MNIST lab's convolutional network (99,402 parameters), trained with "
        "digitlab: four blocks of Conv2d 3x3 + BatchNorm + ReLU "
        f"({'/'.join(map(str, FILTERS))} filters), global average pooling and a dense layer of 10 logits.",
        "",
        f"- input: {PREPROCESSING['input_shape']}, {PREPROCESSING['input_dtype']}, "
        f"{PREPROCESSING['input_scaling']}, {PREPROCESSING['input_polarity']}",
        f"- output: {PREPROCESSING['output']}",
    ]
    if "accuracy" in test:
        body.append(f"- test accuracy: {test['accuracy']:.2%} on {test.get('count', 0):,} images")
    if card.get("command"):
        body.append(f"- trained with: `{card['command']}`")
    body += [
        "",
        "With digitlab: `digitlab evaluate --model DIR`, `digitlab predict --model DIR picture.png`, "
        "`digitlab serve --model DIR`. Without it, `model.safetensors` loads into a plain "
        "`torch.nn.Sequential` of the layers above (digitlab's README, section *Without digitlab*).",
        "",
    ]
    return "\n".join([*_front_matter(card), *body])
