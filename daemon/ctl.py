"""``hypatia-ctl``: look at and steer a running hypatiad."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from hypatia.config import ConfigError, load
from hypatia.daemon import control
from hypatia.daemon.cli import print_status


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hypatia-ctl", description="Inspect and control hypatiad.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    p = sub.add_parser("stats", help="counters: requests, plan-cache hits and misses, graphs, plans, fallbacks",
                       description="Print the daemon's counters (or the store's contents when it is down).")
    p.add_argument("--json", action="store_true", help="print JSON for machines")
    p = sub.add_parser("status", help="say whether the daemon runs and answers",
                       description="Print whether a daemon runs for this runtime directory and answers.")
    p.add_argument("--json", action="store_true", help="print JSON")
    sub.add_parser("stop", help="stop the daemon after it drains in-flight requests",
                   description="Send SIGTERM and wait until the daemon has drained and exited.")
    return parser


def _fmt_bytes(n: int | None) -> str:
    if n is None:
        return "-"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def format_stats(s: dict[str, Any]) -> str:
    rows: list[tuple[str, Any]] = []
    if s.get("running"):
        cache = s["plan_cache"]
        rate = cache["hit_rate"]
        rows += [
            ("daemon", f"hypatiad {s['version']} (protocol {s['protocol']})"),
            ("pid", s["pid"]),
            ("uptime", f"{s['uptime_s']:.1f} s"),
            ("socket", s["socket"]),
            ("store", s["store"]["path"]),
            ("store size", _fmt_bytes(s["store"]["size_bytes"])),
            ("clients seen", s["clients_seen"]),
            ("requests", ", ".join(f"{k} {v}" for k, v in sorted(s["requests"].items())) or "0"),
            ("plan-cache hits", cache["hits"]),
            ("plan-cache misses", cache["misses"]),
            ("hit rate", "-" if rate is None else f"{rate:.1%}"),
            ("plans made", cache["plans_made"]),
            ("coalesced requests", cache["coalesced"]),
        ]
    else:
        rows += [("daemon", "not running (figures below read from the store)"), ("socket", s["socket"]),
                 ("store", s["store"]["path"]), ("store size", _fmt_bytes(s["store"].get("size_bytes")))]
        if "note" in s:
            rows.append(("note", s["note"]))
    for name in ("graphs", "workloads", "environments", "implementations", "plans"):
        if name in s:
            rows.append((name, s[name]))
    if s.get("running"):
        rows += [
            ("fallbacks", s["fallbacks"]),
            ("errors", s["error_total"]),
            ("corrupt rows", s["corrupt_rows"]),
            ("rules fired", ", ".join(f"{k} {v}" for k, v in sorted(s["rules"].items())) or "none"),
        ]
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k.ljust(width)}  {v}" for k, v in rows)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        config = load()
        if args.command == "stats":
            info = control.stats(config)
            print(json.dumps(info, indent=2, sort_keys=True) if args.json else format_stats(info))
            return 0
        if args.command == "status":
            return print_status(control.status(config), args.json)
        pid = control.stop(config)
        print(f"hypatiad (pid {pid}) stopped")
        return 0
    except control.NotRunning as exc:
        print(f"hypatia-ctl: {exc}", file=sys.stderr)
        return 3
    except (ConfigError, TimeoutError) as exc:
        print(f"hypatia-ctl: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
