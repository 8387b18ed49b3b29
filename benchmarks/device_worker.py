"""One measurement of :mod:`benchmarks.device`, in a process of its own; prints one JSON row.

``python -m benchmarks.device_worker KIND WORKLOAD MODE STEPS DTYPE BATCH`` with KIND one of
``intercept`` (per-op cost of recording on the hypatia device), ``device`` (the model on the
hypatia device, run from this process, which the runner starts with no GPU visible),
``device_compiled`` (the same, through ``torch.compile(backend="hypatia")``: whole graphs per
call), ``device_ipc`` (as ``device_compiled``, from a process that has the daemon's GPU too: its
batches are made on that GPU and go up by CUDA IPC handle), ``remote`` (a CPU model through
``torch.compile(backend="hypatia")`` with ``HYPATIA_MODE=remote``, from a process with no GPU:
its graphs run on the daemon's device through the same requests), ``eager`` and ``hypatia``
(the model run in this process on the daemon's kind of device, as is and through
``torch.compile(backend="hypatia")``).
"""

from __future__ import annotations

import json
import statistics
import sys
import time

import torch

from benchmarks.workloads import by_name, loss_of, primary_output


def _intercept(steps: int) -> dict:
    import hypatia.device  # noqa: F401 - registers the device

    rec = hypatia.device.trace.recorder()
    rec.max_ops = 1 << 30  # nothing flushes while the loop records
    x = torch.ones(256, device="hypatia")
    torch.hypatia.synchronize()
    for _ in range(100):
        x + 1
    times = {}
    for name, op in (("add", lambda: x + 1), ("mul_relu", lambda: (x * 2).relu()), ("view", lambda: x.view(16, 16))):
        t0 = time.perf_counter()
        for _ in range(steps):
            op()
        times[name] = (time.perf_counter() - t0) / steps * 1e6
    rec.flush()
    return {"us_per_op": {k: round(v, 2) for k, v in times.items()},
            "meta_cache_hits": rec.counters["meta_cache_hits"], "ops_recorded": rec.counters["ops_recorded"]}


def _model(workload: str, device: str, dtype: torch.dtype, train: bool):
    w = by_name(workload)
    torch.manual_seed(0)
    model = w.build()
    model.train(train)
    if dtype != torch.float32:
        model = model.to(dtype)
    return w, model.to(device)


def _run(kind: str, workload: str, mode: str, steps: int, dtype: torch.dtype, batch: int) -> dict:
    train = mode == "training"
    on_device = kind.startswith("device")
    remote = kind == "remote"  # a CPU model whose graphs run in the daemon
    device = "hypatia" if on_device else ("cuda" if torch.cuda.is_available() and not remote else "cpu")
    if on_device or remote:
        import hypatia.device as hd  # noqa: F401
    t0 = time.perf_counter()
    w, model = _model(workload, device, dtype, train)
    made_on = torch.device("cuda" if kind == "device_ipc" else "cpu")
    batches = [w.make_inputs(batch, made_on, dtype) for _ in range(steps + 2)]  # a new batch each step
    if kind in ("hypatia", "device_compiled", "device_ipc", "remote"):  # on the device: whole graphs recorded per call
        model = torch.compile(model, backend="hypatia")
    opt = torch.optim.SGD(model.parameters(), lr=1e-4) if train else None

    def step(k: int = 0) -> float:
        args = [x.to(device) for x in batches[k % len(batches)]]
        if train:
            loss = loss_of(model(*args))
            loss.backward()
            opt.step()
            opt.zero_grad()
            return loss.item()
        with torch.no_grad():
            return primary_output(model(*args)).float().sum().item()

    def moved() -> tuple[int, int]:
        if remote:
            from hypatia.client.backend import session

            return session().counters["remote_bytes_up"], session().counters["remote_bytes_down"]
        if not on_device:
            return 0, 0
        link = hd.trace.recorder().link
        return link.bytes_up, link.bytes_down

    first = step()
    first_s = time.perf_counter() - t0
    up_first, _ = moved()  # the weights and the first batch
    # Hypatia measures its executors on a graph's first calls (the device's in the daemon, four
    # candidates of 13 calls each on a GPU): the timed steps come after the choice
    warmup = WARMUP_GPU if kind != "eager" and (torch.cuda.is_available() or (on_device or remote) and _daemon_gpu()) else 1
    for k in range(warmup):
        step(k)
    up0, down0 = moved()
    ipc0 = hd.trace.recorder().link.bytes_ipc_up if on_device else 0
    times = []
    for k in range(steps):
        t = time.perf_counter()
        step(k + 1)
        times.append(time.perf_counter() - t)
    up1, down1 = moved()
    ipc1 = hd.trace.recorder().link.bytes_ipc_up if on_device else 0
    row = {"kind": kind, "workload": workload, "mode": mode, "dtype": str(dtype).removeprefix("torch."),
           "batch": batch, "device": device, "steps": steps, "median_ms": round(statistics.median(times) * 1e3, 3),
           "first_step_s": round(first_s, 3), "first_value": first, "warmup_steps": warmup + 1}
    if remote:
        from hypatia.client.backend import session

        c = session().counters
        row |= {"bytes_up_per_step": (up1 - up0) / steps, "bytes_down_per_step": (down1 - down0) / steps,
                "bytes_up_first": up_first, "remote_runs": c["remote_runs"], "remote_fallbacks": c["remote_fallbacks"],
                "remote_local_graphs": c["remote_local_graphs"], "executors": _daemon_choices()}
    if on_device:
        stats = hd.memory_stats()
        row |= {"bytes_ipc_up_per_step": (ipc1 - ipc0) / steps,
                "bytes_up_per_step": (up1 - up0) / steps, "bytes_down_per_step": (down1 - down0) / steps,
                "bytes_up_first": up_first, "daemon_device": stats["device_type"], "client": stats["client"],
                "daemon_memory_bytes": stats["memory_used_bytes"], "executors": _daemon_choices()}
    return row


WARMUP_GPU = 60


def _daemon_gpu() -> bool:
    import hypatia.device as hd

    return hd.memory_stats()["device_type"] == "cuda"


def _daemon_choices() -> dict:
    """The executors the daemon chose for the device's graphs, with their timings."""
    from hypatia.client.rpc import DaemonClient
    from hypatia.config import load

    client = DaemonClient(load())
    try:
        return client.call("stats", {})["device"].get("executor_choices_made", {})
    finally:
        client.close()


def main(argv: list[str]) -> int:
    kind, workload, mode, steps, dtype, batch = argv
    try:
        row = (_intercept(int(steps)) | {"kind": kind} if kind == "intercept" else
               _run(kind, workload, mode, int(steps), getattr(torch, dtype), int(batch)))
    except Exception as exc:  # noqa: BLE001 - a row that failed says why
        row = {"kind": kind, "workload": workload, "mode": mode, "error": f"{type(exc).__name__}: {exc}"[:2000]}
    print(json.dumps(row))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
