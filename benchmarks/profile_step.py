"""Where one lab-recipe training step spends its time: a torch.profiler breakdown by kind of work.

One step is the lab recipe's (batch 32, SGD at lr 0.1, the lab's CNN,
channels-last) in the chosen precision (by default the one `digitlab train`
chooses on this machine), with the allocator setting `digitlab train` uses,
on random images (the time does not
depend on the pixels). After warm-up steps, `--steps` steps run under the
profiler; each operator's self time is put in a group (convolutions,
BatchNorm, ReLU, optimizer, the rest), and the table prints milliseconds per
step and the share of each group.

    python benchmarks/profile_step.py                 # auto precision, 100 profiled steps
    python benchmarks/profile_step.py --precision fp32 --top 15
"""

from __future__ import annotations

import argparse
import time
from collections import defaultdict

import torch
from torch.profiler import ProfilerActivity, profile

from digitlab import devices
from digitlab.model import build_model

GROUPS = (  # (group, substrings of operator names), first match wins
    ("convolution", ("convolution", "conv2d", "mkldnn_conv")),
    ("BatchNorm", ("batch_norm",)),
    ("ReLU", ("relu", "threshold")),
    ("optimizer", ("_foreach", "sgd")),
)


def group_of(name: str) -> str:
    lowered = name.lower()
    for group, needles in GROUPS:
        if any(needle in lowered for needle in needles):
            return group
    return "other"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--precision", default="auto", choices=("auto", "fp32", "bf16"))
    parser.add_argument("--steps", type=int, default=100, help="profiled steps (default 100)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--threads", type=int, help="intra-op threads (default: PyTorch's choice)")
    parser.add_argument("--top", type=int, default=10, help="also list the N costliest operators")
    args = parser.parse_args()
    devices.set_threads(args.threads)
    devices.keep_freed_memory()
    device = torch.device("cpu")
    precision, reason = devices.choose_precision(args.precision, device)

    model = build_model(seed=0).to(memory_format=torch.channels_last).train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    images = torch.rand(args.batch_size, 1, 28, 28).contiguous(memory_format=torch.channels_last)
    labels = torch.randint(0, 10, (args.batch_size,))

    def step() -> None:
        with devices.autocast(precision, device):
            logits = model(images)
        loss = torch.nn.functional.cross_entropy(logits.float(), labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    for _ in range(30):
        step()
    started = time.perf_counter()
    for _ in range(args.steps):
        step()
    unprofiled_ms = (time.perf_counter() - started) / args.steps * 1e3
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(args.steps):
            step()

    events = [e for e in prof.key_averages() if e.self_cpu_time_total > 0]
    by_group: dict[str, float] = defaultdict(float)
    for event in events:
        by_group[group_of(event.key)] += event.self_cpu_time_total
    total = sum(by_group.values())
    print(
        f"Lab-recipe step, batch {args.batch_size}, {precision} ({reason}), {torch.get_num_threads()} thread(s): "
        f"{unprofiled_ms:.2f} ms per step without the profiler ({unprofiled_ms * 1875 / 1e3:.1f} s per 1,875-step epoch)"
    )
    print(f"{'group':<12} {'ms/step':>8} {'share':>7}   (profiler self CPU time)")
    for group, micros in sorted(by_group.items(), key=lambda item: -item[1]):
        print(f"{group:<12} {micros / args.steps / 1e3:8.2f} {micros / total:7.1%}")
    print(f"\nThe {args.top} costliest operators:")
    for event in sorted(events, key=lambda e: -e.self_cpu_time_total)[: args.top]:
        share = event.self_cpu_time_total / total
        print(f"  {event.key:<45} {event.self_cpu_time_total / args.steps / 1e3:6.2f} ms/step {share:6.1%}  [{group_of(event.key)}]")


if __name__ == "__main__":
    main()
