"""``report.md``: the results table, learning curves and figure links as GitHub-flavoured Markdown."""

from __future__ import annotations

from .html import _fmt_bytes, _fmt_s, _params


def _ci(v):
    lo, hi = v
    return "" if lo is None else f" [{lo:.3f}, {hi:.3f}]"


def results_table(report: dict) -> str:
    """The results table alone (also used by docs)."""
    front = set(report["timing"].get("pareto_front", []))
    lines = ["| row | features | parameters | accuracy [95% CI] | macro-F1 [95% CI] | CV acc. | fit time | predict / 1k | size |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in report["rows"]:
        marks = (" **(best)**" if r["id"] == report["best"] else "") + (" (Pareto)" if r["id"] in front else "")
        cv = (r.get("cv") or {}).get("accuracy")
        t = r["timing"]
        lines.append(f"| {r['label']}{marks} | {r['feature_label']} | {_params(r['params'])} | "
                     f"{r['accuracy']:.3f}{_ci(r['accuracy_ci95'])} | {r['macro_f1']:.3f}{_ci(r['macro_f1_ci95'])} | "
                     f"{'' if cv is None else f'{cv:.3f}'} | {_fmt_s(t.get('fit_seconds'))} | "
                     f"{_fmt_s(t.get('predict_seconds_per_1000'))} | {_fmt_bytes(r.get('size_bytes'))} |")
    return "\n".join(lines)


def render_markdown(report: dict) -> str:
    cfg, data = report["config"], report["data"]
    bc = cfg["backbone_config"]
    out = [f"# tlfx compare — {data['train'].get('dataset')}", "",
           f"Backbone **{bc.get('backbone')}** (layers {', '.join(map(str, bc.get('layers') or []))}, {bc.get('pooling')} "
           f"pooling, {bc.get('image_size')} px); {len(data['class_names'])} classes; train {data['train']['n_labelled']} "
           f"images, test {data['test']['n_labelled']} images. "
           + (f"Hyperparameters by {cfg['cv_folds']}-fold CV on the training store. " if cfg["search"] else
              "Default hyperparameters. ")
           + f"95% bootstrap CIs ({cfg['bootstrap_resamples']} resamples, seed {cfg['seed']}).", "",
           "## Results", "", results_table(report), ""]
    if (report.get("baseline") or {}).get("note"):
        out += [f"Baseline: {report['baseline']['note']}.", ""]
    curves = report.get("learning_curves", {}).get("curves") or []
    if curves:
        pts = []
        for c in curves:
            pts += [p for p in c["per_class"] if p not in pts]
        pts.sort(key=lambda p: (p == "all", p if p != "all" else 0))
        out += ["## Learning curves (test accuracy by labelled examples per class)", "",
                "| head | features | " + " | ".join(str(p) for p in pts) + " |", "|---|---|" + "---|" * len(pts)]
        for c in curves:
            vals = dict(zip(c["per_class"], c["accuracy"]))
            out.append(f"| {c['head']} | {c['feature_label']} | "
                       + " | ".join("–" if vals.get(p) is None else f"{vals[p]:.3f}" for p in pts) + " |")
        out.append("")
    figs = report.get("figures") or {}
    if figs:
        out += ["## Figures", ""]
        for f in figs.values():
            out += [f"### {f['title']}", "", f"![{f['title']}]({f['file']})", "", f["caption"], ""]
    if report.get("command"):
        out += ["## Command", "", "```", "tlfx " + " ".join(map(str, report["command"])), "```", ""]
    return "\n".join(out)
