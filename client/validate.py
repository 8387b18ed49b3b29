"""Validation of a plan's fused regions before they run (``HYPATIA_CHECKSUM_MODE``).

``strict``: every region not yet validated for this plan is run on random inputs of the
graph's shapes and dtypes and compared, with a dtype-aware tolerance, against the unfused
ATen nodes it replaces computed in float64; the kernel must also leave its inputs (the
model's parameters among them) bit-identical. Two input draws are used: a normal one (signs
matter: ReLU, masks) and a positive one (variances, logs). A failing region runs unfused;
the verdict goes to the daemon, which stores it and drops the region from the plan for every
later process. ``soft``: only the kernel's output shape and dtype are checked. ``off``: the
plan is trusted.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.fx

from hypatia.kernels import load_kernel
from hypatia.client import capture
from hypatia.planner import equivalence, regions
from hypatia.planner.plan import Plan, Region

SEED = 1234


@dataclass(frozen=True)
class Verdict:
    region: int
    rule: str
    kernel: str
    ok: bool
    max_abs_err: float = 0.0
    max_rel_err: float = 0.0
    detail: str = ""

    def to_wire(self) -> dict:
        return {
            "region": self.region, "rule": self.rule, "kernel": self.kernel, "ok": self.ok,
            "max_abs_err": self.max_abs_err, "max_rel_err": self.max_rel_err, "detail": self.detail,
        }


def region_module(fx_nodes: list[torch.fx.Node], region: Region) -> torch.fx.GraphModule:
    """The unfused nodes of ``region`` as a module of the region's inputs."""
    graph = torch.fx.Graph()
    env: dict[torch.fx.Node, torch.fx.Node] = {}
    for k, i in enumerate(region.inputs):
        env[fx_nodes[i]] = graph.placeholder(f"in{k}")
    members = {fx_nodes[i] for i in region.nodes}
    for node in fx_nodes[0].graph.nodes:  # graph order is a topological order
        if node in members:
            env[node] = graph.node_copy(node, lambda n: env[n])
            if node.op == "call_function" and capture.op_name(node) in regions.REFERENCE_OPS:
                env[node].target = regions.REFERENCE_OPS[capture.op_name(node)]
    graph.output(env[fx_nodes[region.output]])
    return torch.fx.GraphModule(torch.nn.Module(), graph)


def _example(node: torch.fx.Node) -> torch.Tensor:
    val = node.meta.get("val")
    if not isinstance(val, torch.Tensor):
        raise TypeError(f"input {node.name} has no tensor meta")
    return val


def random_inputs(fx_nodes: list[torch.fx.Node], region: Region, positive: bool) -> list[torch.Tensor]:
    vals = [_example(fx_nodes[i]) for i in region.inputs]
    specs = [(tuple(int(s) for s in v.shape), str(v.dtype).removeprefix("torch.")) for v in vals]
    device = vals[0].device if vals else "cpu"
    inputs = equivalence.random_inputs(specs, seed=SEED + int(positive), device=device)
    members = {fx_nodes[i] for i in region.nodes}
    for k, i in enumerate(region.inputs):
        uses = [(capture.op_name(u), position) for u in fx_nodes[i].users if u in members
                for position, a in enumerate(u.args) if a is fx_nodes[i]]
        if (positive or regions.must_be_positive(uses)) and inputs[k].is_floating_point():
            inputs[k] = inputs[k].abs().add_(0.5)
    # Keep each input's strides (a transposed weight stays transposed) so the kernel sees
    # the layouts it will see in the model.
    return [regions.laid_out(x, v.stride()) for v, x in zip(vals, inputs)]


def check_region(fx_nodes: list[torch.fx.Node], region: Region, mode: str) -> Verdict:
    """The verdict on one region under ``mode`` ("strict" or "soft")."""
    kernel = load_kernel(region.kernel, region.placement)

    def fused(*xs):
        return kernel(*xs, *region.consts)

    base = dict(region=region.output, rule=region.rule, kernel=region.kernel)
    try:
        reference = region_module(fx_nodes, region)
        draws = [random_inputs(fx_nodes, region, positive) for positive in (False, True)]
        if mode == "soft":
            expected = _example(fx_nodes[region.output])
            for inputs in draws:
                with torch.no_grad():
                    out = fused(*inputs)
                if tuple(out.shape) != tuple(expected.shape) or out.dtype != expected.dtype:
                    return Verdict(ok=False, detail=f"kernel returned {tuple(out.shape)} {out.dtype}, the graph expects "
                                   f"{tuple(expected.shape)} {expected.dtype}", **base)
            return Verdict(ok=True, detail="shapes and dtypes match", **base)
        result = regions.check(fused, regions.Reference(reference, draws))
        return Verdict(ok=result.ok, max_abs_err=result.max_abs_err, max_rel_err=result.max_rel_err,
                       detail="" if result.ok else result.detail, **base)
    except Exception as exc:  # noqa: BLE001 - a kernel that cannot even run fails validation
        return Verdict(ok=False, detail=f"{type(exc).__name__}: {exc}"[:500], **base)


def validate(fx_nodes: list[torch.fx.Node], plan: Plan, mode: str) -> tuple[Plan, list[Verdict]]:
    """(the plan without failing regions, the new verdicts); regions already validated for
    this plan are not checked again."""
    if mode == "off" or not plan.regions:
        return plan, []
    # AOTAutograd calls its compilers with fake tensors enabled; validation needs real ones.
    from torch._subclasses.fake_tensor import unset_fake_temporarily

    with unset_fake_temporarily():
        verdicts = [check_region(fx_nodes, r, mode) for r in plan.regions if r.output not in plan.validated]
    failed = {v.region for v in verdicts if not v.ok}
    passed = {v.region for v in verdicts if v.ok} if mode == "strict" else set()
    if not failed and not passed:
        return plan, verdicts
    return plan.without(failed, passed), verdicts
