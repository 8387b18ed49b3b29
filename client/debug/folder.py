"""The per-process artifacts folder: ``<root>/<host>-<pid>-<YYYYmmdd-HHMMSS>/`` with its
``process.json``, created once per process (a forked child gets its own)."""

from __future__ import annotations

import datetime
import json
import os
import socket
import sys
import threading
from pathlib import Path

_lock = threading.Lock()
_folders: dict[tuple[int, str], Path] = {}


def _versions() -> tuple[str, str]:
    try:
        import torch

        torch_version = str(torch.__version__)
    except Exception:  # noqa: BLE001 - the record says what it can
        torch_version = "unknown"
    try:
        from importlib.metadata import version

        hypatia_version = version("hypatia")
    except Exception:  # noqa: BLE001
        hypatia_version = "unknown"
    return torch_version, hypatia_version


def process_folder(root: str | os.PathLike) -> Path:
    """This process's folder under ``root`` (created with its ``process.json`` on first call;
    the same path on every later call from this process)."""
    key = (os.getpid(), str(Path(root).expanduser().absolute()))
    with _lock:
        if key in _folders:
            return _folders[key]
        host = socket.gethostname().split(".")[0] or "host"
        started = datetime.datetime.now()
        folder = Path(key[1]) / f"{host}-{key[0]}-{started.strftime('%Y%m%d-%H%M%S')}"
        folder.mkdir(parents=True, exist_ok=True)
        torch_version, hypatia_version = _versions()
        record = {
            "pid": key[0], "host": host, "argv": list(sys.argv), "started": started.isoformat(timespec="seconds"),
            "torch": torch_version, "hypatia": hypatia_version,
            "config": {k: v for k, v in sorted(os.environ.items()) if k.startswith("HYPATIA_")},
        }
        tmp = folder / f".process.json.{key[0]}.tmp"
        tmp.write_text(json.dumps(record, indent=2) + "\n")
        os.replace(tmp, folder / "process.json")
        _folders[key] = folder
        return folder
