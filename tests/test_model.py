"""The network is the lab's, layer for layer, with Keras' defaults."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from digitlab.errors import DigitlabError
from digitlab.model import (
    GlobalAveragePooling,
    Resizing,
    as_model_input,
    build_model,
    fold_batchnorm,
    parameter_counts,
    prepare,
    summary,
    summary_rows,
)


def test_parameter_counts_match_the_lab():
    assert parameter_counts(build_model()) == {"total": 99_402, "trainable": 98_922, "non_trainable": 480}


def test_summary_rows_match_keras_shapes_and_counts():
    rows = summary_rows(build_model())
    assert [(name, shape, params) for name, _, shape, params in rows] == [
        ("conv2d", "(None, 26, 26, 16)", 160),
        ("batch_normalization", "(None, 26, 26, 16)", 64),
        ("re_lu", "(None, 26, 26, 16)", 0),
        ("conv2d_1", "(None, 24, 24, 32)", 4640),
        ("batch_normalization_1", "(None, 24, 24, 32)", 128),
        ("re_lu_1", "(None, 24, 24, 32)", 0),
        ("conv2d_2", "(None, 22, 22, 64)", 18496),
        ("batch_normalization_2", "(None, 22, 22, 64)", 256),
        ("re_lu_2", "(None, 22, 22, 64)", 0),
        ("conv2d_3", "(None, 20, 20, 128)", 73856),
        ("batch_normalization_3", "(None, 20, 20, 128)", 512),
        ("re_lu_3", "(None, 20, 20, 128)", 0),
        ("global_average_pooling2d", "(None, 128)", 0),
        ("dense", "(None, 10)", 1290),
    ]
    text = summary(build_model())
    assert "Total params: 99,402" in text and "Non-trainable params: 480" in text


def test_a_smaller_input_size_adds_only_a_resizing_layer_without_parameters():
    lab, shrinking = build_model(seed=3), build_model(seed=3, input_size=18)
    rows = summary_rows(shrinking)
    assert rows[0] == ("resizing", "Resizing", "(None, 18, 18, 1)", 0)
    assert [row[2] for row in rows[1:4]] == ["(None, 16, 16, 16)"] * 3
    assert rows[10][2] == "(None, 10, 10, 128)" and rows[-1][2:] == ("(None, 10)", 1290)
    assert parameter_counts(shrinking) == parameter_counts(lab)
    assert lab.state_dict().keys() == shrinking.state_dict().keys()  # the same weights file
    assert all(torch.equal(lab.state_dict()[k], v) for k, v in shrinking.state_dict().items())
    assert not any(isinstance(m, Resizing) for m in lab.modules())  # the lab's network exactly


@pytest.mark.parametrize("size", [9, 18, 27])
def test_resizing_is_antialiased_bilinear_interpolation(size):
    images = torch.rand(6, 1, 28, 28, generator=torch.Generator().manual_seed(size))
    expected = F.interpolate(images, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    torch.testing.assert_close(Resizing(size)(images), expected, rtol=0, atol=1e-6)
    constant = torch.full((1, 1, 28, 28), 0.7)
    torch.testing.assert_close(Resizing(size)(constant), torch.full((1, 1, size, size), 0.7))


@pytest.mark.parametrize("size", [8, 29, 18.0, True])
def test_input_sizes_the_network_cannot_take_are_refused(size):
    with pytest.raises(DigitlabError, match="from 9 to 28"):
        build_model(input_size=size)


def test_batchnorm_uses_keras_defaults():
    bns = [m for m in build_model().modules() if isinstance(m, nn.BatchNorm2d)]
    assert len(bns) == 4
    assert all(bn.momentum == pytest.approx(0.01) and bn.eps == pytest.approx(1e-3) for bn in bns)


def test_initialisation_is_glorot_uniform_with_zero_biases():
    model = build_model(seed=0)
    for layer in (m for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))):
        fan_in = layer.weight[0].numel()
        fan_out = layer.weight.shape[0] * layer.weight[0, 0].numel()
        limit = (6 / (fan_in + fan_out)) ** 0.5
        assert layer.weight.abs().max() <= limit
        assert layer.weight.abs().max() > 0.9 * limit  # uniform over the whole range
        assert torch.count_nonzero(layer.bias) == 0


def test_seed_makes_initial_weights_reproducible():
    a, b, c = build_model(seed=1), build_model(seed=1), build_model(seed=2)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    assert not torch.equal(a.conv1.weight, c.conv1.weight)


def test_forward_gives_logits_for_each_image():
    logits = build_model().eval()(torch.rand(5, 1, 28, 28))
    assert logits.shape == (5, 10)


def test_prepare_is_the_labs_scale_and_reshape():
    images = np.array([[[0, 255] * 14] * 28] * 3, dtype=np.uint8)
    prepared = prepare(images)
    assert prepared.shape == (3, 28, 28, 1) and prepared.dtype == np.float32
    assert prepared.min() == 0.0 and prepared.max() == 1.0


@pytest.mark.parametrize("shape", [(28, 28), (4, 28, 28), (4, 28, 28, 1), (4, 1, 28, 28)])
def test_model_input_accepts_the_usual_layouts(shape):
    assert as_model_input(np.zeros(shape, np.uint8)).shape[1:] == (1, 28, 28)


def test_model_input_rejects_wrong_sizes_and_ranges():
    with pytest.raises(DigitlabError, match="28×28"):
        as_model_input(np.zeros((2, 32, 32), np.uint8))
    with pytest.raises(DigitlabError, match=r"\[0, 1\]"):
        as_model_input(np.full((28, 28), 255.0))


@pytest.mark.parametrize("input_size", [28, 18])
def test_folding_batchnorm_keeps_the_function_and_leaves_the_model_alone(input_size):
    model = build_model(seed=0, input_size=input_size)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for norm in (m for m in model.modules() if isinstance(m, nn.BatchNorm2d)):
            for tensor, low, high in [
                (norm.running_mean, -1, 1), (norm.running_var, 0.2, 3),
                (norm.weight, 0.5, 1.5), (norm.bias, -0.5, 0.5),
            ]:  # fmt: skip
                tensor.copy_(torch.rand(tensor.shape, generator=generator) * (high - low) + low)
    before = {name: value.clone() for name, value in model.state_dict().items()}
    folded = fold_batchnorm(model)
    images = torch.rand(8, 1, 28, 28, generator=generator)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in folded.modules())
    assert model.training and not folded.training
    with torch.no_grad():
        torch.testing.assert_close(folded(images), model.eval()(images), rtol=1e-4, atol=1e-5)
    assert all(torch.equal(before[name], value) for name, value in model.state_dict().items())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("layout", [torch.channels_last, torch.contiguous_format])
def test_global_pooling_passes_its_gradient_as_a_broadcast_view_with_pytorchs_values(layout, dtype):
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(4, 8, 5, 5, generator=generator).to(dtype).contiguous(memory_format=layout)
    upstream = torch.randn(4, 8, 1, 1, generator=generator).to(dtype)

    def gradients(pooling: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
        """The gradient the pooling hands to the ReLU before it, and the one the ReLU hands on."""
        before_relu = x.clone().requires_grad_() * 1  # not a leaf: its gradient is kept as written
        after_relu = torch.relu(before_relu)
        captured: dict[str, torch.Tensor] = {}
        before_relu.register_hook(lambda grad: captured.setdefault("relu", grad))
        after_relu.register_hook(lambda grad: captured.setdefault("pooling", grad))
        pooling(after_relu).backward(upstream)
        return captured["pooling"], captured["relu"]

    (ours_pooling, ours_relu), (reference_pooling, reference_relu) = (
        gradients(GlobalAveragePooling()), gradients(nn.AdaptiveAvgPool2d(1))
    )
    torch.testing.assert_close(ours_pooling, reference_pooling)
    torch.testing.assert_close(ours_relu, reference_relu)
    assert ours_pooling.stride()[2:] == (0, 0)  # nothing written over height and width
    assert ours_relu.is_contiguous(memory_format=layout)
    torch.testing.assert_close(GlobalAveragePooling()(x.clone().requires_grad_()), nn.AdaptiveAvgPool2d(1)(x))
    with torch.no_grad():
        torch.testing.assert_close(GlobalAveragePooling()(x), nn.AdaptiveAvgPool2d(1)(x))
