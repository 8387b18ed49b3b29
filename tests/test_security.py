"""Only the daemon's own user reaches it: peer credentials (SO_PEERCRED) checked through ZAP."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from hypatia.daemon.zap import peer_uid


def test_peer_uid_is_read_from_the_zap_address():
    assert peer_uid(b"/run/user/1000/hypatia/hypatiad.sock:1000:1000:4242") == 1000
    assert peer_uid(b":0:0:1") == 0
    assert peer_uid(b"") is None and peer_uid(b"127.0.0.1") is None and peer_uid(b"a:b:c:d") is None


def test_own_user_is_accepted_through_zap(daemon):
    daemon.python("import torch; from hypatia.client.rpc import DaemonClient; from hypatia.config import load; "
                  "c = DaemonClient(load()); print(c.call('ping')); c.close()")
    peers = daemon.stats()["peers"]
    assert peers["accepted"] >= 2 and peers["refused"] == 0 and peers["unverified"] == 0


OTHER_USER_CLIENT = textwrap.dedent(
    """
    import sys, zmq
    from hypatia.protocol import PROTOCOL_VERSION, encode_request
    ctx = zmq.Context()
    s = ctx.socket(zmq.DEALER)
    s.setsockopt(zmq.LINGER, 0)
    s.connect(sys.argv[1])
    s.send(encode_request(1, "hello", {"protocol": PROTOCOL_VERSION}))
    print("answered" if s.poll(3000) else "no answer")
    """
)


@pytest.mark.skipif(os.getuid() != 0 or shutil.which("setpriv") is None,
                    reason="needs root and setpriv to run a client as another user")
def test_another_user_is_refused_even_when_the_socket_is_left_open(daemon):
    # Loosen the directory and socket by hand, as a careless admin might: the ZAP check still holds.
    os.chmod(daemon.path, 0o755)
    os.chmod(daemon.config.runtime_dir, 0o755)
    os.chmod(daemon.config.socket_path, 0o777)
    try:
        proc = subprocess.run(
            ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", sys.executable, "-c", OTHER_USER_CLIENT,
             daemon.config.endpoint],
            env=daemon.env, capture_output=True, text=True, timeout=60, cwd="/tmp",
        )
    finally:
        os.chmod(daemon.config.runtime_dir, 0o700)
        os.chmod(daemon.config.socket_path, 0o600)
        os.chmod(daemon.path, 0o700)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "no answer"
    stats = daemon.stats()  # the daemon's own user is still served
    assert stats["peers"]["refused"] >= 1
    assert "refused a connection from uid 65534" in daemon.config.log_path.read_text()


def test_daemon_refuses_a_runtime_directory_others_can_enter(home):
    home.config.runtime_dir.mkdir(parents=True)
    os.chmod(home.config.runtime_dir, 0o755)
    proc = home.hypatiad("start", check=False)
    assert proc.returncode == 2
    assert "has mode 755" in proc.stderr and f"chmod 700 {home.config.runtime_dir}" in proc.stderr
    assert home.daemon_pid() is None


@pytest.mark.skipif(os.getuid() != 0, reason="needs root to give the directory to another user")
def test_daemon_refuses_a_runtime_directory_of_another_owner(home):
    home.config.runtime_dir.mkdir(parents=True, mode=0o700)
    os.chown(home.config.runtime_dir, 65534, 65534)
    proc = home.hypatiad("start", check=False)
    assert proc.returncode == 2 and "belongs to uid 65534" in proc.stderr
    assert home.daemon_pid() is None


def test_nothing_from_the_wire_is_unpickled_or_executed():
    """No module of the package can deserialize code: no pickle-family import, no eval/exec, no
    torch.load (which unpickles), and msgpack is never given hooks that build objects."""
    import ast

    root = Path(__file__).resolve().parent.parent
    forbidden_modules = {"pickle", "cPickle", "_pickle", "dill", "cloudpickle", "marshal", "shelve", "jsonpickle"}
    problems = []
    files = [p for d in ("hypatia", "client", "daemon", "planner", "kernels") for p in (root / d).rglob("*.py")]
    assert len(files) > 30
    for path in files:
        tree = ast.parse(path.read_text(), str(path))
        for node in ast.walk(tree):
            where = f"{path.relative_to(root)}:{getattr(node, 'lineno', 0)}"
            if isinstance(node, ast.Import):
                problems += [f"{where} imports {a.name}" for a in node.names if a.name.split(".")[0] in forbidden_modules]
            elif isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] in forbidden_modules:
                problems.append(f"{where} imports from {node.module}")
            elif isinstance(node, ast.Call):
                name = ast.unparse(node.func)
                if name in ("eval", "exec", "torch.load", "pickle.loads", "builtins.eval", "builtins.exec"):
                    problems.append(f"{where} calls {name}")
                if name.endswith(("unpackb", "Unpacker")) and {k.arg for k in node.keywords} & {"ext_hook", "object_hook", "object_pairs_hook", "list_hook"}:
                    problems.append(f"{where} gives msgpack a hook that builds objects")
    assert problems == []
