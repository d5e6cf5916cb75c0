"""report.html in a real browser (headless Chromium): the table rows and every figure are there and decoded."""

from __future__ import annotations

import base64
import io
import json
import os
import re
import subprocess
from html.parser import HTMLParser

import numpy as np
import pytest
from PIL import Image

CHROMIUM = "/usr/bin/chromium"
pytestmark = pytest.mark.skipif(not os.path.exists(CHROMIUM),
                                reason="headless Chromium missing: apt-get install chromium (.ci/run installs it)")

# inserted into a COPY of the report only: the report itself has no JavaScript; this asks the browser what it decoded
PROBE = """<script>
window.addEventListener('load', function () {
  var out = [];
  document.querySelectorAll('img').forEach(function (im) {
    out.push({figure: im.dataset.figure, complete: im.complete, w: im.naturalWidth, h: im.naturalHeight,
              shown_w: im.getBoundingClientRect().width});
  });
  var pre = document.createElement('pre');
  pre.id = 'probe';
  pre.textContent = JSON.stringify({images: out, height: document.documentElement.scrollHeight,
                                    rows: document.querySelectorAll('#results-table tbody tr').length});
  document.body.appendChild(pre);
});
</script>"""


def chromium(tmp_path, *args, timeout=120):
    profile = tmp_path / "chromium-profile"
    cmd = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
           "--disable-background-networking", "--disable-component-update", "--disable-sync",
           f"--user-data-dir={profile}", *map(str, args)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc.stdout


class _Collect(HTMLParser):
    def __init__(self):
        super().__init__()
        self.imgs, self.rows, self.scripts, self.links = [], [], 0, []

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "img":
            self.imgs.append(a)
        if tag == "tr" and "result-row" in (a.get("class") or ""):
            self.rows.append(a.get("data-row"))
        if tag == "script":
            self.scripts += 1
        for key in ("src", "href"):
            if a.get(key):
                self.links.append(a[key])


@pytest.fixture(scope="module")
def report_dir(digits_stores, tmp_path_factory):
    from tlfx.compare import compare

    tr, te = digits_stores
    out = tmp_path_factory.mktemp("browser") / "rep"
    compare(tr, te, ["knn", "svm"], str(out), baseline="pixels", learning_curve="1,all", n_boot=100)
    return out


def test_report_renders_every_row_and_figure(report_dir, tmp_path):
    rep = json.loads((report_dir / "report.json").read_text())
    html = (report_dir / "report.html").read_text()
    # self-contained: no script, no external resource, figures inline
    static = _Collect()
    static.feed(html)
    assert static.scripts == 0
    assert not [u for u in static.links if re.match(r"^(https?:|//|file:)", u)]

    dom = chromium(tmp_path, "--virtual-time-budget=10000", "--dump-dom", (report_dir / "report.html").as_uri())
    page = _Collect()
    page.feed(dom)
    assert page.rows == [r["id"] for r in rep["rows"]]
    for r in rep["rows"]:
        assert r["label"] in dom
    figures = {im.get("data-figure"): im for im in page.imgs}
    assert set(figures) == set(rep["figures"]) == {"accuracy_vs_fit_time", "learning_curves", "confusion_best",
                                                   "per_class_f1", "misclassified"}
    for name, im in figures.items():
        src = im["src"]
        assert src.startswith("data:image/png;base64,")
        png = Image.open(io.BytesIO(base64.b64decode(src.split(",", 1)[1])))
        assert png.format == "PNG"
        png.load()
        with Image.open(report_dir / rep["figures"][name]["file"]) as ref:
            assert png.size == ref.size

    # the browser itself decoded every image (a probe in a copy of the page reports naturalWidth)
    probe_page = tmp_path / "probe.html"
    probe_page.write_text(html.replace("</body>", PROBE + "</body>"))
    dom = chromium(tmp_path, "--virtual-time-budget=10000", "--window-size=1400,4000", "--dump-dom", probe_page.as_uri())
    probe = json.loads(re.search(r'<pre id="probe">(.*?)</pre>', dom, re.S).group(1).replace("&quot;", '"'))
    assert probe["rows"] == len(rep["rows"])
    assert len(probe["images"]) == len(rep["figures"])
    for im in probe["images"]:
        assert im["complete"] and im["w"] > 300 and im["h"] > 50 and im["shown_w"] > 300, im
    assert probe["height"] > 2500  # the figures take real space on the page

    # a screenshot of the page: the expected size, and not blank anywhere along the figures
    shot = tmp_path / "report.png"
    chromium(tmp_path, f"--screenshot={shot}", "--window-size=1400,4000", "--hide-scrollbars",
             (report_dir / "report.html").as_uri())
    with Image.open(shot) as img:
        assert img.size == (1400, 4000)
        grey = np.asarray(img.convert("L"), dtype=np.float32)
    top = grey[: min(probe["height"], 4000)]
    for band in np.array_split(top, 5):
        assert band.std() > 10, "a blank stretch in the rendered report"
