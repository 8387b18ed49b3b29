"""The hypatia device on the GPU machine (``pytest -m gpu``): the daemon keeps its tensors on
the GPU, a client that sees no GPU trains the small transformer there, and the result matches
the same loop run on CUDA in the test process."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

pytestmark = pytest.mark.gpu

CHILD = """
import json, torch, hypatia.device as hd
assert not torch.cuda.is_available()
torch.manual_seed(5)
layer = torch.nn.TransformerEncoderLayer(d_model=64, nhead=4, dim_feedforward=128, dropout=0.0, batch_first=True)
model = torch.nn.Sequential(layer, torch.nn.Flatten(), torch.nn.Linear(16 * 64, 3)).to("hypatia")
opt = torch.optim.AdamW(model.parameters(), lr=1e-3, capturable=True)
torch.manual_seed(6)
batches = [(torch.randn(8, 16, 64), torch.randint(0, 3, (8,))) for _ in range(4)]
losses = []
for x, y in batches:
    loss = torch.nn.functional.cross_entropy(model(x.to("hypatia")), y.to("hypatia"))
    loss.backward(); opt.step(); opt.zero_grad()
    losses.append(loss.item())
stats = hd.memory_stats()
print(json.dumps({"losses": losses, "device": stats["device_type"], "params": [p.detach().cpu().tolist() for p in model.parameters()][-1]}))
"""


def test_a_client_without_a_gpu_trains_on_the_daemon_s_gpu_as_cuda_does(daemon):
    proc = subprocess.run([sys.executable, "-c", CHILD], env=daemon.env | {"CUDA_VISIBLE_DEVICES": ""},
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    assert got["device"] == "cuda"
    torch.manual_seed(5)
    layer = torch.nn.TransformerEncoderLayer(d_model=64, nhead=4, dim_feedforward=128, dropout=0.0, batch_first=True)
    ref = torch.nn.Sequential(layer, torch.nn.Flatten(), torch.nn.Linear(16 * 64, 3)).cuda()
    opt = torch.optim.AdamW(ref.parameters(), lr=1e-3, capturable=True)
    torch.manual_seed(6)
    batches = [(torch.randn(8, 16, 64), torch.randint(0, 3, (8,))) for _ in range(4)]
    losses = []
    for x, y in batches:
        loss = torch.nn.functional.cross_entropy(ref(x.cuda()), y.cuda())
        loss.backward(); opt.step(); opt.zero_grad()
        losses.append(loss.item())
    torch.testing.assert_close(got["losses"], losses, rtol=1e-3, atol=1e-4)
    torch.testing.assert_close(torch.tensor(got["params"]), list(ref.parameters())[-1].detach().cpu(), rtol=1e-3, atol=1e-4)


CHOOSING = """
import json, torch, hypatia.device as hd
from hypatia.client.rpc import DaemonClient
from hypatia.config import load
assert not torch.cuda.is_available()
torch.manual_seed(0)
model = torch.nn.Sequential(torch.nn.Linear(256, 512), torch.nn.GELU(), torch.nn.LayerNorm(512), torch.nn.Linear(512, 16))
outs = []
with torch.no_grad():
    on_device = model.to("hypatia")
    torch.manual_seed(1)
    for _ in range(60):
        outs.append(on_device(torch.randn(32, 256).to("hypatia")).cpu().tolist())
print(json.dumps({"outs": outs, "device": DaemonClient(load()).call("stats", {})["device"]}))
"""


def test_a_repeated_device_graph_runs_under_each_gpu_executor_and_keeps_the_fastest(home):
    """On the GPU the daemon builds and times aten, CUDA graphs and Inductor (with and without
    CUDA graphs) on a structure's executes; every step matches the same model on CUDA, each
    candidate was timed without error, and one was kept."""
    env = home.env | {"HYPATIA_BACKGROUND_TUNING": "0"}  # a revised plan would start the choice again
    home.hypatiad("start", extra_env=env)
    proc = subprocess.run([sys.executable, "-c", CHOOSING], env=env | {"CUDA_VISIBLE_DEVICES": "", "HYPATIA_AUTOSTART": "0"},
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(256, 512), torch.nn.GELU(), torch.nn.LayerNorm(512),
                                torch.nn.Linear(512, 16)).cuda()
    torch.manual_seed(1)
    with torch.no_grad():
        for out in got["outs"]:
            torch.testing.assert_close(torch.tensor(out), model(torch.randn(32, 256).cuda()).cpu(), rtol=1e-3, atol=1e-3)
    device = got["device"]
    assert device["executor_choices"] >= 1, device
    choice = next(iter(device["executor_choices_made"].values()))
    measured = {m["name"]: m for m in choice["measured"]}
    assert set(measured) == {"aten", "aten+cudagraphs", "inductor", "inductor+cudagraphs"}, measured
    assert all(not m["error"] and m["samples"] == 10 for m in measured.values()), measured
    assert choice["chosen"] in measured
    if choice["chosen"].endswith("+cudagraphs"):  # what the kept capture holds counts against the limit
        assert device["memory_held_by_executors_bytes"] > 0, device


# In training mode (dropout 0): in eval under no_grad the layer takes torch's fused fast path
# (_transformer_encoder_layer_fwd), which some torch versions' Dynamo leaves to eager
COMPILED = """
import json, torch, hypatia.device as hd
from hypatia.device import compiled
assert not torch.cuda.is_available()
torch.manual_seed(0)
layer = torch.nn.TransformerEncoderLayer(d_model=64, nhead=4, dim_feedforward=128, dropout=0.0, batch_first=True)
model = torch.compile(layer.to("hypatia").train(), backend="hypatia")
torch.manual_seed(1)
outs = []
with torch.no_grad():
    for _ in range(5):
        outs.append(model(torch.randn(8, 16, 64).to("hypatia")).cpu().tolist())
print(json.dumps({"outs": outs, "compiled": dict(compiled.counters), "client": hd.memory_stats()["client"]}))
"""


def test_a_compiled_model_on_the_device_runs_whole_graphs_on_the_gpu_as_cuda_does(home):
    """torch.compile on a model on the device, from a client with no GPU: each call is one
    recorded graph, run on the daemon's GPU, and matches the same layer on CUDA."""
    home.hypatiad("start")
    proc = subprocess.run([sys.executable, "-c", COMPILED], env=home.env | {"CUDA_VISIBLE_DEVICES": "", "HYPATIA_AUTOSTART": "0"},
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    assert got["compiled"].get("graphs_compiled") == 1 and "graphs_op_by_op" not in got["compiled"], got["compiled"]
    assert got["client"]["compiled_calls"] == 5, got["client"]
    torch.manual_seed(0)
    layer = torch.nn.TransformerEncoderLayer(d_model=64, nhead=4, dim_feedforward=128, dropout=0.0,
                                             batch_first=True).cuda().train()
    torch.manual_seed(1)
    with torch.no_grad():
        for out in got["outs"]:
            torch.testing.assert_close(torch.tensor(out), layer(torch.randn(8, 16, 64).cuda()).cpu(), rtol=1e-4, atol=1e-4)


IPC = """
import json, torch, hypatia.device as hd
torch.manual_seed(2)
x = torch.randn(512, 1024, device="cuda")  # 2 MiB: over what rides inside a message
y = x.to("hypatia")
z = (y * 2 + 1).to("cuda")  # back onto this process's GPU
model = torch.nn.Sequential(torch.nn.Linear(1024, 1024), torch.nn.GELU(), torch.nn.Linear(1024, 8)).cuda()
with torch.no_grad():
    expected = model(x).cpu().tolist()
    model.to("hypatia")
    out = model(x.to("hypatia")).cpu().tolist()
print(json.dumps({"z_ok": bool(torch.allclose(z, x * 2 + 1)), "z_device": str(z.device), "out": out,
                  "expected": expected, "client": hd.memory_stats()["client"]}))
"""


def test_a_client_with_the_daemon_s_gpu_moves_tensors_by_cuda_ipc_not_through_host_memory(daemon):
    proc = subprocess.run([sys.executable, "-c", IPC], env=daemon.env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    assert got["z_ok"] and got["z_device"].startswith("cuda"), got
    torch.testing.assert_close(torch.tensor(got["out"]), torch.tensor(got["expected"]), rtol=1e-4, atol=1e-4)
    client = got["client"]
    big = 512 * 1024 * 4
    # x went up twice by handle (once as a tensor, once as the model's input), z came down by handle
    assert client["bytes_ipc_up"] >= 2 * big and client["bytes_ipc_down"] >= big, client
    assert client["ipc_copies"] >= 2 and "host_copies" not in client, client
    assert client["bytes_up"] < big, client  # only what is small enough to ride in a message
    device = daemon.stats()["device"]
    assert device["ipc_uploads"] >= 2 and device["ipc_fetches"] >= 1, device


REMOTE = """
import json, torch
from hypatia.client.backend import session
from hypatia.client.rpc import DaemonClient
from hypatia.config import load
assert not torch.cuda.is_available()
torch.manual_seed(0)
model = torch.nn.Sequential(torch.nn.Linear(256, 512), torch.nn.GELU(), torch.nn.LayerNorm(512), torch.nn.Linear(512, 16)).eval()
compiled = torch.compile(model, backend="hypatia", dynamic=False)
torch.manual_seed(1)
outs = []
with torch.no_grad():
    for _ in range(60):  # past the daemon's measuring of its executors (four of 13 calls each)
        outs.append(compiled(torch.randn(32, 256)).tolist())
print(json.dumps({"outs": outs, "counters": dict(session().counters),
                  "device": DaemonClient(load()).call("stats", {})["device"]}))
"""


def test_remote_mode_from_a_client_without_a_gpu_runs_a_cpu_model_on_the_daemon_s_gpu(home):
    """HYPATIA_MODE=remote on the device's machinery: a CPU model compiled in a process that sees
    no GPU runs on the daemon's GPU under the executor it measured fastest; its weights go up
    once, and every call matches the same model on CUDA."""
    env = home.env | {"HYPATIA_BACKGROUND_TUNING": "0"}
    home.hypatiad("start", extra_env=env)
    proc = subprocess.run([sys.executable, "-c", REMOTE], capture_output=True, text=True, timeout=600,
                          env=env | {"CUDA_VISIBLE_DEVICES": "", "HYPATIA_AUTOSTART": "0", "HYPATIA_MODE": "remote"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    counters, device = got["counters"], got["device"]
    assert counters["remote_runs"] == 60 and counters.get("remote_fallbacks", 0) == 0, counters
    weights = (256 * 512 + 512 + 512 + 512 + 512 * 16 + 16) * 4
    assert counters["remote_bytes_up"] == weights + 60 * 32 * 256 * 4  # the weights once, then batches
    assert device["executes"] == 60 and device["executor_choices"] == 1, device
    torch.manual_seed(0)
    ref = torch.nn.Sequential(torch.nn.Linear(256, 512), torch.nn.GELU(), torch.nn.LayerNorm(512),
                              torch.nn.Linear(512, 16)).cuda().eval()
    torch.manual_seed(1)
    with torch.no_grad():
        for out in got["outs"]:
            torch.testing.assert_close(torch.tensor(out), ref(torch.randn(32, 256).cuda()).cpu(), rtol=1e-3, atol=1e-3)
