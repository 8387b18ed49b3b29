"""What a process says about its compiles: the one-line fusion summary (``hypatia.client.summary()``
and ``HYPATIA_SUMMARY=1``), and a bad setting's warning attributed to the user's own line."""

from __future__ import annotations

import importlib.util
import textwrap
import warnings

import torch

from hypatia.client.explain import fusion_summary
from hypatia.planner.plan import Plan, Region


def _plan(key: str, *rules: str) -> Plan:
    return Plan(graph_key=key, regions=tuple(Region(rule, "k", (0,), (), i + 1, (i + 1,)) for i, rule in enumerate(rules)))


def test_the_summary_counts_each_rule_once_per_distinct_plan_most_frequent_first():
    keys = [("g1-a", "w1-a", "e1"), ("g1-b", "w1-b", "e1"), ("g1-a", "w1-a", "e1")]
    plans = [_plan("g1-a", "rms_norm", "attention_fill_mask"), _plan("g1-b", "linear_silu", "rms_norm"),
             _plan("g1-a", "rms_norm", "attention_fill_mask")]  # the first graph compiled again: counted once
    assert fusion_summary(zip(keys, plans)) == "rms_norm x2, attention_fill_mask, linear_silu"
    assert fusion_summary([]) == "nothing fused"


SUMMARY_CLIENT = """
import torch
import hypatia.client

class Block(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.up = torch.nn.Linear(8, 16)
        self.norm = torch.nn.LayerNorm(16)
        self.down = torch.nn.Linear(16, 8)

    def forward(self, x):
        h = torch.nn.functional.silu(self.up(x))
        return torch.nn.functional.silu(self.down(self.norm(h)))

print("before:", hypatia.client.summary())
model = Block().eval()
with torch.no_grad():
    x = torch.randn(4, 8)
    torch.testing.assert_close(torch.compile(model, backend="hypatia")(x), model(x))
print("after:", hypatia.client.summary())
"""


def test_a_process_says_what_it_fused_when_asked_and_at_exit(home):
    proc = home.python(SUMMARY_CLIENT, extra_env={"HYPATIA_SUMMARY": "1", "HYPATIA_AUTOSTART": "0"})
    lines = proc.stdout.strip().splitlines()
    assert lines[0] == "before: nothing fused"
    assert lines[1] == "after: linear_silu x2", proc.stdout
    assert proc.stderr.strip().splitlines()[-1] == "hypatia: 1 graph planned; fused linear_silu x2", proc.stderr
    quiet = home.python(SUMMARY_CLIENT, extra_env={"HYPATIA_AUTOSTART": "0"})
    assert "hypatia: 1 graph planned" not in quiet.stderr  # printed at exit only when asked for


USER_SCRIPT = """
import torch

def train_step(model, x):
    return torch.compile(model, backend="hypatia")(x)
"""


def test_a_bad_variable_is_reported_on_the_users_line(home, dynamo_reset, monkeypatch, tmp_path):
    """The warning that disables Hypatia for a bad HYPATIA_* value names the user's file and line
    (the call of the compiled model), not a frame inside Dynamo or Hypatia."""
    from hypatia.client.backend import HypatiaFallbackWarning, reset_session

    script = tmp_path / "train_script.py"
    script.write_text(textwrap.dedent(USER_SCRIPT))
    spec = importlib.util.spec_from_file_location("train_script", script)
    user = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(user)
    monkeypatch.setenv("HYPATIA_LOG_LEVEL", "LOUD")
    reset_session()
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.ReLU())
    x = torch.randn(2, 4)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = user.train_step(model, x)
    torch.testing.assert_close(out, model(x))  # the model still runs, as eager PyTorch
    [warning] = [w for w in caught if issubclass(w.category, HypatiaFallbackWarning)]
    assert "HYPATIA_LOG_LEVEL='LOUD' is not one of" in str(warning.message)
    assert (warning.filename, warning.lineno) == (str(script), 5), (warning.filename, warning.lineno)
