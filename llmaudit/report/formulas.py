"""Formulas rendered with matplotlib mathtext to SVG: no LaTeX install, no network."""
from __future__ import annotations

import functools
import io
import re


@functools.lru_cache(maxsize=256)
def formula_svg(tex: str, fontsize: int = 13) -> str:
    """The SVG markup of ``tex``, a mathtext string such as ``r"$A_t=\\delta_t+\\gamma\\lambda A_{t+1}$"``
    (matplotlib's TeX subset: no environments such as aligned)."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    from matplotlib import mathtext

    buf = io.BytesIO()
    with matplotlib.rc_context({"svg.hashsalt": "llmaudit", "svg.fonttype": "path", "mathtext.fontset": "cm",
                                  "savefig.transparent": True}):
        mathtext.math_to_image(tex, buf, prop=matplotlib.font_manager.FontProperties(size=fontsize),
                               format="svg")
    svg = buf.getvalue().decode("utf-8")
    # drop the XML prolog, doctype and the date stamp so the markup can be inlined and is reproducible
    svg = svg[svg.index("<svg"):]
    return re.sub(r"<metadata>.*?</metadata>", "", svg, flags=re.S)
