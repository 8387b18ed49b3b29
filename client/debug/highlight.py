"""Code highlighting for the HTML report: keywords, strings, comments and numbers as <span>s,
every piece HTML-escaped. A tokenizer by regular expression, not a parser: good enough to read."""

from __future__ import annotations

import keyword
import re
from html import escape

_C_KEYWORDS = frozenset("""auto break case char const constexpr continue default do double else enum extern float
for goto if inline int long register return short signed sizeof static struct switch typedef union unsigned void
volatile while bool true false template typename namespace using class public private __global__ __device__
__host__ __shared__ __restrict__ __syncthreads __forceinline__ half nullptr""".split())
_PY_KEYWORDS = frozenset(keyword.kwlist) | frozenset(keyword.softkwlist) - {"_"}

_STRING = r'"""[\s\S]*?(?:"""|$(?![\s\S]))' r"|'''[\s\S]*?(?:'''|$(?![\s\S]))" r'|"(?:\\.|[^"\\\n])*"?' r"|'(?:\\.|[^'\\\n])*'?"
_NUMBER = r"\b\d+(?:\.\d*)?(?:[eE][+-]?\d+)?\b"
_TOKENS = {
    "python": re.compile(rf"(?P<cm>#[^\n]*)|(?P<st>{_STRING})|(?P<nu>{_NUMBER})|(?P<id>[A-Za-z_]\w*)"),
    "c": re.compile(rf"(?P<cm>//[^\n]*|/\*[\s\S]*?(?:\*/|$(?![\s\S]))|#[^\n]*)|(?P<st>{_STRING})|(?P<nu>{_NUMBER})"
                    r"|(?P<id>[A-Za-z_]\w*)"),
    "json": re.compile(rf"(?P<st>{_STRING})|(?P<nu>-?{_NUMBER})|(?P<id>true|false|null)"),
}
_KEYWORDS = {"python": _PY_KEYWORDS, "c": _C_KEYWORDS, "json": frozenset({"true", "false", "null"})}


def highlight(code: str, language: str) -> str:
    """``code`` as escaped HTML with <span class="kw|st|cm|nu"> around tokens; ``language`` is
    "python", "c" (C, C++, CUDA) or "json"; any other language is only escaped."""
    pattern = _TOKENS.get(language)
    if pattern is None:
        return escape(code)
    keywords = _KEYWORDS[language]
    out: list[str] = []
    pos = 0
    for m in pattern.finditer(code):
        out.append(escape(code[pos:m.start()]))
        kind, text = m.lastgroup, m.group()
        if kind == "id":
            out.append(f'<span class="kw">{escape(text)}</span>' if text in keywords else escape(text))
        else:
            out.append(f'<span class="{kind}">{escape(text)}</span>')
        pos = m.end()
    out.append(escape(code[pos:]))
    return "".join(out)
