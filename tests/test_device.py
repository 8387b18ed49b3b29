"""The ``hypatia`` device against a real hypatiad: tensors live in the daemon, ops are recorded
and flushed as keyed graphs, weights are kept once per content for every process, training
matches the same loop run on the CPU, and a lost daemon or a full device is a clear error."""

from __future__ import annotations

import copy
import json
import os
import signal
import subprocess
import sys
import textwrap

import pytest
import torch

from conftest import daemon_of_its_own_home, daemon_stats, free_port, wait_until
from device_helpers import config, device_stats, rec  # noqa: F401  (fixtures)

import hypatia.device as hd
from hypatia import shm
from hypatia.daemon.device_pool import DeviceFull as PoolFull, DevicePool, UnknownSession
from hypatia.device import trace


def run_child(config, body: str, timeout: int = 120) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("HYPATIA_")} | {
        "HYPATIA_HOME": str(config.runtime_dir.parent), "HYPATIA_AUTOSTART": "0"}
    return subprocess.run([sys.executable, "-c", textwrap.dedent(body)], env=env, capture_output=True, text=True,
                          timeout=timeout)


def test_the_device_is_torch_s_privateuse1_backend_renamed_and_tensors_behave(rec):
    assert torch._C._get_privateuse1_backend_name() == "hypatia" and torch.hypatia.device_count() == 1
    assert torch.hypatia.is_available()
    x = torch.randn(4, 3)
    y = x.to("hypatia")
    assert isinstance(y, hd.HypatiaTensor) and y.device == torch.device("hypatia", 0) and y.is_hypatia
    z = (y * 2 + 1).relu()
    torch.testing.assert_close(z.cpu(), (x * 2 + 1).relu())
    assert z.sum().item() == pytest.approx(float((x * 2 + 1).relu().sum()), rel=1e-6)
    assert (z.numpy() == (x * 2 + 1).relu().numpy()).all()
    assert "device='hypatia:0'" in repr(z)
    torch.testing.assert_close((torch.zeros(2, 3, device="hypatia") + 1).cpu(), torch.ones(2, 3))
    assert bool((y.abs() >= 0).all())
    assert rec.counters["flushes"] >= 3 and rec.counters["ops_recorded"] >= 5, rec.counters


def test_tensors_from_data_and_factories_written_through_out_land_on_the_device(rec):
    """``torch.tensor(data, device=...)`` copies with the Python dispatch key off, and
    ``torch.arange(n, device=...)`` reaches the device as ``arange.start_out``: both must make
    hypatia tensors recorded on the device (GPT-2's position ids and cache set-up), not CPU
    values or a run on the client."""
    on_client = rec.counters["ops_on_client"]
    for data, dtype in (([1.5, -2.0], None), ([], torch.bfloat16), (3, None), ([[1, 2], [3, 4]], torch.int32)):
        t = torch.tensor(data, dtype=dtype, device="hypatia")
        assert isinstance(t, hd.HypatiaTensor)
        torch.testing.assert_close(t.cpu(), torch.tensor(data, dtype=dtype))
    positions = torch.arange(6, device="hypatia") + 2
    assert isinstance(positions, hd.HypatiaTensor) and positions.dtype == torch.int64
    x = torch.empty(4, dtype=torch.float64, device="hypatia")
    torch.arange(4, out=x)
    mask = torch.where(positions > 4, torch.ones(6, device="hypatia"), torch.tensor(-1.0))
    torch.testing.assert_close(positions.cpu(), torch.arange(6) + 2)
    torch.testing.assert_close(x.cpu(), torch.arange(4, dtype=torch.float64))
    torch.testing.assert_close(mask.cpu(), torch.tensor([-1.0, -1.0, -1.0, 1.0, 1.0, 1.0]))
    assert rec.counters["ops_on_client"] == on_client, rec.counters


def test_a_deep_copy_of_a_model_on_the_device_is_a_copy_on_the_device(rec):
    """copy.deepcopy copies a device tensor on the device (a recorded clone), even before its
    upload was flushed; the copy is independent, and a parameter stays a parameter."""
    torch.manual_seed(7)
    ref = torch.nn.Linear(4, 4)
    model = copy.deepcopy(ref).to("hypatia")
    twin = copy.deepcopy(model)
    assert twin.weight is not model.weight and isinstance(twin.weight, torch.nn.Parameter)
    assert isinstance(twin.weight, hd.HypatiaTensor) and twin.weight.requires_grad
    with torch.no_grad():
        twin.weight.add_(1)
    torch.testing.assert_close(model.weight.cpu(), ref.weight.detach())
    torch.testing.assert_close(twin.weight.cpu(), ref.weight.detach() + 1)
    shared = torch.randn(3).to("hypatia")
    pair = copy.deepcopy([shared, shared])  # the memo: one copy for one tensor
    assert pair[0] is pair[1] and pair[0] is not shared


def test_a_flushed_structure_is_planned_once_and_its_executable_served_to_later_flushes(rec, config):
    def f(t):
        return (t @ t.T).softmax(-1).sum(0)

    before = device_stats(config)
    plans_before = daemon_stats(config)["requests"].get("make_plan", 0)
    outs = [f(torch.full((5, 5), float(k)).to("hypatia")).cpu() for k in range(3)]
    for k, out in enumerate(outs):
        torch.testing.assert_close(out, f(torch.full((5, 5), float(k))))
    after = device_stats(config)
    assert after["executes"] - before.get("executes", 0) == 3, after
    assert after["executables_built"] - before.get("executables_built", 0) == 1, after  # one structure
    assert daemon_stats(config)["requests"]["make_plan"] - plans_before == 1


def test_views_and_in_place_writes_follow_torch_s_aliasing(rec):
    x = torch.arange(12.0).reshape(3, 4)
    h = x.clone().to("hypatia")
    for t in (x, h):
        t[:, 1:3].mul_(10)
        t.view(-1)[0] = -1.0
        t.t()[3].add_(0.5)
        row = t[2]
        row.zero_()
        t.add_(1)
    torch.testing.assert_close(h.cpu(), x)
    torch.testing.assert_close(row.cpu(), x[2])


def _mlp() -> torch.nn.Module:
    return torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.GELU(), torch.nn.LayerNorm(32), torch.nn.Linear(32, 4))


def _train(model, opt, batches, to):
    losses = []
    for x, y in batches:
        loss = torch.nn.functional.cross_entropy(model(x.to(to)), y.to(to))
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    return losses


def test_an_mlp_trains_on_the_device_as_on_the_cpu_with_state_resident_in_the_daemon(rec, config):
    torch.manual_seed(0)
    ref = _mlp()
    model = copy.deepcopy(ref).to("hypatia")
    assert all(isinstance(p, torch.nn.Parameter) and p.device.type == "hypatia" for p in model.parameters())
    batches = [(torch.randn(8, 16), torch.randint(0, 4, (8,))) for _ in range(4)]
    got = _train(model, torch.optim.AdamW(model.parameters(), lr=1e-2, capturable=True), batches, "hypatia")
    want = _train(ref, torch.optim.AdamW(ref.parameters(), lr=1e-2), batches, "cpu")
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    for p, q in zip(model.parameters(), ref.parameters()):
        torch.testing.assert_close(p.detach().cpu(), q.detach(), rtol=1e-5, atol=1e-6)
    stats = device_stats(config)
    assert stats["handles"] >= 3 * len(list(ref.parameters())), stats  # weights, moments, step counts
    assert rec.link.bytes_up < 64 * 1024, rec.link.bytes_up  # weights went up once; only batches after


def test_a_small_transformer_trains_on_the_device_as_on_the_cpu(rec):
    torch.manual_seed(1)
    layer = torch.nn.TransformerEncoderLayer(d_model=32, nhead=4, dim_feedforward=64, dropout=0.0, batch_first=True)
    ref = torch.nn.Sequential(layer, torch.nn.Flatten(), torch.nn.Linear(6 * 32, 3))
    model = copy.deepcopy(ref).to("hypatia")
    batches = [(torch.randn(4, 6, 32), torch.randint(0, 3, (4,))) for _ in range(3)]
    got = _train(model, torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9), batches, "hypatia")
    want = _train(ref, torch.optim.SGD(ref.parameters(), lr=0.05, momentum=0.9), batches, "cpu")
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    for p, q in zip(model.parameters(), ref.parameters()):
        torch.testing.assert_close(p.detach().cpu(), q.detach(), rtol=1e-4, atol=1e-5)


CHILD_SAME_WEIGHTS = """
import torch, hypatia.device as hd
torch.manual_seed(7)
model = torch.nn.Linear(256, 256).to("hypatia")
torch.hypatia.synchronize()
print("UP", hd.memory_stats()["client"]["bytes_up"])
opt = torch.optim.SGD(model.parameters(), lr=1.0)
model(torch.ones(2, 256).to("hypatia")).sum().backward()
opt.step()
print("STEPPED", float(model.weight.detach().sum().cpu()))
"""


def test_two_processes_share_one_copy_of_the_same_weights_and_a_write_copies_first(rec, config):
    torch.manual_seed(7)
    here = torch.nn.Linear(256, 256)
    original = here.weight.detach().clone()
    here.to("hypatia")
    torch.hypatia.synchronize()
    before = device_stats(config)
    proc = run_child(config, CHILD_SAME_WEIGHTS)
    assert proc.returncode == 0, proc.stderr[-2000:]
    after = device_stats(config)
    assert after["uploads_shared"] - before.get("uploads_shared", 0) >= 2, after  # weight and bias adopted
    assert after["bytes_not_moved"] - before.get("bytes_not_moved", 0) >= 256 * 256 * 4, after
    up = int(proc.stdout.split("UP ")[1].split()[0])
    assert up < 256 * 256 * 4, proc.stdout  # the child sent digests, not the weight
    # the child's optimizer step wrote its own copy: this process still sees the original
    assert float(proc.stdout.split("STEPPED ")[1]) != pytest.approx(float(original.sum()))
    torch.testing.assert_close(here.weight.detach().cpu(), original)


def test_a_client_that_dies_releases_its_tensors(rec, config):
    body = """
        import os, signal, torch, hypatia.device as hd
        keep = torch.randn(512, 512).to("hypatia") * 3
        torch.hypatia.synchronize()
        print("HELD", flush=True)
        os.kill(os.getpid(), signal.SIGKILL)
    """
    before = device_stats(config)
    proc = run_child(config, body)
    assert proc.returncode == -signal.SIGKILL and "HELD" in proc.stdout, proc.stderr[-2000:]
    assert wait_until(lambda: device_stats(config)["sessions_swept"] > before.get("sessions_swept", 0), timeout=30)
    assert device_stats(config)["memory_used_bytes"] <= before["memory_used_bytes"] + 4096


def test_the_first_use_of_the_device_starts_hypatiad_where_none_runs(home):
    """A first flush of small tensors only (sent with the execute, none uploaded before it) holds
    nothing yet: the daemon it finds missing is started, as for any first request."""
    assert home.daemon_pid() is None
    proc = home.python("""
        import torch, hypatia.device
        print((torch.ones(4).to("hypatia") * 3).cpu().tolist())
    """)
    assert proc.stdout.strip().splitlines()[-1] == "[3.0, 3.0, 3.0, 3.0]", proc.stderr[-2000:]
    assert home.daemon_pid() is not None and home.stats()["device"]["executes"] == 1


def test_a_dead_daemon_is_one_clear_error_and_what_was_moved_back_is_kept():
    with daemon_of_its_own_home() as own:
        recorder = trace.connect(own)
        model = torch.nn.Linear(8, 8).to("hypatia")
        kept = copy.deepcopy(model).to("cpu")
        x = torch.randn(2, 8)
        want = kept(x)
        pid = recorder.link.client.call("ping")["pid"]
        os.kill(pid, signal.SIGKILL)
        assert wait_until(lambda: not shm.pid_alive(pid), timeout=30)
        with pytest.raises(hd.DeviceLost, match="lost") as caught:
            model(x.to("hypatia")).cpu()
        assert "model.to('cpu')" in str(caught.value)
        with pytest.raises(hd.DeviceLost):  # and every later use says the same
            torch.ones(1, device="hypatia").cpu()
        torch.testing.assert_close(kept(x), want)
    trace.connect()  # a fresh session for whatever runs next


def test_a_full_device_is_a_clear_error_that_loses_nothing():
    with daemon_of_its_own_home(HYPATIA_DEVICE_MEMORY_MB="1") as small:
        trace.connect(small)
        small_cpu = torch.randn(64, 64)
        fits = small_cpu.to("hypatia")
        torch.hypatia.synchronize()
        big = torch.randn(1024, 1024).to("hypatia")  # 4 MiB
        with pytest.raises(hd.DeviceFull, match="HYPATIA_DEVICE_MEMORY_MB"):
            torch.hypatia.synchronize()
        del big
        torch.testing.assert_close((fits * 2).cpu(), small_cpu * 2)
    trace.connect()


def test_a_structure_flushed_every_step_runs_under_the_executor_measured_fastest():
    """With two candidates, the daemon runs a repeated structure under ``aten`` at once, then
    builds Inductor's code for it, times both on the client's own steps and keeps the faster;
    every step's result matches the CPU's, and ``stats`` names the choice and its timings."""
    with daemon_of_its_own_home(HYPATIA_DEVICE_EXECUTORS="aten,inductor") as home:
        rec = trace.connect(home)
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.GELU(), torch.nn.Linear(64, 4))
        on_device = copy.deepcopy(model).to("hypatia")
        calls = 3 * (3 + 10) + 2  # each candidate: warm-up and timed calls; then the choice
        for _ in range(calls):
            x = torch.randn(8, 32)
            with torch.no_grad():
                torch.testing.assert_close(on_device(x.to("hypatia")).cpu(), model(x), rtol=1e-5, atol=1e-5)
        stats = device_stats(home)
        assert rec.counters["structures_reused"] >= calls - 2, rec.counters
        assert stats["executor_choices"] == 1, stats
        ((graph, choice),) = stats["executor_choices_made"].items()
        assert choice["chosen"] in ("aten", "inductor") and stats[f"chose_{choice['chosen']}"] == 1
        measured = {m["name"]: m for m in choice["measured"]}
        assert set(measured) == {"aten", "inductor"}, measured
        assert all(m["samples"] == 10 and not m["error"] and m["median_us"] > 0 for m in measured.values()), measured
        # the choice is stored with the graph's plan: a restarted daemon builds it at once
        assert wait_until(lambda: daemon_stats(home)["executors"]["choices"] == 1, timeout=30)
        rec.link.close()
        env = {k: v for k, v in os.environ.items() if not k.startswith("HYPATIA_")} | {
            "HYPATIA_HOME": str(home.runtime_dir.parent), "HYPATIA_BACKGROUND_TUNING": "0",
            "HYPATIA_DEVICE_EXECUTORS": "aten,inductor"}
        for verb in ("stop", "start"):
            subprocess.run([sys.executable, "-m", "hypatia.daemon", verb], env=env, check=True, capture_output=True,
                           timeout=120)
        rec = trace.connect(home)
        on_device = copy.deepcopy(model).to("hypatia")
        for _ in range(3):
            x = torch.randn(8, 32)
            with torch.no_grad():
                torch.testing.assert_close(on_device(x.to("hypatia")).cpu(), model(x), rtol=1e-5, atol=1e-5)
        again = device_stats(home)
        assert again["executor_choices_reused"] == 1 and "executor_choices" not in again, again
        rec.link.close()
    trace.connect()


def test_the_device_s_executor_candidates_and_the_graph_inductor_is_given():
    from torch.fx.experimental.proxy_tensor import make_fx

    from hypatia.config import ConfigError, load
    from hypatia.daemon import device_executors as dx

    assert dx.candidates("auto", "cuda") == ("aten", "aten+cudagraphs", "inductor", "inductor+cudagraphs")
    assert dx.candidates("auto", "cpu") == ("aten",)
    assert dx.candidates("inductor+cudagraphs,inductor", "cpu") == ("aten", "inductor")  # no CUDA graphs off a GPU
    assert load({"HYPATIA_DEVICE_EXECUTORS": "aten+cudagraphs, inductor"}).device_executors == "aten+cudagraphs, inductor"
    for bad, said in (("eager", "name aten, not eager"), ("aten,turbo", "'turbo' is not a candidate")):
        with pytest.raises(ConfigError, match=said):
            load({"HYPATIA_DEVICE_EXECUTORS": bad})
    x = torch.randn(4, 6)
    gm = make_fx(lambda t: (t.t().contiguous().view(3, 8) * 2,))(x)
    assert torch.ops.aten.view.default in {n.target for n in gm.graph.nodes}
    reshaped = dx._reshaping(gm)
    targets = {n.target for n in reshaped.graph.nodes}
    assert torch.ops.aten.view.default not in targets and torch.ops.aten.reshape.default in targets
    torch.testing.assert_close(reshaped(x)[0], x.t().contiguous().view(3, 8) * 2)


def test_the_pool_counts_references_and_drops_a_session_s_buffers():
    pool = DevicePool(limit_bytes=1 << 20)
    a, b = pool.session("a" * 16, pid=1, create=True), pool.session("b" * 16, pid=2, create=True)
    pool.put(a, 1, torch.ones(1024), digest="d" * 64)
    assert pool.adopt(b, 7, "d" * 64) and pool.used == 4096 and pool.shared["d" * 64].refs == 2
    pool.release(a, [1])
    assert pool.used == 4096 and pool.get(b, 7).sum() == 1024
    with pytest.raises(PoolFull, match="HYPATIA_DEVICE_MEMORY_MB"):
        pool.reserve(2 << 20, "a test")
    give_back = pool.hold_for_executor(512 << 10, "a captured graph")  # counted against the limit
    assert pool.stats()["memory_held_by_executors_bytes"] == 512 << 10
    with pytest.raises(PoolFull, match="in use"):
        pool.hold_for_executor(600 << 10, "another captured graph")
    with pytest.raises(PoolFull):
        pool.reserve(600 << 10, "outputs")
    give_back()
    pool.reserve(600 << 10, "outputs")
    assert pool.held_by_executors == 0
    assert pool.sweep(alive=lambda pid: pid != 2, idle_s=60) == ["b" * 16]
    assert pool.used == 0 and not pool.shared
    with pytest.raises(UnknownSession, match="lost"):
        pool.session("b" * 16, pid=2)


def test_a_cuda_ipc_upload_that_cannot_be_opened_is_refused_clearly_and_stores_nothing(rec, config):
    """A client sends a CUDA tensor by IPC handle only to a daemon with its GPU: this daemon has
    none, so the link never offers one, and a request that does (or a malformed one) is refused."""
    from hypatia.client.rpc import DaemonClient
    from hypatia.protocol import RemoteError

    assert rec.link.cuda_ipc(torch.device("cuda")) is False  # asked without touching CUDA
    fields = {"uuid": "GPU-0", "size": [4], "stride": [1], "offset": 0, "dtype": "float32", "handle": b"\0" * 64,
              "size_bytes": 16, "offset_bytes": 0, "ref_counter_handle": b"/torch_x", "ref_counter_offset": 0,
              "event_handle": None, "event_sync_required": False}
    client = DaemonClient(config)
    before = device_stats(config)["memory_used_bytes"]

    def upload(data: dict) -> None:
        client.call("device", {"op": "upload", "session": rec.link.session, "pid": os.getpid(), "tag": "ipc0test",
                               "tensors": [{"handle": 1 << 40, "digest": None, "data": {"cuda_ipc": data}}]}, retries=0)
    try:
        with pytest.raises(RemoteError, match="hypatiad's device is its CPU; send it through host memory"):
            upload(fields)
        with pytest.raises(RemoteError, match="size and stride differ"):
            upload(fields | {"size": [4, 4]})
        with pytest.raises(RemoteError, match="cuda_ipc.dtype 'float8' is not one of"):
            upload(fields | {"dtype": "float8"})
        with pytest.raises(RemoteError, match="cuda_ipc.handle must be a bytes"):
            upload(fields | {"handle": "not bytes"})
    finally:
        client.close()
    assert device_stats(config)["memory_used_bytes"] == before
    assert "ipc_uploads" not in device_stats(config)


CHILD_OVER_TCP = """
import copy, json, torch, hypatia.device as hd
torch.manual_seed(3)
ref = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 2))
model = copy.deepcopy(ref).to("hypatia")
xs, ys = torch.randn(3, 4, 8), torch.randn(3, 4, 2)
for m, opt, dev in ((model, torch.optim.SGD(model.parameters(), lr=0.1), "hypatia"),
                    (ref, torch.optim.SGD(ref.parameters(), lr=0.1), "cpu")):
    for x, y in zip(xs, ys):
        loss = torch.nn.functional.mse_loss(m(x.to(dev)), y.to(dev))
        loss.backward(); opt.step(); opt.zero_grad()
for p, q in zip(model.parameters(), ref.parameters()):
    torch.testing.assert_close(p.detach().cpu(), q.detach())
print(json.dumps(hd.memory_stats()["client"]))
"""


def test_a_client_on_another_host_uses_the_device_over_curve_with_tensors_in_the_messages(home):
    from test_curve import remote_host

    home.ctl("keys", "--client", "alice")
    bundle = home.config.keys_dir / "clients" / "alice.json"
    endpoint = f"tcp://127.0.0.1:{free_port()}"
    home.env["HYPATIA_LISTEN"] = endpoint
    home.hypatiad("start")
    env = {k: v for k, v in os.environ.items() if not k.startswith("HYPATIA_")} | remote_host(bundle, endpoint)
    proc = subprocess.run([sys.executable, "-c", CHILD_OVER_TCP], env=env, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    client = json.loads(proc.stdout.strip().splitlines()[-1])
    # three steps recorded lazily: nothing asked for a value until the parameters were compared
    assert client["flushes"] >= 1 and client["ops_recorded"] > 50 and client["bytes_up"] > 0, client
    assert client["bytes_down"] >= sum(p.numel() * 4 for p in torch.nn.Sequential(
        torch.nn.Linear(8, 16), torch.nn.Linear(16, 2)).parameters()), client
    stats = home.stats()
    assert stats["peers"]["curve_accepted"] >= 1
    device = stats["device"]
    assert device["executes"] >= 1 and device["bytes_uploaded"] == client["bytes_up"], device
    assert device["sessions_closed"] == 1 and device["memory_used_bytes"] == 0, device  # released at exit


def test_recorded_ops_flush_at_the_size_limit_and_data_dependent_ops_run_on_the_client(rec):
    rec.max_ops = 8
    x = torch.arange(6.0).to("hypatia")
    y = x
    for _ in range(20):
        y = y + 1
    assert rec.counters["flushes_at_size"] >= 2, rec.counters
    torch.testing.assert_close(y.cpu(), torch.arange(6.0) + 20)
    with pytest.warns(hd.DeviceWarning, match="nonzero"):
        nz = torch.nonzero(x > 2)
    assert isinstance(nz, hd.HypatiaTensor)
    torch.testing.assert_close(nz.cpu(), torch.nonzero(torch.arange(6.0) > 2))


def test_a_backward_op_with_outputs_it_does_not_compute_stays_on_the_device(rec):
    """layer norm's backward with an input that needs no gradient returns None for it: recorded
    as it is, not fetched and computed on the client (no DeviceWarning: warnings are errors)."""
    torch.manual_seed(0)
    ref = torch.nn.Sequential(torch.nn.LayerNorm(8), torch.nn.Linear(8, 8))
    model = copy.deepcopy(ref).to("hypatia")
    x = torch.randn(2, 4, 8)
    model(x.to("hypatia")).square().sum().backward()
    ref(x).square().sum().backward()
    for p, q in zip(model.parameters(), ref.parameters()):
        torch.testing.assert_close(p.grad.cpu(), q.grad)
    assert rec.counters["ops_on_client"] == 0, rec.counters
