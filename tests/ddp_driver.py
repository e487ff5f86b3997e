"""Runs `digitlab train` under torchrun while recording what each rank trained on.

Every training forward pass records which training images it saw (found by
their pixels), and each rank saves its final weights, so a test can check
the sharding and that the ranks agree. Usage:
    torchrun --standalone --nproc_per_node=2 tests/ddp_driver.py OUT_DIR train ...
"""

import json
import os
import sys
from pathlib import Path

import torch

import digitlab.runs
from digitlab.cli import main
from digitlab.data import load_mnist
from digitlab.model import IMAGE_SIZE, DigitCNN, build_model
from digitlab.serialization import save_model

out_dir = Path(sys.argv[1])
argv = sys.argv[2:]
rank = int(os.environ["RANK"])

(x_train, _), _ = load_mnist(progress=False)
index_of = {image.tobytes(): i for i, image in reversed(list(enumerate(x_train)))}
seen: list[int] = []
models: list[DigitCNN] = []
plain_forward = DigitCNN.forward


def recording_forward(self: DigitCNN, x: torch.Tensor) -> torch.Tensor:
    if self.training:
        pixels = (x.detach().float() * 255).round().to(torch.uint8).reshape(len(x), 28, 28)
        seen.extend(index_of[image.numpy().tobytes()] for image in pixels)
    return plain_forward(self, x)


def recording_build_model(seed: int | None = None, input_size: int = IMAGE_SIZE) -> DigitCNN:
    model = build_model(seed, input_size)
    models.append(model)
    return model


DigitCNN.forward = recording_forward
digitlab.runs.build_model = recording_build_model
status = main(argv)
out_dir.mkdir(parents=True, exist_ok=True)
(out_dir / f"seen-{rank}.json").write_text(json.dumps(seen))
save_model(models[0], out_dir / f"weights-{rank}.safetensors", {"rank": rank})
sys.exit(status)
