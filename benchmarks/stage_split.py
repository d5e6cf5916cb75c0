"""Where extraction's time goes: CPU seconds per image of each stage of ``tlfx extract``, and the bound they set.

One command, one table (see benchmarks/README.md and docs/performance.md)::

    .venv/bin/python benchmarks/stage_split.py                 # 2,000 JPEG files at 256 and 28 px, ~2-3 minutes
    .venv/bin/python benchmarks/stage_split.py --quick         # seconds: checks the script itself
    .venv/bin/python benchmarks/stage_split.py --runtimes torch,openvino   # skip INT8 (its calibration costs time)

Each stage runs tlfx's own code, in the order extraction runs it, one batch of ``--batch-size`` files at a time:

- list: ``tlfx.load_dataset("imagefolder:...")`` and the dataset's fingerprint (a ``stat`` per file);
- read: ``tlfx.images.open_regular`` and reading the file's bytes;
- decode: ``tlfx.images.open_image`` on those bytes, with the JPEG draft target ``pre.resize``;
- resize: what ``tlfx.pipeline.DecodedImages`` and ``collate`` do: Pillow's box resize + centre crop per image
  (``preprocess_image``), or, for images smaller than the input, one batched torch resize (``batch_resize``);
- normalise: ``tlfx.pipeline.Normalizer`` (torch only; OpenVINO's graph takes the uint8 batch and normalises inside);
- network: ``FeatureComputer``'s network (torch: autocast, channels_last, inference_mode) or its OpenVINO model,
  features to float32 numpy;
- write: the HDF5 part(s) (``StoreWriter.write_part``) and the final join (``finalize``).

For every stage it prints CPU ms per image (``time.process_time``: every thread of this process; the measure that
other users' load moves least) and wall ms per image. The stages run one after another on one thread, except the
network, which uses all of torch's / OpenVINO's threads as in extraction. A second row, "loader", runs
``FeatureComputer.loader`` as extraction does (threads or worker processes) over the same files, to show what
decoding costs there.

The bound: with C cores, end to end can run at most C / (sum of the stages' CPU s per image) images/s, while the
model-only rate is at most C / (network CPU s per image). Their ratio, the network's share of the CPU, is the best
end to end can reach against the model-only rate. It is compared with the measured ratio of a saved
``extract_speed.py --json`` run (``--measured``, default the 2026-12-02 results) and with a second, serial model of
what extraction does on 2 cores (decoding takes turns with the network instead of overlapping it): measured
model-only ms per image + the other stages' CPU ms per image (on one core) + the run's one-off build spread over
its files.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import sys
import tempfile
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path.insert(0, HERE)
sys.path.insert(0, REPO)

from extract_speed import WEIGHTS, loadavg, machine, make_folder, save  # noqa: E402

RUNTIMES = {"torch": ("torch", "auto"), "openvino": ("openvino", "auto"), "openvino-int8": ("openvino", "int8")}
STAGES = ("list", "read", "decode", "resize", "normalise", "network", "write")
TARGET = 0.85
MEASURED = os.path.join(HERE, "results-2026-12-02-cpu.json")


class Clock:
    """Accumulates CPU seconds (all threads of this process) and wall seconds over the blocks it times."""

    def __init__(self):
        self.cpu = self.wall = 0.0

    def __enter__(self):
        self._c, self._t = time.process_time(), time.perf_counter()
        return self

    def __exit__(self, *exc):
        self.cpu += time.process_time() - self._c
        self.wall += time.perf_counter() - self._t


def per_image(clock: Clock, n: int) -> dict:
    return {"cpu_ms": 1000 * clock.cpu / max(n, 1), "wall_ms": 1000 * clock.wall / max(n, 1), "n": n}


def input_stages(root: str, n: int, batch_size: int, pre, keep: int) -> tuple[dict, list, object]:
    """list, read, decode, resize for ``n`` files; returns (stage -> per image, the first ``keep`` uint8 batches, ds)."""
    from tlfx.datasets import load_dataset
    from tlfx.images import open_image, open_regular, preprocess_image
    from tlfx.pipeline import BATCH_RESIZE, DecodedImages, collate

    clocks = {s: Clock() for s in ("list", "read", "decode", "resize")}
    with clocks["list"]:
        ds = load_dataset(f"imagefolder:{root}", limit=n)
        ds.fingerprint()
    batch_resize = pre.interpolation in BATCH_RESIZE  # DecodedImages' default
    batches = []
    for s in range(0, len(ds), batch_size):
        chunk = range(s, min(s + batch_size, len(ds)))
        with clocks["read"]:
            data = []
            for i in chunk:
                with open_regular(ds.path(i)) as f:
                    data.append(f.read())
        with clocks["decode"]:
            imgs = [open_image(io.BytesIO(b), target=pre.resize) for b in data]
        with clocks["resize"]:
            items = []
            for i, img in zip(chunk, imgs):
                if batch_resize and min(img.size) < pre.resize:
                    items.append((i, np.asarray(img, dtype=np.uint8), ""))
                else:
                    items.append((i, preprocess_image(img, pre), ""))
            arr = collate(items, pre)[2]
        if s == 0:  # the split stages give exactly the pixels that extraction's own item loader gives
            ref = collate([DecodedImages(ds, pre)[i] for i in chunk], pre)[2]
            if not np.array_equal(ref.numpy(), arr.numpy()):
                raise SystemExit("the split stages do not reproduce tlfx.pipeline.DecodedImages' pixels")
        if sum(len(b) for b in batches) < keep:
            batches.append(arr)
    return {k: per_image(c, len(ds)) for k, c in clocks.items()}, batches, ds


def loader_stage(computer, ds, batch_size: int, workers) -> dict:
    """read + decode + resize as extraction runs them: ``FeatureComputer.loader`` (threads or worker processes)."""
    import resource

    def cpu():
        s, c = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
        return s.ru_utime + s.ru_stime + c.ru_utime + c.ru_stime

    from tlfx.runtime import decode_threads, default_workers

    w = default_workers() if workers is None else workers
    c0, t0, done = cpu(), time.perf_counter(), 0
    for _idx, good, _arr, _bad in computer.loader(ds, range(len(ds)), batch_size, workers):
        done += len(good)
    c, t = cpu() - c0, time.perf_counter() - t0
    how = f"{w} worker processes" if w > 0 else f"{decode_threads()} threads"
    return {"cpu_ms": 1000 * c / max(done, 1), "wall_ms": 1000 * t / max(done, 1), "n": done, "how": how}


def network_stage(computer, batches: list) -> tuple[dict, dict, np.ndarray]:
    """(normalise, network) per image over ``batches`` after one warm-up batch; and the features."""
    import torch

    import tlfx

    norm, net = Clock(), Clock()
    ov = computer._openvino

    def forward(arr, timed: bool):
        if ov is not None:  # uint8 in: the OpenVINO graph normalises
            with net if timed else Clock():
                return ov(arr)
        with norm if timed else Clock():
            x = computer.normalize(arr)
        with net if timed else Clock():
            with torch.inference_mode(), tlfx.runtime.autocast(computer.device, computer.precision):
                return computer._forward(x).float().cpu().numpy()

    forward(batches[0], timed=False)  # warm-up: oneDNN / OpenVINO build their kernels on the first call
    feats = [forward(arr, timed=True) for arr in batches]
    n = sum(len(b) for b in batches)
    return (per_image(norm, n) if ov is None else None), per_image(net, n), np.concatenate(feats)


def write_stage(computer, bb, ds, feats: np.ndarray, out: str, batch_size: int) -> dict:
    """The store's parts and final join for all of ``ds`` (feature rows repeated from those computed)."""
    from tlfx.extraction import store_attributes
    from tlfx.store import StoreWriter

    n = len(ds)
    rows = np.resize(feats, (n, feats.shape[1])).astype(np.float32)
    part_size = max(batch_size, (2048 // batch_size) * batch_size)  # extract's default
    config = {**bb.config(computer.layers, "avg", None), "runtime": computer.runtime, "tta": computer.tta}
    attrs = store_attributes(ds, config, computer.precision, "float32", None, None, part_size)
    clock = Clock()
    with clock, StoreWriter(out, attrs, overwrite=True) as writer:
        for s in range(0, n, part_size):
            e = min(n, s + part_size)
            writer.write_part(s, e, rows[s:e], ds.labels[s:e], [ds.ids[i] for i in range(s, e)], [])
        writer.finalize({"seconds": 0.0})
    return per_image(clock, n)


def build(backbone: str, runtime: str, precision: str, calibration):
    import torch

    import tlfx
    from tlfx.extraction import FeatureComputer

    torch.manual_seed(0)  # random-weight backbones: the same network as extract_speed.py's (one OpenVINO cache entry)
    bb = tlfx.create_backbone(backbone, WEIGHTS.get(backbone))
    t0 = time.perf_counter()
    computer = FeatureComputer(bb, precision=precision, device="cpu", runtime=runtime,
                               calibration=calibration if precision == "int8" else None)
    return bb, computer, time.perf_counter() - t0


def bound(stages: dict, cores: int) -> dict:
    """The CPU budget: predicted e2e / model-only ratio and what the other stages must shrink to for TARGET."""
    net = stages["network"]["cpu_ms"]
    total = sum(v["cpu_ms"] for v in stages.values() if v)
    other = total - net
    budget = net * (1 / TARGET - 1)
    biggest = max((k for k in stages if k != "network" and stages[k]), key=lambda k: stages[k]["cpu_ms"])
    return {"total_cpu_ms": total, "network_cpu_ms": net, "other_cpu_ms": other, "predicted_ratio": net / total,
            "e2e_max_img_s": 1000 * cores / total, "model_max_img_s": 1000 * cores / net,
            "other_budget_ms": budget, "other_shrink": max(0.0, 1 - budget / other) if other else 0.0,
            "biggest": biggest, "biggest_cpu_ms": stages[biggest]["cpu_ms"],
            "biggest_needed_ms": stages[biggest]["cpu_ms"] - max(0.0, other - budget)}


def measured_runs(path: str | None, backbone: str) -> dict:
    """(runtime label, source px) -> what a saved extract_speed.py --json run measured: the e2e / model-only ratio,
    the model-only images/s, the cached build's seconds (OpenVINO) and the run's file count."""
    if not path or not os.path.isfile(path):
        return {}
    with open(path) as f:
        res = json.load(f)
    out = {}
    for r in res.get("rows", []):
        if r["backbone"] == backbone:
            out[("torch", r["source_px"])] = {"ratio": r["ratio_3_2"], "model_img_s": r["model_img_s"],
                                              "build_s": None, "n": res["n"]}
    for r in res.get("openvino", []):
        if r["backbone"] == backbone:
            label = "openvino-int8" if r["precision"] == "int8" else "openvino"
            out[(label, r["source_px"])] = {"ratio": r["of_model"], "model_img_s": r["model_img_s"],
                                            "build_s": r["warm_build_s"], "n": res["n"]}
    return out


def serial_ratio(row: dict) -> float | None:
    """The ratio if the other stages ran *between* the network's batches on one core (as on 2 cores, where decoding
    takes turns with the network) and the run paid its build once: measured model-only ms per image + the other
    stages' CPU ms per image + build seconds spread over the measured run's files."""
    m = row.get("measured")
    if not m:
        return None
    t_model = 1000 / m["model_img_s"]
    build_s = m["build_s"] if m["build_s"] is not None else row["build_s"]
    return t_model / (t_model + row["bound"]["other_cpu_ms"] + 1000 * build_s / m["n"])


def run(a) -> dict:
    import torch

    tmp = None if a.workdir else tempfile.TemporaryDirectory(prefix="tlfx-stages-")
    work = a.workdir or tmp.name
    os.makedirs(work, exist_ok=True)
    info = machine()
    info["load_before"] = loadavg()
    info["torch_threads"] = torch.get_num_threads()
    print(f"# {info['cpu']}, {info['cores']} cores, torch threads {info['torch_threads']}, {info['date']}, "
          f"load average {info['load_before']}", flush=True)
    sizes = [int(s) for s in a.sizes.split(",") if s]
    runtimes = [r for r in a.runtimes.split(",") if r]
    for r in runtimes:
        if r not in RUNTIMES:
            raise SystemExit(f"unknown runtime {r!r}; valid: {', '.join(RUNTIMES)}")
    folders = {s: make_folder(work, a.n, s) for s in sizes}
    measured = measured_runs(a.measured, a.backbone)
    res = {"machine": info, "backbone": a.backbone, "n": a.n, "net_n": a.net_n, "batch_size": a.batch_size,
           "rows": []}
    computers = {}
    for label in runtimes:
        runtime, precision = RUNTIMES[label]
        from tlfx.datasets import load_dataset

        calib = load_dataset(f"imagefolder:{folders[sizes[0]]}", limit=a.n) if precision == "int8" else None
        computers[label] = build(a.backbone, runtime, precision, calib)
        print(f"  built {label} ({computers[label][1].precision}) in {computers[label][2]:.1f} s", flush=True)
    pre = next(iter(computers.values()))[1].pre
    for size in sizes:
        inputs, batches, ds = input_stages(folders[size], a.n, a.batch_size, pre, a.net_n)
        loader = None
        if not a.no_loader:
            loader = loader_stage(next(iter(computers.values()))[1], ds, a.batch_size, a.workers)
        for label, (bb, computer, build_s) in computers.items():
            norm, net, feats = network_stage(computer, batches)
            write = write_stage(computer, bb, ds, feats, os.path.join(work, f"stages-{size}-{label}.h5"), a.batch_size)
            stages = {**inputs, "normalise": norm, "network": net, "write": write}
            row = {"source_px": size, "runtime": label, "precision": computer.precision, "build_s": build_s,
                   "stages": stages, "loader": loader, "bound": bound(stages, info["cores"]),
                   "measured": measured.get((label, size))}
            res["rows"].append(row)
            b = row["bound"]
            print(f"  {size} px {label}: network {net['cpu_ms']:.2f} of {b['total_cpu_ms']:.2f} CPU ms per image, "
                  f"predicted ratio {b['predicted_ratio']:.2f}", flush=True)
        save(res, a.json)
    res["machine"]["load_after"] = loadavg()
    save(res, a.json)
    if tmp is not None:
        tmp.cleanup()
    return res


def print_table(res: dict):
    m = res["machine"]
    print()
    print(f"machine: {m['cpu']}, {m['cores']} cores, torch threads {m.get('torch_threads', '?')}; torch {m['torch']}; "
          f"{m['date']}")
    print(f"load average (1, 5, 15 min): before {m['load_before']}, after {m.get('load_after', '?')}")
    print(f"{res['backbone']}, {res['n']} JPEG files per source size, network on the first {res['net_n']} at batch "
          f"{res['batch_size']}; CPU ms per image (wall ms per image)")
    print()
    print("| source | runtime | " + " | ".join(STAGES) + " | total | network share = CPU bound on e2e/model "
          "| serial model | measured |")
    print("|---|---|" + "---|" * (len(STAGES) + 4))
    for r in res["rows"]:
        st, b = r["stages"], r["bound"]
        cells = [f"{st[s]['cpu_ms']:.2f} ({st[s]['wall_ms']:.2f})" if st.get(s) else "in network" for s in STAGES]
        meas = f"{r['measured']['ratio']:.2f}" if r.get("measured") else "-"
        ser = serial_ratio(r)
        ser = "-" if ser is None else f"{ser:.2f}"
        print(f"| {r['source_px']} px | {r['runtime']} {r['precision']} | " + " | ".join(cells)
              + f" | {b['total_cpu_ms']:.2f} | {b['predicted_ratio']:.2f} | {ser} | {meas} |")
    loaders = {r["source_px"]: r["loader"] for r in res["rows"] if r.get("loader")}
    if loaders:
        print()
        for size, ld in loaders.items():
            r = next(x for x in res["rows"] if x["source_px"] == size)
            split = sum(r["stages"][s]["cpu_ms"] for s in ("read", "decode", "resize"))
            print(f"loader as extract runs it ({ld['how']}), {size} px: {ld['cpu_ms']:.2f} CPU ms per image "
                  f"({ld['wall_ms']:.2f} wall), vs read + decode + resize one by one {split:.2f}")
    print()
    print(f"bound on {m['cores']} cores (end to end <= cores / total CPU s per image; target >= {TARGET} of model "
          f"only):")
    for r in res["rows"]:
        b = r["bound"]
        ok = "reachable" if b["predicted_ratio"] >= TARGET else (
            f"NOT reachable: the other stages' {b['other_cpu_ms']:.2f} ms must fall to {b['other_budget_ms']:.2f} ms "
            f"(-{100 * b['other_shrink']:.0f}%), e.g. {b['biggest']} {b['biggest_cpu_ms']:.2f} -> "
            f"{max(0.0, b['biggest_needed_ms']):.2f} ms")
        print(f"  {r['source_px']} px {r['runtime']} {r['precision']}: model only <= {b['model_max_img_s']:.0f}, end to "
              f"end <= {b['e2e_max_img_s']:.0f} images/s, ratio <= {b['predicted_ratio']:.2f}: {ok}")
        m = r.get("measured")
        if m:
            t_model = 1000 / m["model_img_s"]
            build_s = m["build_s"] if m["build_s"] is not None else r["build_s"]
            fixed = 1000 * build_s / m["n"]
            print(f"    serial (other stages between batches, on one core): measured model only {t_model:.2f} ms per "
                  f"image leaves {t_model * (1 / TARGET - 1):.2f} ms for the other stages + the build; they take "
                  f"{b['other_cpu_ms']:.2f} + {fixed:.2f} ({build_s:.1f} s over {m['n']} files) -> ratio "
                  f"{serial_ratio(r):.2f}, measured {m['ratio']:.2f}")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="few images, 28 px only, torch only: tests the script itself")
    ap.add_argument("--n", type=int, default=2000, help="JPEG files per source size (default 2000)")
    ap.add_argument("--sizes", default="256,28", help="source sizes of the JPEG files, px (default 256,28)")
    ap.add_argument("--backbone", default="resnet18", help="resnet18 (random weights, as extract_speed.py) or "
                    "efficientnet_lite0")
    ap.add_argument("--runtimes", default=",".join(RUNTIMES), help=f"comma list of {', '.join(RUNTIMES)} "
                    "(default all; openvino-int8 calibrates on a cold cache: seconds)")
    ap.add_argument("--net-n", type=int, default=640, help="images the network is timed on (default 640; the "
                    "input stages and the write use all --n)")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--workers", type=int, default=None, help="the loader row's decoding workers (default tlfx's)")
    ap.add_argument("--no-loader", action="store_true", help="skip the loader row")
    ap.add_argument("--measured", default=MEASURED, help="an extract_speed.py --json file to compare with")
    ap.add_argument("--workdir", default=None, help="where the JPEG folders and stores go (default: a temp dir)")
    ap.add_argument("--json", default=None, help="also write all measurements to this JSON file")
    ap.add_argument("--report", default=None, metavar="JSON", help="print the table of a saved --json run and exit")
    a = ap.parse_args(argv)
    if a.report:
        with open(a.report) as f:
            res = json.load(f)
        measured = measured_runs(a.measured, res["backbone"])
        for r in res["rows"]:  # a run saved before the comparison was recorded
            r.setdefault("measured", measured.get((r["runtime"], r["source_px"])))
        print_table(res)
        return 0
    if a.quick:
        a.n, a.sizes, a.net_n = min(a.n, 64), a.sizes.split(",")[-1], min(a.net_n, 64)
        if a.runtimes == ",".join(RUNTIMES):
            a.runtimes = "torch"
    if a.n < 1 or a.net_n < 1 or a.batch_size < 1:
        raise SystemExit("--n, --net-n and --batch-size must be at least 1")
    print_table(run(a))
    return 0


if __name__ == "__main__":
    sys.exit(main())
