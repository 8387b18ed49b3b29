"""The command-line shells: every command has help text and is documented in the README."""

from __future__ import annotations

import argparse
import re
from pathlib import Path

import pytest

from hypatia.daemon import cli, ctl

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()


def subcommands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


@pytest.mark.parametrize("prog,parser", [("hypatiad", cli.build_parser()), ("hypatia-ctl", ctl.build_parser())])
def test_every_command_has_help_and_is_documented(prog, parser):
    commands = subcommands(parser)
    assert commands, f"{prog} has no subcommands"
    help_of = {a.dest: a.help for a in parser._subparsers._group_actions[0]._choices_actions}
    for name, sub in commands.items():
        assert help_of.get(name), f"{prog} {name} has no help text"
        assert sub.format_help().strip()
        assert f"`{prog} {name}" in README, f"README does not document `{prog} {name}`"
        for action in sub._actions:
            if action.option_strings and action.help != argparse.SUPPRESS and action.dest != "help":
                assert action.help, f"{prog} {name} {action.option_strings} has no help"
                assert any(opt in README for opt in action.option_strings), f"README lacks {action.option_strings}"


def test_every_environment_variable_is_documented():
    source = "\n".join(p.read_text() for p in (ROOT / "hypatia").glob("*.py")) + "\n".join(
        p.read_text() for d in ("client", "daemon", "planner", "kernels") for p in (ROOT / d).rglob("*.py")
    )
    names = set(re.findall(r"\b(HYPATIA_[A-Z_]+)\b", source)) - {"HYPATIA_UPDATE_GOLDEN"}
    assert {"HYPATIA_HOME", "HYPATIA_AUTOSTART", "HYPATIA_TIMEOUT_MS"} <= names
    missing = sorted(n for n in names if f"`{n}`" not in README)
    assert not missing, f"README's configuration table lacks {missing}"


def test_ctl_reports_bad_configuration_clearly(home):
    proc = home.ctl("status", check=False, extra_env={"HYPATIA_TIMEOUT_MS": "soon"})
    assert proc.returncode == 2
    assert "HYPATIA_TIMEOUT_MS='soon' is not a whole number" in proc.stderr


def test_readme_quick_start_has_the_two_commands():
    quick = README.split("## Quick start", 1)[1].split("##", 1)[0]
    assert re.findall(r"^make (\w+)", quick, re.M) == ["demo", "test"]
    assert "make test" in (ROOT / ".ci" / "run").read_text()
