"""The captured CUDA-graph training step: when it is used, and that it trains as the eager loop does.

The tests that train on a GPU are marked `cuda` and skip where PyTorch sees no
CUDA device (CI has none); they were run on an H100 (benchmarks/README.md).
"""

from __future__ import annotations

import pytest
import torch

from digitlab.graphed import can_graph
from digitlab.model import build_model
from digitlab.train import Checkpoints, TrainConfig, train

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (none here)")
CUDA = torch.device("cuda")


@pytest.mark.parametrize(
    ("device", "enabled", "world_size", "compiled", "expected"),
    [
        ("cuda", True, 1, False, True),
        ("cuda", False, 1, False, False),  # --no-cuda-graph
        ("cuda", True, 2, False, False),  # DDP synchronises inside backward: not captured
        ("cuda", True, 1, True, False),  # torch.compile has its own graphs
        ("cpu", True, 1, False, False),
        ("mps", True, 1, False, False),
    ],
)
def test_only_a_single_uncompiled_cuda_process_captures_its_step(device, enabled, world_size, compiled, expected):
    assert can_graph(torch.device(device), enabled=enabled, world_size=world_size, compiled=compiled) is expected


def test_a_cpu_run_ignores_the_cuda_graph_setting(mnist):
    (x, y), _ = mnist
    graphed = build_model(seed=0)
    eager = build_model(seed=0)
    train(graphed, x[:96], y[:96], TrainConfig(seed=0, device="cpu", cuda_graph=True), progress=False)
    train(eager, x[:96], y[:96], TrainConfig(seed=0, device="cpu", cuda_graph=False), progress=False)
    for name, value in graphed.state_dict().items():
        assert torch.equal(value, eager.state_dict()[name]), name


def relative_difference(a: torch.nn.Module, b: torch.nn.Module) -> float:
    """‖a − b‖ / ‖b‖ over all floating-point weights and statistics."""
    pairs = [(va.float(), b.state_dict()[name].float()) for name, va in a.state_dict().items() if va.is_floating_point()]
    difference = sum(float((va - vb).norm() ** 2) for va, vb in pairs) ** 0.5
    return difference / sum(float(vb.norm() ** 2) for _, vb in pairs) ** 0.5


def trained_on_cuda(mnist, count: int, **settings) -> tuple[torch.nn.Module, dict]:
    (x, y), _ = mnist
    model = build_model(seed=0)
    history = train(model, x[:count], y[:count], TrainConfig(seed=0, device="cuda", **settings), progress=False)
    return model.cpu(), history.epochs[-1]


@needs_cuda
@pytest.mark.parametrize(
    "recipe",
    [
        {"precision": "fp32", "batch_size": 48},  # the lab's constant rate, 13 batches of 48 and one of 16
        {"precision": "bf16", "batch_size": 48},
        # momentum, Nesterov, weight decay, label smoothing, a rate that changes every step, augmentation
        {"precision": "fp32", "batch_size": 128, "lr": 0.2, "momentum": 0.9, "nesterov": True,
         "weight_decay": 5e-4, "label_smoothing": 0.1, "schedule": "onecycle", "augment": True, "epochs": 2},
    ],  # fmt: skip
)
def test_the_captured_step_trains_as_the_eager_loop_does(mnist, recipe):
    """Same seed, same batches: after 640 images the weights agree to float rounding, and so do the metrics.

    Not bit for bit: rounding differences (the eager SGD reads its rate as a number, the graph's as a float32
    tensor) grow with every step; after 2,000 lab images the two were 0.55% apart on an H100.
    """
    graphed, graphed_epoch = trained_on_cuda(mnist, 640, cuda_graph=True, **recipe)
    eager, eager_epoch = trained_on_cuda(mnist, 640, cuda_graph=False, **recipe)
    tolerance = 2e-2 if recipe["precision"] == "bf16" else 2e-3
    assert relative_difference(graphed, eager) < tolerance
    assert graphed_epoch["samples"] == eager_epoch["samples"] == 640
    assert graphed_epoch["loss"] == pytest.approx(eager_epoch["loss"], rel=tolerance)
    assert abs(graphed_epoch["accuracy"] - eager_epoch["accuracy"]) <= 0.02
    assert relative_difference(graphed, build_model(seed=0)) > 0.03  # it did train (see the CPU test below)


@needs_cuda
def test_the_captured_step_distils_as_the_eager_loop_does(mnist, bundled_model_path):
    """With a teacher, whose forward pass is captured in the graph too. Wrong labels (each image gets its
    neighbour's) make the teacher's part plain: on the CPU it moved the weights by 3% after 640 images."""
    (x, y), _ = mnist
    wrong = torch.as_tensor(y[:640]).roll(1).numpy()

    def trained(teacher: tuple[str, ...], cuda_graph: bool) -> torch.nn.Module:
        model = build_model(seed=0)
        config = TrainConfig(seed=0, device="cuda", precision="fp32", batch_size=48, teacher=teacher, distill=1.0,
                             cuda_graph=cuda_graph)  # fmt: skip
        train(model, x[:640], wrong, config, progress=False)
        return model.cpu()

    graphed = trained((str(bundled_model_path),), cuda_graph=True)
    assert relative_difference(graphed, trained((str(bundled_model_path),), cuda_graph=False)) < 2e-3
    assert relative_difference(graphed, trained((), cuda_graph=True)) > 1e-2


@needs_cuda
def test_the_captured_step_averages_the_weights_as_the_eager_loop_does(mnist):
    """The moving average's update is captured in the graph too: it agrees with the eager loop's, and it is
    not the model's last weights."""
    settings = dict(precision="fp32", batch_size=48, ema=0.9)
    graphed, _ = trained_on_cuda(mnist, 640, cuda_graph=True, **settings)
    assert relative_difference(graphed, trained_on_cuda(mnist, 640, cuda_graph=False, **settings)[0]) < 2e-3
    assert relative_difference(graphed, trained_on_cuda(mnist, 640, cuda_graph=True, precision="fp32",
                                                         batch_size=48)[0]) > 1e-2  # fmt: skip


@needs_cuda
def test_a_resumed_graphed_run_ends_where_an_uninterrupted_one_does(mnist, tmp_path):
    """Resumed in the second epoch (a new graph, new eager steps), a run ends where one run straight through does."""
    (x, y), _ = mnist
    config = TrainConfig.from_recipe("lab", epochs=2, seed=0, device="cuda", momentum=0.9, checkpoint_every=8,
                                     keep_checkpoints=20)  # fmt: skip
    straight = build_model(seed=0)
    train(straight, x[:1024], y[:1024], config, checkpoints=Checkpoints(tmp_path, keep=20), progress=False)
    for later in [path for path in Checkpoints(tmp_path).all() if int(path.stem.split("-")[1]) > 40]:
        later.unlink()  # as if the run had been killed at epoch 2, step 8 (32 steps an epoch)
    resumed = build_model(seed=1)  # other starting weights: all of them must come from the checkpoint
    train(resumed, x[:1024], y[:1024], config, checkpoints=Checkpoints(tmp_path, keep=20), resume=True,
          progress=False)  # fmt: skip
    assert relative_difference(resumed.cpu(), straight.cpu()) < 1e-3


def test_the_trained_test_above_can_tell_trained_weights_from_untrained(mnist):
    """The CUDA test's "it did train" bound, checked where it runs everywhere: 640 lab images move the weights."""
    (x, y), _ = mnist
    model = build_model(seed=0)
    train(model, x[:640], y[:640], TrainConfig(seed=0, device="cpu", batch_size=48), progress=False)
    assert relative_difference(model, build_model(seed=0)) > 0.03
