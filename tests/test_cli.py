"""The command-line shells: every command has help text and is documented in docs/cli.md; the
installed entry points print their version, end quietly when their reader goes away, and say
what was wrong with a bad setting or argument."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from hypatia.daemon import cli, ctl

ROOT = Path(__file__).resolve().parent.parent
CLI_DOC = (ROOT / "docs" / "cli.md").read_text()


def subcommands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


@pytest.mark.parametrize("prog,parser", [("hypatiad", cli.build_parser()), ("hypatia-ctl", ctl.build_parser())])
def test_every_command_has_help_and_is_documented(prog, parser):
    commands = subcommands(parser)
    assert commands, f"{prog} has no subcommands"
    for action in parser._actions:  # the top-level options (--version)
        if action.option_strings and action.dest != "help":
            assert action.help and any(opt in CLI_DOC for opt in action.option_strings), (prog, action.option_strings)
    help_of = {a.dest: a.help for a in parser._subparsers._group_actions[0]._choices_actions}
    for name, sub in commands.items():
        assert help_of.get(name), f"{prog} {name} has no help text"
        assert sub.format_help().strip()
        assert f"`{prog} {name}" in CLI_DOC, f"docs/cli.md does not document `{prog} {name}`"
        for action in sub._actions:
            if action.option_strings and action.help != argparse.SUPPRESS and action.dest != "help":
                assert action.help, f"{prog} {name} {action.option_strings} has no help"
                assert any(opt in CLI_DOC for opt in action.option_strings), f"docs/cli.md lacks {action.option_strings}"


def test_ctl_reports_bad_configuration_clearly(home):
    proc = home.ctl("status", check=False, extra_env={"HYPATIA_TIMEOUT_MS": "soon"})
    assert proc.returncode == 2
    assert "HYPATIA_TIMEOUT_MS='soon' is not a whole number" in proc.stderr


def test_every_package_imports_from_the_checkout_without_an_editable_install():
    """A script run from the repository root sees the checkout's ``hypatia/`` first; with a
    non-editable install (or none) every package pyproject maps must still resolve there."""
    import subprocess
    import sys
    import tomllib

    packages = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]
    script = ("import importlib, sys\n"
              "sys.meta_path = [f for f in sys.meta_path if 'editable' not in repr(f).lower()]\n"
              f"for name in {packages!r}:\n"
              "    m = importlib.import_module(name)\n"
              "    assert m.__file__.startswith(sys.argv[1]), (name, m.__file__)\n"
              "print(len(sys.modules))\n")
    proc = subprocess.run([sys.executable, "-c", script, str(ROOT)], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "hypatia.device" in packages and "hypatia.debug" in packages
