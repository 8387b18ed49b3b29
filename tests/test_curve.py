"""The optional TCP listener: off by default, CURVE-encrypted, admitted client keys only.

A "remote host" here is a client process with a HYPATIA_HOME of its own (no daemon, no socket)
that reaches the daemon over TCP on 127.0.0.1 with the key file ``hypatia-ctl keys`` wrote.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import pytest
import zmq

from conftest import free_port
from hypatia.protocol import PROTOCOL_VERSION, encode_request
from test_end_to_end import run_client


def listening_tcp_ports(pid: int) -> set[int]:
    """The TCP ports ``pid`` listens on, from its socket descriptors and /proc/net/tcp{,6}."""
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = os.readlink(fd)
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    ports = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] == "0A" and fields[9] in inodes:  # 0A: LISTEN
                ports.add(int(fields[1].rsplit(":", 1)[1], 16))
    return ports


def remote_host(bundle: Path, endpoint: str) -> dict:
    """Environment of a client on another host: its own home, the key file copied there (0600)."""
    home = Path(tempfile.mkdtemp(prefix="hy-r-", dir="/tmp"))
    copy = home / "client.json"
    shutil.copy(bundle, copy)
    os.chmod(copy, 0o600)
    return {"HYPATIA_HOME": str(home), "HYPATIA_CONNECT": endpoint, "HYPATIA_CLIENT_KEYS": str(copy)}


@pytest.fixture
def listener(home):
    """A daemon listening on 127.0.0.1 with client 'alice' admitted; yields (endpoint, alice's key file)."""
    out = home.ctl("keys", "--client", "alice").stdout
    bundle = home.config.keys_dir / "clients" / "alice.json"
    assert str(bundle) in out and (bundle.stat().st_mode & 0o777) == 0o600
    assert ((home.config.keys_dir / "server.secret").stat().st_mode & 0o777) == 0o600
    endpoint = f"tcp://127.0.0.1:{free_port()}"
    home.env["HYPATIA_LISTEN"] = endpoint
    home.hypatiad("start")
    return endpoint, bundle


def test_no_tcp_listener_by_default(daemon):
    assert listening_tcp_ports(daemon.daemon_pid()) == set()
    assert daemon.stats()["listen"] is None


def test_a_listener_without_keys_refuses_to_start_and_says_how(home):
    home.env["HYPATIA_LISTEN"] = f"tcp://127.0.0.1:{free_port()}"
    proc = home.hypatiad("start", check=False)
    assert proc.returncode != 0
    assert "hypatia-ctl keys" in proc.stdout + proc.stderr
    assert home.daemon_pid() is None


def test_an_admitted_remote_client_plans_through_curve(home, listener):
    endpoint, bundle = listener
    port = int(endpoint.rsplit(":", 1)[1])
    assert listening_tcp_ports(home.daemon_pid()) == {port}
    env = remote_host(bundle, endpoint)
    first = run_client(home, extra_env=env)  # checks outputs and gradients against eager
    assert first["daemon_misses"] == 1 and first.get("local_plans", 0) == 0
    second = run_client(home, extra_env=env)
    assert second["daemon_hits"] == 1 and second.get("local_plans", 0) == 0
    stats = home.stats()
    assert stats["peers"]["curve_accepted"] == 2 and stats["peers"]["curve_refused"] == 0
    assert stats["plan_cache"]["plans_made"] == 1 and stats["listen"] == endpoint
    # the remote host started no daemon of its own, though autostart is on
    assert not (Path(env["HYPATIA_HOME"]) / "run" / "hypatiad.lock").exists()

    # remote mode from the other host: its graphs run in the daemon, tensors inside the messages
    proc = home.python("""
        import json, os, torch
        from hypatia import shm
        from hypatia.client.backend import session
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.ReLU(), torch.nn.Linear(64, 16)).eval()
        compiled = torch.compile(model, backend="hypatia", dynamic=False)
        with torch.no_grad():
            for i in range(3):
                x = torch.randn(512, 32)  # 64 KiB: through a segment, were this host the daemon's
                torch.testing.assert_close(compiled(x), model(x))
        assert shm.names_of(os.getpid()) == []
        print(json.dumps(dict(session().counters)))
    """, extra_env=env | {"HYPATIA_MODE": "remote"}, timeout=240)
    counters = json.loads(proc.stdout.strip().splitlines()[-1])
    assert counters["remote_runs"] == 3 and counters.get("remote_fallbacks", 0) == 0
    device = home.stats()["device"]
    assert device["executes"] == 3 and device["bytes_uploaded"] == counters["remote_bytes_up"]
    assert counters["remote_bytes_up"] == (32 * 64 + 64 + 64 * 16 + 16 + 3 * 512 * 32) * 4  # the weights once


def test_unadmitted_keys_plain_tcp_and_revoked_clients_are_refused(home, listener):
    endpoint, bundle = listener
    quick = {"HYPATIA_TIMEOUT_MS": "500", "HYPATIA_RETRIES": "0"}
    alice = remote_host(bundle, endpoint)  # her copy, made before she is revoked

    stranger = json.loads(bundle.read_text())
    public, secret = zmq.curve_keypair()
    stranger |= {"public": public.decode(), "secret": secret.decode()}
    forged = Path(tempfile.mkdtemp(prefix="hy-s-", dir="/tmp")) / "stranger.json"
    forged.write_text(json.dumps(stranger))
    os.chmod(forged, 0o600)
    result = run_client(home, extra_env=remote_host(forged, endpoint) | quick)
    assert result["local_plans"] == 1 and result.get("daemon_misses", 0) == 0

    ctx = zmq.Context()
    plain = ctx.socket(zmq.DEALER)
    plain.setsockopt(zmq.LINGER, 0)
    plain.connect(endpoint)
    plain.send(encode_request(1, "hello", {"protocol": PROTOCOL_VERSION}))
    assert plain.poll(1000) == 0  # no CURVE handshake: nothing is read, nothing answered
    plain.close()
    ctx.term()

    home.ctl("keys", "--revoke", "alice")
    assert not bundle.exists()
    revoked = run_client(home, extra_env=alice | quick)
    assert revoked["local_plans"] == 1

    stats = home.stats()  # the daemon is still up and answers locally
    assert stats["peers"]["curve_refused"] >= 2 and stats["peers"]["curve_accepted"] == 0
    assert stats["plan_cache"]["plans_made"] == 0


def test_a_key_file_others_can_read_is_refused_with_the_fix(home, listener):
    endpoint, bundle = listener
    env = remote_host(bundle, endpoint)
    os.chmod(env["HYPATIA_CLIENT_KEYS"], 0o644)
    proc = home.python(
        "import torch\n"
        "m = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU())\n"
        "x = torch.randn(2, 8)\n"
        "with torch.no_grad():\n"
        "    torch.testing.assert_close(torch.compile(m, backend='hypatia')(x), m(x))\n"
        "from hypatia.client.backend import session\n"
        "print(session().counters['local_plans'])\n",
        extra_env=env,
    )
    assert proc.stdout.strip().splitlines()[-1] == "1"
    assert "chmod 600" in proc.stderr
