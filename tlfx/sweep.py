"""``tlfx compare --data D --backbones a,b --layers penultimate,multi --heads x,y``: which network, which layer,
which head, answered in one report.

For every backbone x layers configuration the train and test splits are extracted into a store cache whose file
names are a hash of the full feature configuration (backbone, weights sha256, layers, pooling, image size,
preprocessing, precision, runtime, dtype) and of the data (spec, root, split, limit, fingerprint of the listed
images and labels). A complete store is reused, an incomplete one resumes (the extraction engine continues a store
of the same configuration), anything else is extracted. Each configuration then runs the ordinary store-mode
comparison (:func:`tlfx.compare.compare`, its own full report under ``configs/``), and the rows are merged into
one report with per-configuration cost and paired tests between the best row and every other row.

>>> from tlfx.sweep import sweep
>>> rep = sweep("digits", ["pixels_grey", "efficientnet_lite0"], ["penultimate"], ["logistic", "knn"], "report")
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import sys
import tempfile
import time
from dataclasses import dataclass

import numpy as np

from . import __version__
from .compare import DEFAULT_CURVE, MAX_SEED, _slug, parse_heads
from .errors import TlfxError
from .safetext import terminal

KEY_VERSION = 1  # bump when the meaning of a cache key changes: old stores are then simply not found
SWEEP_PRECISIONS = ("auto", "fp32", "bf16", "fp16", "int8")


def parse_list(spec, what: str) -> list[str]:
    """'a,b' (or a list) -> ['a', 'b'], refusing an empty list and duplicates (one line naming the fix)."""
    items = spec if isinstance(spec, (list, tuple)) else [s.strip() for s in str(spec or "").split(",")]
    items = [str(s).strip() for s in items if str(s).strip()]
    if not items:
        raise TlfxError(f"no {what} given; pass --{what} with one or more comma-separated values")
    dup = sorted({s for s in items if items.count(s) > 1})
    if dup:
        raise TlfxError(f"{what} {dup[0]!r} is listed twice in --{what}; list each once")
    return items


@dataclass
class SweepOptions:
    """How every store of a sweep is extracted (one set of choices for all backbones)."""

    data: str = "digits"
    root: str | None = None
    limit: int | None = None
    test_limit: int | None = None
    train_split: str = "train"
    test_split: str = "test"
    pooling: str = "avg"
    image_size: int | None = None
    precision: str = "auto"
    runtime: str = "torch"  # the Python API's default, as for tlfx.extract; the command line's is auto
    device: str | None = None
    dtype: str = "float32"
    batch_size: int = 64
    workers: int | None = None
    part_size: int | None = None  # rows per durable part of a store (default: the extraction engine's)
    tta: str = "none"  # test-time augmentation at extraction (none, flip)

    def validate(self) -> SweepOptions:
        for name in ("limit", "test_limit"):
            v = getattr(self, name)
            if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
                raise TlfxError(f"--{name.replace('_', '-')} must be a positive number of images, got {v!r}")
        if self.precision not in SWEEP_PRECISIONS:
            raise TlfxError(f"unknown precision {self.precision!r} for a sweep; valid choices: "
                            f"{', '.join(SWEEP_PRECISIONS)}")
        from .config import ExtractOptions

        ExtractOptions(pooling=self.pooling, image_size=self.image_size, dtype=self.dtype, batch_size=self.batch_size,
                       workers=self.workers, runtime=self.runtime, part_size=self.part_size, tta=self.tta).validate()
        from .openvino_runtime import resolve_runtime
        from .runtime import pick_device

        resolve_runtime(self.runtime, pick_device(self.device), self.precision)  # e.g. int8 without OpenVINO
        return self


# --------------------------------------------------------------------------------------------------- cache key
def store_key(feature_config: dict, ds, limit: int | None, dtype: str) -> tuple[str, dict]:
    """The cache key of one store: (sha256 hex, the JSON-ready record it hashes).

    ``feature_config`` is the resolved configuration the store records (:class:`tlfx.config.FeatureConfig` fields);
    the weights count by name and content (sha256), not by where the file lies.
    """
    from .config import FeatureConfig

    fc = FeatureConfig.from_dict(feature_config).to_dict()
    w = fc.get("weights") or {}
    fc["weights"] = {"name": w.get("name"), "sha256": w.get("sha256") or ""}
    record = {
        "key_version": KEY_VERSION,
        "feature_config": fc,
        "dtype": dtype,
        "dataset": {"spec": ds.spec, "split": ds.split or "all", "root": ds.root or "", "limit": int(limit or 0),
                    "n_items": len(ds), "fingerprint": ds.fingerprint()},
    }
    digest = hashlib.sha256(json.dumps(record, sort_keys=True, default=str).encode()).hexdigest()
    return digest, record


def resolved_config(bb, layers: str, opts: SweepOptions) -> dict:
    """What a store extracted with these choices will record (resolved layers, precision and runtime)."""
    from .openvino_runtime import resolve_runtime
    from .runtime import pick_device, resolve_precision

    device = pick_device(opts.device)
    return {**bb.config(layers, opts.pooling, opts.image_size), "runtime": resolve_runtime(opts.runtime, device,
                                                                                          opts.precision),
            "precision": resolve_precision(opts.precision, device), "tta": opts.tta}


def store_path(cache: str, backbone: str, layers, split: str, digest: str) -> str:
    """``<cache>/<backbone>-<layers>-<split>-<first 16 hex of the key>.h5`` (readable, and unique by the key).

    ``layers`` is the resolved list (or a label): two spellings of the same layers name the same file.
    """
    lay = "-".join(layers) if isinstance(layers, (list, tuple)) else str(layers)
    lay = _slug(lay)[:48]
    return os.path.join(cache, f"{_slug(backbone)[:48]}-{lay}-{_slug(split)}-{digest[:16]}.h5")


def _write_json(path: str, obj):
    fd, tmp = tempfile.mkstemp(prefix=".tlfx-tmp-", suffix=".json", dir=os.path.dirname(path) or ".")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(obj, f, indent=2, sort_keys=True, default=str)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def store_state(path: str) -> str:
    """'reusing' (a complete store), 'resuming' (parts or an unfinished file) or 'extracting' (nothing yet)."""
    from .store import parts_dir, read_attrs

    if os.path.isfile(path):
        try:
            return "reusing" if read_attrs(path).get("complete") else "resuming"
        except TlfxError:
            return "resuming"  # the extraction engine decides what to do with an unreadable file
    return "resuming" if os.path.isdir(parts_dir(path)) else "extracting"


def _same_store(path: str, wanted: dict) -> bool:
    """Whether the complete store at ``path`` records exactly ``wanted`` (configuration and images): then it is
    reused without building the network (the extraction engine would find the same and do nothing)."""
    from .store import config_diff, read_attrs

    try:
        attrs = read_attrs(path)
    except TlfxError:
        return False
    return bool(attrs.get("complete")) and not config_diff(attrs, wanted)


def disk_bytes(path: str) -> int:
    """Bytes a store takes on disk: the file and, for a virtual or unfinished store, its parts."""
    from .store import parts_dir

    total = os.path.getsize(path) if os.path.isfile(path) else 0
    d = parts_dir(path)
    if os.path.isdir(d) and not os.path.islink(d):
        total += sum(e.stat().st_size for e in os.scandir(d) if e.is_file(follow_symlinks=False))
    return int(total)


# ------------------------------------------------------------------------------------------------------- sweep
class _Log:
    def __init__(self, total: int, sink):
        self.total, self.k, self.sink, self.lines = total, 0, sink, []

    def step(self, text: str):
        self.k += 1
        self.say(f"[{self.k}/{self.total}] {text}")

    def say(self, text: str):
        self.lines.append(text)
        if self.sink is not None:
            self.sink(text)


def _stderr(text: str):
    print(terminal(text), file=sys.stderr, flush=True)


def sweep(data: str, backbones, layers, heads, out: str, *, cache: str | None = None, opts: SweepOptions | None = None,
          search: bool = False, folds: int = 3, learning_curve=DEFAULT_CURVE, n_boot: int = 1000, seed: int = 0,
          gallery: int = 24, progress: bool = False, log=_stderr, engine: str = "local", address: str | None = None,
          argv: list | None = None, normalize=None, finetune=(), trust_types=(), trust_pickle: bool = False) -> dict:
    """Extract what is missing, compare ``heads`` on every backbone x layers configuration, write one report.

    ``finetune``: model files (``tlfx finetune``) each scored once on the test split's images (the same images,
    matched by id, as the head rows) and added as rows of their own; ``trust_types``/``trust_pickle`` as for
    :func:`tlfx.models.load_model`.

    Writes ``out/report.html``, ``report.json`` and ``report.md`` (the merged grid), ``out/configs/<config>/`` (each
    configuration's full compare report) and, unless ``cache`` names another folder, the stores in
    ``out/stores``. Returns the merged report dictionary. ``log`` receives one line per step (None: silent).
    """
    from .backbone import create_backbone, resolve_backbone_name
    from .compare import compare
    from .datasets import load_dataset
    from .plugins import registry

    t_start = time.perf_counter()
    opts = (opts or SweepOptions()).validate()
    opts.data = data
    names = parse_list(backbones, "backbones")
    layer_specs = parse_list(layers, "layers")
    head_names = parse_heads(heads)
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or not 0 <= seed <= MAX_SEED:
        raise TlfxError(f"--seed must be an integer from 0 to {MAX_SEED}, got {seed!r}")
    reg = registry("backbone")
    for n in names:
        base, extra = resolve_backbone_name(n)
        reg.get(base if extra and base in reg else n)  # unknown backbone: one line with the valid choices
    for path, what in ((out, "--out"), (cache, "--cache")):
        if path and os.path.exists(path) and not os.path.isdir(path):
            raise TlfxError(f"{what} {path!r} is a file; pass a directory")
    cache = cache or os.path.join(out, "stores")
    try:
        os.makedirs(cache, exist_ok=True)
        os.makedirs(os.path.join(out, "configs"), exist_ok=True)
    except OSError as exc:
        raise TlfxError(f"cannot create {cache!r} or {out!r}: {exc.strerror or exc}") from None

    splits = {"train": load_dataset(data, split=opts.train_split, root=opts.root, limit=opts.limit),
              "test": load_dataset(data, split=opts.test_split, root=opts.root, limit=opts.test_limit)}
    finetune = [os.fspath(p) for p in (finetune or ())]
    for path in finetune:  # before any extraction: a wrong file costs nothing
        check_model_file(path, data, splits["test"].class_names)
    limits = {"train": opts.limit, "test": opts.test_limit}
    plan = [(b, lay) for b in names for lay in layer_specs]
    lg = _Log(len(plan) * 3, log)
    lg.say(f"sweep: {len(names)} backbone(s) x {len(layer_specs)} layer choice(s) x {len(head_names)} head(s) on "
           f"{data} (train {len(splits['train'])}, test {len(splits['test'])} images); store cache {cache}")

    configs, per_config = [], {}
    used_slugs: set = set()
    for b in names:
        bb = create_backbone(b)
        seen: dict = {}
        for lay in layer_specs:
            same = json.dumps(resolved_config(bb, lay, opts), sort_keys=True, default=str)
            if same in seen:  # e.g. multi on a backbone without stages: the same features, the same rows
                lg.total -= 3
                lg.say(f"{b} / {lay}: skipped, the same features as {b} / {seen[same]}")
            else:
                seen[same] = lay
        for lay in seen.values():
            cfg = _run_config(bb, b, lay, splits, limits, opts, cache, lg, progress)
            slug = _slug(f"{b}-{lay}")
            while slug in used_slugs:
                slug += "_"
            used_slugs.add(slug)
            cfg["id"] = slug
            cfg["report"] = f"configs/{slug}/report.html"
            lg.step(f"{b} / {lay}: compare {', '.join(head_names)}")
            rep = compare(cfg["stores"]["train"]["path"], cfg["stores"]["test"]["path"], head_names,
                          os.path.join(out, "configs", slug), search=search, folds=folds,
                          learning_curve=learning_curve, n_boot=n_boot, seed=seed, gallery=gallery, progress=False,
                          engine=engine, address=address, argv=argv, normalize=normalize)
            per_config[slug] = rep
            configs.append(cfg)
        del bb

    scored = []
    for path in finetune:
        cfg, row, model = score_model_file(path, configs, n_boot, seed, (trust_types, trust_pickle))
        lg.say(f"--finetune {path}: accuracy {row['accuracy']:.3f} on the test images of {cfg['id']}")
        scored.append((cfg, row, model))
    report = merge(configs, per_config, head_names, n_boot=n_boot, seed=seed, models=scored)
    report.update({
        "tlfx_version": __version__,
        "command": argv,
        "config": {"data": data, "root": opts.root, "limit": opts.limit, "test_limit": opts.test_limit,
                   "train_split": opts.train_split, "test_split": opts.test_split, "backbones": names,
                   "layers": layer_specs, "heads": head_names, "pooling": opts.pooling, "image_size": opts.image_size,
                   "precision": opts.precision, "runtime": opts.runtime, "search": bool(search), "cv_folds": folds,
                   "learning_curve": learning_curve, "bootstrap_resamples": n_boot, "seed": seed,
                   "finetune": [os.path.abspath(p) for p in finetune], "cache": os.path.abspath(cache)},
        "log": lg.lines,
    })
    report["embedding"] = embedding_map(report, per_config, seed=seed)
    report["learning_curves"] = best_head_curves(report, per_config)
    report["timing"] = {"total_seconds": time.perf_counter() - t_start}
    from .report.sweep import write_sweep_reports

    write_sweep_reports(report, out)
    return report


def _run_config(bb, name: str, layers: str, splits: dict, limits: dict, opts: SweepOptions, cache: str, lg: _Log,
                progress: bool) -> dict:
    """Make sure both stores of one configuration exist and are complete; returns what the report says about them."""
    from .config import ExtractOptions
    from .extraction import run_extraction
    from .store import FeatureStore

    config = resolved_config(bb, layers, opts)
    stores = {}
    for what, ds in splits.items():
        digest, record = store_key(config, ds, limits[what], opts.dtype)
        path = store_path(cache, name, config["layers"], ds.split or what, digest)
        state = store_state(path)
        lg.step(f"{name} / {layers}: {what} split: {state} {path}")
        if state != "reusing":
            _write_json(path[:-3] + ".key.json", record)  # what the hashed name stands for, for people
        t0 = time.perf_counter()
        wanted = {**config, "dtype": opts.dtype, "dataset": ds.spec, "split": ds.split or "all",
                  "dataset_fingerprint": record["dataset"]["fingerprint"]}
        if state != "reusing" or not _same_store(path, wanted):  # anything unsure: the extraction engine decides
            res = run_extraction(ExtractOptions(backbone=bb, data=ds, out=path, limit=limits[what], layers=layers,
                                                pooling=opts.pooling, image_size=opts.image_size,
                                                precision=opts.precision, runtime=opts.runtime, device=opts.device,
                                                dtype=opts.dtype, batch_size=opts.batch_size, workers=opts.workers,
                                                part_size=opts.part_size, tta=opts.tta, progress=progress))
            if not res.already_complete:
                lg.say(f"  {res.summary()}")
        st = FeatureStore(path)
        stats = st.attrs.get("stats") or {}
        stores[what] = {"path": os.path.abspath(path), "key": digest, "state": state, "n": len(st),
                        "bytes": disk_bytes(path), "extract_seconds": float(stats.get("seconds") or 0.0),
                        "images_per_s": float(stats.get("images_per_s") or 0.0),
                        "this_run_seconds": time.perf_counter() - t0}
    st = FeatureStore(stores["train"]["path"])
    n_img = stores["train"]["n"] + stores["test"]["n"]
    ext_s = stores["train"]["extract_seconds"] + stores["test"]["extract_seconds"]
    n_params = int(sum(p.numel() for p in bb.module.parameters()))
    return {"backbone": name, "layers": layers, "resolved_layers": list(config["layers"]),
            "image_size": config["image_size"], "precision": config["precision"], "runtime": config["runtime"],
            "weights": {"name": config["weights"].get("name"), "sha256": config["weights"].get("sha256")},
            "dim": int(st.attrs.get("dim", 0)), "n_params": n_params, "model_bytes": n_params * 4,
            "extract_seconds": ext_s, "images_per_s": n_img / ext_s if ext_s > 0 else None,
            "store_bytes": stores["train"]["bytes"] + stores["test"]["bytes"], "stores": stores}


# ------------------------------------------------------------------------------------------------ fine-tuned rows
def check_model_file(path: str, data: str, class_names) -> dict:
    """The record of a ``--finetune`` file, refused (one line) when it is not a tlfx model or names other classes
    than the dataset; read before any extraction so that a wrong file costs nothing."""
    from .models import read_meta

    meta = read_meta(path)
    names, want = list(meta.get("class_names") or []), list(class_names)
    if names and names != want:
        raise TlfxError(f"--finetune {path!r} was trained on other classes ({len(names)}: "
                        f"{terminal(', '.join(map(str, names[:4])))}...) than {data!r} ({len(want)}: "
                        f"{terminal(', '.join(map(str, want[:4])))}...); pass a model fine-tuned on the same dataset")
    return meta


def score_model_file(path: str, configs: list[dict], n_boot: int, seed: int, trust: tuple):
    """Score a model file once on the sweep's test images: ``(configuration whose test store was used, row, model)``.

    The row is store mode's (:func:`tlfx.compare.model_row`). A fine-tuned network re-reads the images any test
    store points to (they are the same images in every configuration); a model that reads cached features (a head
    file) is scored on the test store of the configuration it was fitted on, and refused when there is none.
    """
    from .compare import Progress, model_backbone, model_row
    from .models import load_model
    from .store import FeatureStore

    model = load_model(path, trust_types=trust[0], trust_pickle=trust[1])
    chosen = configs[0]
    if getattr(model, "reads_features", True):
        chosen = None
        for c in configs:
            try:
                model.check_store(FeatureStore(c["stores"]["test"]["path"]))
            except TlfxError:
                continue
            chosen = c
            break
        if chosen is None:
            raise TlfxError(f"--finetune {path!r} is a {terminal(model.kind)!r} model that reads features of "
                            f"{terminal(model_backbone(model))!r} made unlike every configuration of this sweep; pass "
                            f"a fine-tuned model (tlfx finetune) or a head fitted on one of the sweep's stores")
    st = FeatureStore(chosen["stores"]["test"]["path"])
    row = model_row(path, st, len(st.class_names), n_boot, seed, trust, Progress(1), model=model)
    return chosen, row, model


def _model_rows(models, rows: list[dict], correct: dict):
    """Append one merged row per scored model file (see :func:`score_model_file`) and its right/wrong per image id."""
    from .compare import model_backbone

    used, labels = {r["id"] for r in rows}, {r["label"] for r in rows}
    for c, r, model in models:
        name = r["id"].split("/", 1)[-1]
        rid = f"finetune/{_slug(name)}"
        while rid in used:
            rid += "_"
        used.add(rid)
        backbone = model_backbone(model)
        tuned = not getattr(model, "reads_features", True)
        label = f"fine-tuned: {backbone}" if tuned else f"model: {name}"
        if label in labels:
            label += f" ({name})"
        while label in labels:
            label += "'"
        labels.add(label)
        t = r["timing"]
        fit, ps = t.get("fit_seconds"), float(t.get("predict_seconds") or 0.0)
        rows.append({
            "id": rid, "config": None, "scored_on": c["id"], "kind": r["kind"], "backbone": backbone,
            "layers": "fine-tuned" if tuned else "model file", "head": r["head"], "label": label,
            "feature_label": r["feature_label"],
            "accuracy": r["accuracy"], "accuracy_ci95": r["accuracy_ci95"],
            "macro_f1": r["macro_f1"], "macro_f1_ci95": r["macro_f1_ci95"], "n_test": r["n_test"],
            "cv_accuracy": None,
            "timing": {"fit_seconds": fit, "predict_seconds": ps,
                       "predict_seconds_per_1000": t.get("predict_seconds_per_1000"), "extract_seconds": None,
                       "total_cost_seconds": (fit or 0.0) + ps},
            "model_file": r["model_file"], "size_bytes": r["size_bytes"], "warnings": r["warnings"],
        })
        ids, y = _test_ids(c), np.asarray(_test_labels(c))
        pred = np.asarray(r["predictions"])
        correct[rid] = dict(zip(ids, (pred == y).tolist())) if len(pred) == len(y) == len(ids) else {}


# ------------------------------------------------------------------------------------------------------ merging
def row_label(backbone: str, layers: str, head: str, show_layers: bool) -> str:
    return f"{backbone}/{layers}+{head}" if show_layers else f"{backbone}+{head}"


def merge(configs: list[dict], per_config: dict, heads: list[str], n_boot: int = 1000, seed: int = 0,
          models=()) -> dict:
    """One row per configuration x head (accuracy, CIs, fit time, total cost) and per scored model file
    (``models``: what :func:`score_model_file` returns; total cost = training + prediction time), the best row and
    the paired tests."""
    from .metrics import paired_comparison

    show_layers = len({c["layers"] for c in configs}) > 1
    rows, correct = [], {}
    for c in configs:
        rep = per_config[c["id"]]
        y = np.asarray(_test_labels(c))
        ids = _test_ids(c)
        for r in rep["rows"]:
            if r.get("features") != "main":
                continue
            fit = (r.get("timing") or {}).get("fit_seconds")
            rid = f"{c['id']}/{r['head']}"
            rows.append({
                "id": rid, "config": c["id"], "backbone": c["backbone"], "layers": c["layers"], "head": r["head"],
                "label": row_label(c["backbone"], c["layers"], r["head"], show_layers),
                "accuracy": r["accuracy"], "accuracy_ci95": r["accuracy_ci95"],
                "macro_f1": r["macro_f1"], "macro_f1_ci95": r["macro_f1_ci95"], "n_test": r["n_test"],
                "cv_accuracy": (r.get("cv") or {}).get("accuracy"),
                "timing": {"fit_seconds": fit, "predict_seconds_per_1000": r["timing"].get("predict_seconds_per_1000"),
                           "extract_seconds": c["extract_seconds"],
                           "total_cost_seconds": c["extract_seconds"] + (fit or 0.0)},
                "model_file": f"configs/{c['id']}/{r['model_file']}",
            })
            pred = np.asarray(r["predictions"])
            correct[rid] = dict(zip(ids, (pred == y).tolist())) if len(pred) == len(y) == len(ids) else {}
    _model_rows(models or (), rows, correct)
    if not rows:
        raise TlfxError("the sweep produced no rows; check --heads")
    best = max(rows, key=lambda r: (r["accuracy"], r["macro_f1"], -r["timing"]["total_cost_seconds"]))
    paired = []
    b_ok = correct[best["id"]]
    for r in sorted(rows, key=lambda r: -r["accuracy"]):
        if r["id"] == best["id"]:
            continue
        o_ok = correct[r["id"]]
        common = [i for i in b_ok if i in o_ok]
        res = paired_comparison([b_ok[i] for i in common], [o_ok[i] for i in common], n_boot, seed)
        res.update(a=best["id"], b=r["id"], sentence=paired_sentence(best["label"], r["label"], res))
        paired.append(res)
    return {"kind": "sweep", "configs": configs, "rows": rows, "best": best["id"], "heads": heads,
            "pareto_front": pareto_cost(rows), "paired": paired}


def _test_ids(c: dict) -> list[str]:
    from .store import FeatureStore

    st = FeatureStore(c["stores"]["test"]["path"])
    y = st.labels
    return [i for i, lab in zip(st.ids, y) if lab >= 0]


def _test_labels(c: dict) -> list[int]:
    from .store import FeatureStore

    y = FeatureStore(c["stores"]["test"]["path"]).labels
    return y[y >= 0].tolist()


def fmt_p(p: float) -> str:
    return f"p = {p:.3f}" if p >= 0.001 else f"p = {p:.1e}"


def paired_sentence(a: str, b: str, res: dict) -> str:
    """'X beats Y by 1.1 points (...), p = 0.003 (...)' or why the difference is not established."""
    pts = res["difference"] * 100
    lo, hi = res["difference_ci95"]
    ci = "" if lo is None else f"; paired bootstrap 95% CI of the difference [{lo * 100:+.1f}, {hi * 100:+.1f}] points"
    detail = (f"McNemar's exact test on {res['n']} shared test images: {res['a_only']} right only by {a}, "
              f"{res['b_only']} only by {b}{ci}")
    p = fmt_p(res["p_value"])
    if res["p_value"] < 0.05 and pts > 0:
        return f"{a} beats {b} by {pts:.1f} points, {p} ({detail})."
    if pts == 0:
        return f"{a} and {b} are equally accurate on these images, {p} ({detail})."
    return f"{a} is ahead of {b} by {pts:.1f} points, but the difference is not significant, {p} ({detail})."


def pareto_cost(rows) -> list[str]:
    """Ids of rows no other row beats on both accuracy (higher) and total cost, extraction + fit (lower)."""
    pts = [(r["id"], r["accuracy"], r["timing"]["total_cost_seconds"]) for r in rows]
    return [rid for rid, acc, t in pts
            if not any(a2 >= acc and t2 <= t and (a2 > acc or t2 < t) for _, a2, t2 in pts)]


def best_head_curves(report: dict, per_config: dict) -> list[dict]:
    """Per configuration, the learning curve of its most accurate head (from the configuration's own report)."""
    out = []
    for c in report["configs"]:
        mine = [r for r in report["rows"] if r["config"] == c["id"]]
        curves = (per_config[c["id"]].get("learning_curves") or {}).get("curves") or []
        if not mine or not curves:
            continue
        top = max(mine, key=lambda r: (r["accuracy"], r["macro_f1"]))
        cur = next((cv for cv in curves if cv["head"] == top["head"] and cv["features"] == "main"), None)
        if cur is not None:
            out.append({"config": c["id"], "row": top["id"], "label": top["label"], "per_class": cur["per_class"],
                        "n_train": cur["n_train"], "accuracy": cur["accuracy"]})
    return out


MAX_MAP_POINTS = 5000


def embedding_map(report: dict, per_config: dict, seed: int = 0) -> dict | None:
    """2-D coordinates of the best configuration's test features (UMAP when umap-learn is installed, else PCA),
    with true classes and whether the best row got each point right; at most 5,000 seeded points."""
    from .store import FeatureStore

    best = next(r for r in report["rows"] if r["id"] == report["best"])
    if best["config"] is None:  # a fine-tuned model is best: map the features of the best head row
        best = max((r for r in report["rows"] if r["config"] is not None),
                   key=lambda r: (r["accuracy"], r["macro_f1"]), default=None)
        if best is None:
            return None
    cfg = next(c for c in report["configs"] if c["id"] == best["config"])
    st = FeatureStore(cfg["stores"]["test"]["path"])
    y = st.labels
    keep = np.flatnonzero(y >= 0)
    X = np.asarray(st.features, dtype=np.float64)[keep]
    y = y[keep]
    row = next(r for r in per_config[cfg["id"]]["rows"] if r["head"] == best["head"] and r["features"] == "main")
    pred = np.asarray(row["predictions"])
    if len(pred) != len(y) or len(y) < 3:
        return None
    idx = np.arange(len(y))
    if len(idx) > MAX_MAP_POINTS:
        idx = np.sort(np.random.default_rng(seed).choice(len(idx), MAX_MAP_POINTS, replace=False))
    X, y, pred = X[idx], y[idx], pred[idx]
    method, xy = "PCA", None
    try:
        import umap  # optional

        xy = umap.UMAP(n_components=2, random_state=seed).fit_transform(X)
        method = "UMAP"
    except Exception:  # not installed (or failed): PCA, which needs nothing
        Xc = X - X.mean(0)
        _u, s, vt = np.linalg.svd(Xc, full_matrices=False)
        xy = Xc @ vt[:2].T
        if xy.shape[1] < 2:
            xy = np.hstack([xy, np.zeros((len(xy), 2 - xy.shape[1]))])
        var = s**2
        method = f"PCA ({var[:2].sum() / var.sum() * 100:.0f}% of the variance)" if var.sum() > 0 else "PCA"
    return {"row": best["id"], "label": best["label"], "method": method, "class_names": st.class_names,
            "x": np.round(xy[:, 0], 5).tolist(), "y": np.round(xy[:, 1], 5).tolist(), "true": y.tolist(),
            "pred": pred.tolist(), "n_wrong": int((pred != y).sum())}
