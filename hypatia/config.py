"""Where Hypatia keeps its files and how it is tuned: every ``HYPATIA_*`` variable is read here."""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

from hypatia.executors import UnknownCandidate, parse as parse_candidate

# The longest path an AF_UNIX socket accepts on Linux (sun_path is 108 bytes with the NUL).
MAX_IPC_PATH = 107


class ConfigError(Exception):
    """A setting or a directory is unusable; the message says which and how to fix it."""


def _int(env: Mapping[str, str], name: str, default: int, minimum: int = 0) -> int:
    raw = env.get(name)
    if raw is None or raw.strip() == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ConfigError(f"{name}={raw!r} is not a whole number; unset it or give e.g. {default}") from None
    if value < minimum:
        raise ConfigError(f"{name}={value} is below the minimum {minimum}")
    return value


def _flag(env: Mapping[str, str], name: str, default: bool) -> bool:
    raw = env.get(name)
    if raw is None or raw.strip() == "":
        return default
    low = raw.strip().lower()
    if low in ("1", "true", "yes", "on"):
        return True
    if low in ("0", "false", "no", "off"):
        return False
    raise ConfigError(f"{name}={raw!r} is not a boolean; use 1 or 0")


def _choice(env: Mapping[str, str], name: str, default: str, choices: tuple[str, ...]) -> str:
    raw = env.get(name, "").strip().lower() or default
    if raw not in choices:
        raise ConfigError(f"{name}={raw!r} is not one of {', '.join(choices)}; unset it for {default}")
    return raw


CHECKSUM_MODES = ("background", "strict", "soft", "off")
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
POLICIES = ("HEURISTIC", "EXPLORE", "FASTEST")
MODES = ("local", "remote")


def _log_level(env: Mapping[str, str]) -> str:
    raw = env.get("HYPATIA_LOG_LEVEL", "")
    level = raw.strip().upper() or "INFO"
    level = "WARNING" if level == "WARN" else level
    if level not in LOG_LEVELS:
        raise ConfigError(f"HYPATIA_LOG_LEVEL={raw!r} is not one of {', '.join(LOG_LEVELS)}; unset it for INFO")
    return level


@dataclass(frozen=True)
class Config:
    """Resolved settings for one process; build it with :func:`load`."""

    runtime_dir: Path
    cache_dir: Path
    autostart: bool = True
    timeout_ms: int = 2000
    retries: int = 2
    start_timeout_s: int = 30
    max_message_bytes: int = 64 * 1024 * 1024
    log_level: str = "INFO"
    debug_fx: bool = False
    summary: bool = False  # print what this process fused, in one line, when it exits
    checksum_mode: str = "background"
    policy: str = "FASTEST"
    # "auto": the executor is chosen by measurement (the daemon keeps the choice); or one
    # candidate name ("inductor", "aten+cudagraphs", ...) that every graph runs under.
    executor: str = "auto"
    background_tuning: bool = True
    tune_budget_ms: int = 100
    tune_timeout_s: int = 600
    idle_timeout_s: int = 0
    faults: str = ""
    # Where plans are stored: "" for the SQLite file in cache_dir, or a postgresql:// URL that
    # the daemons of several hosts share.
    store_url: str = ""
    # How often a daemon whose store cannot be written (a full disk) tries writing again.
    store_retry_s: int = 30
    # The optional TCP listener for remote clients (CURVE only), and a client's way to it.
    listen: str = ""
    connect: str = ""
    client_keys: str = ""
    keys_dir: Path | None = None
    mode: str = "local"
    run_timeout_ms: int = 60000
    # The hypatia device (hypatia.device): where the daemon keeps its tensors ("auto": its first
    # GPU if torch sees one, else its CPU), how much they may take (0: 90% of the GPU's memory,
    # no limit on the CPU), and how long a TCP client's session may stay silent before its
    # tensors are dropped; a client's own bound on the ops it records before it flushes them.
    device_backend: str = "auto"
    device_memory_mb: int = 0
    device_idle_s: int = 600
    device_max_ops: int = 4096
    device_executors: str = "auto"

    # How long a client keeps waiting for a plan the daemon said it is making (and keeps saying
    # so); 0: no longer than timeout_ms, as for any other reply.
    plan_wait_s: int = 60
    log_max_bytes: int = 10 * 1024 * 1024  # the daemon's log rotates past this size
    # Bounds on what one request may cost the daemon: graph size, planning time, tuning memory
    # (0: a quarter of the machine's memory, half of a GPU's), the delay before a background
    # tuning, and how long a stopping daemon drains before it cancels what is left.
    max_graph_nodes: int = 50_000
    plan_deadline_s: int = 60
    tune_memory_mb: int = 0
    tune_delay_s: int = 5
    drain_timeout_s: int = 20
    # Compiled code the daemon keeps and serves (Inductor's cache artifacts per graph): whether
    # processes share it, the store's total limit (least recently used go past it), the largest
    # one entry may be, how often a compiling process says it is alive, and how long a process
    # waits for another's compile before compiling itself.
    share_compiled: bool = True
    compiled_cache_mb: int = 4096
    compiled_entry_mb: int = 48
    compile_heartbeat_s: int = 2
    compile_wait_s: int = 600
    # Where each process writes the artifacts of its compiles (graphs, plans, generated code,
    # guards); None: nothing is written.
    artifacts: str | None = None

    @property
    def compiled_entry_bytes(self) -> int:
        """The largest artifact kept: the setting, and always room to spare in one message."""
        return min(self.compiled_entry_mb << 20, self.max_message_bytes - (64 << 10))

    @property
    def socket_path(self) -> Path:
        return self.runtime_dir / "hypatiad.sock"

    @property
    def endpoint(self) -> str:
        """The daemon's own socket on this host."""
        return f"ipc://{self.socket_path}"

    @property
    def client_endpoint(self) -> str:
        """Where this process's client reaches a daemon: ``HYPATIA_CONNECT`` (tcp, CURVE) if set."""
        return self.connect or self.endpoint

    @property
    def remote(self) -> bool:
        """The daemon is on another host: reached over TCP, never started from here."""
        return bool(self.connect)

    @property
    def lock_path(self) -> Path:
        return self.runtime_dir / "hypatiad.lock"

    @property
    def autostart_lock_path(self) -> Path:
        return self.runtime_dir / "autostart.lock"

    @property
    def store_path(self) -> Path:
        return self.cache_dir / "hypatia.sqlite"

    @property
    def store_location(self) -> Path | str:
        """The store the daemon opens: a PostgreSQL URL when ``HYPATIA_STORE`` names one."""
        return self.store_url or self.store_path

    @property
    def store_shown(self) -> str:
        """The store's location for people: a URL's password is never printed or logged."""
        return redact(self.store_url) if self.store_url else str(self.store_path)

    @property
    def log_path(self) -> Path:
        return self.cache_dir / "hypatiad.log"


def redact(url: str) -> str:
    """``url`` without its password."""
    scheme, sep, rest = url.partition("://")
    userinfo, at, host = rest.rpartition("@")
    if not at or ":" not in userinfo:
        return url
    return f"{scheme}{sep}{userinfo.split(':', 1)[0]}:***@{host}"


def load(env: Mapping[str, str] | None = None) -> Config:
    """Read the configuration from ``env`` (default: the process environment)."""
    env = os.environ if env is None else env
    home = env.get("HYPATIA_HOME")
    uid = os.getuid()
    if home:
        base = Path(home).expanduser().absolute()
        runtime_dir, cache_dir, keys_dir = base / "run", base / "cache", base / "keys"
    else:
        xdg_run = env.get("XDG_RUNTIME_DIR")
        runtime_dir = Path(xdg_run) / "hypatia" if xdg_run else Path(f"/tmp/hypatia-{uid}")
        xdg_cache = env.get("XDG_CACHE_HOME")
        cache_root = Path(xdg_cache) if xdg_cache else Path.home() / ".cache"
        cache_dir = cache_root / "hypatia"
        xdg_config = env.get("XDG_CONFIG_HOME")
        keys_dir = (Path(xdg_config) if xdg_config else Path.home() / ".config") / "hypatia" / "keys"
    config = Config(
        runtime_dir=runtime_dir,
        cache_dir=cache_dir,
        autostart=_flag(env, "HYPATIA_AUTOSTART", True),
        timeout_ms=_int(env, "HYPATIA_TIMEOUT_MS", 2000, minimum=1),
        retries=_int(env, "HYPATIA_RETRIES", 2),
        start_timeout_s=_int(env, "HYPATIA_START_TIMEOUT_S", 30, minimum=1),
        max_message_bytes=_int(env, "HYPATIA_MAX_MESSAGE_BYTES", 64 * 1024 * 1024, minimum=4096),
        log_level=_log_level(env),
        debug_fx=_flag(env, "HYPATIA_DEBUG_FX", False),
        summary=_flag(env, "HYPATIA_SUMMARY", False),
        checksum_mode=env.get("HYPATIA_CHECKSUM_MODE", "background").strip().lower(),
        executor=env.get("HYPATIA_EXECUTOR", "auto").strip().lower() or "auto",
        policy=env.get("HYPATIA_POLICY", "FASTEST").strip().upper() or "FASTEST",
        background_tuning=_flag(env, "HYPATIA_BACKGROUND_TUNING", True),
        tune_budget_ms=_int(env, "HYPATIA_TUNE_BUDGET_MS", 100, minimum=1),
        tune_timeout_s=_int(env, "HYPATIA_TUNE_TIMEOUT_S", 600, minimum=1),
        idle_timeout_s=_int(env, "HYPATIA_IDLE_TIMEOUT_S", 0),
        faults=env.get("HYPATIA_FAULTS", ""),
        store_url=env.get("HYPATIA_STORE", "").strip(),
        store_retry_s=_int(env, "HYPATIA_STORE_RETRY_S", 30),
        listen=env.get("HYPATIA_LISTEN", "").strip(),
        connect=env.get("HYPATIA_CONNECT", "").strip(),
        client_keys=env.get("HYPATIA_CLIENT_KEYS", "").strip(),
        keys_dir=keys_dir,
        mode=env.get("HYPATIA_MODE", "local").strip().lower() or "local",
        run_timeout_ms=_int(env, "HYPATIA_RUN_TIMEOUT_MS", 60000, minimum=1),
        device_backend=_choice(env, "HYPATIA_DEVICE_BACKEND", "auto", ("auto", "cuda", "cpu")),
        device_memory_mb=_int(env, "HYPATIA_DEVICE_MEMORY_MB", 0),
        device_idle_s=_int(env, "HYPATIA_DEVICE_IDLE_S", 600, minimum=1),
        device_max_ops=_int(env, "HYPATIA_DEVICE_MAX_OPS", 4096, minimum=1),
        device_executors=env.get("HYPATIA_DEVICE_EXECUTORS", "auto").strip().lower() or "auto",
        plan_wait_s=_int(env, "HYPATIA_PLAN_WAIT_S", 60),
        log_max_bytes=_int(env, "HYPATIA_LOG_MAX_BYTES", 10 * 1024 * 1024, minimum=1024),
        max_graph_nodes=_int(env, "HYPATIA_MAX_GRAPH_NODES", 50_000, minimum=1),
        plan_deadline_s=_int(env, "HYPATIA_PLAN_DEADLINE_S", 60, minimum=1),
        tune_memory_mb=_int(env, "HYPATIA_TUNE_MEMORY_MB", 0),
        tune_delay_s=_int(env, "HYPATIA_TUNE_DELAY_S", 5),
        drain_timeout_s=_int(env, "HYPATIA_DRAIN_TIMEOUT_S", 20, minimum=1),
        share_compiled=_flag(env, "HYPATIA_SHARE_COMPILED", True),
        compiled_cache_mb=_int(env, "HYPATIA_COMPILED_CACHE_MB", 4096, minimum=1),
        compiled_entry_mb=_int(env, "HYPATIA_COMPILED_ENTRY_MB", 48, minimum=1),
        compile_heartbeat_s=_int(env, "HYPATIA_COMPILE_HEARTBEAT_S", 2, minimum=1),
        compile_wait_s=_int(env, "HYPATIA_COMPILE_WAIT_S", 600),
        artifacts=env.get("HYPATIA_ARTIFACTS", "").strip() or None,
    )
    if config.store_url and not config.store_url.startswith(("postgresql://", "postgres://")):
        raise ConfigError(
            f"HYPATIA_STORE={config.store_url!r} is not a postgresql:// URL; unset it to keep plans in "
            f"{config.store_path}, or give e.g. postgresql://user@dbhost:5432/hypatia to share them between hosts"
        )
    for name, value in (("HYPATIA_LISTEN", config.listen), ("HYPATIA_CONNECT", config.connect)):
        if value and not value.startswith("tcp://"):
            raise ConfigError(
                f"{name}={value!r} is not a tcp:// endpoint; give e.g. tcp://0.0.0.0:7787 (local clients "
                "always use the private ipc socket and need no setting)"
            )
    if config.connect and not config.client_keys:
        raise ConfigError(
            "HYPATIA_CONNECT names a remote daemon but HYPATIA_CLIENT_KEYS is not set; TCP connections "
            "are CURVE-encrypted only: run `hypatia-ctl keys --client NAME` on the daemon's host and "
            "point HYPATIA_CLIENT_KEYS at the file it writes"
        )
    if config.checksum_mode not in CHECKSUM_MODES:
        raise ConfigError(
            f"HYPATIA_CHECKSUM_MODE={config.checksum_mode!r} is not one of {', '.join(CHECKSUM_MODES)}; "
            "background (the default) has the daemon check each new region shape while the model runs, strict "
            "checks it before it first runs, soft checks only shapes and dtypes, off nothing"
        )
    if config.executor != "auto":
        try:
            parse_candidate(config.executor)
        except UnknownCandidate as exc:
            raise ConfigError(f"HYPATIA_EXECUTOR: {exc}; or auto (the default) to choose by measurement") from None
    if config.device_executors != "auto":
        try:
            for name in config.device_executors.split(","):
                if name.strip() and parse_candidate(name.strip())[0] == "eager":
                    raise UnknownCandidate("the device's graphs are ATen graphs already: name aten, not eager")
        except UnknownCandidate as exc:
            raise ConfigError(f"HYPATIA_DEVICE_EXECUTORS: {exc}; a comma-separated list, or auto (the default): "
                              "aten, aten+cudagraphs, inductor and inductor+cudagraphs on a GPU, aten on a CPU") from None
    if config.policy not in POLICIES:
        raise ConfigError(
            f"HYPATIA_POLICY={config.policy!r} is not one of {', '.join(POLICIES)}; HEURISTIC plans with the "
            "static cost model, EXPLORE measures every candidate before answering, FASTEST (the default) "
            "uses the best measured and tunes in the background"
        )
    if config.mode not in MODES:
        raise ConfigError(
            f"HYPATIA_MODE={config.mode!r} is not one of {', '.join(MODES)}; local (the default) runs compiled "
            "graphs in this process, remote has the daemon run CPU inference graphs on tensors passed "
            "through shared memory"
        )
    if len(str(config.socket_path)) > MAX_IPC_PATH:
        raise ConfigError(
            f"the daemon socket path {config.socket_path} is longer than {MAX_IPC_PATH} bytes, "
            "which AF_UNIX cannot bind; point HYPATIA_HOME (or XDG_RUNTIME_DIR) at a shorter directory"
        )
    return config


def ensure_private_dir(path: Path) -> Path:
    """Create ``path`` as a 0700 directory of this user, or refuse one that others could enter."""
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    info = path.stat()
    if info.st_uid != os.getuid():
        raise ConfigError(
            f"{path} belongs to uid {info.st_uid}, not to you (uid {os.getuid()}); "
            "remove it or set HYPATIA_HOME to a directory of your own"
        )
    if stat.S_IMODE(info.st_mode) & 0o077:
        raise ConfigError(
            f"{path} has mode {stat.S_IMODE(info.st_mode):o}; other users could reach the daemon's "
            f"socket through it. Run `chmod 700 {path}` or remove it"
        )
    return path


def read_daemon_pid(config: Config) -> int | None:
    """The pid written in the daemon's lock file if that process is alive, else None."""
    try:
        text = config.lock_path.read_text().strip()
        pid = int(text.split()[0]) if text else 0
    except (OSError, ValueError, IndexError):
        return None
    if pid <= 0:
        return None
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return None
    except PermissionError:
        return pid
    return pid
