"""Extraction speed: the naive loop vs the model-only upper bound vs ``tlfx.extract`` end to end, on real JPEG files.

One command, one table (see benchmarks/README.md and docs/performance.md)::

    .venv/bin/python benchmarks/extract_speed.py            # full run: 2,000 files per size, RSS at 2k/20k, accuracy
    .venv/bin/python benchmarks/extract_speed.py --quick    # a couple of minutes: checks the script itself

For each backbone (resnet18 from torchvision, efficientnet_lite0) at 224 px:

1. naive: fp32, NCHW, torchvision transforms per PIL image (Resize, CenterCrop, ToTensor, Normalize),
   ``torchvision.datasets.ImageFolder`` + DataLoader batch 32, the model called per batch under ``torch.no_grad``
   (no ``inference_mode``, no channels_last, no bf16);
2. model only: the same network with tlfx's precision and layout (``FeatureComputer``: autocast, channels_last,
   inference_mode, allocator tuning) on tensors decoded beforehand: the upper bound for end to end;
3. ``tlfx.extract(...)`` end to end: listing the folder, decoding, resizing, the network, the HDF5 parts and the
   final join.

Every stage runs in its own fresh process (no allocator or thread settings leak from one to the next); the stages
take turns (1, 3, 1, 3, ... with ``--repeats``) and the best run of each is kept, because on a shared machine the
other users' load only ever makes a run slower. CPU ms per image (user + system, the process and its children) is
printed beside images/s: it moves much less with other users' load than wall-clock rates do.

resnet18 runs with random weights (``weights="none"``: torchvision weights are not available offline here; speed
does not depend on the values); efficientnet_lite0 runs with its real ImageNet weights, which the accuracy check
(logistic regression on bf16 vs fp32 features) needs.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
FASHION = "/usr/share/datasets/fashion-mnist"
CLASSES = ["tshirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "boot"]
WEIGHTS = {"resnet18": "none", "efficientnet_lite0": None}
TARGET_NAIVE = {"resnet18": 3.5, "efficientnet_lite0": 2.5}
TARGET_UPPER = 0.80


# ----------------------------------------------------------------------------------------------------------- data
def read_fashion(split: str = "test"):
    prefix = "t10k" if split == "test" else "train"
    with gzip.open(os.path.join(FASHION, f"{prefix}-images-idx3-ubyte.gz")) as f:
        images = np.frombuffer(f.read(), np.uint8, offset=16).reshape(-1, 28, 28)
    with gzip.open(os.path.join(FASHION, f"{prefix}-labels-idx1-ubyte.gz")) as f:
        labels = np.frombuffer(f.read(), np.uint8, offset=8).astype(np.int64)
    return images, labels


def make_folder(root: str, n: int, size: int) -> str:
    """``n`` Fashion-MNIST test images as JPEG files in ``root/<size>px/<class>/``: 28 px grey as stored, or 256 px RGB."""
    from PIL import Image

    out = os.path.join(root, f"{size}px")
    stamp = os.path.join(out, ".complete")
    if os.path.isfile(stamp) and open(stamp).read() == str(n):
        return out
    images, labels = read_fashion("test")
    if n > len(images):
        raise SystemExit(f"--n {n} is more than the {len(images)} Fashion-MNIST test images")
    for c in CLASSES:
        os.makedirs(os.path.join(out, c), exist_ok=True)
    for i in range(n):
        img = Image.fromarray(images[i], "L")
        if size != 28:
            img = img.resize((size, size), Image.Resampling.BICUBIC).convert("RGB")
        img.save(os.path.join(out, CLASSES[labels[i]], f"{i:05d}.jpg"), quality=90)
    with open(stamp, "w") as f:
        f.write(str(n))
    return out


# --------------------------------------------------------------------------------------------------------- stages
def _cpu_seconds() -> float:
    s, c = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return s.ru_utime + s.ru_stime + c.ru_utime + c.ru_stime


def stage_naive(backbone: str, root: str, batch_size: int, workers: int) -> dict:
    import torch
    import torchvision
    from torchvision import transforms as T

    import tlfx
    from tlfx.backbone import PooledLayers

    bb = tlfx.create_backbone(backbone, WEIGHTS[backbone])
    model = PooledLayers(bb, "penultimate").eval()
    pre = bb.preprocess
    interp = T.InterpolationMode(pre.interpolation)
    tf = T.Compose([T.Resize(pre.resize, interpolation=interp), T.CenterCrop(pre.crop), T.ToTensor(),
                    T.Normalize(pre.mean, pre.std)])
    t0, c0 = time.perf_counter(), _cpu_seconds()
    ds = torchvision.datasets.ImageFolder(root, transform=tf)
    loader = torch.utils.data.DataLoader(ds, batch_size=batch_size, num_workers=workers)
    n = 0
    with torch.no_grad():
        for x, _y in loader:
            model(x).numpy()
            n += len(x)
    return {"n": n, "seconds": time.perf_counter() - t0, "cpu_s": _cpu_seconds() - c0}


def stage_model(backbone: str, root: str, n: int, batch_size: int, runtime: str = "torch", precision: str = "auto") -> dict:
    import torch

    import tlfx
    from tlfx.datasets import load_dataset
    from tlfx.extraction import FeatureComputer

    torch.manual_seed(0)  # random-weight backbones: the same network in every stage (and one OpenVINO cache entry)
    bb = tlfx.create_backbone(backbone, WEIGHTS[backbone])
    ds = load_dataset(f"imagefolder:{root}", limit=n)
    t_build = time.perf_counter()  # OpenVINO: conversion (+ INT8 calibration) on a cold cache, a cache read after
    computer = FeatureComputer(bb, precision=precision, device="cpu" if runtime == "openvino" else None,
                               runtime=runtime, calibration=ds if precision == "int8" else None)
    build_s = time.perf_counter() - t_build
    batches = [arr for _i, _g, arr, _b in computer.loader(ds, range(len(ds)), batch_size, workers=0)]
    if runtime == "openvino":
        ov = computer._openvino
        ov(batches[0])  # warm-up
        t0, c0 = time.perf_counter(), _cpu_seconds()
        for arr in batches:
            ov(arr)
        return {"n": sum(len(b) for b in batches), "seconds": time.perf_counter() - t0, "cpu_s": _cpu_seconds() - c0,
                "precision": computer.precision, "build_s": build_s, "cached": ov.cached}
    # pre-made network inputs: normalised float32, channels_last, exactly what FeatureComputer feeds the network
    inputs = []
    for arr in batches:
        x = arr.float().mul_(computer.scale).add_(computer.bias).permute(0, 3, 1, 2)
        inputs.append(x)

    def run(x):
        with torch.inference_mode(), tlfx.runtime.autocast(computer.device, computer.precision):
            return computer._forward(x).float().numpy()

    run(inputs[0])  # warm-up: oneDNN builds its kernels on the first call
    t0, c0 = time.perf_counter(), _cpu_seconds()
    done = 0
    for x in inputs:
        run(x)
        done += len(x)
    return {"n": done, "seconds": time.perf_counter() - t0, "cpu_s": _cpu_seconds() - c0,
            "precision": computer.precision}


def stage_tlfx(backbone: str, root: str, out: str, batch_size: int, workers: int | None, runtime: str = "torch",
               precision: str = "auto") -> dict:
    import torch

    import tlfx
    from tlfx.extraction import extract

    torch.manual_seed(0)
    bb = tlfx.create_backbone(backbone, WEIGHTS[backbone])
    t0, c0 = time.perf_counter(), _cpu_seconds()
    res = extract(bb, f"imagefolder:{root}", out, overwrite=True, batch_size=batch_size, workers=workers,
                  runtime=runtime, precision=precision, device="cpu" if runtime == "openvino" else None)
    return {"n": res.n + res.skipped, "seconds": time.perf_counter() - t0, "cpu_s": _cpu_seconds() - c0,
            "skipped": res.skipped}


def run_stage(stage: str, **kw) -> dict:
    """One stage in a fresh interpreter; returns its measurements (and the child's peak RSS)."""
    cmd = [sys.executable, os.path.abspath(__file__), "--stage", stage, "--stage-args", json.dumps(kw)]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
    line = next((ln for ln in reversed(proc.stdout.splitlines()) if ln.startswith("{")), None)
    if proc.returncode != 0 or line is None:
        raise SystemExit(f"stage {stage} {kw} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return json.loads(line)


def peak_rss_mb(cmd: list[str]) -> tuple[float, float]:
    """Run ``cmd`` under a fresh Python parent; returns (peak RSS of the command in MB, wall seconds)."""
    probe = ("import resource, subprocess, sys, time, json; t = time.perf_counter(); "
             "r = subprocess.run(sys.argv[1:], capture_output=True, text=True); "
             "print(json.dumps([r.returncode, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, "
             "time.perf_counter() - t, r.stderr[-2000:]]))")
    proc = subprocess.run([sys.executable, "-c", probe, *cmd], capture_output=True, text=True, cwd=REPO)
    rc, kb, wall, err = json.loads(proc.stdout.strip().splitlines()[-1])
    if rc != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{err}")
    return kb / 1024, wall


def cv_accuracy(path: str) -> float:
    """5-fold cross-validated accuracy of a standardised logistic regression on the features in ``path``."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedKFold, cross_val_predict
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    from tlfx.store import FeatureStore

    st = FeatureStore(path)
    x, y = np.asarray(st.features, np.float32), np.asarray(st.labels)
    clf = make_pipeline(StandardScaler(), LogisticRegression(max_iter=3000))
    pred = cross_val_predict(clf, x, y, cv=StratifiedKFold(5, shuffle=True, random_state=0))
    return float((pred == y).mean() * 100)


# ---------------------------------------------------------------------------------------------------------- report
def machine() -> dict:
    model = platform.processor() or platform.machine()
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        model = next((ln.split(":", 1)[1].strip() for ln in out.splitlines() if ln.startswith("Model name")), model)
    except OSError:
        pass
    import torch

    from tlfx.runtime import cpu_count, cpu_flags

    flags = sorted(cpu_flags() & {"amx_bf16", "avx512_bf16", "avx512f", "amx_tile"})
    return {"cpu": model, "cores": cpu_count(), "bf16_flags": flags, "torch": torch.__version__,
            "python": platform.python_version(), "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")}


def loadavg() -> str:
    try:
        return " ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "?"


def rate(r: dict) -> float:
    return r["n"] / r["seconds"]


def cpu_ms(r: dict) -> float:
    return 1000 * r["cpu_s"] / r["n"]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="few images, one size, no 20k RSS run: tests the script itself")
    ap.add_argument("--n", type=int, default=2000, help="image files per size (default 2000)")
    ap.add_argument("--sizes", default="256,28", help="source sizes of the JPEG files, px (default 256,28)")
    ap.add_argument("--backbones", default="resnet18,efficientnet_lite0")
    ap.add_argument("--repeats", type=int, default=1, help="runs of stages 1 and 3 each, taking turns; best kept")
    ap.add_argument("--model-n", type=int, default=640, help="images timed for the model-only bound (default 640)")
    ap.add_argument("--batch-size", type=int, default=64, help="tlfx batch size (the naive loop uses 32)")
    ap.add_argument("--workers", type=int, default=None, help="tlfx decoding workers (default: tlfx's choice)")
    ap.add_argument("--naive-workers", type=int, default=1, help="DataLoader workers of the naive loop (default 1)")
    ap.add_argument("--rss", default="2000,20000", help="item counts for the peak-RSS runs ('' to skip)")
    ap.add_argument("--rss-size", type=int, default=32, help="network input size of the RSS runs, px (default 32)")
    ap.add_argument("--no-accuracy", action="store_true", help="skip the bf16 vs fp32 accuracy check")
    ap.add_argument("--acc-n", type=int, default=10000, help="accuracy check on this many built-in Fashion-MNIST test "
                    "images at --acc-size px (default 10000: on 2,000 images two fits differ by ~0.45 points by "
                    "chance alone, more than the 0.3 target); 0 = the benchmark's JPEG files at 224 px")
    ap.add_argument("--acc-size", type=int, default=64, help="network input size for --acc-n, px (default 64)")
    ap.add_argument("--workdir", default=None, help="where the JPEG folders and stores go (default: a temp dir)")
    ap.add_argument("--json", default=None, help="also write all measurements to this JSON file")
    ap.add_argument("--report", default=None, metavar="JSON", help="print the table of a saved --json run and exit")
    ap.add_argument("--stage", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--stage-args", default="{}", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    sys.path.insert(0, REPO)

    if a.stage:
        kw = json.loads(a.stage_args)
        fn = {"naive": stage_naive, "model": stage_model, "tlfx": stage_tlfx}[a.stage]
        print(json.dumps(fn(**kw)))
        return 0

    if a.report:
        with open(a.report) as f:
            print_table(json.load(f))
        return 0
    if a.quick:
        a.n, a.sizes, a.model_n, a.repeats = min(a.n, 96), a.sizes.split(",")[-1], 64, 1
        a.rss = "100" if a.rss == "2000,20000" else a.rss
        a.acc_n = 0 if a.acc_n == 10000 else a.acc_n
    sizes = [int(s) for s in a.sizes.split(",") if s]
    backbones = [b for b in a.backbones.split(",") if b]
    tmp = None if a.workdir else tempfile.TemporaryDirectory(prefix="tlfx-bench-")
    work = a.workdir or tmp.name
    os.makedirs(work, exist_ok=True)
    info = machine()
    info["load_before"] = loadavg()
    print(f"# {info['cpu']}, {info['cores']} cores, bf16 flags {info['bf16_flags']}, torch {info['torch']}, "
          f"{info['date']}, load average {info['load_before']}", flush=True)
    folders = {s: make_folder(work, a.n, s) for s in sizes}
    results: dict = {"machine": info, "n": a.n, "rows": [], "rss": [], "rss_size": a.rss_size, "accuracy": {},
                     "openvino": []}
    # a cold OpenVINO cache, so the first model-only run of each variant measures conversion / quantization
    os.environ["TLFX_CACHE_DIR"] = os.path.join(work, "ov-cache")
    shutil.rmtree(os.environ["TLFX_CACHE_DIR"], ignore_errors=True)

    for bb in backbones:
        runs: dict = {("model", 0): []}
        for _ in range(a.repeats):  # the stages take turns, so a burst of other users' load hits them alike
            runs[("model", 0)].append(run_stage("model", backbone=bb, root=folders[sizes[0]], n=min(a.model_n, a.n),
                                                batch_size=a.batch_size))
            for size in sizes:
                runs.setdefault(("naive", size), []).append(
                    run_stage("naive", backbone=bb, root=folders[size], batch_size=32, workers=a.naive_workers))
                runs.setdefault(("tlfx", size), []).append(
                    run_stage("tlfx", backbone=bb, root=folders[size], out=os.path.join(work, f"{bb}-{size}.h5"),
                              batch_size=a.batch_size, workers=a.workers))
        model = runs[("model", 0)]
        for size in sizes:
            naive, ours = runs[("naive", size)], runs[("tlfx", size)]
            best = {k: max(v, key=rate) for k, v in (("naive", naive), ("model", model), ("tlfx", ours))}
            row = {"backbone": bb, "source_px": size, "precision": best["model"]["precision"],
                   **{f"{k}_img_s": rate(r) for k, r in best.items()},
                   **{f"{k}_cpu_ms": cpu_ms(r) for k, r in best.items()},
                   "all_img_s": {k: [round(rate(r), 1) for r in v] for k, v in
                                 (("naive", naive), ("model", model), ("tlfx", ours))}}
            row["ratio_3_1"] = row["tlfx_img_s"] / row["naive_img_s"]
            row["ratio_3_2"] = row["tlfx_img_s"] / row["model_img_s"]
            results["rows"].append(row)
            save(results, a.json)
            print(f"  {bb} {size}px: naive {row['naive_img_s']:.1f}, model {row['model_img_s']:.1f}, "
                  f"tlfx {row['tlfx_img_s']:.1f} images/s (load {loadavg()})", flush=True)
        if have_openvino():
            results["openvino"] += openvino_rows(a, bb, folders, sizes, work, results["rows"])
            save(results, a.json)

    rss_counts = [int(x) for x in a.rss.split(",") if x]
    for count in rss_counts:
        out = os.path.join(work, f"rss-{count}.h5")
        cmd = [sys.executable, "-m", "tlfx.cli", "extract", "--data", "fashion-mnist", "--split", "train", "--limit",
               str(count), "--image-size", str(a.rss_size), "--out", out, "--overwrite", "--quiet"]
        mb, wall = peak_rss_mb(cmd)
        results["rss"].append({"n": count, "peak_rss_mb": mb, "seconds": wall})
        save(results, a.json)

    if not a.no_accuracy and ("efficientnet_lite0" in backbones or a.acc_n):
        if a.acc_n:  # more images than the JPEG folders hold: the built-in dataset at a smaller input size
            spec, extra, what = "fashion-mnist", ["--split", "test", "--limit", str(a.acc_n), "--image-size",
                                                  str(a.acc_size)], f"fashion-mnist test, {a.acc_size} px input"
        else:
            spec, extra, what = f"imagefolder:{folders[sizes[0]]}", [], f"{sizes[0]} px JPEGs, 224 px input"
        paths = {}
        for precision in ("auto", "fp32", *(("int8",) if have_openvino() else ())):
            paths[precision] = os.path.join(work, f"acc-{precision}.h5")
            runtime = "openvino" if precision == "int8" else "torch"
            proc = subprocess.run([sys.executable, "-m", "tlfx.cli", "extract", "--data", spec, *extra, "--precision",
                                   precision, "--runtime", runtime, "--out", paths[precision], "--overwrite", "--quiet"],
                                  capture_output=True, text=True, cwd=REPO)
            if proc.returncode != 0:
                raise SystemExit(f"{precision} extract failed:\n{proc.stderr[-2000:]}")
        from tlfx.store import FeatureStore

        st = FeatureStore(paths["auto"])
        results["accuracy"] = {"precision": st.attrs.get("precision"), "acc": cv_accuracy(paths["auto"]),
                               "fp32_acc": cv_accuracy(paths["fp32"]), "what": what, "n": len(st)}
        if "int8" in paths:
            results["accuracy"]["int8_acc"] = cv_accuracy(paths["int8"])
        save(results, a.json)

    results["machine"]["load_after"] = loadavg()
    print_table(results)
    save(results, a.json)
    if tmp is not None:
        tmp.cleanup()
    return 0


def have_openvino() -> bool:
    try:
        import openvino  # noqa: F401
    except ImportError:
        return False
    return True


OV_VARIANTS = (("openvino", "auto"), ("openvino", "int8"))  # auto: bf16 on CPUs with AVX512-BF16/AMX, else fp32


def openvino_rows(a, bb: str, folders: dict, sizes: list, work: str, torch_rows: list) -> list[dict]:
    """OpenVINO bf16/fp32 and INT8: model only (first run on a cold cache, then a timed warm one) and tlfx end to end."""
    rows = []
    for runtime, precision in OV_VARIANTS:
        kw = {"backbone": bb, "runtime": runtime, "precision": precision}
        first = run_stage("model", root=folders[sizes[0]], n=min(a.model_n, a.n), batch_size=a.batch_size, **kw)
        models = [first] + [run_stage("model", root=folders[sizes[0]], n=min(a.model_n, a.n), batch_size=a.batch_size,
                                      **kw) for _ in range(a.repeats)]
        for size in sizes:
            ours = [run_stage("tlfx", root=folders[size], out=os.path.join(work, f"{bb}-{size}-{precision}-ov.h5"),
                              batch_size=a.batch_size, workers=a.workers, **kw) for _ in range(a.repeats)]
            torch_row = next(r for r in torch_rows if r["backbone"] == bb and r["source_px"] == size)
            model, best = max(models[1:], key=rate), max(ours, key=rate)
            row = {"backbone": bb, "source_px": size, "precision": model["precision"], "model_img_s": rate(model),
                   "tlfx_img_s": rate(best), "first_build_s": first["build_s"], "warm_build_s": models[-1]["build_s"],
                   "vs_tlfx_torch": rate(best) / torch_row["tlfx_img_s"], "vs_naive": rate(best) / torch_row["naive_img_s"],
                   "of_model": rate(best) / rate(model)}
            rows.append(row)
            print(f"  {bb} {size}px OpenVINO {row['precision']}: model {row['model_img_s']:.1f}, tlfx "
                  f"{row['tlfx_img_s']:.1f} images/s, first build {row['first_build_s']:.1f} s", flush=True)
    return rows


def save(results: dict, path: str | None):
    """Write what has been measured so far (a long run that is cut short still leaves its rows)."""
    if path:
        with open(path, "w") as f:
            json.dump(results, f, indent=1)


def print_table(res: dict):
    m = res["machine"]
    print()
    print(f"machine: {m['cpu']}, {m['cores']} cores, bf16 flags: {', '.join(m['bf16_flags']) or 'none'}; "
          f"torch {m['torch']}, Python {m['python']}; {m['date']}")
    print(f"load average (1, 5, 15 min): before {m['load_before']}, after {m.get('load_after', '?')}")
    print(f"{res['n']} JPEG files per source size, 224 px network input; images/s (CPU ms per image)")
    print()
    print("| backbone | source | precision | 1 naive | 2 model only | 3 tlfx.extract | 3/1 | 3/2 | 3/1 CPU | 3/2 CPU |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in res["rows"]:
        t1, t2 = TARGET_NAIVE.get(r["backbone"], 0), TARGET_UPPER

        def mark(v, t):
            return "" if not t else (" ok" if v >= t else f" (target {t})")

        c1, c2 = r["naive_cpu_ms"] / r["tlfx_cpu_ms"], r["model_cpu_ms"] / r["tlfx_cpu_ms"]
        print(f"| {r['backbone']} | {r['source_px']} px JPEG | {r['precision']} "
              f"| {r['naive_img_s']:.1f} ({r['naive_cpu_ms']:.1f}) | {r['model_img_s']:.1f} ({r['model_cpu_ms']:.1f}) "
              f"| {r['tlfx_img_s']:.1f} ({r['tlfx_cpu_ms']:.1f}) | {r['ratio_3_1']:.2f}{mark(r['ratio_3_1'], t1)} "
              f"| {r['ratio_3_2']:.2f}{mark(r['ratio_3_2'], t2)} | {c1:.2f}{mark(c1, t1)} | {c2:.2f}{mark(c2, t2)} |")
    print("(3/1 CPU = naive CPU ms per image / tlfx CPU ms per image: the ratio that other users' load moves least)")
    if any(len(v) > 1 for r in res["rows"] for v in r["all_img_s"].values()):
        print()
        for r in res["rows"]:
            print(f"all runs {r['backbone']} {r['source_px']} px: {r['all_img_s']}")
    if res["rss"]:
        print()
        print(f"| tlfx extract (fashion-mnist train, {res['rss_size']} px) | peak RSS | wall |")
        print("|---|---|---|")
        for r in res["rss"]:
            print(f"| {r['n']} images | {r['peak_rss_mb']:.0f} MB | {r['seconds']:.0f} s |")
        if len(res["rss"]) > 1:
            ratio = res["rss"][-1]["peak_rss_mb"] / res["rss"][0]["peak_rss_mb"]
            print(f"peak RSS ratio {res['rss'][-1]['n']} / {res['rss'][0]['n']}: {ratio:.2f} (target <= 1.2)")
    if res.get("openvino"):
        print()
        print("| backbone | source | OpenVINO precision | model only | tlfx.extract | x tlfx torch | x naive | of model | "
              "first-run conversion | cached build |")
        print("|---|---|---|---|---|---|---|---|---|---|")
        for r in res["openvino"]:
            print(f"| {r['backbone']} | {r['source_px']} px JPEG | {r['precision']} | {r['model_img_s']:.1f} "
                  f"| {r['tlfx_img_s']:.1f} | {r['vs_tlfx_torch']:.2f} | {r['vs_naive']:.2f} | {r['of_model']:.2f} "
                  f"| {r['first_build_s']:.1f} s | {r['warm_build_s']:.1f} s |")
        print("(targets, resnet18, best runtime: x tlfx torch >= 2, x naive >= 6; of model >= 0.85)")
    acc = res.get("accuracy")
    if acc:
        d = abs(acc["acc"] - acc["fp32_acc"])
        print()
        print(f"logistic regression (standardised, 5-fold CV) on efficientnet_lite0 features of {acc['n']} "
              f"Fashion-MNIST images ({acc.get('what', '')}): {acc['precision']} {acc['acc']:.2f}%, fp32 "
              f"{acc['fp32_acc']:.2f}%, {d:.2f} points apart (target <= 0.3)")
        if "int8_acc" in acc:
            print(f"OpenVINO INT8 {acc['int8_acc']:.2f}%, {abs(acc['int8_acc'] - acc['fp32_acc']):.2f} points from "
                  f"torch fp32 (target <= 0.3)")


if __name__ == "__main__":
    sys.exit(main())
