"""Fine-tune quality benchmark: efficientnet_lite0 on Fashion-MNIST, test accuracy and wall time per epoch.

The full run (60k train / 10k test; docs/finetune.md has the results on 2 idle CPU cores: 94.65 % test accuracy
with 6 epochs in 85 min; 94.33 % with 4 epochs in about an hour, 94.02 % with 3):

    python benchmarks/finetune.py --train 60000 --test 10000 --image-size 112 --epochs 6 --val-fraction 0.05

A reduced run that fits on a busy machine (what docs/finetune.md records):

    nice -n 5 python benchmarks/finetune.py --train 5000 --test 1000 --image-size 64 --epochs 1

It prints a table (image size, epochs, train/val/test sizes, wall time per epoch, images/s, best val accuracy,
test accuracy) plus the machine and its load, and the time a full 60k-image epoch would take at the measured
speed. ``--json FILE`` also writes every number.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def machine() -> dict:
    import torch

    cpu = platform.processor() or ""
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    from tlfx.runtime import cpu_has_fast_bf16

    return {"cpu": cpu, "cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
            "cpu_bf16": cpu_has_fast_bf16(), "torch": torch.__version__}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--backbone", default="efficientnet_lite0")
    ap.add_argument("--train", type=int, default=5000, help="training images (first N of the train split)")
    ap.add_argument("--test", type=int, default=1000, help="test images (first N of the test split)")
    ap.add_argument("--image-size", type=int, default=64)
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--unfreeze", default="all")
    ap.add_argument("--lr", type=float, default=None)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--augment", default="flip,crop")
    ap.add_argument("--val-fraction", type=float, default=0.1)
    ap.add_argument("--precision", default="auto")
    ap.add_argument("--device", default=None)
    ap.add_argument("--out", default=None, help="model file to keep (default: a temporary file)")
    ap.add_argument("--json", default=None, help="also write the results as JSON here")
    args = ap.parse_args(argv)

    import numpy as np

    from tlfx.datasets import load_dataset
    from tlfx_plugins.finetune_train import finetune

    load0 = os.getloadavg()
    tmp = tempfile.mkdtemp(prefix="tlfx-ft-bench-")
    out = args.out or os.path.join(tmp, "ft.tlfx")
    t0, c0 = time.perf_counter(), time.process_time()
    model = finetune(out, backbone=args.backbone, data="fashion-mnist", split="train", limit=args.train,
                     epochs=args.epochs, image_size=args.image_size, unfreeze=args.unfreeze, lr=args.lr,
                     batch_size=args.batch_size, augment=args.augment, val_fraction=args.val_fraction,
                     precision=args.precision, device=args.device, quiet=False, log_every=30.0)
    train_wall, train_cpu = time.perf_counter() - t0, time.process_time() - c0
    test = load_dataset("fashion-mnist", "test", limit=args.test)
    t1 = time.perf_counter()
    proba, idx, bad = model._run(test, range(len(test)))
    test_seconds = time.perf_counter() - t1
    y = test.labels[np.asarray(idx)]
    acc = float((proba.argmax(1) == y).mean())
    m = model.meta
    hist = m["history"]
    per_epoch = float(np.mean([h["train_seconds"] + h.get("val_seconds", 0.0) for h in hist]))
    ips = float(np.mean([h["images_per_s"] for h in hist]))
    full_epoch = 60000 * (1 - args.val_fraction) / ips + 6000 / max(len(test) / test_seconds, 1e-9) * (args.val_fraction > 0)
    res = {
        "backbone": args.backbone, "image_size": m["image_size"], "epochs": m["epochs"], "unfreeze": m["unfreeze"],
        "n_train": m["n_train"], "n_val": m["n_val"], "n_test": len(y), "seconds_per_epoch": per_epoch,
        "train_images_per_s": ips, "test_images_per_s": len(test) / test_seconds, "best_val_accuracy": m["best_val_accuracy"],
        "test_accuracy": acc, "train_wall_seconds": train_wall, "precision": m["precision"], "device": m["device"],
        "params": m["params"], "history": hist, "machine": machine(), "loadavg_before": load0,
        "loadavg_after": os.getloadavg(), "full_epoch_seconds_estimate": full_epoch,
        "train_cpu_seconds": train_cpu, "cpu_seconds_per_train_image": train_cpu / max(m["n_train"] * m["epochs"], 1),
    }
    cols = ["image px", "epochs", "unfreeze", "train", "val", "test", "s/epoch", "train img/s", "val acc", "test acc"]
    vals = [res["image_size"], res["epochs"], res["unfreeze"], res["n_train"], res["n_val"], res["n_test"],
            f"{per_epoch:.0f}", f"{ips:.1f}", f"{m['best_val_accuracy'] or 0:.4f}", f"{acc:.4f}"]
    print("| " + " | ".join(cols) + " |")
    print("|" + "|".join("---" for _ in cols) + "|")
    print("| " + " | ".join(map(str, vals)) + " |")
    mc = res["machine"]
    print(f"\nmachine: {mc['cpu']}, {mc['cores']} cores, torch {mc['torch']} ({mc['torch_threads']} threads), "
          f"{res['precision']} on {res['device']}; load average before {load0[0]:.1f}, after {res['loadavg_after'][0]:.1f}")
    print(f"CPU time of this process while training: {train_cpu:.0f} s in {train_wall:.0f} s wall "
          f"({res['cpu_seconds_per_train_image'] * 1000:.0f} ms of CPU per training image, validation included)")
    print(f"a full 60k Fashion-MNIST epoch at this speed: ~{full_epoch / 60:.0f} min "
          f"(54k train images / {ips:.1f} img/s + 6k validation images)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=2)
    return res


if __name__ == "__main__":
    main()
