"""``tlfx compare``: every head (and a raw-pixel baseline, and fine-tuned models) on the same splits, quality beside cost.

Hyperparameters are chosen by cross-validation on the training store only; the test store is used once per row,
for the final numbers. All randomness (CV folds, bootstrap, subsampling, head seeds) comes from ``seed``, so the
same command gives the same numbers; wall-clock measurements live only under ``timing`` keys.

>>> from tlfx.compare import compare
>>> report = compare("train.h5", "test.h5", ["logistic", "svm"], "report_dir", baseline="pixels")
"""

from __future__ import annotations

import os
import platform
import sys
import time
from dataclasses import dataclass, field

import numpy as np

from . import __version__, training
from .errors import TlfxError
from .metrics import scores
from .models import config_differences
from .safetext import terminal
from .store import FeatureStore
from .training import collect_warnings, fit_head, plain

DEFAULT_CURVE = "1,5,10,50,100,all"
MAX_SEED = 2**32 - 1  # numpy's legacy seeding accepts no more


# ------------------------------------------------------------------------------------------------ parsing
def parse_heads(spec) -> list[str]:
    """'linear,svm' (or a list) -> validated head names; unknown ones are refused with the valid choices."""
    from .plugins import registry

    reg = registry("head")
    names = spec if isinstance(spec, (list, tuple)) else [h.strip() for h in str(spec or "").split(",") if h.strip()]
    if not names:
        raise TlfxError(f"no heads given; pass --heads with one or more of: {', '.join(reg.names())}")
    for n in names:
        reg.get(n)  # raises: unknown head 'x'; valid choices: ...
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise TlfxError(f"head {dup[0]!r} is listed twice in --heads; list each head once")
    return list(names)


def parse_curve(spec) -> list:
    """'1,5,10,all' -> [1, 5, 10, 'all']; 'none' or '' -> [] (no learning curves)."""
    if spec is None or (isinstance(spec, str) and spec.strip().lower() in ("", "none", "off", "no")):
        return []
    items = spec if isinstance(spec, (list, tuple)) else str(spec).split(",")
    out = []
    for it in items:
        s = str(it).strip().lower()
        if s == "all":
            v = "all"
        else:
            try:
                v = int(s)
            except ValueError:
                v = 0
            if v < 1:
                raise TlfxError(f"--learning-curve value {it!r} is not a positive integer or 'all'; "
                                f"e.g. --learning-curve {DEFAULT_CURVE} (or none)")
        if v not in out:
            out.append(v)
    return sorted(out, key=lambda v: (v == "all", v if v != "all" else 0))


# ------------------------------------------------------------------------------------------------- stores
@dataclass
class Split:
    """A store's labelled rows in memory."""

    store: FeatureStore
    X: np.ndarray
    y: np.ndarray
    ids: list
    rows: np.ndarray  # row indices in the store (unlabelled rows dropped)

    @classmethod
    def read(cls, store: FeatureStore) -> Split:
        y = store.labels
        keep = np.flatnonzero(y >= 0)
        X = np.asarray(store.features, dtype=np.float32)
        ids = store.ids
        if X.ndim != 2 or X.shape[0] != len(y) or len(ids) != len(y):
            raise TlfxError(f"store {store.path!r} is inconsistent (features {X.shape}, {len(y)} labels, {len(ids)} ids); "
                            f"extract it again")
        if not np.isfinite(X[keep]).all():
            raise TlfxError(f"store {store.path!r} holds NaN or infinite features; extract it again")
        return cls(store, X[keep], y[keep], [ids[i] for i in keep], keep)

    def describe(self) -> dict:
        a = self.store.attrs
        return {
            "path": os.path.abspath(self.store.path),
            "dataset": a.get("dataset"), "split": a.get("split"), "limit": int(a.get("limit") or 0),
            "n_rows": int(len(self.store)), "n_labelled": int(len(self.y)),
            "dim": int(self.X.shape[1]) if self.X.ndim == 2 else 0,
            "n_skipped": len(self.store.skipped), "complete": self.store.complete,
            "class_counts": np.bincount(self.y, minlength=len(self.store.class_names)).tolist(),
            "dataset_fingerprint": a.get("dataset_fingerprint"),
        }


def open_pair(train: str, test: str, allow_incomplete: bool = False) -> tuple[FeatureStore, FeatureStore]:
    """Open the train and test stores and refuse pairs whose features or classes are not comparable."""
    tr = FeatureStore(train, allow_incomplete=allow_incomplete)
    te = FeatureStore(test, allow_incomplete=allow_incomplete)
    detail = config_differences(tr.config, te.config, names=("", ""))
    if detail:
        raise TlfxError(f"train store {train!r} and test store {test!r} were made with different backbone "
                        f"configurations ({terminal(detail)}); extract both with the same "
                        f"--backbone/--layers/--pooling/--image-size")
    if tr.class_names != te.class_names:
        raise TlfxError(f"train store {train!r} and test store {test!r} have different class names "
                        f"({len(tr.class_names)} vs {len(te.class_names)} classes); extract both from the same dataset")
    k = len(tr.class_names)
    for st, what in ((tr, "train"), (te, "test")):
        labels = st.labels
        if not (labels >= 0).any():
            raise TlfxError(f"{what} store {st.path!r} has no labelled rows; compare needs labels on both splits")
        if labels.max() >= k or labels.min() < -1:
            bad = int(labels.max() if labels.max() >= k else labels.min())
            raise TlfxError(f"{what} store {st.path!r} has label {bad} but {k} class names (labels run from 0 to "
                            f"{k - 1}, -1 for unlabelled); extract it again")
    present = np.unique(tr.labels[tr.labels >= 0])
    if len(present) < 2:
        raise TlfxError(f"train store {train!r} has only one class ({terminal(tr.class_names[present[0]])!r}) among "
                        f"its labelled rows; a classifier needs at least 2 classes")
    return tr, te


def training_overlap(tr: FeatureStore, te: FeatureStore) -> dict | None:
    """How many labelled test rows are images the training store also holds (same store, or same dataset and ids).

    Ids name the same image when both stores come from the same dataset spec and root (ids are relative to it),
    or when the datasets' fingerprints are equal. Returns None when nothing overlaps.
    """
    te_ids = [i for i, lab in zip(te.ids, te.labels) if lab >= 0]
    try:
        same_file = os.path.samefile(tr.path, te.path)
    except OSError:
        same_file = False
    a, b = tr.attrs, te.attrs
    same_data = bool(a.get("dataset")) and (a.get("dataset"), a.get("data_root")) == (b.get("dataset"), b.get("data_root"))
    splits = {_split_of(a), _split_of(b)}
    if same_data and len(splits) == 2 and "all" not in splits and _positional(te_ids):
        same_data = False  # two named splits whose ids are row positions in each (Fashion-MNIST's "0", "1", ...)
    same_data = same_data or (bool(a.get("dataset_fingerprint")) and a.get("dataset_fingerprint") == b.get("dataset_fingerprint"))
    if same_file:
        n = len(te_ids)
    elif same_data:
        train_ids = set(tr.ids)
        n = sum(i in train_ids for i in te_ids)
    else:
        return None
    if n == 0:
        return None
    if same_file or n == len(te_ids):
        why = "the same store" if same_file else "the same images (every test id is a training id)"
        message = (f"--train and --test are {why}: every number in this report is TRAINING accuracy, not accuracy "
                   f"on unseen images; extract a separate test split")
    else:
        message = (f"{n} of {len(te_ids)} test images are also in the training store (same dataset, same ids): the "
                   f"numbers overstate accuracy on unseen images; extract disjoint splits")
    return {"kind": "test_images_in_training", "n_overlap": int(n), "n_test": len(te_ids), "same_store": same_file,
            "banner": True, "message": message}


def _split_of(attrs) -> str:
    split = attrs.get("split")
    return "all" if split in (None, "", "all") else str(split)


def _positional(ids, sample: int = 1000) -> bool:
    """Whether ids look like row positions (built-in array datasets) rather than file paths."""
    head = ids[:sample]
    return bool(head) and all(isinstance(i, str) and i.isdigit() for i in head)


# ------------------------------------------------------------------------------------------------- fitting
def _predict(est, X):
    """Predicted label indices (heads may return class labels; they are the store's label integers)."""
    return np.asarray(est.predict(X)).astype(np.int64)


def _json_params(est) -> dict:
    """Every parameter the fitted head ran with (defaults included), JSON-safe."""
    from .normalize import split

    out = {}
    for k, v in sorted(split(est)[0].get_params(deep=False).items()):
        v = plain(v)
        out[k] = v if v is None or isinstance(v, (bool, int, float, str)) else repr(v)
    return out


def save_head(est, name: str, params: dict, store: FeatureStore, path: str, extra: dict | None = None) -> int:
    """Save a fitted head in the HeadModel file format; returns the file size in bytes."""
    from .head_model import HeadModel
    from .heads import check_loadable

    model = HeadModel.from_estimator(est, head=name, params=params, config=store.config,
                                     class_names=store.class_names, extra=extra or {}, store=store)
    check_loadable(est, name)  # as tlfx fit: a file that evaluate/predict would refuse is not written
    model.save(path)
    return os.path.getsize(path)


def subsample_per_class(y, k: int, seed: int) -> np.ndarray:
    """Row indices with at most ``k`` examples of each class; nested across k for one seed."""
    rng = np.random.default_rng(seed)
    picked = []
    for c in np.unique(y):
        idx = np.flatnonzero(y == c)
        picked.append(rng.permutation(idx)[:k])
    return np.sort(np.concatenate(picked)) if picked else np.zeros(0, np.int64)


# -------------------------------------------------------------------------------------------------- report
@dataclass
class Progress:
    total: int
    enabled: bool = False
    bar: object = None
    log: list = field(default_factory=list)

    def __post_init__(self):
        if self.enabled:
            import threading

            from .progress import progress_bar

            self.bar = progress_bar(total=self.total, unit="step", dynamic_ncols=True, file=sys.stderr,
                            bar_format="{l_bar}{bar}| {n_fmt}/{total_fmt} [{elapsed}<{remaining}]")
            self._stop = threading.Event()
            # one fit can take minutes: keep the elapsed time moving so the display never looks stuck
            threading.Thread(target=self._tick, daemon=True).start()

    def _tick(self):
        while not self._stop.wait(2.0):
            self.bar.refresh()

    def step(self, what: str):
        self.log.append(what)
        if self.bar is not None:
            self.bar.set_description_str(terminal(what)[:48].ljust(48))  # names from stores: no escapes sent

    def done(self, n: int = 1):
        if self.bar is not None:
            self.bar.update(n)

    def close(self):
        if self.bar is not None:
            self._stop.set()
            self.bar.close()


def _slug(s: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "-_." else "-" for ch in s).strip("-") or "row"


def _feature_label(store: FeatureStore) -> str:
    c = store.config
    if c.get("components"):  # tlfx combine
        return " + ".join(f"{(x.get('config') or {}).get('backbone')} ({(x.get('config') or {}).get('image_size')} px)"
                          for x in c["components"])
    layers = c.get("layers") or []
    lay = "multi, " if len(layers) > 1 else ("" if layers in ([], ["penultimate"]) else f"{layers[0]}, ")
    return f"{c.get('backbone')} ({lay}{c.get('image_size')} px)"


def compare(train: str, test: str, heads, out: str, *, search: bool = False, folds: int = 3,
            baseline: str | None = None, finetune=(), learning_curve=DEFAULT_CURVE, allow_incomplete: bool = False,
            n_boot: int = 1000, seed: int = 0, gallery: int = 24, progress: bool = False,
            trust_types=(), trust_pickle: bool = False, engine: str = "local", address: str | None = None,
            argv: list | None = None, normalize=None) -> dict:
    """Fit every head on ``train``, score it once on ``test``, and write report.html/.json/.md into ``out``.

    ``normalize``: the feature normalisation in front of every head (:mod:`tlfx.normalize`); with ``search``,
    several (``"none,l2,power"``) are cross-validated on the training store like the heads' parameters.
    Returns the report dictionary (what ``report.json`` holds).
    """
    from .normalize import parse_specs
    from .report import write_reports

    t_start = time.perf_counter()
    head_names = parse_heads(heads)
    norms = parse_specs(normalize)
    if len(norms) > 1 and not search:
        raise TlfxError(f"--normalize {','.join(norms)} names several methods, which only --search chooses between; "
                        f"add --search or name one")
    points = parse_curve(learning_curve)
    if folds < 2:
        raise TlfxError(f"--cv must be at least 2 folds, got {folds}")
    from .engines import check_engine

    engine = check_engine(engine)
    if n_boot < 0:
        raise TlfxError(f"--bootstrap must be 0 or more resamples, got {n_boot}")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or not 0 <= seed <= MAX_SEED:
        raise TlfxError(f"--seed must be an integer from 0 to {MAX_SEED}, got {seed!r}")
    if gallery < 0:
        raise TlfxError(f"--gallery must be 0 or more images, got {gallery}")
    if baseline:
        from .plugins import registry

        registry("backbone").get(baseline)
    finetune = list(finetune or ())
    from .models import read_meta

    for path in finetune:
        read_meta(path)
    if os.path.exists(out) and not os.path.isdir(out):
        raise TlfxError(f"--out {out!r} is a file; pass a directory for the report")
    tr_store, te_store = open_pair(train, test, allow_incomplete)
    overlap = training_overlap(tr_store, te_store)
    if overlap:
        print(f"warning: {terminal(overlap['message'])}", file=sys.stderr, flush=True)
    models_dir = os.path.join(out, "models")
    try:
        if os.path.islink(models_dir):
            os.unlink(models_dir)  # a planted link would send the model files elsewhere: replace it by a folder
        os.makedirs(models_dir, exist_ok=True)
    except OSError as exc:
        raise TlfxError(f"cannot create report directory {out!r}: {exc.strerror or exc}") from None
    from .report import clear_previous

    clear_previous(out)  # the input is fine: from here on no report file of an earlier run sits beside new results

    class_names = tr_store.class_names
    k = len(class_names)
    n_sets = 2 if baseline else 1
    n_steps = (n_sets * len(head_names) * (2 if search else 1) + n_sets * len(head_names) * len(points)
               + len(finetune) + (2 if baseline else 0) + 2)
    prog = Progress(n_steps, progress)
    timing: dict = {}
    try:
        prog.step("reading stores")
        feature_sets = [("main", _feature_label(tr_store), Split.read(tr_store), Split.read(te_store))]
        baseline_info = None
        if baseline:
            t0 = time.perf_counter()
            b_tr, b_te, baseline_info = _extract_baseline(baseline, tr_store, te_store, out, prog)
            timing["baseline_extract_seconds"] = time.perf_counter() - t0
            feature_sets.append(("baseline", _feature_label(b_tr), Split.read(b_tr), Split.read(b_te)))

        rows, curves = [], []
        for set_kind, set_label, s_tr, s_te in feature_sets:
            for name in head_names:
                row = _head_row(set_kind, set_label, name, s_tr, s_te, k, search, folds, seed, n_boot, out, prog,
                                engine, address, norms)
                rows.append(row)
                if points:
                    curves.append(_curve(set_kind, set_label, name, s_tr, s_te, points, row, search, seed, prog,
                                         row["normalize"]))
        for path in finetune:
            rows.append(model_row(path, te_store, k, n_boot, seed, (trust_types, trust_pickle), prog))

        best = max(rows, key=lambda r: (r["accuracy"], r["macro_f1"], -rows.index(r)))
        pareto = pareto_front(rows)
        report = {
            "tlfx_version": __version__,
            "command": argv,
            "config": {
                "train": os.path.abspath(train), "test": os.path.abspath(test), "heads": head_names,
                "search": bool(search), "cv_folds": folds, "search_engine": engine, "baseline": baseline,
                "normalize": norms,
                "finetune": [os.path.abspath(p) for p in finetune],
                "learning_curve": points, "bootstrap_resamples": n_boot, "ci_level": 0.95, "seed": seed,
                "allow_incomplete": bool(allow_incomplete), "backbone_config": tr_store.config,
            },
            "data": {"class_names": class_names, "train": feature_sets[0][2].describe(), "test": feature_sets[0][3].describe()},
            "baseline": baseline_info,
            "rows": rows,
            "best": best["id"],
            "learning_curves": {"points": points, "curves": curves},
            "timing": {"pareto_front": pareto},
            "environment": {"python": platform.python_version(), "platform": platform.platform(),
                            "cpu_count": os.cpu_count()},
            "warnings": [overlap] if overlap else [],
        }
        prog.step("misclassified gallery")
        test_split = feature_sets[0][3] if best["features"] != "baseline" else feature_sets[1][3]
        report["gallery"] = _gallery_items(best, test_split, gallery)
        prog.done()
        prog.step("figures and report")
        timing["total_seconds"] = time.perf_counter() - t_start
        report["timing"].update(timing)
        write_reports(report, out, te_store)
        prog.done()
    finally:
        prog.close()
    return report


def _extract_baseline(name: str, tr_store: FeatureStore, te_store: FeatureStore, out: str, prog: Progress):
    """Re-extract the same dataset splits as the stores with backbone ``name`` (e.g. pixels) into ``out``."""
    splits = ((tr_store, "train"), (te_store, "test"))
    stores = [_extract_baseline_split(name, st, what, out, prog) for st, what in splits]
    info = {"backbone": name}
    if name == "pixels" and all(_channels_are_copies(b) for b in stores):
        # greyscale images: the three RGB copies would triple the features, and the heads' fit time, for nothing
        info.update(requested="pixels", note="the images are greyscale, so the baseline uses pixels_grey (one "
                                             "channel instead of three identical copies)")
        for b in stores:
            os.remove(b.path)
        stores = [_extract_baseline_split("pixels_grey", st, what, out, prog, step=False) for st, what in splits]
        info["backbone"] = "pixels_grey"
    info.update(train=os.path.relpath(stores[0].path, out), test=os.path.relpath(stores[1].path, out),
                config=stores[0].config)
    return stores[0], stores[1], info


def _channels_are_copies(store: FeatureStore) -> bool:
    """Whether a ``pixels`` store's R, G and B blocks (channel-major flattening) are equal in every row."""
    x = store.features
    if x.shape[1] % 3:
        return False
    r, g, b = np.split(x, 3, axis=1)
    return bool(np.array_equal(r, g) and np.array_equal(r, b))


def _extract_baseline_split(name: str, st: FeatureStore, what: str, out: str, prog: Progress, step=True):
    from .extraction import extract

    if step:
        prog.step(f"baseline {name}: {what} split")
    a = st.attrs
    if not a.get("dataset"):
        raise TlfxError(f"store {st.path!r} does not record its dataset; --baseline needs stores made by tlfx extract")
    path = os.path.join(out, f"baseline-{_slug(name)}-{what}.h5")
    kw = dict(split=a.get("split") or None, root=a.get("data_root") or None, limit=int(a.get("limit") or 0) or None,
              precision="fp32", progress=False)
    try:
        try:
            extract(name, a["dataset"], path, **kw)
        except TlfxError as exc:
            if "another configuration" not in str(exc) and "not a tlfx store" not in str(exc):
                raise
            extract(name, a["dataset"], path, overwrite=True, **kw)
    except TlfxError as exc:
        raise TlfxError(f"--baseline {name}: cannot re-read the images of {st.path!r} ({exc.message})") from None
    b = FeatureStore(path)
    if b.attrs.get("dataset_fingerprint") != a.get("dataset_fingerprint") or int(b.attrs.get("n_items", -1)) != int(
            a.get("n_items", -2)):
        raise TlfxError(f"--baseline {name}: the images of {a.get('dataset')!r} ({a.get('split')}) changed since "
                        f"{st.path!r} was extracted; extract the store again")
    if step:
        prog.done()
    return b


def _head_row(set_kind, set_label, name, s_tr: Split, s_te: Split, k, search, folds, seed, n_boot, out, prog,
              engine="local", address=None, norms=("none",)):
    params, cv_score, search_s, n_folds = {}, None, 0.0, 0
    normalize = norms[0]
    warn: list = []
    if search:
        prog.step(f"{name} on {set_label.split(' ')[0]}: CV search")
        found = training.search(name, s_tr.X, s_tr.y, cv=folds, seed=seed, engine=engine, address=address, warn=warn,
                                normalize=list(norms))
        if found is not None:
            params, cv_score, search_s, n_folds = found.best_params, found.cv_score, found.seconds, found.folds
            normalize = found.normalize
        prog.done()
    prog.step(f"{name} on {set_label.split(' ')[0]}: fit + test")
    est, fit_s = fit_head(name, s_tr.X, s_tr.y, params, seed, warn, normalize=normalize)
    with collect_warnings(warn):
        t0 = time.perf_counter()
        pred = _predict(est, s_te.X)
        predict_s = time.perf_counter() - t0
    row_id = name if set_kind == "main" else f"{_slug(set_label.split(' ')[0])}/{name}"
    model_path = os.path.join(out, "models", f"{_slug(row_id.replace('/', '-'))}.tlfx")
    size = save_head(est, name, params, s_tr.store, model_path, {"train_seconds": fit_s, "cv_score": cv_score})
    row = {
        "id": row_id,
        "label": (name if normalize == "none" else f"{name} [{normalize}]")
        + ("" if set_kind == "main" else f" (baseline: {set_label.split(' ')[0]})"),
        "kind": "head" if set_kind == "main" else "baseline",
        "features": set_kind,
        "feature_label": set_label,
        "head": name,
        "normalize": normalize,
        "params": {key: plain(v) for key, v in params.items()},
        "effective_params": _json_params(est),
        "cv": {"accuracy": cv_score, "folds": n_folds} if search else None,
        "n_train": int(len(s_tr.y)),
        **scores(s_te.y, pred, k, n_boot, seed),
        "model_file": os.path.relpath(model_path, out),
        "size_bytes": int(size),
        "predictions": pred.tolist(),
        "warnings": warn,
        "timing": {"fit_seconds": fit_s, "search_seconds": search_s, "predict_seconds": predict_s,
                   "predict_seconds_per_1000": predict_s / max(len(s_te.y), 1) * 1000.0},
    }
    prog.done()
    return row


def _curve(set_kind, set_label, name, s_tr: Split, s_te: Split, points, row, search, seed, prog, normalize="none"):
    """Test accuracy of the head (default parameters) trained on k examples per class, for each k."""
    counts = np.bincount(s_tr.y)
    largest = int(counts.max()) if len(counts) else 0
    out = {"row": row["id"], "head": name, "features": set_kind, "feature_label": set_label,
           "per_class": [], "n_train": [], "accuracy": [], "errors": []}
    warn: list = []
    seen_all = False
    for p in points:
        prog.step(f"curve {name} on {set_label.split(' ')[0]}: {p}/class")
        kk = largest if p == "all" else min(int(p), largest)
        if kk >= largest:
            if seen_all:
                prog.done()
                continue
            seen_all = True
        rows_idx = subsample_per_class(s_tr.y, kk, seed)
        err = None
        if kk >= largest and not search:
            acc = row["accuracy"]  # the row itself: default parameters on the whole training store
        else:
            Xs, ys = s_tr.X[rows_idx], s_tr.y[rows_idx]
            try:
                from .heads import create_head

                params = {}
                n_nb = create_head(name).get_params().get("n_neighbors")
                if isinstance(n_nb, int) and n_nb > len(ys):
                    params["n_neighbors"] = len(ys)  # kNN cannot ask for more neighbours than examples
                est, _ = fit_head(name, Xs, ys, params, seed, warn, normalize=normalize)
                with collect_warnings(warn):
                    acc = float(np.mean(_predict(est, s_te.X) == s_te.y))
            except Exception as exc:  # a head that cannot learn from so few examples is a point, not a failure
                acc, err = None, f"{type(exc).__name__}: {str(exc).splitlines()[0][:160] if str(exc) else ''}"
        out["per_class"].append("all" if kk >= largest else int(kk))
        out["n_train"].append(int(len(rows_idx)))
        out["accuracy"].append(acc)
        out["errors"].append(err)
        prog.done()
    out["warnings"] = warn
    return out


def model_row(path: str, te_store: FeatureStore, k: int, n_boot: int, seed: int, trust: tuple, prog: Progress,
              model=None) -> dict:
    """A row for a saved model file (fine-tune, or any tlfx model) scored on the test store's labelled rows.

    ``predictions`` are in the store's order of labelled rows (as a head row's); ``model`` is the file already
    loaded (else it is loaded with ``trust``). Used by store mode and, once per model, by the backbone sweep.
    """
    from .models import load_model

    prog.step(f"model {terminal(os.path.basename(path))}")
    if model is None:
        model = load_model(path, trust_types=trust[0], trust_pickle=trust[1])
    if model.class_names and model.class_names != te_store.class_names:
        raise TlfxError(f"model {path!r} was trained on other classes than the test store {te_store.path!r}; "
                        f"use a model trained on the same dataset")
    labels = te_store.labels
    warn: list = []
    with collect_warnings(warn):
        t0 = time.perf_counter()
        proba = np.asarray(model.predict_proba_store(te_store))
        predict_s = time.perf_counter() - t0
    if proba.shape[0] != len(labels):
        raise TlfxError(f"model {path!r} returned {proba.shape[0]} predictions for {len(labels)} test rows")
    keep = labels >= 0
    pred = proba.argmax(1).astype(np.int64)[keep]
    y = labels[keep]
    meta = model.meta
    name = str(meta.get("name") or os.path.splitext(os.path.basename(path))[0])
    fit_s = meta.get("train_seconds")
    if isinstance(fit_s, bool) or not isinstance(fit_s, (int, float)) or not np.isfinite(fit_s) or fit_s < 0:
        fit_s = None  # a model file's own claim: only a plain non-negative number is used as a fit time
    row = {
        "id": f"model/{name}",
        "label": name if model.kind in name else f"{name} ({model.kind})",
        "kind": model.kind,
        "features": "model",
        "feature_label": _model_feature_label(model),
        "head": meta.get("head") or model.kind,
        "params": meta.get("params") or {},
        "cv": None,
        "n_train": meta.get("n_train"),
        **scores(y, pred, k, n_boot, seed),
        "model_file": os.path.abspath(path),
        "size_bytes": int(os.path.getsize(path)),
        "predictions": pred.tolist(),
        "warnings": warn,
        "timing": {"fit_seconds": float(fit_s) if fit_s is not None else None, "search_seconds": 0.0,
                   "predict_seconds": predict_s, "predict_seconds_per_1000": predict_s / max(len(y), 1) * 1000.0},
    }
    prog.done()
    return row


def _model_feature_label(model) -> str:
    """What a model file's row runs on: its backbone (and how it was trained, for a fine-tune)."""
    meta, cfg = model.meta, model.config or {}
    backbone = model_backbone(model)
    size = cfg.get("image_size") or meta.get("image_size")
    how = f"fine-tuned ({meta['unfreeze']})" if meta.get("unfreeze") else ("cached features" if cfg else model.kind)
    return f"{backbone} ({how}{f', {size} px' if size else ''})"


def model_backbone(model) -> str:
    """The backbone a model file runs ('?' when it records none)."""
    return str((model.config or {}).get("backbone") or model.meta.get("backbone") or "?")


def pareto_front(rows) -> list[str]:
    """Ids of rows that no other row beats on both accuracy (higher) and fit time (lower)."""
    pts = [(r["id"], r["accuracy"], (r.get("timing") or {}).get("fit_seconds")) for r in rows]
    pts = [p for p in pts if p[2] is not None]
    front = []
    for rid, acc, t in pts:
        dominated = any((a2 >= acc and t2 <= t) and (a2 > acc or t2 < t) for _, a2, t2 in pts)
        if not dominated:
            front.append(rid)
    return front


def _gallery_items(row: dict, s_te: Split, n: int) -> list[dict]:
    """The first ``n`` misclassified test rows of ``row`` (in store order: deterministic)."""
    pred = np.asarray(row["predictions"])
    wrong = np.flatnonzero(pred != s_te.y)[:n] if len(pred) == len(s_te.y) else []
    return [{"id": s_te.ids[i], "true": int(s_te.y[i]), "pred": int(pred[i])} for i in wrong]
