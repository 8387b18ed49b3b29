"""``hypatia-ctl``: look at and steer a running hypatiad."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from hypatia.config import ConfigError, load
from hypatia.daemon import control
from hypatia.debug import report
from hypatia.client.rpc import DaemonUnavailable, VersionSkew
from hypatia.daemon.cli import add_version, print_status, quiet_broken_pipe
from hypatia.daemon.lock import AlreadyRunning
from hypatia.daemon.server import StartFailed
from hypatia.keys import KeysError
from hypatia.planner.store import StoreError
from hypatia.protocol import RemoteError


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hypatia-ctl", description="Inspect and control hypatiad.")
    add_version(parser)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    p = sub.add_parser("stats", help="the daemon's figures: plan-cache hit rate, plans, fallbacks, tuning, errors",
                       description="Print the daemon's main figures (or the store's contents when it is down); "
                       "--all prints every counter.")
    p.add_argument("--all", action="store_true", help="every counter: requests, peers, rules fired, validation, ...")
    p.add_argument("--json", action="store_true", help="print JSON for machines (always every counter)")
    p = sub.add_parser("status", help="say whether the daemon runs and answers",
                       description="Print whether a daemon runs for this runtime directory and answers.")
    p.add_argument("--json", action="store_true", help="print JSON")
    sub.add_parser("stop", help="stop the daemon after it drains in-flight requests",
                   description="Send SIGTERM and wait until the daemon has drained and exited.")
    p = sub.add_parser("plans", help="list stored plans, or show one (KEY: a graph key or its prefix)",
                       description="Without KEY, one line per stored plan: graph key, which graph (inference, or "
                       "training: forward and backward), the model it was compiled from, nodes, device, revision, "
                       "policy, whether tuned, fused regions. With KEY, that plan's recipe and the decision "
                       "behind each candidate region (chosen implementation, measured or estimated cost, eager cost).")
    p.add_argument("key", nargs="?", default="", help="graph key, or a unique prefix of one")
    p.add_argument("--json", action="store_true", help="print JSON for machines")
    p = sub.add_parser("tune", help="measure every untuned plan's candidates now (offline profiler)",
                       description="Have the daemon benchmark the candidate implementations of every stored plan "
                       "that is not tuned yet (or of those whose graph key starts with --key), with a progress "
                       "bar. Tuned plans supersede heuristic ones for every later compile. Starts the daemon "
                       "if it is not running.")
    p.add_argument("--key", default="", help="only plans whose graph key starts with this")
    p = sub.add_parser("flush", help="empty the plan cache (asks for confirmation)",
                       description="Delete every stored graph, plan, benchmark trace, verdict and compiled "
                       "artifact; with --artifacts, the compiled artifacts alone (every later process compiles "
                       "its graphs once more). Asks first unless --yes is given.")
    p.add_argument("--yes", "-y", action="store_true", help="do not ask for confirmation")
    p.add_argument("--artifacts", action="store_true", help="delete only the compiled artifacts; plans and "
                   "measurements stay")
    p = sub.add_parser("keys", help="CURVE keys for the optional TCP listener: show, admit or revoke clients",
                       description="Create the daemon's CURVE key pair if it has none and print its public key and "
                       "the admitted clients. With --client NAME, also create a key pair for a remote client, "
                       "admit it, and write the file its machine points HYPATIA_CLIENT_KEYS at. With --revoke NAME, "
                       "stop admitting that client.")
    group = p.add_mutually_exclusive_group()
    group.add_argument("--client", metavar="NAME", help="admit a new remote client and write its key file")
    group.add_argument("--revoke", metavar="NAME", help="stop admitting this client")
    p = sub.add_parser("report", help="write a JSON or HTML report of the compile artifacts and the daemon's figures",
                       description="Build a report from an artifacts folder (HYPATIA_ARTIFACTS) and the daemon's "
                       "store: graphs, graph breaks, fallbacks and their reasons, regions fused per rule, executor "
                       "choices with measured times, validation verdicts, KernelDiff results, constraint violations, "
                       "then each graph's details. Writes report.json or report.html into --out and prints its path.")
    p.add_argument("--format", choices=("html", "json"), default="html", help="html (one self-contained page, "
                   "the default) or json (schema hypatia-report/1)")
    p.add_argument("--out", metavar="DIR", default="hypatia-report", help="folder to write the report into "
                   "(default ./hypatia-report)")
    p.add_argument("--artifacts", metavar="DIR", default=None, help="the artifacts folder to read (default: "
                   "HYPATIA_ARTIFACTS if set, else ./hypatia-artifacts)")
    p = sub.add_parser("debug", help="debugging aids: run a script writing the artifacts of its compiles",
                       description="Debugging aids. `debug run SCRIPT [ARGS...]` runs a Python script with "
                       "HYPATIA_ARTIFACTS set, so that every graph it compiles with Hypatia leaves its folder of "
                       "artifacts (graphs, plan, rewrites, generated code, guards, graph breaks), and says where.")
    debug = p.add_subparsers(dest="debug_command", required=True, metavar="WHAT")
    run = debug.add_parser("run", help="run a script with HYPATIA_ARTIFACTS set; exit with its status",
                           description="Run `python SCRIPT ARGS...` (this interpreter) with HYPATIA_ARTIFACTS=--out, "
                           "print where the artifacts are, and exit with the script's status.")
    run.add_argument("--out", default="hypatia-artifacts", metavar="DIR",
                     help="where the artifacts go (default ./hypatia-artifacts); each process writes a folder of its own")
    run.add_argument("script", help="the Python script to run")
    run.add_argument("args", nargs=argparse.REMAINDER, help="the script's own arguments")
    return parser


def format_plans(rows: list[dict]) -> str:
    if not rows:
        return "no stored plans"
    model_width = min(24, max([5] + [len(r.get("model") or "?") for r in rows]))
    lines = [f"{'graph key':<22} {'graph':<9} {'model':<{model_width}} {'nodes':>5}  {'device':<24} {'rev':>3}  "
             f"{'policy':<9} {'tuned':<5}  regions"]
    for r in rows:
        regions = "?" if r["regions"] is None else (", ".join(r["regions"]) or "-")
        lines.append(f"{r['graph_key'][:22]:<22} {r.get('graph') or '?':<9} {(r.get('model') or '?')[:24]:<{model_width}} "
                     f"{r['nodes'] or 0:>5}  {str(r['device'] or '')[:24]:<24} "
                     f"{r['revision']:>3}  {r['policy']:<9} {'yes' if r['tuned'] else 'no':<5}  {regions}")
    return "\n".join(lines)


def format_plan(p: dict) -> str:
    recipe = p["recipe"]
    lines = [
        f"graph       {p['graph_key']}",
        f"model       {p.get('model') or '?'}, {p.get('graph') or '?'} graph"
        + (" (forward and backward)" if p.get("graph") == "training" else ""),
        f"workload    {p['workload_key']}",
        f"environment {p['env_key']} ({p['device']})",
        f"revision    {recipe['revision']}, policy {recipe['policy']}, {'tuned' if recipe['tuned'] else 'not tuned'}, "
        f"recipe format {recipe['format']}, updated {p['updated_at']}",
        "regions:",
    ]
    for r in recipe["regions"]:
        where = "" if r["placement"] == "device" else f" on the {r['placement']}"
        lines.append(f"  node {r['output']:>4}  {r['rule']:<22} {r['kernel']}{where}  ({len(r['nodes'])} nodes)")
    if not recipe["regions"]:
        lines.append("  none: the graph runs as eager ATen")
    if recipe["decisions"]:
        lines.append("decisions (cost vs eager; m = measured, e = estimated):")
        for d in recipe["decisions"]:
            tag = "m" if d["measured"] else "e"
            other = f"  (heuristic: {d['heuristic']})" if d["heuristic"] and d["heuristic"] != d["chosen"] else ""
            lines.append(f"  node {d['output']:>4}  {d['rule']:<22} {d['chosen']:<40} {d['cost_us']:>10.2f} us "
                         f"vs {d['eager_us']:>10.2f} us {tag}{other}")
    lines += format_executor(recipe.get("executor"))
    return "\n".join(lines)


def format_executor(decision: dict | None) -> list[str]:
    """The executor decision of a plan: every candidate's measured step time, the choice marked."""
    if decision is None:
        return ["executor: not measured yet (the next process measures the candidates as the model runs)"]
    step = "forward + backward" if decision["training"] else "forward"
    lines = [f"executor: {decision['chosen']} (measured as the model ran them; median {step} time per call):"]
    for t in sorted(decision["times"], key=lambda t: (bool(t["error"]), t["median_us"])):
        mark = "*" if t["name"] == decision["chosen"] else " "
        timing = (f"failed: {t['error']}" if t["error"] else
                  f"{t['median_us']:>12.1f} us  (p90-p10 {t['spread_us']:.1f} us, {t['samples']} samples)")
        lines.append(f"  {mark} {t['name']:<22} {timing}")
    return lines


def progress_bar(stream=None):
    """A callback drawing tuning progress on ``stream`` (redrawn in place on a terminal)."""
    stream = stream or sys.stderr
    tty = stream.isatty()
    last = [None]

    def draw(status: dict) -> None:
        total, pending = status["total"], status["pending"]
        finished = total - pending
        width = 30
        filled = width * finished // total if total else width
        line = (f"tuning [{'#' * filled}{'.' * (width - filled)}] {finished}/{total}  "
                f"done {status['done']}, failed {status['failed']}, skipped {status['skipped']}")
        if tty:
            stream.write("\r" + line + ("\n" if pending == 0 else ""))
        elif line != last[0]:
            stream.write(line + "\n")
        last[0] = line
        stream.flush()

    return draw


def _fmt_bytes(n: int | None) -> str:
    if n is None:
        return "-"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def fired_rules(rules: dict[str, int]) -> str:
    """``rule count`` for every rule that fired at least once, most fired first."""
    fired = [(k.removesuffix(".fired"), v) for k, v in rules.items() if k.endswith(".fired") and v]
    return ", ".join(f"{k} {v}" for k, v in sorted(fired, key=lambda kv: (-kv[1], kv[0]))) or "none"


def format_stats_short(s: dict[str, Any]) -> str:
    """The figures a user needs first: is the daemon up, where is the store, does the cache hit,
    what ran eager, what is being tuned, what failed."""
    if not s.get("running"):
        return format_stats(s)
    cache, tuning = s["plan_cache"], s["tuning"]
    rate = "-" if cache["hit_rate"] is None else f"{cache['hit_rate']:.1%}"
    errors = ", ".join(f"{k} {v}" for k, v in sorted(s["errors"].items()) if v)
    rows = [
        ("daemon", f"hypatiad {s['version']}, pid {s['pid']}, up {s['uptime_s']:.0f} s, {s['socket']}"),
        ("store", f"{s['store']['path']} ({_fmt_bytes(s['store']['size_bytes'])})"
                  + ("" if s["store"].get("writable", True) else f"; {_store_state(s['store'])}")
                  + (f"; files moved aside as damaged: {s['store_quarantined']}" if s.get("store_quarantined") else "")),
        ("plan cache", f"{rate} hit rate ({cache['hits']} hits, {cache['misses']} misses)"),
        ("plans", f"{s['plans']} stored for {s['graphs']} graphs; {cache['plans_made']} made since start"),
        ("fallbacks", f"{s['fallbacks']} graphs ran as eager PyTorch"),
        ("tuning", f"{tuning['tunings']} done, {tuning['failed']} failed, {s['tuning_inflight']} in flight"
                   + ("" if tuning["background"] else " (background tuning off)")),
        ("compiled code", _compiled(s["artifacts"])),
        *([("hypatia device", _device(s["device"]))] if s.get("device", {}).get("sessions_opened") else []),
        ("errors", f"{s['error_total']}" + (f" ({errors})" if errors else "")),
    ]
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k.ljust(width)}  {v}" for k, v in rows) + "\n(hypatia-ctl stats --all for every counter)"


def _compiled(a: dict[str, Any]) -> str:
    """The compiled artifacts the daemon keeps, and how they served."""
    return (f"{a['count']} artifacts, {_fmt_bytes(a['bytes'])} of {_fmt_bytes(a['limit_bytes'])}; {a['hits']} served, "
            f"{a['stored']} stored, {a['evicted']} evicted, {a['quarantined']} quarantined, {a['compiling']} compiling")


def _device(d: dict[str, Any]) -> str:
    """The hypatia device's memory, sessions and work (shared weights counted once)."""
    limit = _fmt_bytes(d["memory_limit_bytes"]) if d["memory_limit_bytes"] else "no limit"
    held = d.get("memory_held_by_executors_bytes", 0)
    return (f"{_fmt_bytes(d['memory_used_bytes'])} in use of {limit}"
            + (f" (and {_fmt_bytes(held)} held by captured graphs)" if held else "") + f"; {d['sessions']} session(s), "
            f"{d['shared_buffers']} shared buffer(s) ({d.get('uploads_shared', 0)} uploads found by content, "
            f"{_fmt_bytes(d.get('bytes_not_moved', 0))} not moved); {d.get('executes', 0)} graphs run, "
            f"{_fmt_bytes(d.get('bytes_uploaded', 0))} up, {_fmt_bytes(d.get('bytes_fetched', 0))} down; "
            f"{d.get('executables_cached', 0)} executables cached, {d.get('segments_swept', 0)} shared-memory "
            "segments of exited clients swept" + _device_choices(d))


def _device_choices(d: dict[str, Any]) -> str:
    """How many device graphs settled on each executor, by measuring."""
    chosen = {k.removeprefix("chose_"): v for k, v in sorted(d.items()) if k.startswith("chose_")}
    return "; executors chosen: " + ", ".join(f"{v} {k}" for k, v in chosen.items()) if chosen else ""


def _store_state(store: dict[str, Any]) -> str:
    if store.get("writable", True):
        return "writable"
    return (f"READ-ONLY: {store.get('problem')}; serving what it holds, {store.get('writes_dropped', 0)} "
            "writes dropped so far (retried every HYPATIA_STORE_RETRY_S seconds)")


def format_stats(s: dict[str, Any]) -> str:
    """Every counter (``hypatia-ctl stats --all``), or what the store holds when the daemon is down."""
    rows: list[tuple[str, Any]] = []
    if s.get("running"):
        cache = s["plan_cache"]
        rate = cache["hit_rate"]
        rows += [
            ("daemon", f"hypatiad {s['version']} (protocol {s['protocol']})"),
            ("pid", s["pid"]),
            ("uptime", f"{s['uptime_s']:.1f} s"),
            ("socket", s["socket"]),
            ("tcp listener", s.get("listen") or "off"),
            ("peers", ", ".join(f"{k.replace('_', ' ')} {v}" for k, v in s.get("peers", {}).items() if v) or "none yet"),
            ("store", s["store"]["path"]),
            ("store size", _fmt_bytes(s["store"]["size_bytes"])),
            ("store state", _store_state(s["store"])),
            ("clients seen", s["clients_seen"]),
            ("requests", ", ".join(f"{k} {v}" for k, v in sorted(s["requests"].items())) or "0"),
            ("plan-cache hits", cache["hits"]),
            ("plan-cache misses", cache["misses"]),
            ("hit rate", "-" if rate is None else f"{rate:.1%}"),
            ("plans made", cache["plans_made"]),
            ("coalesced requests", cache["coalesced"]),
            ("planning waits", f"{cache.get('acknowledged', 0)} misses acknowledged, {cache.get('waits_served', 0)} "
                               f"served, {cache.get('waits_abandoned', 0)} given up (HYPATIA_PLAN_WAIT_S)"),
        ]
    else:
        rows += [("daemon", "not running (figures below read from the store)"), ("socket", s["socket"]),
                 ("store", s["store"]["path"]), ("store size", _fmt_bytes(s["store"].get("size_bytes")))]
        if "note" in s:
            rows.append(("note", s["note"]))
    for name in ("graphs", "workloads", "environments", "implementations", "plans"):
        if name in s:
            rows.append((name, s[name]))
    if not s.get("running") and "artifacts" in s:
        rows.append(("compiled code", f"{s['artifacts']['count']} artifacts, {_fmt_bytes(s['artifacts']['bytes'])}"))
    if s.get("running"):
        rows += [
            ("fallbacks", s["fallbacks"]),
            ("errors", s["error_total"]),
            ("corrupt rows", f"{s['corrupt_rows']} ({s.get('quarantined_rows', 0)} quarantined); store files moved aside "
                             f"as damaged: {s['store_quarantined']} ({s['store'].get('corruptions', 0)} damage(s) found, "
                             f"{s['store'].get('rows_salvaged', 0)} rows salvaged)"),
            ("rules fired", fired_rules(s["rules"])),
            ("tunings", f"{s['tuning']['tunings']} done, {s['tuning']['failed']} failed, {s['tuning']['skipped']} skipped, "
                        f"{s['tuning_inflight']} in flight, {s['tuning']['coalesced']} coalesced"
                        + ("" if s["tuning"]["background"] else " (background tuning off)")),
            ("bounds", f"graphs up to {s['planning']['max_graph_nodes']} nodes ({s['planning']['graphs_too_large']} "
                       f"refused), planning {s['planning']['deadline_s']} s ({s['planning']['past_deadline']} abandoned); "
                       f"{s['tuning']['untunable']} plan(s) untunable, {s['tuning']['regions_over_budget']} region(s) "
                       "over the tuning memory budget"),
            ("benchmark traces", f"{s['traces']} stored, {s['tuning']['traces_written']} written and "
                                 f"{s['tuning']['traces_reused']} reused since start"),
            ("validation", f"{s['validation']['region_verdicts']} region shapes judged; {s['validation']['passed']} "
                           f"passed and {s['validation']['failed']} failed in clients' strict checks since start"),
            ("executor choices", f"{s['executors']['choices']} stored, {s['executors']['stale_reports']} reports for "
                                 "a superseded plan dropped"),
            ("compiled code", _compiled(s["artifacts"])),
            ("compiles shared", f"{s['artifacts']['compiles_granted']} compiled by one process for all, "
                                f"{s['artifacts']['waits']} asks told to wait for another's compile, "
                                f"{s['artifacts']['takeovers']} taken over from a silent compiler; "
                                f"{s['artifacts']['warm_hits']} warm starts"),
        ]
        if "device" in s:
            rows.append(("hypatia device", _device(s["device"])))
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k.ljust(width)}  {v}" for k, v in rows)


@quiet_broken_pipe
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "debug":
        from hypatia.debug.run import describe, run_script

        done = run_script(args.script, args.args, args.out)
        print(f"hypatia-ctl: {describe(done)}", file=sys.stderr)
        return done.returncode
    try:
        config = load()
        if args.command == "stats":
            info = control.stats(config)
            if args.json:
                print(json.dumps(info, indent=2, sort_keys=True))
            else:
                print(format_stats(info) if args.all else format_stats_short(info))
            return 0
        if args.command == "status":
            return print_status(control.status(config), args.json)
        if args.command == "plans":
            info = control.plan(config, args.key) if args.key else control.plans(config)
            if args.json:
                print(json.dumps(info, indent=2, sort_keys=True))
            else:
                print(format_plan(info) if args.key else format_plans(info))
            return 0
        if args.command == "tune":
            status = control.tune(config, args.key, progress=progress_bar())
            print(f"tuned {status['done']} plan(s); {status['failed']} failed, {status['skipped']} skipped "
                  "(see the daemon log for why)" if status["total"] else "nothing to tune: every stored plan"
                  + (f" whose graph key starts with {args.key!r}" if args.key else "") + " is tuned"
                  + (" or untunable" if status.get("untunable") else ""))
            if status.get("untunable"):
                print(f"{status['untunable']} plan(s) not tuned again: their tuning failed, died or exceeded its "
                      "time or memory budget before (the daemon log says why)")
            return 0 if status["failed"] == 0 else 1
        if args.command == "flush":
            if not args.yes:
                if not sys.stdin.isatty():
                    print("hypatia-ctl: flush deletes every stored " + ("compiled artifact" if args.artifacts else
                          "plan and measurement") + "; run it with --yes to confirm when not at a terminal",
                          file=sys.stderr)
                    return 2
                what = "compiled artifact" if args.artifacts else "plan, graph, benchmark trace and compiled artifact"
                answer = input(f"Delete every {what} in {config.store_shown}? [y/N] ")
                if answer.strip().lower() not in ("y", "yes"):
                    print("nothing deleted")
                    return 1
            deleted = control.flush(config, artifacts_only=args.artifacts)
            print("flushed: " + (", ".join(f"{n} {t}" for t, n in sorted(deleted.items())) or "the store was empty"))
            return 0
        if args.command == "report":
            artifacts = Path(args.artifacts) if args.artifacts else report.default_artifacts_dir(config)
            print(report.write_report(config, artifacts, Path(args.out), args.format))
            return 0
        if args.command == "keys":
            print(control.keys(config, admit=args.client, revoke=args.revoke))
            return 0
        pid = control.stop(config)
        print(f"hypatiad (pid {pid}) stopped")
        return 0
    except control.NotRunning as exc:
        print(f"hypatia-ctl: {exc}", file=sys.stderr)
        return 3
    except (ConfigError, TimeoutError, control.NoSuchPlan, StoreError, AlreadyRunning, StartFailed,
            DaemonUnavailable, VersionSkew, RemoteError, KeysError, report.ReportError) as exc:
        print(f"hypatia-ctl: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
