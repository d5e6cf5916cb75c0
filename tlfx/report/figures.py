"""The report's figures, drawn with matplotlib's Agg backend (no display needed) into PNG files."""

from __future__ import annotations

import contextlib
import os
import stat
import tempfile
import textwrap

import numpy as np

from ..safetext import terminal

COLORS = {"main": "#1f77b4", "baseline": "#ff7f0e", "model": "#2ca02c"}
HEAD_COLORS = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#8c564b", "#e377c2", "#17becf", "#bcbd22", "#7f7f7f",
               "#ff7f0e"]


# Class names, labels and titles come from other people's stores and model files: "$1_to_$5" must stay text,
# never mathtext (which fails on it) or LaTeX, whatever the user's matplotlibrc says.
RC = {"font.size": 10, "axes.spines.top": False, "axes.spines.right": False, "axes.grid": True, "grid.alpha": 0.3,
      "figure.dpi": 100, "text.usetex": False, "text.parse_math": False}
MAX_GALLERY_FILE = 64 * 1024 * 1024  # bytes read for one gallery image at most
TMP_PREFIX = ".tlfx-tmp-"  # temporaries in the report directory; a later run removes those a killed run left


def _plt():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _t(value) -> str:
    """Foreign text as drawn in a figure: one line, control characters visible (mathtext is off in RC)."""
    return terminal(value)


def _save(fig, path):
    """Write the PNG under a fresh exclusive temporary name, then rename it over ``path`` (never through a link)."""
    import matplotlib.pyplot as plt

    fd, tmp = tempfile.mkstemp(prefix=TMP_PREFIX, suffix=".png", dir=os.path.dirname(path) or ".")
    try:
        public_mode(fd)
        with os.fdopen(fd, "wb") as f:
            fig.savefig(f, format="png", dpi=110, bbox_inches="tight", facecolor="white")
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    finally:
        plt.close(fig)
    return path


def public_mode(fd: int, directory: bool = False):
    """Give a file made by mkstemp/mkdtemp (0600/0700) the mode a plain open() would have (umask applied)."""
    mask = os.umask(0)
    os.umask(mask)
    os.fchmod(fd, (0o777 if directory else 0o666) & ~mask)


def make_figures(report: dict, directory: str, test_store=None) -> dict:
    """Draw every figure the report has data for; returns {name: {path, title, caption}} in display order."""
    os.makedirs(directory, exist_ok=True)
    plt = _plt()
    with plt.rc_context(RC):
        return _make_figures(plt, report, directory, test_store)


def _make_figures(plt, report, directory, test_store):
    figs = {}
    rows = report["rows"]
    best = next(r for r in rows if r["id"] == report["best"])

    def add(name, title, caption, fn):
        path = os.path.join(directory, f"{name}.png")
        fn(plt, path)
        figs[name] = {"path": path, "title": title, "caption": caption}

    if any((r.get("timing") or {}).get("fit_seconds") is not None for r in rows):
        add("accuracy_vs_fit_time", "Accuracy vs fit time",
            "Test accuracy (bars: 95% bootstrap CI) against wall-clock fit time, log scale. Rings and the dashed line "
            "mark the Pareto front: no other row is both more accurate and faster to fit.",
            lambda plt, p: _pareto(plt, p, rows, set(report["timing"].get("pareto_front", []))))
    curves = report.get("learning_curves", {}).get("curves") or []
    if curves:
        add("learning_curves", "Learning curves",
            "Test accuracy against labelled training examples per class (default parameters, fixed-seed subsets). "
            "Solid: backbone features; dashed: the baseline.",
            lambda plt, p: _curves(plt, p, curves, len(report["data"]["class_names"])))
    add("confusion_best", f"Confusion matrix: {best['label']}",
        f"Best row by test accuracy ({best['label']}, {best['accuracy']:.3f}). Colour: fraction of each true class; "
        f"numbers: counts.",
        lambda plt, p: _confusion(plt, p, best, report["data"]["class_names"]))
    add("per_class_f1", "Per-class F1 across rows", "F1 score of each class (columns) for each row of the table.",
        lambda plt, p: _per_class(plt, p, rows, report["data"]["class_names"]))
    items = report.get("gallery") or []
    if items:
        loaded = gallery_images(test_store.attrs if test_store is not None else {}, [it["id"] for it in items])
        images = [im for im, _ in loaded]
        for it, (_, reason) in zip(items, loaded):
            it["shown"], it["reason"] = reason is None, reason  # report.json and the page list what is not shown
        hidden = sum(im is None for im in images)
        add("misclassified", f"Misclassified test images: {best['label']}",
            f"The first {len(items)} test images the best row gets wrong, in store order: true label above, "
            f"prediction below (red)." + (f" {hidden} cannot be shown; their tiles give the reason." if hidden else ""),
            lambda plt, p: _gallery(plt, p, items, images, report["data"]["class_names"]))
    return figs


def _pareto(plt, path, rows, front):
    fig, ax = plt.subplots(figsize=(8.5, 5))
    pts = [r for r in rows if (r.get("timing") or {}).get("fit_seconds") is not None]
    for r in pts:
        t = max(r["timing"]["fit_seconds"], 1e-4)
        lo, hi = r["accuracy_ci95"]
        yerr = [[r["accuracy"] - lo], [hi - r["accuracy"]]] if lo is not None else None
        c = COLORS.get(r["features"], COLORS["model"])
        ax.errorbar([t], [r["accuracy"]], yerr=yerr, fmt="o", color=c, ms=7, capsize=3, alpha=0.9)
        if r["id"] in front:
            ax.plot([t], [r["accuracy"]], "o", ms=15, mfc="none", mec="black", mew=1.4)
    fr = sorted((max(r["timing"]["fit_seconds"], 1e-4), r["accuracy"]) for r in pts if r["id"] in front)
    if len(fr) > 1:
        ax.step([p[0] for p in fr], [p[1] for p in fr], "k--", where="post", lw=1, alpha=0.6)
    ax.set_xscale("log")
    plain_log_ticks(ax)
    ax.set_xlabel("fit time (s, log scale)")
    ax.set_ylabel("test accuracy")
    handles = [plt.Line2D([], [], marker="o", ls="", color=c, label=lbl) for key, c in COLORS.items()
               for lbl in [{"main": "backbone features", "baseline": "baseline", "model": "model file"}[key]]
               if any(r["features"] == key for r in pts)]
    handles.append(plt.Line2D([], [], marker="o", ls="--", color="black", mfc="none", ms=10, label="Pareto front"))
    ax.margins(x=0.25)
    _labels(fig, ax, [(max(r["timing"]["fit_seconds"], 1e-4), r["accuracy"], _t(r["label"])) for r in pts])
    ax.legend(handles=handles, loc="best", fontsize=9)  # after the labels, so "best" avoids them too
    return _save(fig, path)


def plain_log_ticks(ax):
    """Log-axis tick labels as plain numbers: mathtext is off (RC), so matplotlib's '10^{1}' would show raw."""
    from matplotlib.ticker import FuncFormatter, NullFormatter

    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _pos: f"{v:g}"))
    ax.xaxis.set_minor_formatter(NullFormatter())


def _labels(fig, ax, points):
    """Name each point, moving a label down (then up) until it overlaps no label placed before it."""
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    placed = []
    for x, y, text in sorted(points, key=lambda p: (-p[1], p[0])):
        for dy in (-3, -13, 7, -23, 17, -33, 27, -43, 37):
            ann = ax.annotate(text, (x, y), xytext=(8, dy), textcoords="offset points", fontsize=8.5, va="center")
            box = ann.get_window_extent(renderer).expanded(1.02, 1.1)
            if not any(box.overlaps(b) for b in placed):
                break
            ann.remove()
        else:
            ann = ax.annotate(text, (x, y), xytext=(8, -3), textcoords="offset points", fontsize=8.5, va="center")
            box = ann.get_window_extent(renderer)
        placed.append(box)


def _curves(plt, path, curves, n_classes):
    fig, ax = plt.subplots(figsize=(8.5, 5))
    heads = list(dict.fromkeys(c["head"] for c in curves))
    ticks = set()
    for c in curves:
        xs, ys = [], []
        for n, acc in zip(c["n_train"], c["accuracy"]):
            if acc is not None:
                xs.append(n / max(n_classes, 1))
                ys.append(acc)
        if not xs:
            continue
        ticks.update(xs)
        color = HEAD_COLORS[heads.index(c["head"]) % len(HEAD_COLORS)]
        style = "-" if c["features"] == "main" else "--"
        label = _t(c["head"] if c["features"] == "main" else f"{c['head']} ({c['feature_label'].split(' ')[0]})")
        ax.plot(xs, ys, style, marker="o", ms=4, color=color, label=label, alpha=0.95 if style == "-" else 0.7)
    ax.set_xscale("log")
    if ticks:
        ax.set_xticks(sorted(ticks))
        ax.set_xticklabels([f"{t:.0f}" if t >= 10 or t == int(t) else f"{t:.1f}" for t in sorted(ticks)])
        ax.minorticks_off()
    ax.set_xlabel("labelled training examples per class (log scale)")
    ax.set_ylabel("test accuracy")
    ax.legend(fontsize=8.5, ncol=2, loc="lower right")
    return _save(fig, path)


def _confusion(plt, path, row, class_names):
    cm = np.asarray(row["confusion"], dtype=float)
    k = len(class_names)
    frac = cm / np.maximum(cm.sum(1, keepdims=True), 1)
    size = min(10, 2.6 + 0.42 * k)
    fig, ax = plt.subplots(figsize=(size + 1.5, size))
    im = ax.imshow(frac, cmap="Blues", vmin=0, vmax=1)
    ax.grid(False)
    if k <= 30:
        for i in range(k):
            for j in range(k):
                if cm[i, j]:
                    ax.text(j, i, int(cm[i, j]), ha="center", va="center", fontsize=8 if k <= 15 else 6,
                            color="white" if frac[i, j] > 0.5 else "black")
    labels = [_short(n, 14) for n in class_names] if k <= 40 else []
    ax.set_xticks(range(k) if labels else [])
    ax.set_yticks(range(k) if labels else [])
    if labels:
        ax.set_xticklabels(labels, rotation=45, ha="right")
        ax.set_yticklabels(labels)
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    fig.colorbar(im, ax=ax, fraction=0.04, pad=0.02, label="fraction of true class")
    return _save(fig, path)


def _per_class(plt, path, rows, class_names):
    f1 = np.array([r["per_class"]["f1"] for r in rows], dtype=float)
    k = len(class_names)
    fig, ax = plt.subplots(figsize=(min(16, 3.5 + 0.75 * k), 1.2 + 0.42 * len(rows)))
    im = ax.imshow(f1, cmap="viridis", vmin=0, vmax=1, aspect="auto")
    ax.grid(False)
    if k <= 30:
        for i in range(len(rows)):
            for j in range(k):
                ax.text(j, i, f"{f1[i, j]:.2f}", ha="center", va="center", fontsize=7.5,
                        color="black" if f1[i, j] > 0.6 else "white")
    ax.set_yticks(range(len(rows)))
    ax.set_yticklabels([_t(r["label"]) for r in rows])
    if k <= 40:
        ax.set_xticks(range(k))
        ax.set_xticklabels([_short(n, 14) for n in class_names], rotation=45, ha="right")
    fig.colorbar(im, ax=ax, fraction=0.03, pad=0.01, label="F1")
    return _save(fig, path)


def _gallery(plt, path, items, images, class_names):
    pairs = list(zip(items, images))
    cols = min(8, len(pairs))
    nrows = (len(pairs) + cols - 1) // cols
    fig, axes = plt.subplots(nrows, cols, figsize=(1.45 * cols, 1.85 * nrows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, (it, im) in zip(axes.flat, pairs):
        if im is None:  # a placeholder tile: the reason instead of the image
            ax.add_patch(plt.Rectangle((0, 0), 1, 1, transform=ax.transAxes, color="#eceff1"))
            ax.text(0.5, 0.5, "not shown:\n" + textwrap.fill(_t(it.get("reason") or "unreadable")[:80], 16),
                    transform=ax.transAxes, ha="center", va="center", fontsize=6, color="#37474f")
        else:
            ax.imshow(np.asarray(im), cmap="gray" if np.asarray(im).ndim == 2 else None)
        ax.set_title(f"{_short(class_names[it['true']])}", fontsize=8, pad=2)
        ax.text(0.5, -0.08, f"→ {_short(class_names[it['pred']])}", transform=ax.transAxes, ha="center", va="top",
                fontsize=8, color="#c0392b")
    fig.subplots_adjust(wspace=0.08, hspace=0.45)
    return _save(fig, path)


def _short(s, n=12):
    s = _t(s)
    return s if len(s) <= n else s[:n - 1] + "…"


def load_gallery_images(attrs: dict, ids: list[str], size: int = 96) -> list:
    """The test images behind store ids (None where one cannot be shown); see :func:`gallery_images`."""
    return [im for im, _ in gallery_images(attrs, ids, size)]


def gallery_images(attrs: dict, ids: list[str], size: int = 96) -> list[tuple]:
    """``(RGB PIL image, None)`` or ``(None, reason)`` for each store id, re-opening the store's dataset.

    Built-in array datasets are indexed by id. For file datasets the id is a path relative to the dataset's root
    and only a regular file under that root is read: absolute ids, ``..``, a link leading out of the root or to
    another link, special files and files over ``MAX_GALLERY_FILE`` bytes are reported, never opened.
    """
    from ..datasets import FileDataset, load_dataset

    ds, missing = None, "the dataset is not recorded in the store"
    if attrs.get("dataset"):
        try:
            split = attrs.get("split") or None
            ds = load_dataset(attrs["dataset"], split, root=attrs.get("data_root") or None,
                              limit=int(attrs.get("limit") or 0) or None)
            missing = "not in the dataset any more"
        except Exception:
            ds, missing = None, "the dataset cannot be re-opened"
    pos = {str(i): n for n, i in enumerate(ds.ids)} if ds is not None else {}
    out = []
    for i in ids:
        i = str(i)
        try:
            if i in pos and not isinstance(ds, FileDataset):
                img = ds.load(pos[i], target=size)
            elif i in pos or attrs.get("data_root"):
                root = ds.root if i in pos else str(attrs["data_root"])
                img = _open_image_bytes(read_under_root(root, i), size)
            else:
                out.append((None, missing))
                continue
            img.thumbnail((size, size))
            out.append((img, None))
        except UnsafePath as exc:
            out.append((None, str(exc)))
        except Exception as exc:  # a file moved since extraction, or no longer an image: the gallery shows the others
            out.append((None, _t(str(exc).splitlines()[0][:80]) if str(exc) else type(exc).__name__))
    return out


class UnsafePath(Exception):
    """A store id that names a file the report will not open (the message is the reason shown)."""


def read_under_root(root: str, rel: str, limit: int = MAX_GALLERY_FILE) -> bytes:
    """The bytes of the regular file ``rel`` under ``root``: contained, at most one link, bounded size."""
    parts = rel.replace("\\", "/").split("/")
    if "\x00" in rel or not rel:
        raise UnsafePath("not a file name")
    if os.path.isabs(rel) or rel.startswith("\\"):
        raise UnsafePath("absolute path, outside the dataset root")
    if ".." in parts:
        raise UnsafePath("'..' leads outside the dataset root")
    real_root = os.path.realpath(root)
    path = os.path.join(real_root, rel)
    if os.path.islink(path):  # the file itself may be a link, to a file: never a chain of links
        target = os.path.join(os.path.dirname(path), os.readlink(path))
        if os.path.islink(target):
            raise UnsafePath("a link to a link")
    real = os.path.realpath(path)
    if os.path.commonpath([real, real_root]) != real_root:
        raise UnsafePath("a link leads outside the dataset root")
    try:
        fd = os.open(real, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except FileNotFoundError:
        raise UnsafePath("file not found") from None
    except OSError as exc:
        raise UnsafePath(f"cannot open: {os.strerror(exc.errno) if exc.errno else exc}") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise UnsafePath("not a regular file")
        if st.st_size > limit:
            raise UnsafePath(f"larger than {limit // (1024 * 1024)} MB")
        data = os.read(fd, limit + 1)
    finally:
        os.close(fd)
    if len(data) > limit:
        raise UnsafePath(f"larger than {limit // (1024 * 1024)} MB")
    return data


def _open_image_bytes(data: bytes, size: int):
    import io

    from ..images import open_image

    return open_image(io.BytesIO(data), size)
