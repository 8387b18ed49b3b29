"""conv -> batch norm in inference [-> ReLU] -> one conv with the BN folded into its weights.

Training-mode batch norm (batch statistics) never matches: only
``_native_batch_norm_legit_no_training`` does, which is what ``model.eval()`` traces to.
"""

from __future__ import annotations

from hypatia.planner.rules import Family, Fusion, Lit, Match, Rule, int_list, scalar

BN = "aten._native_batch_norm_legit_no_training.default"


def _conv(bias) -> tuple:
    return ("aten.convolution.default", "$x", "$w", bias, "_", "_", "_", Lit(False), "_", "_")


def _patterns(bias, relu: bool) -> tuple:
    bn = (BN, _conv(bias), "$gamma", "$beta", "$mean", "$var", "_", "_")
    out = ("_operator.getitem", bn, Lit(0))
    return (("aten.relu.default", out),) if relu else (out,)


def _build(signature: str):
    def build(match: Match) -> Fusion | None:
        (conv,) = match.members("aten.convolution.default")
        (bn,) = match.members(BN)
        args = match.node(conv).args
        stride, padding, dilation = (int_list(a) for a in args[3:6])
        groups, eps = args[8], scalar(match.node(bn).args[6])
        if None in (stride, padding, dilation, eps) or not isinstance(groups, int):
            return None
        i = match.inputs
        names = ("x", "w", "cb", "gamma", "beta", "mean", "var") if "cb" in i else ("x", "w", "gamma", "beta", "mean", "var")
        return Fusion(signature, tuple(i[n] for n in names), (eps, stride, padding, dilation, groups))

    return build


RULES = tuple(
    Rule(f"conv_bn{'_relu' if relu else ''}{'' if bias == Lit(None) else '_bias'}", "conv_bn", "conv_bn",
         _build(("bias_" if bias != Lit(None) else "") + ("relu" if relu else "plain")), _patterns(bias, relu))
    for bias in (Lit(None), "$cb")
    for relu in (False, True)
)

FAMILY = Family("conv_bn", RULES)
