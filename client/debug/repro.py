"""A minified graph as a standalone Python script that reproduces its failure.

The script rebuilds the inputs (shapes, dtypes, strides and devices as observed; seeded random
floats of the observed mean and spread; small integer and boolean tensors literally), holds the
graph as a plain function of ``torch.ops`` calls, runs the failing check and exits 1 printing
``REPRODUCED: ...`` when the failure is still there, 0 printing ``NOT REPRODUCED: ...`` when not.

Checks (the ``check`` argument of :func:`write_repro`):

- ``runs``: the graph called eagerly must not raise;
- ``accuracy``: Hypatia's fused graph (planned and rewritten in the script's process) must match
  the graph run eagerly (``torch.testing.assert_close``);
- ``raises:<ExceptionType>``: Hypatia's fused graph must not raise that exception;
- ``kernel``: one region's kernel against its unfused operators in float64, as strict validation
  checks it (``kernel=(kernel_id, placement, consts)``).
"""

from __future__ import annotations

import datetime
import os
import re
import sys
import textwrap
import types
from pathlib import Path
from typing import Any

import torch
import torch.fx

from hypatia.debug.delta import Minified

LITERAL_MAX = 1000  # integer and boolean tensors up to this many elements are written as they are


class ReproError(Exception):
    """The graph holds something a script cannot rebuild (an object with no importable name)."""


CHECKS = ("runs", "accuracy", "kernel")


def _check_kind(check: str) -> str:
    if check in CHECKS or (check.startswith("raises:") and check[7:].isidentifier()):
        return check
    raise ValueError(f"unknown check {check!r}; use one of {', '.join(CHECKS)} or raises:<ExceptionType>")


# -- the graph ------------------------------------------------------------------------------
def _import_line(name: str, obj: Any) -> str:
    if isinstance(obj, types.ModuleType):
        return f"import {obj.__name__}" if name == obj.__name__ else f"import {obj.__name__} as {name}"
    if name in ("inf", "nan") and isinstance(obj, float):
        return f"from math import {name}"
    if obj is type(None):
        return "NoneType = type(None)"
    if isinstance(obj, torch.device):
        return f"{name} = torch.device({str(obj)!r})"
    if name == "device" and obj is torch.device:
        return "device = torch.device"
    module, qual = getattr(obj, "__module__", None), getattr(obj, "__qualname__", None)
    if module and qual and "<" not in qual:
        target: Any = sys.modules.get(module)
        for part in qual.split("."):
            target = getattr(target, part, None)
        if target is obj:
            head, _, rest = qual.partition(".")
            return f"from {module} import {head} as {name}" if not rest else \
                f"from {module} import {head} as _{name}_owner\n{name} = _{name}_owner.{rest}"
    raise ReproError(f"the graph uses {name} ({obj!r}), which a script cannot import")


def graph_source(gm: torch.fx.GraphModule) -> tuple[list[str], str]:
    """(import lines, ``def graph(...)``) for ``gm``'s graph, a plain function of its inputs."""
    for node in gm.graph.nodes:
        if node.op in ("call_module", "get_attr"):
            raise ReproError(f"node {node.name} reads the model ({node.op} {node.target}); trace to operators first")
    code = gm.graph.python_code(root_module="self")
    src = textwrap.dedent(code.src).strip("\n")
    imports = []
    for name, obj in sorted(code.globals.items()):
        if name in ("torch", "__builtins__") or not re.search(rf"\b{re.escape(name)}\b", src):
            continue
        imports.append(_import_line(name, obj))
    head, _, body = src.partition("\n")
    if not head.startswith("def forward(self"):
        raise ReproError(f"unexpected generated code: {head[:80]}")
    head = head.replace("def forward(self, ", "def graph(", 1).replace("def forward(self)", "def graph()", 1)
    return imports, head + "\n" + body + "\n"


def literal(value: Any) -> str:
    """Python source for a constant: numbers, strings, None, dtypes, devices, layouts and
    memory formats, and tuples, lists and dicts of them."""
    if isinstance(value, tuple):
        return f"({literal(value[0])},)" if len(value) == 1 else "(" + ", ".join(literal(v) for v in value) + ")"
    if isinstance(value, list):
        return "[" + ", ".join(literal(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{literal(k)}: {literal(v)}" for k, v in value.items()) + "}"
    if isinstance(value, torch.device):
        return f"torch.device({str(value)!r})"
    if isinstance(value, (torch.dtype, torch.layout, torch.memory_format)):
        return str(value)  # torch.float32, torch.strided, torch.contiguous_format
    if isinstance(value, float) and value != value:
        return "float('nan')"
    if isinstance(value, float) and value in (float("inf"), float("-inf")):
        return f"float({str(value)!r})"
    if value is None or isinstance(value, (bool, int, float, str)):
        return repr(value)
    raise ReproError(f"a constant of type {type(value).__name__} cannot be written in a script: {value!r}"[:200])


# -- the inputs -----------------------------------------------------------------------------
def _storage_size(t: torch.Tensor) -> int:
    if t.numel() == 0:
        return 0
    return 1 + sum((s - 1) * st for s, st in zip(t.shape, t.stride()))


def input_source(name: str, value: Any) -> str:
    """One line rebuilding ``value`` as ``name``."""
    if not isinstance(value, torch.Tensor):
        if isinstance(value, (torch.SymInt, torch.SymFloat, torch.SymBool)):
            value = value.node.hint
        return f"{name} = {literal(value)}"
    shape, stride = tuple(value.shape), tuple(value.stride())
    common = f"{shape}, {stride}, {value.dtype}, {str(value.device)!r}"
    flat = value.detach().cpu()
    if value.dtype == torch.bool or not (value.is_floating_point() or value.is_complex()):
        if value.numel() <= LITERAL_MAX:
            return f"{name} = literal({flat.reshape(-1).tolist()!r}, {common})"
        low, high = (0, 1) if value.dtype == torch.bool else (int(flat.min()), int(flat.max()))
        return f"{name} = randint({low}, {high}, {common})"
    wide = flat.double()
    finite = wide[torch.isfinite(wide)] if value.numel() else wide
    mean = float(finite.mean()) if finite.numel() else 0.0
    std = float(finite.std()) if finite.numel() > 1 else 1.0
    nonneg = bool(finite.numel() and float(finite.min()) >= 0)
    return f"{name} = rand({common}, mean={mean:.6g}, std={std:.6g}, nonneg={nonneg})"


PRELUDE = '''
def _strided(base, shape, stride, device):
    return base.as_strided(shape, stride).to(device)


def rand(shape, stride, dtype, device, mean=0.0, std=1.0, nonneg=False):
    """Seeded normal values of the observed mean and spread, laid out with the observed strides."""
    size = 0 if 0 in shape else 1 + sum((s - 1) * st for s, st in zip(shape, stride))
    base = torch.randn(size, dtype=torch.float64) * std + mean
    base = base.abs() if nonneg else base
    return _strided(base.to(dtype), shape, stride, device)


def randint(low, high, shape, stride, dtype, device):
    size = 0 if 0 in shape else 1 + sum((s - 1) * st for s, st in zip(shape, stride))
    return _strided(torch.randint(low, high + 1, (size,)).to(dtype), shape, stride, device)


def literal(values, shape, stride, dtype, device):
    """The observed values, laid out with the observed strides where they do not overlap."""
    dense = torch.tensor(values, dtype=dtype).reshape(shape)
    size = 0 if 0 in shape else 1 + sum((s - 1) * st for s, st in zip(shape, stride))
    if size >= dense.numel():
        out = torch.empty_strided(shape, stride, dtype=dtype)
        out.copy_(dense)
        return out.to(device)
    return dense.to(device)
'''.strip("\n")


CHECK_SOURCE = {
    "runs": '''
def check():
    """The failure: calling the graph raises."""
    try:
        with torch.no_grad():
            graph(*INPUTS)
    except Exception as exc:
        return f"{type(exc).__name__}: {exc}"
    return None
''',
    "accuracy": '''
def check():
    """The failure: Hypatia's fused graph differs from the graph run eagerly."""
    from torch.fx.experimental.proxy_tensor import make_fx
    from hypatia.debug.delta import fused_graph

    with torch.no_grad():
        gm = make_fx(graph)(*INPUTS)
        expected = graph(*INPUTS)
        try:
            fused, plan = fused_graph(gm, list(INPUTS))
        except Exception as exc:
            return f"compile error: {type(exc).__name__}: {exc}"
        if not plan.regions:
            return None
        try:
            actual = fused(*INPUTS)
        except Exception as exc:
            return f"{type(exc).__name__}: {exc}"
    rules = ", ".join(r.rule for r in plan.regions)
    actual = actual if isinstance(actual, (tuple, list)) else (actual,)
    expected = expected if isinstance(expected, (tuple, list)) else (expected,)
    for k, (a, b) in enumerate(zip(actual, expected)):
        try:
            torch.testing.assert_close(a, b, atol=ATOL, rtol=RTOL, equal_nan=True)
        except AssertionError as exc:
            return f"fused ({rules}) output {k} differs from eager: {str(exc).strip().splitlines()[0]}"
    return None
''',
    "raises": '''
def check():
    """The failure: Hypatia's fused graph raises EXCEPTION_NAME as it is built or run."""
    from torch.fx.experimental.proxy_tensor import make_fx
    from hypatia.debug.delta import fused_graph

    with torch.no_grad():
        gm = make_fx(graph)(*INPUTS)
        try:
            fused, plan = fused_graph(gm, list(INPUTS))
            fused(*INPUTS)
        except Exception as exc:
            if type(exc).__name__ == EXCEPTION_NAME:
                return f"{type(exc).__name__}: {exc}"
    return None
''',
    "kernel": '''
def check():
    """The failure: the region's kernel differs from its unfused operators computed in float64
    (the tolerance strict validation uses), or raises."""
    from hypatia.kernels import load_kernel
    from hypatia.planner import regions

    kernel = load_kernel(KERNEL_ID, PLACEMENT)
    try:
        result = regions.check(lambda *xs: kernel(*xs, *CONSTS), regions.Reference(graph, [list(INPUTS)]))
    except Exception as exc:
        return f"{type(exc).__name__}: {exc}"
    return None if result.ok else result.detail
''',
}

MAIN = '''
if __name__ == "__main__":
    failure = check()
    if failure is not None:
        print(f"REPRODUCED: {failure}")
        sys.exit(1)
    print("NOT REPRODUCED: the check passes")
    sys.exit(0)
'''


def repro_source(minified: Minified, *, what: str, check: str, source: str = "",
                 kernel: tuple[str, str, tuple] | None = None, name: str = "repro.py",
                 atol: float | None = None, rtol: float | None = None) -> str:
    """The script's text; see :func:`write_repro`."""
    kind = _check_kind(check)
    imports, function = graph_source(minified.gm)
    names = [n.name for n in minified.gm.graph.nodes if n.op == "placeholder"]
    inputs = [input_source(n, value) for n, value in zip(names, minified.inputs)]
    uses_hypatia = kind != "runs" or "hypatia" in function or any("hypatia" in line for line in imports)
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")
    header = [
        f"# Hypatia repro: {what}",
        f"# Failure: {minified.failure}".replace("\n", " ")[:400],
        f"# From: {source or 'hypatia.debug.minify'} ({stamp}, torch {torch.__version__})",
        (f"# Minified from {minified.original_nodes} operator nodes to {len(minified.nodes)} in {minified.tests} tests"
         + ("." if minified.minimal else " (stopped by its budget: perhaps not minimal).")
         if len(minified.nodes) < minified.original_nodes else
         f"# The graph's {len(minified.nodes)} operator nodes, not shrunk ({minified.tests} tests)."),
        f"# Check: {kind}",
        f"# Run: python {name}   exits 1 (REPRODUCED) while the failure is there, 0 once it is fixed."
        + ("" if not uses_hypatia else " Needs torch and hypatia."),
    ]
    parts = ["\n".join(header), '"""A standalone reproduction of a Hypatia failure."""',
             "import sys\n\nimport torch\n" + ("\n".join(imports) + "\n" if imports else ""),
             "torch.manual_seed(0)", PRELUDE, function.rstrip("\n"),
             "\n".join(inputs) + f"\nINPUTS = [{', '.join(names)}]" if names else "INPUTS = []"]
    if kind == "accuracy":  # None: torch.testing.assert_close's defaults for the dtype
        atol, rtol = _tolerance(atol, rtol)
        parts.append(f"ATOL = {atol!r}\nRTOL = {rtol!r}")
    if kind.startswith("raises:"):
        parts.append(f"EXCEPTION_NAME = {kind[7:]!r}")
    if kind == "kernel":
        if kernel is None:
            raise ValueError("check='kernel' needs kernel=(kernel_id, placement, consts)")
        parts.append(f"KERNEL_ID = {kernel[0]!r}\nPLACEMENT = {kernel[1]!r}\nCONSTS = {literal(tuple(kernel[2]))}")
    parts.append(CHECK_SOURCE["raises" if kind.startswith("raises:") else kind].strip("\n"))
    parts.append(MAIN.strip("\n"))
    return "\n\n\n".join(parts) + "\n"


def _tolerance(atol: float | None, rtol: float | None) -> tuple[float | None, float | None]:
    """Both or neither, as ``torch.testing.assert_close`` takes them (the one not given: 0)."""
    if atol is None and rtol is None:
        return None, None
    return atol or 0.0, rtol or 0.0


def write_repro(minified: Minified, path: str | os.PathLike, *, what: str, check: str, source: str = "",
                kernel: tuple[str, str, tuple] | None = None, atol: float | None = None,
                rtol: float | None = None) -> Path:
    """Write the standalone script reproducing ``minified``'s failure under ``check`` to
    ``path`` (written whole, then renamed); ``what`` and ``source`` go in its header,
    ``kernel`` is (kernel id, placement, consts) for the ``kernel`` check, ``atol``/``rtol``
    the ``accuracy`` check's tolerance."""
    path = Path(path)
    text = repro_source(minified, what=what, check=check, source=source, kernel=kernel, name=path.name,
                        atol=atol, rtol=rtol)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)
    return path
