"""Multi-process training against one daemon: 4 CPU ranks under torchrun (gloo,
DistributedDataParallel), each compiling with backend="hypatia"; DataLoader workers forked
after the rank talked to the daemon compile on their own connection."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import torch

from conftest import free_port

RANKS = 4

TRAIN = textwrap.dedent(
    """
    import json, os, sys
    import torch
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP
    from torch.utils.data import DataLoader, TensorDataset

    backend = sys.argv[1]
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 4))
    ddp = DDP(torch.compile(model, backend=backend))
    opt = torch.optim.SGD(ddp.parameters(), lr=0.1)
    losses = []
    for step in range(3):
        g = torch.Generator().manual_seed(100 + 10 * step + rank)
        x, y = torch.randn(8, 16, generator=g), torch.randn(8, 4, generator=g)
        loss = ((ddp(x) - y) ** 2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())

    def worker_init(worker_id):
        # forked after this rank's session talked to the daemon: it must open its own
        f = torch.compile(lambda t: torch.relu(t) * 2 + 1, backend=backend)
        assert torch.equal(f(torch.ones(3)), torch.full((3,), 3.0))

    loader = DataLoader(TensorDataset(torch.randn(16, 16)), batch_size=8, num_workers=2,
                        multiprocessing_context="fork", worker_init_fn=worker_init)
    with torch.no_grad():
        seen = sum(ddp(xb).shape[0] for (xb,) in loader)
    result = {"losses": losses, "seen": seen, "weights": [p.detach().sum().item() for p in model.parameters()]}
    if backend == "hypatia":
        from hypatia.client.backend import session
        result["counters"] = dict(session().counters)
        result["plans"] = [[phase, p.graph_key, p.revision, [r.to_dict() for r in p.regions]] for phase, p in session().plans]
    with open(os.path.join(os.environ["DDP_OUT"], f"{backend}-{rank}.json"), "w") as f:
        json.dump(result, f)
    dist.destroy_process_group()
    """
)


def _torchrun(home, tmp_path, backend: str) -> list[dict]:
    script = tmp_path / "train.py"
    script.write_text(TRAIN)
    out = tmp_path / f"out-{backend}"  # not a directory named like a package beside the script
    out.mkdir(exist_ok=True)
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={RANKS}", "--master-addr=127.0.0.1",
         f"--master-port={free_port()}", str(script), backend],
        env=home.env | {"DDP_OUT": str(out), "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=400,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    return [json.loads((out / f"{backend}-{rank}.json").read_text()) for rank in range(RANKS)]


def test_four_ddp_ranks_share_one_daemon_and_match_eager_ddp(home, tmp_path):
    home.env["HYPATIA_BACKGROUND_TUNING"] = "0"  # plan counts below are the ranks' own
    # a request retried after a timeout is served (and counted) twice: on a loaded machine the
    # default 2 s could expire, so the exact counts below get a deadline that cannot
    home.env["HYPATIA_TIMEOUT_MS"] = "60000"
    home.hypatiad("start")
    eager = _torchrun(home, tmp_path, "eager")
    first = _torchrun(home, tmp_path, "hypatia")
    for e, h in zip(eager, first):
        torch.testing.assert_close(h["losses"], e["losses"])
        torch.testing.assert_close(h["weights"], e["weights"])
        assert h["seen"] == 16 and h["counters"].get("fallbacks", 0) == 0
        assert h["counters"]["regions_fused"] >= 1  # Linear+ReLU ran fused on every rank
    # every rank got the same plan for every graph (the training graph and the no-grad one)
    assert all(r["plans"] == first[0]["plans"] for r in first)
    assert sorted(p[0] for p in first[0]["plans"]) == ["inference", "training"]
    stats = home.stats()
    # the model's training and no-grad workloads and the workers' lambda: each planned once for
    # 4 ranks + 8 workers; training and inference share one model graph (the forward computation)
    assert stats["plan_cache"]["plans_made"] == 3 and stats["graphs"] == 2, stats["plan_cache"]
    assert stats["plan_cache"]["misses"] == stats["plan_cache"]["coalesced"] + stats["plan_cache"]["plans_made"]
    assert stats["fallbacks"] == 0 and stats["error_total"] == 0
    # a rerun of the job: every graph is a plan-cache hit, nothing is planned again (the first
    # run's hits depend on who asked after a plan was stored, so only the rerun's are counted)
    hits_before = stats["plan_cache"]["hits"]
    again = _torchrun(home, tmp_path, "hypatia")
    assert all(r["counters"]["daemon_hits"] == 2 and r["counters"].get("daemon_misses", 0) == 0 for r in again)
    stats = home.stats()
    assert stats["plan_cache"]["hits"] - hits_before == 2 * RANKS + 2 * RANKS  # 2 graphs per rank, 2 workers' lambda each
    assert stats["plan_cache"]["plans_made"] == 3
