"""``report.md``: the results table, learning curves and figure links as GitHub-flavoured Markdown.

Every value from a store, a model file or the command line goes through ``m`` (tlfx.safetext.markdown): a ``|`` in
a class or model name cannot add a table column, a newline cannot end a row, markup stays text.
"""

from __future__ import annotations

import re

from ..safetext import markdown as m
from ..safetext import terminal
from .html import _fmt_bytes, _fmt_s, _is_num, _params, banner


def _num(v, empty="–"):
    if v is None:
        return empty
    return f"{v:.3f}" if _is_num(v) else m(v)


def _ci(v):
    lo, hi = v
    return "" if lo is None else f" [{_num(lo)}, {_num(hi)}]"


def results_table(report: dict) -> str:
    """The results table alone (also used by docs)."""
    front = set(report["timing"].get("pareto_front", []))
    lines = ["| row | features | parameters | accuracy [95% CI] | macro-F1 [95% CI] | CV acc. | fit time | predict / 1k | size |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in report["rows"]:
        marks = (" **(best)**" if r["id"] == report["best"] else "") + (" (Pareto)" if r["id"] in front else "")
        cv = (r.get("cv") or {}).get("accuracy")
        t = r["timing"]
        lines.append(f"| {m(r['label'])}{marks} | {m(r['feature_label'])} | {m(_params(r['params']))} | "
                     f"{_num(r['accuracy'])}{_ci(r['accuracy_ci95'])} | {_num(r['macro_f1'])}{_ci(r['macro_f1_ci95'])} | "
                     f"{_num(cv, '')} | {_fmt_s(t.get('fit_seconds'))} | "
                     f"{_fmt_s(t.get('predict_seconds_per_1000'))} | {_fmt_bytes(r.get('size_bytes'))} |")
    return "\n".join(lines)


def _fence(text: str) -> str:
    """``text`` (one line, controls made visible) in a code fence longer than any run of backticks inside it."""
    text = terminal(text)
    longest = max((len(run) for run in re.findall(r"`+", text)), default=0)
    fence = "`" * max(3, longest + 1)
    return f"{fence}\n{text}\n{fence}"


def render_markdown(report: dict) -> str:
    """The whole ``report.md``."""
    cfg, data = report["config"], report["data"]
    bc = cfg["backbone_config"]
    out = [f"> **Warning:** {m(message)}\n" for message in banner(report)]
    out += [f"# tlfx compare — {m(data['train'].get('dataset'))}", "",
            f"Backbone **{m(bc.get('backbone'))}** (layers {m(', '.join(map(str, bc.get('layers') or [])))}, "
            f"{m(bc.get('pooling'))} pooling, {m(bc.get('image_size'))} px); {len(data['class_names'])} classes; "
            f"train {m(data['train']['n_labelled'])} images, test {m(data['test']['n_labelled'])} images. "
            + (f"Hyperparameters by {m(cfg['cv_folds'])}-fold CV on the training store. " if cfg["search"] else
               "Default hyperparameters. ")
            + f"95% bootstrap CIs ({m(cfg['bootstrap_resamples'])} resamples, seed {m(cfg['seed'])}).", "",
            "## Results", "", results_table(report), ""]
    if (report.get("baseline") or {}).get("note"):
        out += [f"Baseline: {m(report['baseline']['note'])}.", ""]
    curves = report.get("learning_curves", {}).get("curves") or []
    if curves:
        pts = []
        for c in curves:
            pts += [p for p in c["per_class"] if p not in pts]
        pts.sort(key=lambda p: (p == "all", p if p != "all" else 0))
        out += ["## Learning curves (test accuracy by labelled examples per class)", "",
                "| head | features | " + " | ".join(m(p) for p in pts) + " |", "|---|---|" + "---|" * len(pts)]
        for c in curves:
            vals = dict(zip(c["per_class"], c["accuracy"]))
            out.append(f"| {m(c['head'])} | {m(c['feature_label'])} | " + " | ".join(_num(vals.get(p)) for p in pts) + " |")
        out.append("")
    figs = report.get("figures") or {}
    if figs:
        out += ["## Figures", ""]
        for f in figs.values():
            out += [f"### {m(f['title'])}", "", f"![{m(f['title'])}]({f['file']})", "", m(f["caption"]), ""]
        hidden = [it for it in report.get("gallery") or [] if it.get("reason")]
        if hidden:
            out += ["Not shown in the gallery:", ""] + [f"- {m(it['id'])}: {m(it['reason'])}" for it in hidden[:50]]
            out += [f"- … and {len(hidden) - 50} more" if len(hidden) > 50 else "", ""]
    if report.get("command"):
        out += ["## Command", "", _fence("tlfx " + " ".join(map(str, report["command"]))), ""]
    return "\n".join(out)
