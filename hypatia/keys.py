"""CURVE keys for the optional TCP listener: the daemon's key pair and the clients it admits.

Layout of the keys directory (0700, in ``$XDG_CONFIG_HOME/hypatia/keys`` or ``$HYPATIA_HOME/keys``)::

    server.public, server.secret     the daemon's key pair (Z85, the secret 0600)
    clients/NAME.public              an admitted client's public key (delete it to revoke)
    clients/NAME.json                the file NAME's machine needs: its key pair and the
                                     server's public key (0600; copy it there, keep it private)

Nothing here is ever sent over the wire; only CURVE's handshake uses the keys.
"""

from __future__ import annotations

import json
import os
import re
import stat
from dataclasses import dataclass
from pathlib import Path

import zmq

from hypatia.config import ensure_private_dir

NAME = re.compile(r"[A-Za-z0-9_.-]{1,64}")
Z85_KEY = re.compile(rb"[0-9A-Za-z.\-:+=^!/*?&<>()\[\]{}@%$#]{40}")


class KeysError(Exception):
    """Keys are missing, malformed or readable by others; the message says what to do."""


@dataclass(frozen=True)
class ClientKeys:
    """What a remote client needs: its own key pair and the daemon's public key (all Z85)."""

    server_public: bytes
    public: bytes
    secret: bytes


def _write_private(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.chmod(path, 0o600)


def _key(raw: bytes | str, what: str) -> bytes:
    key = raw.strip().encode() if isinstance(raw, str) else raw.strip()
    if not Z85_KEY.fullmatch(key):
        raise KeysError(f"{what} is not a 40-character Z85 CURVE key; recreate it with `hypatia-ctl keys`")
    return key


def _check_private(path: Path) -> None:
    mode = stat.S_IMODE(path.stat().st_mode)
    if mode & 0o077:
        raise KeysError(f"{path} has mode {mode:o}: a secret key must be readable by you only; `chmod 600 {path}`")


def server_keys(keys_dir: Path) -> tuple[bytes, bytes]:
    """The daemon's (public, secret) key pair; :class:`KeysError` when there is none yet."""
    public, secret = keys_dir / "server.public", keys_dir / "server.secret"
    if not (public.exists() and secret.exists()):
        raise KeysError(
            f"no CURVE key pair in {keys_dir}; the TCP listener needs one: run `hypatia-ctl keys` to create it"
        )
    _check_private(secret)
    return _key(public.read_bytes(), str(public)), _key(secret.read_bytes(), str(secret))


def ensure_server_keys(keys_dir: Path) -> tuple[bytes, bytes]:
    """The daemon's key pair, created on first use."""
    ensure_private_dir(keys_dir)
    try:
        return server_keys(keys_dir)
    except KeysError:
        if (keys_dir / "server.secret").exists():
            raise  # a damaged or loose secret is reported, never silently replaced
    public, secret = zmq.curve_keypair()
    _write_private(keys_dir / "server.secret", secret + b"\n")
    (keys_dir / "server.public").write_bytes(public + b"\n")
    return public, secret


def _client_dir(keys_dir: Path) -> Path:
    return ensure_private_dir(keys_dir / "clients")


def _checked_name(name: str) -> str:
    if not NAME.fullmatch(name):
        raise KeysError(f"client name {name!r}: use 1-64 letters, digits, '.', '_' or '-'")
    return name


def admit_client(keys_dir: Path, name: str) -> Path:
    """Create a key pair for client ``name``, admit its public key, and return the file (0600)
    that the client's machine points ``HYPATIA_CLIENT_KEYS`` at."""
    server_public, _ = ensure_server_keys(keys_dir)
    clients = _client_dir(keys_dir)
    if (clients / f"{_checked_name(name)}.public").exists():
        raise KeysError(f"a client named {name!r} is already admitted; revoke it first or choose another name")
    public, secret = zmq.curve_keypair()
    bundle = clients / f"{name}.json"
    body = {"server_public": server_public.decode(), "public": public.decode(), "secret": secret.decode()}
    _write_private(bundle, json.dumps(body, indent=1).encode() + b"\n")
    (clients / f"{name}.public").write_bytes(public + b"\n")
    return bundle


def revoke_client(keys_dir: Path, name: str) -> None:
    """Stop admitting ``name`` (its connections are refused from the next handshake on)."""
    clients = keys_dir / "clients"
    public = clients / f"{_checked_name(name)}.public"
    if not public.exists():
        raise KeysError(f"no client named {name!r} is admitted (see `hypatia-ctl keys`)")
    public.unlink()
    (clients / f"{name}.json").unlink(missing_ok=True)


def admitted(keys_dir: Path) -> dict[bytes, str]:
    """Public key -> client name, for every admitted client."""
    found: dict[bytes, str] = {}
    clients = keys_dir / "clients"
    if not clients.is_dir():
        return found
    for path in sorted(clients.glob("*.public")):
        try:
            found[_key(path.read_bytes(), str(path))] = path.stem
        except (KeysError, OSError):
            continue  # a damaged entry admits nobody
    return found


def load_client_keys(path: str | Path) -> ClientKeys:
    """Read the file ``hypatia-ctl keys --client`` wrote; refuse one that others can read."""
    path = Path(path).expanduser()
    try:
        _check_private(path)
        body = json.loads(path.read_text())
    except FileNotFoundError:
        raise KeysError(f"HYPATIA_CLIENT_KEYS={path}: no such file; copy the file from "
                        "`hypatia-ctl keys --client NAME` on the daemon's host") from None
    except (OSError, ValueError) as exc:
        raise KeysError(f"HYPATIA_CLIENT_KEYS={path} is unreadable: {exc}") from None
    if not isinstance(body, dict):
        raise KeysError(f"HYPATIA_CLIENT_KEYS={path} is not a client key file")
    try:
        return ClientKeys(*(_key(str(body[k]), f"{path}: {k}") for k in ("server_public", "public", "secret")))
    except KeyError as exc:
        raise KeysError(f"HYPATIA_CLIENT_KEYS={path} lacks {exc}; recreate it with `hypatia-ctl keys --client`") from None
