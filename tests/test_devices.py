"""Device, precision and allocator choices."""

from __future__ import annotations

import platform
import subprocess
import sys
import textwrap

import pytest
import torch

from digitlab import devices
from digitlab.errors import DigitlabError

CPU = torch.device("cpu")


@pytest.mark.parametrize("native", [True, False])
def test_auto_precision_on_a_cpu_follows_native_bf16(monkeypatch: pytest.MonkeyPatch, native: bool) -> None:
    monkeypatch.setattr(devices, "native_bf16", lambda device: native)
    precision, reason = devices.choose_precision("auto", CPU)
    assert precision == ("bf16" if native else "fp32")
    assert ("natively" in reason) if native else ("no native bf16" in reason)
    assert devices.resolve_precision("auto", CPU) == precision


@pytest.mark.parametrize("device_type", ["cuda", "mps"])
def test_auto_precision_on_an_accelerator_step_by_step_is_fp32(device_type: str) -> None:
    precision, reason = devices.choose_precision("auto", torch.device(device_type))
    assert precision == "fp32"
    assert device_type.upper() in reason and "launch-bound" in reason


@pytest.mark.parametrize("native", [True, False])
def test_auto_precision_of_a_captured_cuda_step_follows_native_bf16(monkeypatch: pytest.MonkeyPatch, native: bool):
    """On an H100 the captured lab epoch took 0.92 s in bf16 and 1.05 s in fp32 (benchmarks/gpu_epoch.py)."""
    monkeypatch.setattr(devices, "native_bf16", lambda device: native)
    precision, reason = devices.choose_precision("auto", torch.device("cuda"), graphed=True)
    assert precision == ("bf16" if native else "fp32")
    assert ("CUDA graph" in reason) if native else ("launch-bound" in reason)


def test_an_explicit_precision_is_kept_and_said_to_be_chosen() -> None:
    assert devices.choose_precision("bf16", CPU) == ("bf16", "chosen with --precision")
    assert devices.choose_precision("fp32", torch.device("cuda"))[0] == "fp32"


@pytest.mark.parametrize(
    ("precision", "message"), [("fp16", "fp16 autocast is for CUDA"), ("int8", "unknown precision 'int8'")]
)
def test_precisions_that_cannot_run_are_refused(precision: str, message: str) -> None:
    with pytest.raises(DigitlabError, match=message):
        devices.choose_precision(precision, CPU)


@pytest.mark.skipif(
    platform.system() != "Linux" or platform.libc_ver()[0] != "glibc",
    reason="the allocator setting exists in glibc only",
)
@pytest.mark.slow
def test_training_steps_reuse_their_memory_once_it_is_kept() -> None:
    """30 lab steps fault in less memory than one step's activations (about 10,000 pages) use."""
    script = textwrap.dedent(
        """
        import resource, torch
        import torch.nn.functional as F
        from digitlab import devices
        from digitlab.model import build_model
        devices.keep_freed_memory()
        model = build_model(seed=0).to(memory_format=torch.channels_last)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        images = torch.rand(32, 1, 28, 28).contiguous(memory_format=torch.channels_last)
        labels = torch.randint(0, 10, (32,))
        def step():
            loss = F.cross_entropy(model(images), labels)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        for _ in range(3):
            step()
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        for _ in range(30):
            step()
        print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
        """
    )
    faults = int(subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True).stdout)
    assert faults < 10_000  # glibc's defaults fault in 70,000-220,000 pages here: each step anew
