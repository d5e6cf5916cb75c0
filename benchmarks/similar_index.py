"""Where a faiss index starts to pay for ``tlfx similar``: exact chunked search vs faiss, on generated vectors.

For each size N it generates N clustered 1280-d float32 vectors (N/100 Gaussian clusters, ReLU'd like CNN features,
L2-normalised, 1% of rows near-copies of another row) in a fresh process, then measures, with the code tlfx runs
(:mod:`tlfx.similar`'s block size, IVF parameters and nprobe):

* query mode, 100 queries, k=10: exact numpy in blocks of rows; faiss IndexFlatIP; tlfx's IndexIVFFlat; and
  IndexHNSWFlat (M=32, efConstruction 40, efSearch 64; only up to ``--hnsw-max`` rows, its build is the slowest);
  build time, query time, recall@10 against exact, the index's own memory (RSS growth while it is built);
* duplicate pairs (cosine >= 0.98): exact blocked products, timed on ``--sample`` query rows and scaled to the
  N/2 rows of the upper triangle, vs ``tlfx.similar._pairs_faiss`` run whole (IVF build, then each cell against
  its nearest cells by blocked products); recall is over the exact pairs of the sample rows.

Reading the store from HDF5 costs the same for every method and is left out. Run on an otherwise idle machine:

    PYTHONPATH=. .venv/bin/python benchmarks/similar_index.py             # 10k, 50k, 200k: ~4 minutes, busy 2 cores
    PYTHONPATH=. .venv/bin/python benchmarks/similar_index.py --sizes 1000000 --hnsw-max 0   # ~20 GB RAM
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

import numpy as np

D = 1280


def rss_mib() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def generate(n: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((max(10, n // 100), D), dtype=np.float32)
    x = np.empty((n, D), np.float32)
    for a in range(0, n, 8192):
        b = min(a + 8192, n)
        blk = centres[rng.integers(0, len(centres), b - a)] + 0.7 * rng.standard_normal((b - a, D), dtype=np.float32)
        x[a:b] = np.maximum(blk, 0)
    dup = rng.choice(n, n // 100, replace=False)
    x[dup] = x[rng.integers(0, n, len(dup))] + 0.02 * np.abs(rng.standard_normal((len(dup), D), dtype=np.float32))
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x


def exact_topk(x: np.ndarray, q: np.ndarray, k: int, block: int) -> np.ndarray:
    best_s = np.full((len(q), 0), -np.inf, np.float32)
    best_i = np.empty((len(q), 0), np.int64)
    for a in range(0, len(x), block):
        s = q @ x[a:a + block].T
        best_s = np.concatenate([best_s, s], 1)
        best_i = np.concatenate([best_i, np.broadcast_to(np.arange(a, a + s.shape[1]), s.shape)], 1)
        keep = np.argpartition(-best_s, k - 1, axis=1)[:, :k]
        best_s, best_i = np.take_along_axis(best_s, keep, 1), np.take_along_axis(best_i, keep, 1)
    return best_i


def recall(got: np.ndarray, truth: np.ndarray) -> float:
    return float(np.mean([len(set(g) & set(t)) / len(t) for g, t in zip(got, truth)]))


def one(n: int, nq: int, sample: int, hnsw_max: int, threshold: float) -> list[dict]:
    import faiss

    from tlfx import similar as S

    t = time.perf_counter()
    x = generate(n)
    gen_s = time.perf_counter() - t
    rng = np.random.default_rng(1)
    q = x[rng.choice(n, nq, replace=False)] + 0.01 * rng.standard_normal((nq, D), dtype=np.float32)
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    k = 10
    out = []
    base = {"n": n, "gen_s": round(gen_s, 1)}

    t = time.perf_counter()
    truth = exact_topk(x, q, k, S.BLOCK_ROWS)
    out.append({**base, "mode": "query", "method": "exact (numpy blocks)", "build_s": 0.0,
                "query_s": time.perf_counter() - t, "recall": 1.0, "index_mib": 0.0})

    def timed_index(name, build, **search_params):
        r0 = rss_mib()
        t = time.perf_counter()
        ix = build()
        b = time.perf_counter() - t
        mem = rss_mib() - r0
        for key, v in search_params.items():
            setattr(ix if key == "nprobe" else ix.hnsw, key, v)
        t = time.perf_counter()
        _, got = ix.search(q, k)
        out.append({**base, "mode": "query", "method": name, "build_s": b, "query_s": time.perf_counter() - t,
                    "recall": recall(got, truth), "index_mib": mem})
        return ix

    def flat():
        ix = faiss.IndexFlatIP(D)
        ix.add(x)
        return ix

    class _Store:  # the two things tlfx.similar._ivf reads of a store, over the in-memory array
        attrs = {"dim": D}

        def __len__(self):
            return n

    import tlfx.similar as sim

    def blocks(_store, rows):
        for a in range(0, n, rows):
            yield a, x[a:a + rows], None, None

    sim.iter_blocks = blocks  # the benchmark's vectors are in memory; _ivf's own code builds the index
    timed_index("faiss IndexFlatIP", flat)
    ivf = timed_index(f"faiss IVFFlat nprobe {S.IVF_NPROBE}", lambda: S._ivf(faiss, _Store(), S.BLOCK_ROWS))
    out[-1]["method"] += f" (nlist {ivf.nlist})"
    ivf_build = out[-1]["build_s"]
    if n <= hnsw_max:
        def hnsw():
            ix = faiss.IndexHNSWFlat(D, 32, faiss.METRIC_INNER_PRODUCT)
            ix.hnsw.efConstruction = 40
            ix.add(x)
            return ix
        timed_index("faiss HNSWFlat M32 ef64", hnsw, efSearch=64)

    # duplicate pairs: exact blocked products vs the IVF range search, on `sample` query rows scaled to all rows
    rows = np.sort(rng.choice(n, min(sample, n), replace=False))
    t = time.perf_counter()
    truth_pairs = set()
    for a in range(0, len(rows), 1024):
        r = rows[a:a + 1024]
        for b in range(0, n, S.BLOCK_ROWS):
            s = x[r] @ x[b:b + S.BLOCK_ROWS].T
            ii, jj = np.nonzero(s >= threshold - 1e-6)
            truth_pairs |= {(int(r[i]), b + int(j)) for i, j in zip(ii, jj) if r[i] != b + j}
    ex = (time.perf_counter() - t) * (n / 2) / len(rows)
    out.append({**base, "mode": "duplicates", "method": "exact (numpy blocks)", "build_s": 0.0, "query_s": ex,
                "recall": 1.0, "index_mib": 0.0, "pairs": len(truth_pairs)})
    t = time.perf_counter()
    found, _ = S._pairs_faiss(_Store(), threshold, S.BLOCK_ROWS)  # tlfx's own code: builds its index, all rows
    total = time.perf_counter() - t
    sample_rows = set(rows.tolist())
    got_pairs = {(p, q) for _, i, j in found for p, q in ((i, j), (j, i)) if p in sample_rows}
    out.append({**base, "mode": "duplicates", "method": f"faiss IVFFlat cells, {S.IVF_NPROBE} nearest",
                "build_s": ivf_build, "query_s": max(0.0, total - ivf_build),
                "recall": len(got_pairs & truth_pairs) / max(1, len(truth_pairs)), "index_mib": 0.0,
                "pairs": len(truth_pairs)})
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", default="10000,50000,200000")
    ap.add_argument("--queries", type=int, default=100)
    ap.add_argument("--sample", type=int, default=2000, help="query rows timed for duplicate pairs (scaled to N)")
    ap.add_argument("--hnsw-max", type=int, default=50000, help="largest N given an HNSW index")
    ap.add_argument("--threshold", type=float, default=0.98)
    ap.add_argument("--one", type=int, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--json", default=None, help="also write every measurement to this file")
    a = ap.parse_args(argv)
    if a.one is not None:
        res = one(a.one, a.queries, a.sample, a.hnsw_max, a.threshold)
        res[0]["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        print(json.dumps(res))
        return
    allres = []
    for n in [int(s) for s in a.sizes.split(",")]:
        cmd = [sys.executable, os.path.abspath(__file__), "--one", str(n), "--queries", str(a.queries),
               "--sample", str(a.sample), "--hnsw-max", str(a.hnsw_max), "--threshold", str(a.threshold)]
        proc = subprocess.run(cmd, capture_output=True, text=True, check=True)
        res = json.loads(proc.stdout.strip().splitlines()[-1])
        allres += res
        print(f"N={n}: generated in {res[0]['gen_s']} s, process peak RSS {res[0]['peak_rss_mib']:.0f} MiB "
              f"(vectors {n * D * 4 / 2**20:.0f} MiB)", file=sys.stderr)
    print("| rows | mode | method | build s | search s | build+search s | recall@10 / pair recall | index MiB |")
    print("|---:|---|---|---:|---:|---:|---:|---:|")
    for r in allres:
        print(f"| {r['n']:,} | {r['mode']} | {r['method']} | {r['build_s']:.2f} | {r['query_s']:.2f} | "
              f"{r['build_s'] + r['query_s']:.2f} | {r['recall']:.3f} | {r['index_mib']:.0f} |")
    print("\nsearch s: query mode = 100 queries, k=10; duplicates = all rows' pairs >= threshold, scaled from "
          f"{a.sample} sampled rows. Pairs in the sample: " +
          ", ".join(f"N={r['n']:,}: {r['pairs']}" for r in allres if r.get("pairs") is not None and "exact" in r["method"]))
    if a.json:
        with open(a.json, "w") as f:
            json.dump(allres, f, indent=1)


if __name__ == "__main__":
    main()
