"""Hostile stores and model files in ``tlfx compare``: the report escapes every foreign value, the gallery opens only
files under the dataset root, files are never written through planted links, and a killed run leaves no old report.

Every store here is a real HDF5 file: a copy of a store made by ``tlfx extract`` whose attributes / ids / labels
are rewritten with h5py, the way someone else's file would arrive.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from html.parser import HTMLParser

import h5py
import numpy as np
import pytest
from conftest import rng_images, run_cli
from PIL import Image

import tlfx
from tlfx.compare import compare, save_head
from tlfx.store import FeatureStore
from tlfx.training import fit_head

HOSTILE_CLASSES = ["$1_to_$5", "a^b_c", "back\\slash", "<script>alert(1)</script>", "pipe|new\nline",
                   "\x1b[31mred\x1b[0m", "$x$", "\" onmouseover=\"alert(2)", "[l](javascript:alert(3))", "`tick`"]
ALLOWED_TAGS = {"html", "head", "meta", "title", "style", "body", "main", "h1", "h2", "p", "b", "div", "span", "table",
                "thead", "tbody", "tr", "th", "td", "figure", "img", "figcaption", "pre", "ul", "li", "code"}
ALLOWED_ATTRS = {"lang", "charset", "name", "content", "class", "id", "data-row", "data-figure", "alt", "src", "title",
                 "role"}


def rewrite(src, dst, attrs=None, ids=None, labels=None):
    """A copy of the store ``src`` at ``dst`` with attributes, ids or labels replaced (plain h5py, as anyone could)."""
    shutil.copy(src, dst)
    with h5py.File(dst, "a") as f:
        for k, v in (attrs or {}).items():
            f.attrs[k] = v
        if ids is not None:
            del f["ids"]
            f.create_dataset("ids", data=np.array(ids, dtype=object), dtype=h5py.string_dtype("utf-8"))
        if labels is not None:
            f["labels"][...] = labels
    return str(dst)


class Page(HTMLParser):
    """Every element and attribute of a page, as a browser's parser would see them."""

    def __init__(self, text):
        super().__init__()
        self.tags, self.attrs, self.title = set(), set(), ""
        self._in_title = False
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        self.tags.add(tag)
        self.attrs.update(a for a, _ in attrs)
        self._in_title = tag == "title"

    def handle_endtag(self, tag):
        self._in_title = False

    def handle_data(self, data):
        if self._in_title:
            self.title += data


def table_widths(md: str) -> set:
    """Number of unescaped ``|`` on each Markdown table line."""
    return {len(re.findall(r"(?<!\\)\|", line)) for line in md.splitlines() if line.startswith("|")}


@pytest.fixture(scope="module")
def hostile_stores(digits_stores, tmp_path_factory):
    """The digits stores with markup, mathtext and ANSI escapes in class names and in shown attributes."""
    tr, te = digits_stores
    d = tmp_path_factory.mktemp("hostile")
    # (a string where a number belongs, e.g. image_size, is refused when the store is opened: test_store_integrity)
    attrs = {"class_names": json.dumps(HOSTILE_CLASSES),
             "pooling": "\x1b[2J<img src=x onerror=alert(5)>|", "backbone": "eff\x1b[31m<i>net",
             "split": "</td><script>alert(6)</script>"}
    return rewrite(tr, d / "tr.h5", attrs), rewrite(te, d / "te.h5", attrs), d


def test_hostile_names_and_attributes_are_escaped_in_every_output(hostile_stores):
    tr, te, d = hostile_stores
    # a model file whose name carries an ANSI escape and markup: its row label reaches terminal, HTML and Markdown
    st = FeatureStore(tr)
    est, _ = fit_head("knn", st.features, st.labels, {}, 0)
    model = d / "m\x1b[31m<b>|x.tlfx"
    save_head(est, "knn", {}, st, str(model), {"name": "m\x1b[31m<b>|x"})
    out = d / "rep"
    proc = run_cli("compare", "--train", tr, "--test", te, "--heads", "knn", "--finetune", model,
                   "--learning-curve", "1,all", "--bootstrap", "50", "--out", out)  # progress on: names in it
    assert proc.returncode == 0, proc.stderr  # "$1_to_$5" used to end in an empty "ValueError:" from mathtext
    assert "\x1b" not in proc.stdout + proc.stderr
    assert "m\\x1b[31m<b>|x (head)" in proc.stdout and " done" in proc.stderr  # the escape is shown, not obeyed

    html = (out / "report.html").read_text()
    page = Page(html)
    assert page.tags <= ALLOWED_TAGS and "script" not in page.tags, page.tags - ALLOWED_TAGS
    assert page.attrs <= ALLOWED_ATTRS, page.attrs - ALLOWED_ATTRS  # no onerror=/onmouseover= injected
    assert "<script" not in html.lower() and "\x1b" not in html
    assert "&lt;/td&gt;&lt;script&gt;alert(6)&lt;/script&gt;" in html and page.title.startswith("tlfx compare")

    md = (out / "report.md").read_text()
    assert "\x1b" not in md
    body, _, command = md.partition("## Command")
    assert not re.search(r"(?<!\\)<", body)  # every '<' escaped: no raw HTML in the Markdown
    fence = command.strip().splitlines()
    assert len(fence) == 3 and fence[0] == fence[2] == "```" and "m\\x1b[31m<b>|x.tlfx" in fence[1]  # code: literal
    results = md.split("## Results", 1)[1].split("\n\n")[1]
    assert table_widths(results) == {10}, results  # 9 columns on every line: no '|' from a name adds one
    assert len([ln for ln in results.splitlines() if ln.startswith("|")]) == 2 + 2  # header, rule, 2 rows

    rep = json.loads((out / "report.json").read_text())
    assert rep["data"]["class_names"] == HOSTILE_CLASSES  # report.json keeps the exact values (JSON escapes them)
    assert {"confusion_best", "per_class_f1", "misclassified"} <= set(rep["figures"])
    for f in rep["figures"].values():
        with Image.open(out / f["file"]) as im:
            assert im.format == "PNG" and im.width > 100


def test_hostile_report_runs_no_script_in_a_browser(hostile_stores, tmp_path):
    """Headless Chromium loads the hostile report: the title is the report's own and no script added anything."""
    from test_report_browser import CHROMIUM, chromium

    if not os.path.exists(CHROMIUM):
        pytest.skip("headless Chromium missing")
    tr, te, _ = hostile_stores
    out = tmp_path / "rep"
    compare(tr, te, ["knn"], str(out), learning_curve="none", n_boot=20, gallery=4)
    dom = chromium(tmp_path, "--virtual-time-budget=5000", "--dump-dom", (out / "report.html").as_uri())
    page = Page(dom)
    assert "script" not in page.tags and page.title == "tlfx compare: digits"
    assert "alert(" not in page.title and page.attrs <= ALLOWED_ATTRS


# ------------------------------------------------------------------------------------------- small image stores
@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A real image folder with train/ and test/ splits (2 classes of random colour PNGs), extracted with pixels_grey."""
    d = tmp_path_factory.mktemp("tiny")
    root = d / "data"
    for split, n, seed in (("train", 16, 0), ("test", 12, 1)):
        for i, a in enumerate(rng_images(n, size=16, seed=seed)):
            (root / split / f"c{i % 2}").mkdir(parents=True, exist_ok=True)
            Image.fromarray(a).save(root / split / f"c{i % 2}" / f"{i}.png")
    spec = f"imagefolder:{root}"
    tr = tlfx.extract("pixels_grey", spec, str(d / "tr.h5"), split="train", precision="fp32", progress=False).path
    te = tlfx.extract("pixels_grey", spec, str(d / "te.h5"), split="test", precision="fp32", progress=False).path
    return tr, te, d


def test_gallery_opens_only_regular_files_under_the_dataset_root(tiny, tmp_path):
    from tlfx.report.figures import gallery_images

    tr, te, d = tiny
    shutil.copytree(d / "data", tmp_path / "data")  # links and a FIFO go into a copy: the shared folder stays clean
    root = str(tmp_path / "data" / "test")
    moved = {"dataset": f"imagefolder:{tmp_path / 'data'}", "data_root": root}
    te = rewrite(te, tmp_path / "te_copy.h5", moved)
    st = FeatureStore(te)
    assert st.attrs["data_root"] == root
    outside = tmp_path / "outside.png"
    Image.new("RGB", (16, 16), (255, 0, 0)).save(outside)
    os.symlink(outside, os.path.join(root, "c0", "link_out.png"))
    os.symlink("0.png", os.path.join(root, "c0", "link_in.png"))  # one link, inside: fine
    os.symlink("link_in.png", os.path.join(root, "c0", "link_link.png"))
    os.mkfifo(os.path.join(root, "c0", "fifo.png"))  # opening it for reading would wait for a writer forever
    rel_out = os.path.relpath(outside, root)
    ids = ["/etc/passwd", str(outside), rel_out, "c0/../../../outside.png", "c0/link_out.png", "c0/link_link.png",
           "c0/fifo.png", "c0", "c0/0.png", "c0/link_in.png"]
    got = gallery_images(st.attrs, ids)
    reasons = dict(zip(ids, (r for _, r in got)))
    assert reasons["/etc/passwd"] == reasons[str(outside)] == "absolute path, outside the dataset root"
    assert reasons[rel_out] == reasons["c0/../../../outside.png"] == "'..' leads outside the dataset root"
    assert reasons["c0/link_out.png"] == "a link leads outside the dataset root"
    assert reasons["c0/link_link.png"] == "a link to a link"
    assert reasons["c0/fifo.png"] == reasons["c0"] == "not a regular file"
    assert got[-2][0] is not None and got[-1][0] is not None and reasons["c0/0.png"] is None

    # the whole command: a store whose ids name outside files shows placeholders with the reason, never the file
    bad_ids = [ids[i % 5] for i in range(len(st.labels))]
    hostile = rewrite(te, tmp_path / "te.h5", ids=bad_ids, labels=1 - st.labels)  # every row misclassified
    rep = compare(tr, hostile, ["knn"], str(tmp_path / "r"), learning_curve="none", n_boot=10)
    assert rep["gallery"] and all(it["reason"] == reasons[it["id"]] and not it["shown"] for it in rep["gallery"])
    html = (tmp_path / "r" / "report.html").read_text()
    assert "Not shown in the gallery" in html
    assert all(f"{it['id']}</code>: {it['reason'].replace(chr(39), '&#x27;')}" in html for it in rep["gallery"])
    with Image.open(tmp_path / "r" / "figures" / "misclassified.png") as im:
        px = np.asarray(im.convert("RGB")).reshape(-1, 3)
    assert not ((px[:, 0] > 240) & (px[:, 1] < 20) & (px[:, 2] < 20)).any()  # the red outside image is not drawn


def test_planted_links_are_replaced_never_followed(tiny, tmp_path):
    tr, te, _ = tiny
    out = tmp_path / "r"
    out.mkdir()
    victim, victim_dir = tmp_path / "victim.txt", tmp_path / "victim_dir"
    victim.write_text("keep me")
    victim_dir.mkdir()
    (victim_dir / "confusion_best.png").write_text("keep me too")
    for name in ("report.html.tmp", "report.json.tmp", "report.md.tmp", "report.html"):
        os.symlink(victim, out / name)
    os.symlink(victim_dir, out / "figures")
    os.symlink(victim_dir, out / "models")
    (out / ".tlfx-tmp-stale.tmp").write_text("left by a killed run")
    compare(tr, te, ["knn"], str(out), learning_curve="none", n_boot=10)
    assert victim.read_text() == "keep me" and os.listdir(victim_dir) == ["confusion_best.png"]
    assert (victim_dir / "confusion_best.png").read_text() == "keep me too"
    assert not (out / "figures").is_symlink() and (out / "figures" / "confusion_best.png").stat().st_size > 1000
    assert not (out / "models").is_symlink() and (out / "models" / "knn.tlfx").stat().st_size > 1000
    assert not (out / "report.html").is_symlink() and "<html" in (out / "report.html").read_text()
    assert not [p for p in os.listdir(out) if p.startswith(".tlfx-tmp-") or p.endswith(".tmp")]
    assert oct((out / "report.html").stat().st_mode & 0o777) == oct(0o666 & ~_umask())


def _umask():
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_killed_run_leaves_no_old_report_beside_new_figures(tiny, tmp_path):
    """SIGKILL as soon as the second run has drawn a figure: any report.json left is the second run's, never the first's."""
    tr, te, _ = tiny
    out = tmp_path / "r"
    compare(tr, te, ["knn"], str(out), learning_curve="none", n_boot=10, seed=0)
    t0 = time.time()
    time.sleep(0.05)
    proc = subprocess.Popen([sys.executable, "-m", "tlfx.cli", "compare", "--train", tr, "--test", te, "--heads", "knn",
                             "--learning-curve", "none", "--bootstrap", "10", "--seed", "7", "--quiet", "--out", str(out)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 300
        while proc.poll() is None and time.time() < deadline:
            new = [p for p in out.rglob("*.png") if _mtime(p) > t0]
            if new:
                proc.send_signal(signal.SIGKILL)
                break
            time.sleep(0.005)
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == -signal.SIGKILL, "the run finished before a figure was seen; nothing was tested"
    if (out / "report.json").exists():
        assert json.loads((out / "report.json").read_text())["config"]["seed"] == 7
    for name in ("report.html", "report.md"):
        assert not (out / name).exists() or "seed 7" in (out / name).read_text()
    # the next run cleans up what the killed one left and writes a complete set
    rep = compare(tr, te, ["knn"], str(out), learning_curve="none", n_boot=10, seed=7)
    assert rep["config"]["seed"] == 7 and (out / "report.html").exists()
    assert not [p for p in out.rglob("*") if p.name.startswith(".tlfx-tmp-")]


def _mtime(p):
    try:
        return p.stat().st_mtime
    except FileNotFoundError:
        return 0.0


def test_same_store_warns_that_numbers_are_training_accuracy(tiny, tmp_path, capsys):
    from tlfx.cli import main

    tr, _, _ = tiny
    with pytest.raises(SystemExit) as exc:
        main(["compare", "--train", tr, "--test", tr, "--heads", "knn", "--learning-curve", "none", "--bootstrap", "10",
              "--quiet", "--out", str(tmp_path / "r")])
    assert exc.value.code == 0
    err = capsys.readouterr().err
    assert "warning: --train and --test are the same store" in err and "TRAINING accuracy" in err
    rep = json.loads((tmp_path / "r" / "report.json").read_text())
    assert rep["warnings"][0]["n_overlap"] == rep["warnings"][0]["n_test"] == 16
    assert "TRAINING accuracy" in (tmp_path / "r" / "report.md").read_text().split("\n")[0]
    assert 'class="banner"' in (tmp_path / "r" / "report.html").read_text()
    # a copy of the store with half of the test ids also in training: a partial overlap is counted, not ignored
    st = FeatureStore(tr)
    half = rewrite(tr, tmp_path / "half.h5", ids=[f"x{i}" if i % 2 else i_ for i, i_ in enumerate(st.ids)])
    rep = compare(tr, half, ["knn"], str(tmp_path / "r2"), learning_curve="none", n_boot=10)
    assert rep["warnings"][0]["n_overlap"] == 8 and "8 of 16 test images" in rep["warnings"][0]["message"]
    assert "warning: 8 of 16" in capsys.readouterr().err
    # disjoint splits of the same data: no warning
    assert compare(tr, tiny[1], ["knn"], str(tmp_path / "r3"), learning_curve="none", n_boot=10)["warnings"] == []


def test_splits_whose_ids_are_row_positions_are_not_the_same_images(tmp_path):
    """Fashion-MNIST-style ids ("0", "1", ... in each split): train and test share ids but not images."""
    from tlfx.cli import main

    stores = {}
    for split in ("train", "test"):
        stores[split] = str(tmp_path / f"{split}.h5")
        with pytest.raises(SystemExit) as exc:
            main(["extract", "--backbone", "pixels_grey", "--data", "digits", "--split", split, "--limit", "60",
                  "--quiet", "--out", stores[split]])
        assert exc.value.code == 0
    # digits' ids are positions in the whole set; renumbered per split they collide as Fashion-MNIST's do
    te = rewrite(stores["test"], tmp_path / "test-pos.h5", ids=[str(i) for i in range(60)])
    tr = rewrite(stores["train"], tmp_path / "train-pos.h5", ids=[str(i) for i in range(60)])
    assert set(FeatureStore(tr).ids) == set(FeatureStore(te).ids)
    assert compare(tr, te, ["knn"], str(tmp_path / "r"), learning_curve="none", n_boot=10)["warnings"] == []
    # the same positional ids in one split (or "all" against a split) are still the same images
    rep = compare(tr, tr, ["knn"], str(tmp_path / "r2"), learning_curve="none", n_boot=10)
    assert rep["warnings"][0]["kind"] == "test_images_in_training"


@pytest.mark.parametrize("case, words", [
    ("one-class", ["only one class", "'c0'", "at least 2 classes"]),
    ("seed", ["--seed", "-1", "0<=x<=4294967295"]),
    ("gallery", ["--gallery", "-3"]),
    ("label-range", ["damaged or inconsistent", "2 classes of class_names"]),  # refused when the store is opened
])
def test_bad_compare_input_is_one_line_exit_2(tiny, tmp_path, case, words, capsys):
    from tlfx.cli import main

    tr, te, _ = tiny
    args = []
    if case == "one-class":
        tr = rewrite(tr, tmp_path / "one.h5", labels=np.zeros(len(FeatureStore(tr).labels), np.int64))
    elif case == "seed":
        args = ["--seed", "-1"]
    elif case == "gallery":
        args = ["--gallery", "-3"]
    else:
        labels = FeatureStore(te).labels.copy()
        labels[0] = 5
        te = rewrite(te, tmp_path / "bad.h5", labels=labels)
    with pytest.raises(SystemExit) as exc:
        main(["compare", "--train", tr, "--test", te, "--heads", "knn", *args, "--out", str(tmp_path / "r")])
    assert exc.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and all(w in lines[0] for w in words), lines
    assert not (tmp_path / "r").exists()
