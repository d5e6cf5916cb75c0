"""The backbone sweep's report: one grid of backbone x layers x head, cost per configuration, paired tests.

Same files and rules as the single-store report (``report.json``, a self-contained ``report.html`` without
JavaScript, ``report.md``; figures in ``figures/``); every value from a store, a dataset or the command line is
escaped (tlfx.safetext) before it reaches HTML or Markdown.
"""

from __future__ import annotations

import os

import numpy as np

from ..safetext import html as e
from ..safetext import markdown as m
from ..safetext import terminal
from .figures import HEAD_COLORS, RC, _labels, _plt, _save, _short, _t, plain_log_ticks
from .html import CSS, _fmt_bytes, _fmt_s, data_uri
from .html import _num as _hnum

SWEEP_CSS = CSS + """
table.grid td,table.grid th{text-align:center}table.grid td.l,table.grid th.l{text-align:left}
table.grid td.best{background:#eaf6ec;font-weight:600}
ul.paired li{margin:4px 0}
"""


# ------------------------------------------------------------------------------------------------------ figures
def make_sweep_figures(report: dict, directory: str) -> dict:
    """Heatmap of the grid, accuracy vs total cost, the embedding map; {name: {path, title, caption}}."""
    os.makedirs(directory, exist_ok=True)
    plt = _plt()
    figs = {}

    def add(name, title, caption, fn):
        path = os.path.join(directory, f"{name}.png")
        fn(plt, path)
        figs[name] = {"path": path, "title": title, "caption": caption}

    with plt.rc_context(RC):
        add("grid_heatmap", "Test accuracy: backbone x layers (rows) by head (columns)",
            "Each cell is one head fitted on one configuration's training store and scored once on the test store"
            + ("; a line that spans every column is a fine-tuned model (--finetune), scored once on the same test "
               "images" if model_lines(report) else "")
            + ". The black box marks the best row.", lambda plt, p: _heatmap(plt, p, report))
        add("accuracy_vs_cost", "Accuracy vs total cost",
            "Test accuracy (bars: 95% bootstrap CI) against extraction of both splits plus head fit time, log scale"
            + ("; for a fine-tuned model (stars): its recorded training time plus its prediction time on the test "
               "images" if model_lines(report) else "")
            + ". Colour: backbone; marker: head. Rings and the dashed line mark the Pareto front.",
            lambda plt, p: _cost(plt, p, report))
        curves = report.get("learning_curves") or []
        if curves:
            add("learning_curves", "Learning curves of the best head per configuration",
                "Test accuracy against labelled training examples per class (default parameters, fixed-seed "
                "subsets), for each configuration's most accurate head.", lambda plt, p: _curves(plt, p, curves))
        emb = report.get("embedding")
        if emb:
            add("embedding_map", f"Embedding map: {emb['label']}",
                f"{emb['method']} of the best configuration's test features ({len(emb['x'])} images), coloured by "
                f"true class; black crosses: the {emb['n_wrong']} images the best row gets wrong.",
                lambda plt, p: _embedding(plt, p, emb))
    return figs


def grid(report: dict):
    """(configuration ids, their labels, heads, accuracy matrix with NaN where a cell is missing)."""
    cfgs = [c["id"] for c in report["configs"]]
    labels = [f"{c['backbone']} · {c['layers']}" for c in report["configs"]]
    heads = list(report["heads"])
    acc = np.full((len(cfgs), len(heads)), np.nan)
    for r in report["rows"]:
        if r["config"] in cfgs and r["head"] in heads:
            acc[cfgs.index(r["config"]), heads.index(r["head"])] = r["accuracy"]
    return cfgs, labels, heads, acc


def model_lines(report: dict) -> list[dict]:
    """The rows of model files (--finetune) in report order: each is one line of the grid with a single cell."""
    return [r for r in report["rows"] if r.get("config") is None]


def _heatmap(plt, path, report):
    cfgs, labels, heads, acc = grid(report)
    extra = model_lines(report)
    cfgs, labels = cfgs + [r["id"] for r in extra], labels + [r["label"] for r in extra]
    acc = np.vstack([acc, np.full((len(extra), len(heads)), np.nan)])
    fig, ax = plt.subplots(figsize=(2.6 + 1.25 * len(heads), 1.4 + 0.55 * len(cfgs)))
    finite = acc[np.isfinite(acc)]
    finite = np.concatenate([finite, [r["accuracy"] for r in extra]])
    lo = float(finite.min()) if finite.size else 0.0
    im = ax.imshow(acc, cmap="viridis", vmin=max(0.0, lo - 0.02), vmax=1.0, aspect="auto")
    ax.grid(False)
    best = next(r for r in report["rows"] if r["id"] == report["best"])
    for i in range(len(cfgs)):
        for j in range(len(heads)):
            if np.isfinite(acc[i, j]):
                bright = (acc[i, j] - im.norm.vmin) / max(im.norm.vmax - im.norm.vmin, 1e-9) > 0.6
                ax.text(j, i, f"{acc[i, j]:.3f}", ha="center", va="center", fontsize=9,
                        color="black" if bright else "white")
    for i, r in enumerate(extra, start=len(cfgs) - len(extra)):  # one cell across every head column
        v = r["accuracy"]
        ax.add_patch(plt.Rectangle((-0.5, i - 0.5), len(heads), 1, color=im.cmap(im.norm(v)), lw=0))
        bright = (v - im.norm.vmin) / max(im.norm.vmax - im.norm.vmin, 1e-9) > 0.6
        ax.text((len(heads) - 1) / 2, i, f"{v:.3f}", ha="center", va="center", fontsize=9,
                color="black" if bright else "white")
    if best["config"] is None:
        bi, bj, bw = cfgs.index(best["id"]), 0, len(heads)
    else:
        bi, bj, bw = cfgs.index(best["config"]), heads.index(best["head"]), 1
    ax.add_patch(plt.Rectangle((bj - 0.5, bi - 0.5), bw, 1, fill=False, ec="black", lw=2.5))
    ax.set_xticks(range(len(heads)))
    ax.set_xticklabels([_short(h, 16) for h in heads])
    ax.set_yticks(range(len(cfgs)))
    ax.set_yticklabels([_t(lbl) for lbl in labels])
    ax.set_xlabel("head")
    fig.colorbar(im, ax=ax, fraction=0.04, pad=0.02, label="test accuracy")
    return _save(fig, path)


MARKERS = "osD^vP*Xh<>"


def _cost(plt, path, report):
    rows = report["rows"]
    front = set(report.get("pareto_front") or [])
    backbones = list(dict.fromkeys(r["backbone"] for r in rows))
    heads = list(report["heads"])
    fig, ax = plt.subplots(figsize=(8.5, 5))
    for r in rows:
        t = max(r["timing"]["total_cost_seconds"], 1e-3)
        lo, hi = r["accuracy_ci95"]
        yerr = [[r["accuracy"] - lo], [hi - r["accuracy"]]] if lo is not None else None
        c = HEAD_COLORS[backbones.index(r["backbone"]) % len(HEAD_COLORS)]
        model = r.get("config") is None
        mk = "*" if model else MARKERS[heads.index(r["head"]) % len(MARKERS)] if r["head"] in heads else "o"
        ax.errorbar([t], [r["accuracy"]], yerr=yerr, fmt=mk, color=c, ms=12 if model else 7, capsize=3, alpha=0.9)
        if r["id"] in front:
            ax.plot([t], [r["accuracy"]], "o", ms=15, mfc="none", mec="black", mew=1.4)
    fr = sorted((max(r["timing"]["total_cost_seconds"], 1e-3), r["accuracy"]) for r in rows if r["id"] in front)
    if len(fr) > 1:
        ax.step([p[0] for p in fr], [p[1] for p in fr], "k--", where="post", lw=1, alpha=0.6)
    ax.set_xscale("log")
    plain_log_ticks(ax)
    ax.set_xlabel("extraction (train + test) + fit time" + ("; fine-tuned: training + prediction" if
                  model_lines(report) else "") + " (s, log scale)")
    ax.set_ylabel("test accuracy")
    ax.margins(x=0.3)
    _labels(fig, ax, [(max(r["timing"]["total_cost_seconds"], 1e-3), r["accuracy"], _t(r["label"]))
                      for r in rows if r["id"] in front])
    handles = [plt.Line2D([], [], ls="-", lw=5, color=HEAD_COLORS[i % len(HEAD_COLORS)], label=_t(b))
               for i, b in enumerate(backbones)]
    handles += [plt.Line2D([], [], marker=MARKERS[i % len(MARKERS)], ls="", color="#555", label=_t(h))
                for i, h in enumerate(heads)]
    if model_lines(report):
        handles.append(plt.Line2D([], [], marker="*", ms=11, ls="", color="#555", label="fine-tuned model"))
    ax.legend(handles=handles, loc="best", fontsize=8.5)
    return _save(fig, path)


def _curves(plt, path, curves):
    fig, ax = plt.subplots(figsize=(8.5, 5))
    for i, c in enumerate(curves):
        pts = [(n, a) for n, a in zip(c["n_train"], c["accuracy"]) if a is not None and n]
        if pts:
            ax.plot([p[0] for p in pts], [p[1] for p in pts], "-o", ms=4, color=HEAD_COLORS[i % len(HEAD_COLORS)],
                    label=_t(c["label"]))
    ax.set_xscale("log")
    plain_log_ticks(ax)
    ax.set_xlabel("labelled training images (log scale)")
    ax.set_ylabel("test accuracy")
    ax.legend(fontsize=8.5, loc="lower right")
    return _save(fig, path)


def _embedding(plt, path, emb):
    x, y = np.asarray(emb["x"]), np.asarray(emb["y"])
    true, pred = np.asarray(emb["true"]), np.asarray(emb["pred"])
    names = emb["class_names"]
    fig, ax = plt.subplots(figsize=(8.5, 6.5))
    cmap = plt.get_cmap("tab10" if len(names) <= 10 else "tab20")
    for k in np.unique(true):
        sel = true == k
        ax.scatter(x[sel], y[sel], s=9, color=cmap(int(k) % cmap.N), alpha=0.7, linewidths=0,
                   label=_short(names[k], 16) if k < len(names) else str(k))
    wrong = pred != true
    if wrong.any():
        ax.scatter(x[wrong], y[wrong], s=28, marker="x", color="black", linewidths=1.1, label="misclassified")
    ax.set_xlabel(f"{_t(emb['method'].split(' ')[0])} 1")
    ax.set_ylabel(f"{_t(emb['method'].split(' ')[0])} 2")
    if len(names) <= 20:
        ax.legend(fontsize=8, markerscale=1.5, loc="center left", bbox_to_anchor=(1.01, 0.5))
    return _save(fig, path)


# -------------------------------------------------------------------------------------------------------- pages
def _ci_h(v):
    lo, hi = v
    return "" if lo is None else f' <span class="ci">[{_hnum(lo)}, {_hnum(hi)}]</span>'


def _mnum(v):
    return "–" if v is None else (f"{v:.3f}" if isinstance(v, (int, float)) else m(v))


def _ci_m(v):
    lo, hi = v
    return "" if lo is None else f" [{_mnum(lo)}, {_mnum(hi)}]"


def render_sweep_html(report: dict, figures: dict) -> str:
    """The merged page: best row and paired tests first, then the grid, every row, the cost, the figures."""
    cfg = report["config"]
    rows = report["rows"]
    best = next(r for r in rows if r["id"] == report["best"])
    front = set(report.get("pareto_front") or [])
    h = []
    w = h.append
    w("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">")
    w("<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">")
    w(f"<title>tlfx compare (sweep): {e(cfg['data'])}</title><style>{SWEEP_CSS}</style></head><body><main>")
    w(f"<h1>tlfx compare — which backbone, layer and head for {e(cfg['data'])}</h1>")
    n_tr = report["configs"][0]["stores"]["train"]["n"]
    n_te = report["configs"][0]["stores"]["test"]["n"]
    w(f"<p class=\"sub\">{len(report['configs'])} configurations ({e(', '.join(cfg['backbones']))}; layers "
      f"{e(', '.join(cfg['layers']))}) × {len(report['heads'])} heads · train {e(n_tr)} images "
      f"({e(cfg['train_split'])}), test {e(n_te)} images ({e(cfg['test_split'])})"
      + (f" · {len(model_lines(report))} fine-tuned model(s)" if model_lines(report) else "")
      + f" · tlfx {e(report['tlfx_version'])}</p>")
    w("<div class=\"cards\">")
    w(f"<div class=\"card\"><span>best row</span><b>{e(best['label'])}</b><span>accuracy {_hnum(best['accuracy'])}"
      f"{_ci_h(best['accuracy_ci95'])}</span></div>")
    w(f"<div class=\"card\"><span>macro-F1 of the best row</span><b>{_hnum(best['macro_f1'])}</b>"
      f"<span>{_ci_h(best['macro_f1_ci95'])}</span></div>")
    w(f"<div class=\"card\"><span>sweep wall time</span><b>{_fmt_s(report['timing'].get('total_seconds'))}</b>"
      f"<span>{sum(s['state'] == 'reusing' for c in report['configs'] for s in c['stores'].values())} of "
      f"{2 * len(report['configs'])} stores reused from the cache</span></div>")
    w("</div>")
    w("<h2 id=\"paired\">Are the rows really different?</h2>")
    w("<p class=\"note\">The best row against every other row on the same test images: McNemar's exact test "
      "(two-sided binomial test on the images exactly one of the two gets right) and a paired bootstrap interval of "
      "the accuracy difference. p-values are not corrected for the number of comparisons.</p>")
    w("<ul class=\"paired\" id=\"paired-tests\">" + "".join(f"<li>{e(p['sentence'])}</li>" for p in report["paired"])
      + "</ul>")

    cfgs, labels, heads, acc = grid(report)
    by_cell = {(r["config"], r["head"]): r for r in rows}
    w("<h2 id=\"grid\">Accuracy grid</h2>")
    w("<div class=\"scroll\"><table class=\"grid\" id=\"grid-table\"><thead><tr><th class=\"l\">backbone · layers</th>"
      + "".join(f"<th>{e(hd)}</th>" for hd in heads) + "</tr></thead><tbody>")
    for cid, lbl in zip(cfgs, labels):
        cells = []
        for hd in heads:
            r = by_cell.get((cid, hd))
            cls = " class=\"best\"" if r is not None and r["id"] == best["id"] else ""
            cells.append(f"<td{cls}>{_hnum(r['accuracy']) + _ci_h(r['accuracy_ci95']) if r else '–'}</td>")
        w(f"<tr><td class=\"l\">{e(lbl)}</td>{''.join(cells)}</tr>")
    for r in model_lines(report):  # a fine-tuned model has no head: one cell across the head columns
        cls = "best" if r["id"] == best["id"] else ""
        w(f"<tr class=\"model-line\" data-row=\"{e(r['id'])}\"><td class=\"l\">{e(r['label'])}</td>"
          f"<td colspan=\"{len(heads)}\" class=\"{cls}\">{_hnum(r['accuracy'])}{_ci_h(r['accuracy_ci95'])}</td></tr>")
    w("</tbody></table></div>")

    w("<h2 id=\"results\">Every row</h2>")
    w(f"<p class=\"note\">Accuracy and macro-F1 on the test store with 95% bootstrap confidence intervals "
      f"({e(cfg['bootstrap_resamples'])} resamples, seed {e(cfg['seed'])}). Total cost: extraction of both splits "
      f"(as measured when the stores were made) plus the head's fit time, wall-clock on this machine"
      + ("; for a fine-tuned model, its recorded training time plus its prediction time on the test images"
         if model_lines(report) else "") + ".</p>")
    w("<div class=\"scroll\"><table id=\"results-table\"><thead><tr><th class=\"l\">row</th><th class=\"l\">backbone"
      "</th><th class=\"l\">layers</th><th class=\"l\">head</th><th>accuracy</th><th>macro-F1</th><th>fit time</th>"
      "<th>total cost</th><th class=\"l\">details</th></tr></thead><tbody>")
    for r in sorted(rows, key=lambda r: -r["accuracy"]):
        tags = ("<span class=\"tag best\">best</span>" if r["id"] == best["id"] else "") + (
            "<span class=\"tag pareto\">Pareto</span>" if r["id"] in front else "")
        c = next((c for c in report["configs"] if c["id"] == r["config"]), None)
        details = (f"<a href=\"{e(c['report'])}\">report</a>" if c is not None else
                   f"model file {e(os.path.basename(str(r.get('model_file') or '')))}")
        w(f"<tr class=\"result-row{' best' if r['id'] == best['id'] else ''}\" data-row=\"{e(r['id'])}\">"
          f"<td class=\"l\">{e(r['label'])}{tags}</td><td class=\"l\">{e(r['backbone'])}</td>"
          f"<td class=\"l\">{e(r['layers'])}</td><td class=\"l\">{e(r['head'])}</td>"
          f"<td>{_hnum(r['accuracy'])}{_ci_h(r['accuracy_ci95'])}</td>"
          f"<td>{_hnum(r['macro_f1'])}{_ci_h(r['macro_f1_ci95'])}</td>"
          f"<td>{_fmt_s(r['timing']['fit_seconds'])}</td><td>{_fmt_s(r['timing']['total_cost_seconds'])}</td>"
          f"<td class=\"l\">{details}</td></tr>")
    w("</tbody></table></div>")

    w("<h2 id=\"cost\">Cost per configuration</h2>")
    w("<div class=\"scroll\"><table id=\"cost-table\"><thead><tr><th class=\"l\">backbone</th><th class=\"l\">layers"
      "</th><th>image size</th><th>feature dim</th><th>extraction images/s</th><th>extraction time</th>"
      "<th>stores on disk</th><th>parameters</th><th class=\"l\">stores this run</th></tr></thead><tbody>")
    for c in report["configs"]:
        ips = c.get("images_per_s")
        w(f"<tr><td class=\"l\">{e(c['backbone'])}</td><td class=\"l\">{e(c['layers'])}</td><td>{e(c['image_size'])}"
          f"</td><td>{e(c['dim'])}</td><td>{'–' if ips is None else f'{ips:.0f}'}</td>"
          f"<td>{_fmt_s(c['extract_seconds'])}</td><td>{_fmt_bytes(c['store_bytes'])}</td>"
          f"<td>{c['n_params'] / 1e6:.1f} M ({_fmt_bytes(c['model_bytes'])})</td>"
          f"<td class=\"l\">{e(_states(c))}</td></tr>")
    w("</tbody></table></div>")

    w("<h2 id=\"figures\">Figures</h2>")
    for name, f in figures.items():
        w(f"<figure id=\"fig-{e(name)}\"><img class=\"figure\" data-figure=\"{e(name)}\" alt=\"{e(f['title'])}\" "
          f"src=\"{data_uri(f['path'])}\"><figcaption><b>{e(f['title'])}.</b> {e(f['caption'])}</figcaption></figure>")
    w("<h2 id=\"config\">Configuration</h2>")
    if report.get("command"):
        w(f"<pre>tlfx {e(' '.join(map(str, report['command'])))}</pre>")
    w("<pre>" + "\n".join(e(line) for line in report.get("log") or []) + "</pre>")
    w(f"<p class=\"note\">Every number above is in report.json; each configuration's own report (learning curves, "
      f"confusion matrix, misclassified images) is linked from the table. Store cache: {e(cfg['cache'])}.</p>")
    w("</main></body></html>\n")
    return "\n".join(h)


def _states(c: dict) -> str:
    return ", ".join(f"{k} {s['state']}" for k, s in c["stores"].items())


def render_sweep_markdown(report: dict) -> str:
    cfg = report["config"]
    rows = report["rows"]
    best = next(r for r in rows if r["id"] == report["best"])
    cfgs, labels, heads, _acc = grid(report)
    by_cell = {(r["config"], r["head"]): r for r in rows}
    out = [f"# tlfx compare — which backbone, layer and head for {m(cfg['data'])}", "",
           f"Best row: **{m(best['label'])}**, accuracy {_mnum(best['accuracy'])}{_ci_m(best['accuracy_ci95'])}, "
           f"macro-F1 {_mnum(best['macro_f1'])}{_ci_m(best['macro_f1_ci95'])}. "
           f"95% bootstrap CIs ({m(cfg['bootstrap_resamples'])} resamples, seed {m(cfg['seed'])}).", "",
           "## Are the rows really different?", ""]
    out += [f"- {m(p['sentence'])}" for p in report["paired"]] or ["- (one row only)"]
    out += ["", "## Accuracy grid", "", "| backbone · layers | " + " | ".join(m(hd) for hd in heads) + " |",
            "|---|" + "---|" * len(heads)]
    for cid, lbl in zip(cfgs, labels):
        cells = []
        for hd in heads:
            r = by_cell.get((cid, hd))
            cell = f"{_mnum(r['accuracy'])}{_ci_m(r['accuracy_ci95'])}" if r else "–"
            cells.append(f"**{cell}**" if r is not None and r["id"] == best["id"] else cell)
        out.append(f"| {m(lbl)} | " + " | ".join(cells) + " |")
    for r in model_lines(report):  # one cell (under the first head); the model has no head
        cell = f"{_mnum(r['accuracy'])}{_ci_m(r['accuracy_ci95'])}"
        cells = [f"**{cell}**" if r["id"] == best["id"] else cell] + [""] * (len(heads) - 1)
        out.append(f"| {m(r['label'])} | " + " | ".join(cells) + " |")
    out += ["", "## Every row", "",
            "| row | backbone | layers | head | accuracy [95% CI] | macro-F1 [95% CI] | fit time | total cost |",
            "|---|---|---|---|---|---|---|---|"]
    for r in sorted(rows, key=lambda r: -r["accuracy"]):
        out.append(f"| {m(r['label'])} | {m(r['backbone'])} | {m(r['layers'])} | {m(r['head'])} | "
                   f"{_mnum(r['accuracy'])}{_ci_m(r['accuracy_ci95'])} | {_mnum(r['macro_f1'])}{_ci_m(r['macro_f1_ci95'])} | "
                   f"{_fmt_s(r['timing']['fit_seconds'])} | {_fmt_s(r['timing']['total_cost_seconds'])} |")
    out += ["", "## Cost per configuration", "",
            "| backbone | layers | image size | feature dim | extraction images/s | extraction time | stores on disk "
            "| parameters |",
            "|---|---|---|---|---|---|---|---|"]
    for c in report["configs"]:
        ips = c.get("images_per_s")
        out.append(f"| {m(c['backbone'])} | {m(c['layers'])} | {m(c['image_size'])} | {m(c['dim'])} | "
                   f"{'–' if ips is None else f'{ips:.0f}'} | {_fmt_s(c['extract_seconds'])} | "
                   f"{_fmt_bytes(c['store_bytes'])} | {c['n_params'] / 1e6:.1f} M |")
    figs = report.get("figures") or {}
    if figs:
        out += ["", "## Figures", ""]
        for f in figs.values():
            out += [f"### {m(f['title'])}", "", f"![{m(f['title'])}]({f['file']})", "", m(f["caption"]), ""]
    if report.get("command"):
        out += ["## Command", "", "```", terminal("tlfx " + " ".join(map(str, report["command"]))).replace("`", "'"),
                "```", ""]
    return "\n".join(out)


def write_sweep_reports(report: dict, out: str) -> dict:
    """Draw the figures (staged, then swapped in as ``figures/``) and write report.json/.html/.md into ``out``."""
    from . import write_report_files

    return write_report_files(report, out, lambda stage: make_sweep_figures(report, stage), render_sweep_html,
                              render_sweep_markdown)
