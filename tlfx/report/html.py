"""``report.html``: one self-contained page (inline CSS, figures as data URIs, no JavaScript, no network)."""

from __future__ import annotations

import base64
import json

from ..safetext import html as e

CSS = """
body{font-family:-apple-system,"Segoe UI",Roboto,"DejaVu Sans",Helvetica,Arial,sans-serif;color:#1d2430;margin:0;
background:#f6f7f9;line-height:1.45}
main{max-width:1300px;margin:0 auto;padding:28px 28px 60px;background:#fff;box-shadow:0 0 0 1px #e3e6ea}
h1{font-size:26px;margin:0 0 4px}h2{font-size:19px;margin:34px 0 10px;border-bottom:2px solid #e9ecef;padding-bottom:4px}
.sub{color:#5b6573;margin:0 0 18px}
.cards{display:flex;flex-wrap:wrap;gap:12px;margin:14px 0}
.card{flex:1 1 200px;border:1px solid #e3e6ea;border-radius:8px;padding:10px 14px;background:#fbfcfd}
.card b{display:block;font-size:20px}.card span{color:#5b6573;font-size:13px}
.scroll{overflow-x:auto}
table{border-collapse:collapse;width:100%;font-size:13px}
th,td{padding:5px 7px;border-bottom:1px solid #e9ecef;text-align:right;white-space:nowrap}
th{background:#f1f3f5;font-weight:600;position:sticky;top:0}
td.l,th.l{text-align:left}td.params{white-space:normal;font-family:monospace;font-size:11.5px;color:#444;max-width:220px}
td.feat{white-space:normal;max-width:190px}
tr.best td{background:#eaf6ec;font-weight:600}tr.baseline td{color:#6b4b1f}
.ci{color:#6c757d;font-size:12px;font-weight:400}
.tag{display:inline-block;font-size:11px;padding:1px 6px;border-radius:9px;margin-left:5px;font-weight:600}
.tag.best{background:#2e7d32;color:#fff}.tag.pareto{background:#263238;color:#fff}.tag.base{background:#ffe0b2;color:#6b4b1f}
figure{margin:18px 0 26px}figure img{max-width:100%;max-height:900px;height:auto;border:1px solid #eceff1;border-radius:4px}
figcaption{color:#5b6573;font-size:13px;margin-top:6px}
pre{background:#f6f8fa;padding:12px;border-radius:6px;overflow:auto;font-size:12px}
.note{color:#5b6573;font-size:13px}
.banner{background:#fdecea;border:2px solid #c62828;color:#8e1c1c;border-radius:6px;padding:10px 14px;
margin:0 0 16px;font-size:15px}
"""


def _is_num(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and v == v


def _fmt_s(s):
    if not _is_num(s):
        return "–"
    if s < 1:
        return f"{s * 1000:.0f} ms"
    if s < 120:
        return f"{s:.1f} s"
    return f"{s / 60:.1f} min"


def _fmt_bytes(n):
    if not _is_num(n):
        return "–"
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024


def _ci(v):
    lo, hi = v
    return "" if lo is None else f'<span class="ci">[{_num(lo)}, {_num(hi)}]</span>'


def _num(v, empty="–"):
    """A number with 3 decimals; anything else (a foreign value where a number belongs) as escaped text."""
    if v is None:
        return empty
    return f"{v:.3f}" if _is_num(v) else e(v)


def _params(p):
    if not p:
        return "defaults"
    if not isinstance(p, dict):
        return str(p)
    return ", ".join(f"{k}={json.dumps(v) if not isinstance(v, str) else v}" for k, v in sorted(p.items(), key=str))


def _pre(text: str) -> str:
    """Multi-line text for a ``<pre>`` block: each line escaped, the line breaks kept."""
    return "\n".join(e(line) for line in str(text).split("\n"))


def data_uri(path: str) -> str:
    with open(path, "rb") as f:
        return "data:image/png;base64," + base64.b64encode(f.read()).decode("ascii")


def banner(report: dict) -> list[str]:
    """Warnings that change how every number in the report must be read (e.g. test images seen in training)."""
    return [w["message"] for w in report.get("warnings") or [] if w.get("banner")]


def render_html(report: dict, figures: dict) -> str:
    """The page. Every value that comes from a store, a model file or the command line goes through ``e``."""
    rows = report["rows"]
    cfg = report["config"]
    data = report["data"]
    front = set(report["timing"].get("pareto_front", []))
    best = next(r for r in rows if r["id"] == report["best"])
    bc = cfg["backbone_config"]
    layers = bc.get("layers") or []
    h = []
    w = h.append
    w("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">")
    w("<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">")
    w(f"<title>tlfx compare: {e(data['train'].get('dataset'))}</title><style>{CSS}</style></head><body><main>")
    for message in banner(report):
        w(f"<div class=\"banner\" role=\"alert\"><b>Warning:</b> {e(message)}</div>")
    w(f"<h1>tlfx compare — {e(data['train'].get('dataset'))}</h1>")
    w(f"<p class=\"sub\">Backbone <b>{e(bc.get('backbone'))}</b> ({e(', '.join(map(str, layers)))}; "
      f"{e(bc.get('pooling'))} pooling; {e(bc.get('image_size'))} px; weights "
      f"{e((bc.get('weights') or {}).get('name') if isinstance(bc.get('weights'), dict) else bc.get('weights'))}) · "
      f"{len(data['class_names'])} classes · "
      f"train {e(data['train']['n_labelled'])} images ({e(data['train'].get('split'))}), "
      f"test {e(data['test']['n_labelled'])} images ({e(data['test'].get('split'))}) · tlfx {e(report['tlfx_version'])}</p>")
    base_rows = [r for r in rows if r["features"] == "baseline"]
    best_base = max(base_rows, key=lambda r: r["accuracy"]) if base_rows else None
    main_rows = [r for r in rows if r["features"] != "baseline"]
    best_main = max(main_rows, key=lambda r: r["accuracy"]) if main_rows else None
    w("<div class=\"cards\">")
    w(f"<div class=\"card\"><span>best row</span><b>{e(best['label'])}</b><span>accuracy {_num(best['accuracy'])} "
      f"{_ci(best['accuracy_ci95'])}</span></div>")
    w(f"<div class=\"card\"><span>macro-F1 of the best row</span><b>{_num(best['macro_f1'])}</b>"
      f"<span>{_ci(best['macro_f1_ci95'])}</span></div>")
    if best_base and best_main:
        gain = best_main["accuracy"] - best_base["accuracy"]
        w(f"<div class=\"card\"><span>best baseline ({e(best_base['label'])})</span><b>{_num(best_base['accuracy'])}</b>"
          f"<span>best transfer row ({e(best_main['label'])}) {gain * 100:+.1f} points</span></div>")
    w(f"<div class=\"card\"><span>fit time of the best row</span><b>{_fmt_s(best['timing'].get('fit_seconds'))}</b>"
      f"<span>report made in {_fmt_s(report['timing'].get('total_seconds'))}</span></div>")
    w("</div>")

    w("<h2 id=\"results\">Results</h2>")
    w("<p class=\"note\">Accuracy and macro-F1 on the test store with 95% bootstrap confidence intervals "
      f"({e(cfg['bootstrap_resamples'])} resamples, seed {e(cfg['seed'])}). "
      + ("Hyperparameters chosen by " + e(cfg["cv_folds"]) + "-fold cross-validation on the training store only. "
         if cfg["search"] else "Default hyperparameters (no --search). ")
      + "Fit time is wall-clock on this machine; prediction time per 1,000 images excludes feature extraction for "
        "heads; size is the saved model file.</p>")
    w("<div class=\"scroll\"><table id=\"results-table\"><thead><tr><th class=\"l\">row</th><th class=\"l\">features</th>"
      "<th class=\"l\">parameters</th><th>accuracy</th><th>macro-F1</th><th>CV acc.</th><th>fit time</th>"
      "<th>predict / 1k</th><th>size</th></tr></thead><tbody>")
    for r in rows:
        w(_result_row(r, report["best"], front))
    w("</tbody></table></div>")

    curves = report.get("learning_curves", {}).get("curves") or []
    if curves:
        pts = []
        for c in curves:
            for p in c["per_class"]:
                if p not in pts:
                    pts.append(p)
        pts.sort(key=lambda p: (p == "all", p if p != "all" else 0))
        w("<h2 id=\"curves\">Learning curves</h2>")
        w("<table id=\"curves-table\"><thead><tr><th class=\"l\">head</th><th class=\"l\">features</th>"
          + "".join(f"<th>{e(p)}/class</th>" if p != "all" else "<th>all</th>" for p in pts) + "</tr></thead><tbody>")
        for c in curves:
            vals = dict(zip(c["per_class"], c["accuracy"]))
            cells = "".join(f"<td>{_num(vals.get(p))}</td>" for p in pts)
            w(f"<tr class=\"curve-row\"><td class=\"l\">{e(c['head'])}</td><td class=\"l\">"
              f"{e(c['feature_label'])}</td>{cells}</tr>")
        w("</tbody></table>")

    w("<h2 id=\"figures\">Figures</h2>")
    for name, f in figures.items():
        w(f"<figure id=\"fig-{e(name)}\"><img class=\"figure\" data-figure=\"{e(name)}\" alt=\"{e(f['title'])}\" "
          f"src=\"{data_uri(f['path'])}\"><figcaption><b>{e(f['title'])}.</b> {e(f['caption'])}</figcaption></figure>")
        if name == "misclassified":
            w(_hidden_gallery_items(report.get("gallery") or []))

    w("<h2 id=\"data\">Data</h2><table><thead><tr><th class=\"l\">split</th><th class=\"l\">store</th><th>rows</th>"
      "<th>dim</th><th>skipped</th><th class=\"l\">dataset</th></tr></thead><tbody>")
    for what in ("train", "test"):
        d = data[what]
        w(f"<tr><td class=\"l\">{what}</td><td class=\"l\">{e(d['path'])}</td><td>{e(d['n_labelled'])}</td>"
          f"<td>{e(d['dim'])}</td><td>{e(d['n_skipped'])}</td><td class=\"l\">{e(d['dataset'])} "
          f"({e(d['split'])}{', limit ' + e(d['limit']) if d['limit'] else ''})</td></tr>")
    if report.get("baseline"):
        b = report["baseline"]
        for what in ("train", "test"):
            w(f"<tr><td class=\"l\">{what} (baseline {e(b['backbone'])})</td><td class=\"l\">{e(b[what])}</td>"
              f"<td></td><td></td><td></td><td class=\"l\">same images, re-extracted</td></tr>")
    w("</tbody></table>")
    if (report.get("baseline") or {}).get("note"):
        w(f"<p class=\"note\">Baseline: {e(report['baseline']['note'])}.</p>")
    w("<h2 id=\"config\">Configuration</h2>")
    if report.get("command"):
        w(f"<pre>tlfx {e(' '.join(map(str, report['command'])))}</pre>")
    from . import dumps

    w(f"<pre>{_pre(dumps(cfg))}</pre>")
    env = report["environment"]
    w(f"<p class=\"note\">Every number above is in report.json. Environment: Python {e(env['python'])}, "
      f"{e(env['platform'])}, {e(env['cpu_count'])} CPUs.</p>")
    w("</main></body></html>\n")
    return "\n".join(h)


def _result_row(r: dict, best_id: str, front: set) -> str:
    """One ``<tr>`` of the results table."""
    cls = ["result-row"]
    tags = ""
    if r["id"] == best_id:
        cls.append("best")
        tags += "<span class=\"tag best\">best</span>"
    if r["id"] in front:
        tags += "<span class=\"tag pareto\">Pareto</span>"
    if r["features"] == "baseline":
        cls.append("baseline")
        tags += "<span class=\"tag base\">baseline</span>"
    cv = r.get("cv") or {}
    t = r["timing"]
    full = e(_params(r.get("effective_params") or {}))
    return (f"<tr class=\"{' '.join(cls)}\" data-row=\"{e(r['id'])}\"><td class=\"l\">{e(r['label'])}{tags}</td>"
            f"<td class=\"l feat\">{e(r['feature_label'])}</td><td class=\"l params\" title=\"{full}\">"
            f"{e(_params(r['params']))}</td>"
            f"<td>{_num(r['accuracy'])} {_ci(r['accuracy_ci95'])}</td><td>{_num(r['macro_f1'])} {_ci(r['macro_f1_ci95'])}</td>"
            f"<td>{_num(cv.get('accuracy'), '')}</td><td>{_fmt_s(t.get('fit_seconds'))}</td>"
            f"<td>{_fmt_s(t.get('predict_seconds_per_1000'))}</td><td>{_fmt_bytes(r.get('size_bytes'))}</td></tr>")


def _hidden_gallery_items(items: list) -> str:
    """The misclassified test images the gallery could not show, each with its id and the reason."""
    hidden = [it for it in items if it.get("reason")]
    if not hidden:
        return ""
    lis = "".join(f"<li><code>{e(it['id'])}</code>: {e(it['reason'])}</li>" for it in hidden[:50])
    more = f"<li>… and {len(hidden) - 50} more</li>" if len(hidden) > 50 else ""
    return f"<p class=\"note\">Not shown in the gallery:</p><ul class=\"note hidden-images\">{lis}{more}</ul>"
