"""Formulas rendered with matplotlib mathtext to SVG: no LaTeX install, no network."""
from __future__ import annotations

import functools
import io
import re
from pathlib import Path


def formula_svg(tex: str, fontsize: int = 13, cache: Path | None = None) -> str:
    """The SVG markup of ``tex``, a mathtext string such as ``r"$A_t=\\delta_t+\\gamma\\lambda A_{t+1}$"``
    (matplotlib's TeX subset: no environments such as aligned).

    With ``cache`` (a folder), the image is kept there under a hash of the LaTeX, the font size and
    the drawing code, and read back instead of drawn the next time (formulas never change between
    runs; drawing 89 of them costs seconds)."""
    if cache is None:
        return _draw(tex, fontsize)
    from llmaudit.report.cache import cached_file, code_digest, content_hash

    key = "formula-" + content_hash(tex, str(fontsize), code_digest("formulas.py"))[:24]
    return cached_file(cache, key, ".svg", lambda: _draw(tex, fontsize).encode("utf-8")).decode("utf-8")


@functools.lru_cache(maxsize=256)
def _draw(tex: str, fontsize: int) -> str:
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
