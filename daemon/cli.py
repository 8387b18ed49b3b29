"""``hypatiad``: start, stop and inspect the per-host Hypatia daemon."""

from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import sys
from importlib import metadata
from typing import Callable

from hypatia import __version__
from hypatia.config import ConfigError, load
from hypatia.daemon import control
from hypatia.daemon.lock import AlreadyRunning
from hypatia.daemon.server import StartFailed
from hypatia.planner.store import StoreError


# The exit status of a command whose reader went away (128 + SIGPIPE), as a shell reports it.
EXIT_BROKEN_PIPE = 141


def version_text(prog: str) -> str:
    """``PROG VERSION (torch X, Python Y)``; torch's version is read without importing it."""
    try:
        torch_version = metadata.version("torch")
    except metadata.PackageNotFoundError:
        torch_version = "not installed"
    return f"{prog} {__version__} (torch {torch_version}, Python {platform.python_version()})"


def add_version(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--version", action="version", version=version_text(parser.prog),
                        help="print Hypatia's version (and torch's) and exit")


def quiet_broken_pipe(main: Callable[..., int]) -> Callable[..., int | str | None]:
    """``main``, ending quietly when its output's reader goes away (``hypatia-ctl plans | head``)."""

    @functools.wraps(main)
    def run(*args, **kwargs) -> int | str | None:
        try:
            try:
                code = main(*args, **kwargs)
            except SystemExit as exc:  # --help, --version and usage errors end in argparse
                code = exc.code
            sys.stdout.flush()  # here, not at exit, where a broken pipe would print a traceback
            return code
        except BrokenPipeError:
            # Nothing more can be written; point stdout at /dev/null so the interpreter's own
            # flush at exit finds nothing to complain about.
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            return EXIT_BROKEN_PIPE

    return run


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="hypatiad",
        description="The Hypatia daemon: one per host and user, shared by every process that "
        "compiles with backend='hypatia'.",
    )
    add_version(parser)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    p = sub.add_parser("start", help="start the daemon (detached unless --foreground)",
                       description="Start hypatiad. Detaches and returns once it answers, unless --foreground.")
    p.add_argument("--foreground", action="store_true", help="serve in this process (for systemd and debugging)")
    p.add_argument("--detached", action="store_true", help=argparse.SUPPRESS)
    sub.add_parser("stop", help="stop the daemon after it drains in-flight requests",
                   description="Send SIGTERM and wait until the daemon has drained and exited.")
    p = sub.add_parser("status", help="say whether the daemon runs and answers",
                       description="Print whether a daemon runs for this runtime directory and answers.")
    p.add_argument("--json", action="store_true", help="print JSON")
    return parser


def print_status(info: dict, as_json: bool) -> int:
    if as_json:
        print(json.dumps(info, indent=2))
    elif info["running"]:
        state = "answering" if info["responding"] else "NOT answering"
        print(f"hypatiad {info['version'] or ''} running, pid {info['pid']}, {state} on {info['socket']}")
        print(f"store {info['store']}\nlog   {info['log']}")
    else:
        print(f"hypatiad is not running ({info['socket']})")
    return 0 if info["running"] else 3


@quiet_broken_pipe
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        config = load()
        if args.command == "start":
            if args.foreground:
                return control.run_foreground(config, detached=args.detached)
            pid = control.start(config)
            print(f"hypatiad started, pid {pid}, on {config.endpoint}")
            return 0
        if args.command == "stop":
            pid = control.stop(config)
            print(f"hypatiad (pid {pid}) stopped")
            return 0
        return print_status(control.status(config), args.json)
    except AlreadyRunning as exc:
        print(f"hypatiad: {exc}", file=sys.stderr)
        return 1
    except control.NotRunning as exc:
        print(f"hypatiad: {exc}", file=sys.stderr)
        return 3
    except (ConfigError, StartFailed, StoreError, TimeoutError) as exc:
        print(f"hypatiad: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
