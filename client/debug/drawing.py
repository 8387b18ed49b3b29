"""``regions.svg``: the model graph drawn by hand, one box per node in rows by depth (the longest
path from an input), each fused region's nodes in a colour of their own, named in a legend."""

from __future__ import annotations

from xml.sax.saxutils import escape

import torch.fx

PALETTE = ("#f4a261", "#2a9d8f", "#e76f51", "#8ab17d", "#e9c46a", "#6d597a", "#4ea8de", "#b5838d", "#90be6d", "#f28482")
UNFUSED, INPUT = "#e9ecef", "#ffffff"
BOX_W, BOX_H, GAP_X, GAP_Y, MARGIN = 170, 30, 16, 34, 12
MAX_NODES = 3000  # past this a drawing helps no one


def _op(node: torch.fx.Node) -> str:
    """``addmm`` for ``aten.addmm.default``; the function's name otherwise."""
    if node.op != "call_function":
        return node.op
    parts = str(node.target).split(".")
    return parts[1] if len(parts) == 3 else getattr(node.target, "__name__", str(node.target))


def regions_svg(fx_nodes: list[torch.fx.Node], regions) -> str | None:
    """The drawing of ``fx_nodes`` (the model graph, in canonical order) with ``regions`` (a
    plan's) coloured; None for a graph too large to draw."""
    nodes = [n for n in fx_nodes if n.op != "output"]
    if not nodes or len(nodes) > MAX_NODES:
        return None
    index = {n: i for i, n in enumerate(fx_nodes)}
    owner = {i: k for k, r in enumerate(regions) for i in r.nodes}
    depth: dict[torch.fx.Node, int] = {}
    for n in nodes:
        depth[n] = 1 + max((depth[a] for a in n.all_input_nodes if a in depth), default=-1)
    rows: dict[int, list[torch.fx.Node]] = {}
    for n in nodes:
        rows.setdefault(depth[n], []).append(n)
    legend_h = MARGIN + 20 * max(1, len(regions))
    where = {}
    for d, row in rows.items():
        for k, n in enumerate(row):
            where[n] = (MARGIN + k * (BOX_W + GAP_X), legend_h + MARGIN + d * (BOX_H + GAP_Y))
    width = MARGIN * 2 + max(len(r) for r in rows.values()) * (BOX_W + GAP_X)
    height = legend_h + MARGIN * 2 + len(rows) * (BOX_H + GAP_Y)
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" font-family="monospace" '
           f'font-size="11">', f'<rect width="{width}" height="{height}" fill="white"/>']
    for k, r in enumerate(regions):
        y = MARGIN + 20 * k
        out.append(f'<rect class="legend" x="{MARGIN}" y="{y}" width="14" height="14" fill="{PALETTE[k % len(PALETTE)]}"/>')
        out.append(f'<text x="{MARGIN + 20}" y="{y + 11}">{escape(f"{r.rule}  {r.kernel}  (node {r.output})")}</text>')
    if not regions:
        out.append(f'<text x="{MARGIN}" y="{MARGIN + 11}">no fused region: the graph runs as eager ATen</text>')
    for n in nodes:
        x, y = where[n]
        for a in n.all_input_nodes:
            if a in where:
                ax, ay = where[a]
                out.append(f'<line x1="{ax + BOX_W // 2}" y1="{ay + BOX_H}" x2="{x + BOX_W // 2}" y2="{y}" '
                           'stroke="#adb5bd" stroke-width="1"/>')
    for n in nodes:
        x, y = where[n]
        k = owner.get(index[n])
        fill = PALETTE[k % len(PALETTE)] if k is not None else INPUT if n.op == "placeholder" else UNFUSED
        title = f"{index[n]} {n.name}: {n.op} {n.target}" + (f"  [{regions[k].rule}]" if k is not None else "")
        cls = "node fused" if k is not None else "node"
        out.append(f'<g class="{cls}"><title>{escape(title)}</title><rect x="{x}" y="{y}" width="{BOX_W}" '
                   f'height="{BOX_H}" rx="4" fill="{fill}" stroke="#495057"/>'
                   f'<text x="{x + 6}" y="{y + 19}">{escape(f"{n.name} {_op(n)}"[:26])}</text></g>')
    out.append("</svg>")
    return "\n".join(out) + "\n"
