"""The whole training step as one CUDA graph: on a GPU this small network is bound by kernel launches.

A step of the lab's network launches over a hundred small kernels (forward,
backward, SGD, running metrics) whose arithmetic takes microseconds; launched
one by one from Python they leave the GPU idle most of the time. Captured once
into a CUDA graph, they are replayed with one launch per step. The graph reads
its batch from fixed buffers and the learning rate from a tensor, so a step
only copies its batch in and sets the rate. The first few steps run eagerly (as
real training steps) so that cuDNN, cuBLAS, autograd and the optimizer's buffers
are set up before capture.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

EAGER_STEPS = 3  # real steps run before capture, as PyTorch's CUDA-graph guide recommends


StepBody = Callable[..., None]
"""`body(x, y, sums, autocast_cache=...)`: forward, loss, backward and update on one batch whose
gradients were cleared, adding its loss sum, correct predictions and size to `sums`."""


class GraphedStep:
    """Train on full batches of one size by replaying a captured CUDA graph of the whole step.

    `body` is the eager loop's step (`digitlab.train`), run on fixed batch
    buffers; `sums` holds the running loss sum, correct predictions and
    samples, as the eager loop keeps them. The optimizer must be a fused SGD
    (`fused=True`): its update reads the learning rate from a device tensor
    inside the graph.
    """

    def __init__(
        self,
        body: StepBody,
        optimizer: torch.optim.SGD,
        *,
        batch_size: int,
        device: torch.device,
        memory_format: torch.memory_format,
    ) -> None:
        self.body, self.optimizer, self.device = body, optimizer, device
        self.batch_size = batch_size
        self.x = torch.zeros(batch_size, 1, 28, 28, device=device).contiguous(memory_format=memory_format)
        self.y = torch.zeros(batch_size, dtype=torch.long, device=device)
        self.sums = torch.zeros(3, dtype=torch.float64, device=device)
        self.lr = torch.zeros((), device=device)
        self._lr_value: float | None = None
        self._eager_steps = 0
        self._graph: torch.cuda.CUDAGraph | None = None

    def step(self, x: torch.Tensor, y: torch.Tensor, lr: float) -> None:
        """One optimizer step on a full batch of float images `x` (N×1×28×28) and labels `y`."""
        self.x.copy_(x)
        self.y.copy_(y)
        if lr != self._lr_value:
            self.lr.fill_(lr)
            self._lr_value = lr
        for group in self.optimizer.param_groups:
            group["lr"] = self.lr  # an eager step on a short last batch may have set a number
        if self._graph is not None:
            self._graph.replay()
        elif self._eager_steps < EAGER_STEPS:
            self._eager_step()
        else:
            self._capture()
            self._graph.replay()

    def _run_body(self) -> None:
        self.body(self.x, self.y, self.sums, autocast_cache=False)  # a graph cannot hold autocast's cache

    def _eager_step(self) -> None:
        """A real step on a side stream, as capture wants the work before it off the default stream."""
        stream = torch.cuda.Stream(self.device)
        stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(stream):
            self.optimizer.zero_grad(set_to_none=True)
            self._run_body()
        torch.cuda.current_stream(self.device).wait_stream(stream)
        self._eager_steps += 1

    def _capture(self) -> None:
        """Record the step; the gradients it allocates stay in the graph's memory for every replay."""
        self.optimizer.zero_grad(set_to_none=True)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            self._run_body()
        self._graph = graph


def can_graph(device: torch.device, *, enabled: bool, world_size: int, compiled: bool) -> bool:
    """Whether a run captures its step: CUDA, asked for, one process, no torch.compile."""
    return enabled and device.type == "cuda" and world_size == 1 and not compiled
