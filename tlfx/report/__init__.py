"""Rendering of a compare report: ``report.json`` (every number), ``report.html`` (one self-contained page), ``report.md``.

Figures are drawn with matplotlib's Agg backend into ``figures/*.png`` and embedded in the HTML as data URIs, so
the page needs no network, no JavaScript and no other file.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile

from .figures import TMP_PREFIX, make_figures, public_mode
from .html import render_html
from .markdown import render_markdown

__all__ = ["write_reports", "clear_previous", "dumps", "render_html", "render_markdown", "make_figures"]

REPORT_FILES = ("report.json", "report.html", "report.md")
LEGACY_TMP = tuple(f"{name}.tmp" for name in REPORT_FILES)  # fixed temporary names of tlfx <= 0.1


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


def clear_previous(out: str):
    """Remove the previous run's report.json/.html/.md and whatever temporaries a killed run left in ``out``.

    Called when a compare run starts (after its input was checked): from then on a report file in ``out`` can
    only be this run's, so a run killed half-way never leaves an old report beside new figures and models.
    Links are removed, never followed.
    """
    if not os.path.isdir(out):
        return
    for name in REPORT_FILES:
        _remove(os.path.join(out, name))
    for entry in os.scandir(out):
        if entry.name.startswith(TMP_PREFIX) or entry.name in LEGACY_TMP:
            _remove(entry.path)
    figs = os.path.join(out, "figures")
    if os.path.isdir(figs) and not os.path.islink(figs):
        for entry in os.scandir(figs):
            if entry.name.startswith(TMP_PREFIX):
                _remove(entry.path)


def _remove(path: str):
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)


def _write_text(path: str, text: str):
    """Write ``text`` to a fresh, exclusively created temporary in the same folder, then rename it over ``path``."""
    fd, tmp = tempfile.mkstemp(prefix=TMP_PREFIX, suffix=".tmp", dir=os.path.dirname(path) or ".")
    try:
        public_mode(fd)
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def _swap_in(staged: str, final: str):
    """Put the folder ``staged`` at ``final``, replacing what is there (a planted link is removed, not followed)."""
    old = None
    if os.path.islink(final) or (os.path.lexists(final) and not os.path.isdir(final)):
        os.unlink(final)
    elif os.path.isdir(final):
        old = tempfile.mkdtemp(prefix=TMP_PREFIX + "old-", dir=os.path.dirname(final))
        os.rename(final, os.path.join(old, "figures"))
    os.rename(staged, final)
    if old:
        shutil.rmtree(old, ignore_errors=True)


def write_reports(report: dict, out: str, test_store=None) -> dict:
    """Draw the figures and write report.json, report.html and report.md into ``out``; returns their paths.

    Figures are drawn into a fresh staging folder and swapped in as ``figures/``; each report file is written
    under an exclusively created temporary name and renamed, so no file is ever written through a planted link.
    """
    return write_report_files(report, out, lambda stage: make_figures(report, stage, test_store),
                              render_html, render_markdown)


def write_report_files(report: dict, out: str, draw, render_html, render_markdown) -> dict:
    """The safe writing of a report (see :func:`write_reports`): ``draw(stage)`` makes the figures in a staging
    folder, ``render_html(report, figures)`` and ``render_markdown(report)`` the pages."""
    os.makedirs(out, exist_ok=True)
    clear_previous(out)
    stage = tempfile.mkdtemp(prefix=TMP_PREFIX + "figures-", dir=out)
    try:
        fd = os.open(stage, os.O_RDONLY)
        try:
            public_mode(fd, directory=True)
        finally:
            os.close(fd)
        figures = draw(stage)
        final = os.path.join(out, "figures")
        _swap_in(stage, final)
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise
    for f in figures.values():
        f["path"] = os.path.join(final, os.path.basename(f["path"]))
    report["figures"] = {name: {"file": os.path.relpath(f["path"], out), "title": f["title"], "caption": f["caption"]}
                         for name, f in figures.items()}
    paths = {"json": os.path.join(out, "report.json"), "html": os.path.join(out, "report.html"),
             "md": os.path.join(out, "report.md")}
    for key, text in (("json", dumps(report)), ("html", render_html(report, figures)), ("md", render_markdown(report))):
        _write_text(paths[key], text)
    return paths
