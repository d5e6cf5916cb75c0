"""Rendering of a compare report: ``report.json`` (every number), ``report.html`` (one self-contained page), ``report.md``.

Figures are drawn with matplotlib's Agg backend into ``figures/*.png`` and embedded in the HTML as data URIs, so
the page needs no network, no JavaScript and no other file.
"""

from __future__ import annotations

import json
import os

from .figures import make_figures
from .html import render_html
from .markdown import render_markdown

__all__ = ["write_reports", "dumps", "render_html", "render_markdown", "make_figures"]


def dumps(obj, indent: int = 2) -> str:
    """JSON with nested structure indented but lists of plain numbers/strings kept on one line."""

    def enc(o, level):
        pad, inner = " " * (indent * level), " " * (indent * (level + 1))
        if isinstance(o, dict):
            if not o:
                return "{}"
            items = [f"{inner}{json.dumps(str(k))}: {enc(v, level + 1)}" for k, v in o.items()]
            return "{\n" + ",\n".join(items) + f"\n{pad}}}"
        if isinstance(o, (list, tuple)):
            if all(not isinstance(v, (dict, list, tuple)) for v in o):
                return json.dumps(list(o))
            if all(isinstance(v, (list, tuple)) and all(not isinstance(x, (dict, list, tuple)) for x in v) for v in o):
                return "[\n" + ",\n".join(inner + json.dumps(list(v)) for v in o) + f"\n{pad}]"
            return "[\n" + ",\n".join(inner + enc(v, level + 1) for v in o) + f"\n{pad}]"
        return json.dumps(o)

    return enc(obj, 0) + "\n"


def write_reports(report: dict, out: str, test_store=None) -> dict:
    """Draw the figures and write report.json, report.html and report.md into ``out``; returns their paths."""
    os.makedirs(out, exist_ok=True)
    figures = make_figures(report, os.path.join(out, "figures"), test_store)
    report["figures"] = {name: {"file": os.path.relpath(f["path"], out), "title": f["title"], "caption": f["caption"]}
                         for name, f in figures.items()}
    paths = {"json": os.path.join(out, "report.json"), "html": os.path.join(out, "report.html"),
             "md": os.path.join(out, "report.md")}
    for key, text in (("json", dumps(report)), ("html", render_html(report, figures)), ("md", render_markdown(report))):
        tmp = paths[key] + ".tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, paths[key])
    return paths
