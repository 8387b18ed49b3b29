"""``python -m hypatia.client.demo``: compile a small model with backend="hypatia", check it
against eager PyTorch, and say where its plan and its executor came from. Run it twice: the
first process measures the executors as the model runs and tells the daemon which was fastest;
the second gets the plan and that choice from the daemon's cache."""

from __future__ import annotations

import os
import time

import torch

from hypatia.client.backend import session


class Block(torch.nn.Module):
    """A transformer-style MLP block: Linear -> GELU(tanh) -> Linear -> ReLU, with a residual."""

    def __init__(self, width: int = 256):
        super().__init__()
        self.up = torch.nn.Linear(width, 4 * width)
        self.act = torch.nn.GELU(approximate="tanh")
        self.down = torch.nn.Linear(4 * width, width)
        self.norm = torch.nn.LayerNorm(width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(x + torch.relu(self.down(self.act(self.up(x)))))


# calls after the first: enough for a first process to measure every executor candidate on a CPU
CALLS = 45


def main() -> None:
    torch.manual_seed(0)
    model = torch.nn.Sequential(Block(), Block()).eval()
    x = torch.randn(32, 64, 256)
    start = time.perf_counter()
    compiled = torch.compile(model, backend="hypatia")
    with torch.no_grad():
        out = compiled(x)
    first_call = time.perf_counter() - start
    with torch.no_grad():
        torch.testing.assert_close(out, model(x), rtol=1e-4, atol=1e-4)
        for _ in range(CALLS):  # a first process measures its executors on these calls
            torch.testing.assert_close(compiled(x), model(x), rtol=1e-4, atol=1e-4)
    counters = session().counters
    source = (
        "daemon cache hit" if counters["daemon_hits"] else
        "planned by the daemon" if counters["daemon_misses"] else "planned in-process"
    )
    print(
        f"[pid {os.getpid()}] output matches eager; first call {first_call:.2f} s; plans: {source} "
        f"(hits {counters['daemon_hits']}, misses {counters['daemon_misses']}, local {counters['local_plans']}); "
        f"fused regions {counters['regions_fused']}; fallbacks {counters['fallbacks']}"
    )
    chosen = [name.removeprefix("executor.") for name in counters if name.startswith("executor.")]
    if counters["executor_from_daemon"]:
        print(f"[pid {os.getpid()}] executor {', '.join(chosen)}: the daemon's choice, measured by an earlier process")
    for choice in session().choices:
        times = ", ".join(f"{n} {m['median_us'] / 1e3:.2f} ms" for n, m in choice.items() if n != "chosen" and not m["error"])
        print(f"[pid {os.getpid()}] executors measured as the model ran: {times}; keeping {choice['chosen']}")


if __name__ == "__main__":
    main()
