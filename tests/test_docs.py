"""The documentation a newcomer reads first stays true: the README is short and its quick start
has the two commands; every variable config.py reads is in docs/configuration.md with the
default config.py gives it, and nothing there is stale; every link in the README resolves."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()
CONFIG_DOC = (ROOT / "docs" / "configuration.md").read_text()
CONFIG_SOURCE = (ROOT / "hypatia" / "config.py").read_text()
# Read by the test suite only (documented in their own table of docs/configuration.md).
TEST_ONLY = {"HYPATIA_TEST_POSTGRES", "HYPATIA_REQUIRE_POSTGRES", "HYPATIA_UPDATE_GOLDEN"}


def _code_variables() -> set[str]:
    source = "\n".join(p.read_text() for d in ("hypatia", "client", "daemon", "planner", "kernels")
                       for p in (ROOT / d).rglob("*.py"))
    return set(re.findall(r"\b(HYPATIA_[A-Z0-9_]+)\b", source))


def _documented() -> dict[str, str]:
    """Variable -> its default column, from the main table of docs/configuration.md."""
    return dict(re.findall(r"^\| `(HYPATIA_[A-Z0-9_]+)` \| ([^|]*) \|", CONFIG_DOC, re.M))


def test_every_variable_read_is_documented_with_its_default():
    names = _code_variables()
    assert {"HYPATIA_HOME", "HYPATIA_AUTOSTART", "HYPATIA_TIMEOUT_MS", "HYPATIA_SUMMARY"} <= names
    documented = _documented()
    missing = sorted(names - set(documented))
    assert not missing, f"docs/configuration.md's table lacks {missing}"
    stale = sorted(set(documented) - names - TEST_ONLY)
    assert not stale, f"docs/configuration.md documents variables nothing reads: {stale}"
    # every variable is read in config.py, and its whole-number and on/off defaults are the table's
    assert not sorted(n for n in names if f'"{n}"' not in CONFIG_SOURCE), "a HYPATIA_* variable is read outside config.py"
    for name, default in re.findall(r'_int\(env, "(HYPATIA_[A-Z0-9_]+)", ([^,)]+)', CONFIG_SOURCE):
        assert documented[name].strip() == f"`{eval(default)}`", (name, documented[name], default)  # noqa: S307
    for name, default in re.findall(r'_flag\(env, "(HYPATIA_[A-Z0-9_]+)", (True|False)\)', CONFIG_SOURCE):
        assert documented[name].strip() == ("`1`" if default == "True" else "`0`"), (name, documented[name])


def test_readme_is_short_and_its_quick_start_has_the_two_commands():
    assert len(README.splitlines()) < 120
    quick = README.split("## Quick start", 1)[1].split("\n## ", 1)[0]
    assert re.findall(r"^make (\w+)", quick, re.M) == ["demo", "test"]
    assert "make test" in (ROOT / ".ci" / "run").read_text()
    # after `make`, the commands live in .venv/bin: the README says so where it shows them
    assert ".venv/bin/hypatia-ctl stats" in quick and "source .venv/bin/activate" in quick
    using = README.split("## Using it in your own project", 1)[1].split("\n## ", 1)[0]
    assert "pip install" in using and 'backend="hypatia"' in using and "python -m hypatia.daemon" in using


def test_every_link_in_the_docs_resolves():
    for doc in [ROOT / "README.md", *(ROOT / "docs").glob("*.md")]:
        for target in re.findall(r"\]\(([^)#]+)(?:#[^)]*)?\)", doc.read_text()):
            if "://" not in target:
                assert (doc.parent / target).exists(), f"{doc.relative_to(ROOT)} links to {target}, which is not there"


def test_the_set_up_says_what_it_is_doing(tmp_path):
    """`make`'s set-up names each step and lets pip show its progress (torch alone takes minutes)."""
    import shutil
    import subprocess

    make = shutil.which("make")
    assert make, "make is needed for the README's two commands"
    dry = subprocess.run([make, "-n", "-B", "install", f"VENV={tmp_path / 'venv'}"], cwd=ROOT, capture_output=True,
                         text=True, timeout=60)
    assert dry.returncode == 0, dry.stderr
    pip_lines = [line for line in dry.stdout.splitlines() if "pip install" in line]
    assert len(pip_lines) == 2 and not any("--quiet" in line or " -q " in line for line in pip_lines), pip_lines
    steps = [line for line in dry.stdout.splitlines() if line.startswith('echo "==> [')]
    assert [s.split("]")[0] for s in steps] == [f'echo "==> [{i}/4' for i in range(1, 5)], dry.stdout
