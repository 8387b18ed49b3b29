"""KernelDiff: metrics against hand-computed differences (NaN/Inf, chunking), output and gradient
naming, a planted wrong kernel found and attributed to its region, and valid PNG heatmaps."""

from __future__ import annotations

import dataclasses
import json
import math
import struct
import zlib
from collections import namedtuple

import pytest
import torch

from hypatia.debug import DiffReport, TensorDiff, compare, tensor_diff
from hypatia.debug import heatmap, png
from hypatia.debug.kernel_diff import UnknownReference, named_tensors
from hypatia.debug.metrics import default_tolerance, max_abs_between


# -- metrics ---------------------------------------------------------------------------------
def test_metrics_match_a_hand_computed_difference():
    a = torch.tensor([1.0, 2.0, 3.0, 4.0])
    b = torch.tensor([1.0, 2.5, 3.0, 0.0])
    d = tensor_diff("x", a, b, atol=0.1, rtol=0.1, allowed_share=0.4)
    # |a-b| = [0, .5, 0, 4]; tolerance .1 + .1|b| = [.2, .35, .4, .1]: elements 1 and 3 are past it
    assert (d.max_abs, d.mean_abs) == (4.0, 1.125)
    assert d.rmse == pytest.approx(math.sqrt((0.25 + 16) / 4))
    # relative to max(|b|, atol): [0, .5/2.5, 0, 4/.1]
    assert d.max_rel == pytest.approx(40.0) and d.mean_rel == pytest.approx((0.2 + 40) / 4)
    assert d.share_past_tol == 0.5 and d.worst == ((3,), (1,))
    assert (d.nan, d.inf, d.ref_nan, d.ref_inf) == (0, 0, 0, 0)
    assert not d.passed
    assert tensor_diff("x", a, b, atol=0.1, rtol=0.1, allowed_share=0.5).passed
    assert (d.name, d.shape, d.dtype) == ("x", (4,), "float32")


def test_nan_and_inf_are_counted_and_new_ones_fail():
    nan, inf = float("nan"), float("inf")
    a = torch.tensor([nan, inf, 1.0, nan, 5.0])
    b = torch.tensor([nan, 1.0, 1.0, 2.0, inf])
    d = tensor_diff("x", a, b)
    assert (d.nan, d.inf, d.ref_nan, d.ref_inf) == (2, 1, 1, 1)
    # the shared NaN is no difference; the three one-sided non-finites are past tolerance
    assert d.share_past_tol == pytest.approx(3 / 5)
    assert d.max_abs == 0.0  # errors are over the positions where both are finite
    assert d.worst == ((1,), (3,), (4,))
    assert not d.passed
    same = tensor_diff("x", torch.tensor([nan, inf, 1.0]), torch.tensor([nan, inf, 1.0]))
    assert same.passed and same.share_past_tol == 0.0 and (same.nan, same.ref_nan) == (1, 1)
    assert max_abs_between(torch.tensor([nan, 1.0]), torch.tensor([nan, 1.5])) == 0.5
    assert max_abs_between(torch.tensor([nan, 1.0]), torch.tensor([0.0, 1.0])) == inf


def test_chunked_metrics_equal_unchunked():
    g = torch.Generator().manual_seed(1)
    b = torch.randn(3, 7, 11, generator=g)
    a = b + 1e-6 * torch.randn(3, 7, 11, generator=g)
    a[1, 2, 3] += 0.5
    a[2, 6, 10] -= 0.25
    a[0, 0, 0] = float("nan")
    whole = tensor_diff("x", a, b, k=4)
    for chunk in (1, 5, 64, 231):
        part = tensor_diff("x", a, b, k=4, chunk_elems=chunk)
        assert part.worst == whole.worst and part.worst[:3] == ((0, 0, 0), (1, 2, 3), (2, 6, 10))
        for f in dataclasses.fields(TensorDiff):
            x, y = getattr(part, f.name), getattr(whole, f.name)
            assert x == pytest.approx(y, rel=1e-12) if isinstance(x, float) else x == y, f.name
    assert whole.max_abs == pytest.approx(0.5, rel=1e-5)
    assert max_abs_between(a, b, chunk_elems=7) == max_abs_between(a, b)


def test_default_tolerances_are_assert_closes():
    assert default_tolerance(torch.float32) == (1e-5, 1.3e-6)
    assert default_tolerance(torch.bfloat16) == (1e-5, 1.6e-2)
    assert default_tolerance(torch.int64) == (0.0, 0.0)
    # a float64 reference for a float32 tensor: tolerances of the tensor checked
    d = tensor_diff("x", torch.ones(3), torch.ones(3, dtype=torch.float64) + 2e-5)
    assert d.share_past_tol == 1.0 and d.dtype == "float32"


# -- naming ----------------------------------------------------------------------------------
@dataclasses.dataclass
class Pair:
    left: torch.Tensor
    right: tuple


def test_nested_outputs_are_named_by_path():
    from transformers.utils import ModelOutput

    @dataclasses.dataclass
    class Out(ModelOutput):
        logits: torch.Tensor = None
        hidden: tuple = None

    t = torch.zeros(1)
    Point = namedtuple("Point", "x y")
    obj = (t, [t, {"a": t, 3: t, "b c": t}], Pair(t, (t, None)), Point(t, 1.0),
           Out(logits=t, hidden=(t, t)))
    assert [n for n, _ in named_tensors(obj)] == [
        "out[0]", "out[1][0]", "out[1][1].a", "out[1][1][3]", "out[1][1]['b c']", "out[2].left", "out[2].right[0]",
        "out[3].x", "out[4].logits", "out[4].hidden[0]", "out[4].hidden[1]"]


# -- heatmaps and PNG ------------------------------------------------------------------------
def png_pixels(data: bytes) -> tuple[int, int, bytes]:
    """(width, height, raw rows) of an RGB PNG, checked chunk by chunk."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    pos, chunks = 8, {}
    while pos < len(data):
        (length,) = struct.unpack(">I", data[pos:pos + 4])
        kind, body = data[pos + 4:pos + 8], data[pos + 8:pos + 8 + length]
        assert struct.unpack(">I", data[pos + 8 + length:pos + 12 + length])[0] == zlib.crc32(kind + body)
        chunks[kind] = chunks.get(kind, b"") + body
        pos += 12 + length
    assert list(chunks)[0] == b"IHDR" and list(chunks)[-1] == b"IEND"
    width, height, depth, color = struct.unpack(">IIBB", chunks[b"IHDR"][:10])
    assert (depth, color) == (8, 2)
    raw = zlib.decompress(chunks[b"IDAT"])
    assert len(raw) == height * (1 + 3 * width)
    return width, height, raw


def test_png_encoder_writes_what_it_was_given(tmp_path):
    pixels = torch.arange(2 * 3 * 3, dtype=torch.uint8).view(2, 3, 3)
    path = png.write(tmp_path / "p.png", pixels)
    width, height, raw = png_pixels(path.read_bytes())
    assert (width, height) == (3, 2) == png.read_size(path.read_bytes())
    assert raw == b"\x00" + bytes(range(9)) + b"\x00" + bytes(range(9, 18))
    table = png.colormap_table()
    assert table.shape == (256, 3) and tuple(table[0].tolist()) == (68, 1, 84) and tuple(table[-1].tolist()) == (253, 231, 37)
    with pytest.raises(png.PNGError):
        png.encode(2, 2, b"\x00" * 11)


@pytest.mark.parametrize("shape,size", [((10,), (64, 48)), ((300, 700), (350, 300)), ((2, 3, 1030, 5), (5, 344)),
                                        ((), (16, 16))])
def test_heatmaps_have_the_expected_size_and_max_pooled_values(shape, size):
    g = torch.Generator().manual_seed(2)
    b = torch.randn(shape, generator=g)
    a = b + torch.rand(shape, generator=g)
    assert heatmap.image_size(shape) == size
    grid = heatmap.error_map(a, b)
    assert heatmap.error_map(a, b, chunk_elems=50).equal(grid)
    # by hand: the error as (leading, rows, cols), max over leading, max-pooled to <= 512 a side
    lead, rows, cols = heatmap.layout(shape)
    err = (a.double() - b.double()).abs().reshape(-1)
    err = torch.cat([err, err.new_zeros(lead * rows * cols - err.numel())]).view(lead, rows, cols).amax(0)
    ph, pw = math.ceil(rows / 512), math.ceil(cols / 512)
    expected = torch.nn.functional.max_pool2d(err[None], (ph, pw), ceil_mode=True)[0]
    assert grid.equal(expected)
    pixels = heatmap.heatmap_pixels(grid)
    assert (pixels.shape[1], pixels.shape[0]) == size
    assert png.read_size(png.image_bytes(pixels)) == size


def test_summary_plot_draws_a_bar_per_tensor():
    pixels = heatmap.summary_pixels([1e-3, 0.0, float("inf"), 2.0], [True, True, False, False])
    assert (pixels.shape[1], pixels.shape[0]) == heatmap.summary_size(4)
    column = lambda i: pixels[:, heatmap.BAR_GAP + i * (heatmap.BAR_WIDTH + heatmap.BAR_GAP) + 1]  # noqa: E731
    fail = torch.tensor(heatmap.FAIL_RGB, dtype=torch.uint8)
    assert (column(2) == fail).all(dim=1).all()  # an Inf error fills its column
    assert not (column(1) == torch.tensor(heatmap.PASS_RGB, dtype=torch.uint8)).all(dim=1).any()  # zero: no bar
    assert 0 < (column(0) != 255).any(dim=1).sum() < (column(3) == fail).all(dim=1).sum()


# -- compare() on a compiled model -----------------------------------------------------------
@dataclasses.dataclass
class Branches:
    relu: torch.Tensor
    extra: dict


class TwoBranches(torch.nn.Module):
    """linear -> ReLU and linear -> GELU side by side: two fused regions, independent of each
    other in the forward and the backward."""

    def __init__(self):
        super().__init__()
        self.a, self.b = torch.nn.Linear(32, 48), torch.nn.Linear(32, 40)

    def forward(self, x):
        return Branches(self.a(x).relu(), {"gelu": torch.nn.functional.gelu(self.b(x))})


NAMES = ["out.relu", "out.extra.gelu", "grad.a.weight", "grad.a.bias", "grad.b.weight", "grad.b.bias"]


@pytest.fixture
def quiet_home(home, dynamo_reset, monkeypatch):
    monkeypatch.setenv("HYPATIA_CHECKSUM_MODE", "off")  # a wrong kernel that validation did not catch
    return home


def test_a_correct_model_passes_against_eager_and_float64(quiet_home, monkeypatch):
    monkeypatch.setenv("HYPATIA_AUTOSTART", "0")
    torch.manual_seed(0)
    model, x = TwoBranches(), torch.randn(8, 32)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    for reference in ("eager", "float64"):
        report = compare(model, x, reference=reference, repeats=2)
        assert report.passed, str(report)
        assert [t.name for t in report.tensors] == NAMES
        assert report.attribution == () and report.to_dict()["reference"] == reference
        assert all(t.noise_max_abs == 0.0 for t in report.tensors)  # the aten executor on the CPU repeats exactly
    float64 = report.tensors[0]
    outputs_only = compare(model, x, grads=False, repeats=1)
    assert [t.name for t in outputs_only.tensors] == NAMES[:2] and outputs_only.passed
    weighted = compare(model, x, repeats=1, loss=lambda out: (out.relu * 3).sum())  # gradients of branch a only
    assert [t.name for t in weighted.tensors] == NAMES[:4] and weighted.passed
    with pytest.raises(UnknownReference):
        compare(model, x, reference="float16")
    assert 0 < float64.max_abs < 1e-5 and float64.dtype == "float32"
    assert all(p.grad is None for p in model.parameters())  # the model itself never ran
    assert all(v.equal(model.state_dict()[k]) for k, v in before.items())
    from hypatia.client.backend import session

    assert {r.rule for _, p in session().plans for r in p.regions} == {"linear_relu", "linear_gelu"}


def test_a_planted_wrong_kernel_is_found_and_attributed(quiet_home, monkeypatch, tmp_path):
    """One region's kernel returns 1% too much: exactly the tensors it reaches fail, by the
    hand-computed amount, and leaving that region unfused (and no other) makes them pass."""
    quiet_home.hypatiad("start", extra_env={"HYPATIA_BACKGROUND_TUNING": "0"})  # plans from a daemon
    from hypatia.kernels import linear_activation

    right = linear_activation.addmm_gelu
    monkeypatch.setattr(linear_activation, "addmm_gelu", lambda bias, m1, m2, shape=None: right(bias, m1, m2, shape) * 1.01)
    torch.manual_seed(0)
    model, x = TwoBranches(), torch.randn(8, 32)
    report = compare(model, x, repeats=2, out_dir=tmp_path, max_regions=4)

    assert [t.name for t in report.tensors] == NAMES
    assert [t.name for t in report.failing] == ["out.extra.gelu", "grad.b.weight", "grad.b.bias"], str(report)
    by_name = {t.name: t for t in report.tensors}
    assert all(by_name[n].max_abs == 0.0 for n in ("out.relu", "grad.a.weight", "grad.a.bias"))
    expected = torch.nn.functional.gelu(model.b(x)).detach().double()
    error = 0.01 * expected.abs()
    gelu = by_name["out.extra.gelu"]
    assert gelu.max_abs == pytest.approx(float(error.max()), rel=1e-4)
    assert gelu.mean_abs == pytest.approx(float(error.mean()), rel=1e-4)
    assert gelu.rmse == pytest.approx(float(error.square().mean().sqrt()), rel=1e-4)
    assert gelu.share_past_tol == pytest.approx(float((error > 1e-5 + 1.3e-6 * expected.abs()).double().mean()), abs=0.01)
    assert gelu.worst[0] == tuple(divmod(int(error.argmax()), 40))
    assert all(t.noise_max_abs == 0.0 for t in report.tensors)

    rules = {a.rule: a for a in report.attribution}
    assert set(rules) == {"linear_relu", "linear_gelu"}
    assert rules["linear_gelu"].explains and rules["linear_gelu"].max_abs_without == 0.0
    assert rules["linear_gelu"].kernel == "linear_activation/cpu_torch/gelu"
    assert not rules["linear_relu"].explains
    assert rules["linear_relu"].max_abs_without == max(t.max_abs for t in report.failing)
    from hypatia.client.backend import session

    counters = session().counters
    assert session().region_filter is None and counters["fallbacks"] == 0
    assert counters["local_plans"] == 0 and counters["daemon_misses"] >= 1  # the daemon planned every compile
    assert "FAIL" in str(report) and "linear_gelu" in str(report)

    written = json.loads((tmp_path / "kerneldiff.json").read_text())
    assert written == json.loads(json.dumps(report.to_dict()))
    assert set(written) == {"reference", "atol", "rtol", "allowed_share", "repeats", "passed", "tensors",
                            "attribution", "heatmaps"}
    assert set(written["tensors"][0]) == {f.name for f in dataclasses.fields(TensorDiff)}
    assert written["attribution"][0].keys() == {"region", "rule", "kernel", "max_abs_without", "explains"}
    assert written["heatmaps"] == ["heatmaps/01-out.extra.gelu.png", "heatmaps/04-grad.b.weight.png",
                                   "heatmaps/05-grad.b.bias.png", "heatmaps/summary.png"]
    for file, t in zip(written["heatmaps"], report.failing):
        assert png_pixels((tmp_path / file).read_bytes())[:2] == heatmap.image_size(t.shape)
    assert png_pixels((tmp_path / "heatmaps/summary.png").read_bytes())[:2] == heatmap.summary_size(6)
    assert isinstance(report, DiffReport) and not report.passed
