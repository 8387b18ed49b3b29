"""The artifacts folder's top level: one folder per process under ``HYPATIA_ARTIFACTS``, with
``process.json`` saying which process it was; and the atomic writes every writer uses.

``DIR/<host>-<pid>-<YYYYmmdd-HHMMSS>/process.json`` holds ``pid``, ``host``, ``argv``,
``started``, ``torch``, ``hypatia`` and ``config`` (the ``HYPATIA_*`` variables that are set).
"""

from __future__ import annotations

import json
import os
import socket
import sys
import threading
import time
from pathlib import Path
from typing import Any

_lock = threading.Lock()
_folders: dict[tuple[int, str], Path] = {}  # (pid, root) -> this process's folder


def write_text(path: Path, text: str) -> Path:
    """Write ``text`` to ``path`` through a temporary file and a rename, so a reader never sees
    half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)
    return path


def write_json(path: Path, value: Any) -> Path:
    """``value`` as pretty JSON (keys sorted; what JSON cannot hold written as its ``str``)."""
    return write_text(path, json.dumps(value, indent=2, sort_keys=True, default=str) + "\n")


def process_info(started: float) -> dict:
    """What ``process.json`` says about this process."""
    import torch

    from hypatia import __version__

    return {
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "argv": list(sys.argv),
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(started)),
        "torch": torch.__version__,
        "hypatia": __version__,
        "config": {k: v for k, v in sorted(os.environ.items()) if k.startswith("HYPATIA_")},
    }


def process_folder(root: str | Path) -> Path:
    """This process's folder under ``root``, made (with ``process.json``) on the first call; a
    forked child gets a folder of its own."""
    key = (os.getpid(), str(Path(root).expanduser().absolute()))
    with _lock:
        found = _folders.get(key)
        if found is not None:
            return found
        started = time.time()
        host = socket.gethostname().split(".")[0] or "host"
        base = Path(key[1]) / f"{host}-{key[0]}-{time.strftime('%Y%m%d-%H%M%S', time.localtime(started))}"
        folder, n = base, 1
        while folder.exists():  # a pid reused within the second
            n += 1
            folder = base.with_name(f"{base.name}-{n}")
        folder.mkdir(parents=True)
        write_json(folder / "process.json", process_info(started))
        _folders[key] = folder
        return folder
