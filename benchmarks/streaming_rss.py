"""Heads on stores larger than memory: peak RSS and fit time of ``tlfx fit --stream`` as the store grows.

One command, one table (docs/performance.md, "Heads on stores larger than memory")::

    .venv/bin/python benchmarks/streaming_rss.py                       # 50k and 250k rows: ~13 min on a busy 2-core machine
    .venv/bin/python benchmarks/streaming_rss.py --sizes 200000,1000000
    .venv/bin/python benchmarks/streaming_rss.py --large               # adds 2M rows (10 GB on disk, 20 GB while written)

For each size N it writes a synthetic training store of N rows x 1280 float32 features (``--dim``) with tlfx's own
store writer (parts, then the join): 10 Gaussian blobs, rows sorted by class like an image-folder extraction, plus
one test store of 10,000 rows from the same blobs. Then, each in a fresh child process, it runs
``tlfx fit --head linear --stream`` and ``tlfx fit --head sgd --stream`` (``--param epochs=E``) and reads the child's
own peak RSS (``os.wait4`` rusage ``ru_maxrss``: that process alone, not the running maximum over all children that
``getrusage(RUSAGE_CHILDREN)`` reports; the stores are written by another child, because Linux carries a parent's
peak RSS over fork and exec into the child's ``ru_maxrss``) and wall time; ``tlfx evaluate`` on the test store
gives the accuracy. At the smallest size the same fits also run in memory (``--no-stream``) for contrast. The
stores are removed at the end (``--keep`` keeps them).
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np

PART_ROWS = 65536
CLASSES = 10


def blobs(seed: int, dim: int):
    """Class centres: far enough apart that a linear head separates them well, close enough not to be trivial."""
    rng = np.random.default_rng(seed)
    return rng.normal(0, 1, (CLASSES, dim)).astype(np.float32) * (3.0 / np.sqrt(dim)) * 2.0


def write_store(path: str, n: int, dim: int, centres, seed: int, sorted_by_class: bool = True):
    """A complete store of ``n`` rows written part by part (memory: one part) with tlfx's StoreWriter."""
    from tlfx.store import StoreWriter, store_attrs_base

    attrs = {**store_attrs_base(), "backbone": "synthetic:blobs", "dtype": "float32", "dataset": "synthetic:blobs",
             "split": "all", "data_root": "", "limit": 0, "dataset_fingerprint": f"blobs-{dim}", "n_items": n,
             "part_size": PART_ROWS, "class_names": [f"c{i}" for i in range(CLASSES)]}
    rng = np.random.default_rng(seed)
    with StoreWriter(path, attrs, overwrite=True) as w:
        for a in range(0, n, PART_ROWS):
            b = min(a + PART_ROWS, n)
            idx = np.arange(a, b)
            y = idx * CLASSES // n if sorted_by_class else rng.integers(0, CLASSES, b - a)
            X = centres[y] + rng.normal(0, 1, (b - a, dim)).astype(np.float32)
            w.write_part(a, b, X, y, [str(i) for i in idx], [])
        w.finalize()


def write_store_in_child(path: str, n: int, dim: int, seed: int, sorted_by_class: bool):
    """Write a store from a separate process: Linux carries a process's peak RSS across fork and exec, so a parent
    that had written a large store itself would pass its own peak on to every fit it starts."""
    subprocess.run([sys.executable, os.path.abspath(__file__), "--write-store", path, str(n), str(dim), str(seed),
                    str(int(sorted_by_class))], check=True)


def run_child(args: list[str]) -> tuple[float, float, str]:
    """Run ``python -m tlfx.cli ARGS`` in a fresh process: (peak RSS in MiB of that process, seconds, stdout)."""
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        t0 = time.perf_counter()
        p = subprocess.Popen([sys.executable, "-m", "tlfx.cli", *args], stdout=out, stderr=err, text=True)
        _, status, usage = os.wait4(p.pid, 0)  # this child's own rusage (ru_maxrss in KiB on Linux)
        p.returncode = os.waitstatus_to_exitcode(status)
        seconds = time.perf_counter() - t0
        out.seek(0)
        err.seek(0)
        if p.returncode != 0:
            raise SystemExit(f"tlfx {' '.join(args)} failed ({p.returncode}):\n{err.read()[-2000:]}")
        return usage.ru_maxrss / 1024, seconds, out.read()


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="50000,250000", help="training rows, comma separated (default: 50000,250000)")
    ap.add_argument("--large", action="store_true", help="add 2,000,000 rows (10 GB on disk)")
    ap.add_argument("--dim", type=int, default=1280, help="features per row (default 1280)")
    ap.add_argument("--heads", default="linear,sgd")
    ap.add_argument("--epochs", type=int, default=2, help="--param epochs=E for every fit (default 2)")
    ap.add_argument("--no-memory", action="store_true", help="skip the in-memory (--no-stream) fits")
    ap.add_argument("--dir", default=None, help="where to write the stores (default: a temporary directory)")
    ap.add_argument("--keep", action="store_true", help="keep the stores")
    ap.add_argument("--write-store", nargs=5, metavar=("PATH", "N", "DIM", "SEED", "SORTED"), help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.write_store:
        path, n, dim, seed, srt = a.write_store
        write_store(path, int(n), int(dim), blobs(0, int(dim)), int(seed), bool(int(srt)))
        return
    sizes = [int(s) for s in a.sizes.split(",") if s.strip()] + ([2_000_000] if a.large else [])
    heads = [h.strip() for h in a.heads.split(",") if h.strip()]
    work = a.dir or tempfile.mkdtemp(prefix="tlfx-stream-")
    os.makedirs(work, exist_ok=True)
    rows = []
    try:
        test = os.path.join(work, "test.h5")
        write_store_in_child(test, 10_000, a.dim, seed=1, sorted_by_class=False)
        for n in sizes:
            path = os.path.join(work, f"train-{n}.h5")
            t0 = time.perf_counter()
            write_store_in_child(path, n, a.dim, seed=2, sorted_by_class=True)
            gb = os.path.getsize(path) / 1e9
            print(f"wrote {n} x {a.dim} store ({gb:.2f} GB) in {time.perf_counter() - t0:.0f} s", flush=True)
            modes = ["--stream"] + (["--no-stream"] if n == min(sizes) and not a.no_memory else [])
            for head in heads:
                for mode in modes:
                    model = os.path.join(work, f"{head}-{n}{mode}.tlfx")
                    rss, secs, out = run_child(["fit", "--features", path, "--head", head, mode,
                                                "--param", f"epochs={a.epochs}", "--out", model])
                    fit_s = float(re.search(r" in ([0-9.]+) s", out).group(1))
                    _, _, ev = run_child(["evaluate", "--model", model, "--features", test])
                    acc = float(re.search(r"accuracy ([0-9.]+)", ev).group(1))
                    rows.append((n, gb, head, "stream" if mode == "--stream" else "in memory", rss, fit_s, secs, acc))
                    print(f"  {head:6s} {rows[-1][3]:9s} peak RSS {rss:7.0f} MiB  fit {fit_s:6.1f} s  "
                          f"(process {secs:6.1f} s)  test accuracy {acc:.4f}", flush=True)
            if not a.keep:
                os.remove(path)
    finally:
        if not a.keep and not a.dir:
            shutil.rmtree(work, ignore_errors=True)
    print()
    print("| rows | store GB | head | mode | peak RSS MiB | fit s | process s | test accuracy |")
    print("|---:|---:|---|---|---:|---:|---:|---:|")
    for n, gb, head, mode, rss, fit_s, secs, acc in rows:
        print(f"| {n:,} | {gb:.2f} | {head} | {mode} | {rss:.0f} | {fit_s:.1f} | {secs:.1f} | {acc:.4f} |")


if __name__ == "__main__":
    main()
