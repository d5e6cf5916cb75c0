#!/usr/bin/env bash
# GPU extraction speed, ready to run as is on a machine with an NVIDIA GPU (about 5 minutes; at most 8).
#
#   benchmarks/gpu.sh               # on a CUDA machine: the full table
#   benchmarks/gpu.sh --cpu-smoke   # anywhere: a tiny run on the CPU that checks the script itself (also automatic
#                                   # when no CUDA GPU is visible)
#
# Measures, for resnet50 (random weights: speed does not depend on the values) and efficientnet_lite0:
#   model only   : uint8 tensors already on the GPU -> features, fp16 and bf16 autocast, channels_last, batch sweep;
#   end to end   : 1,000 JPEG files -> features, decoded by Pillow on CPU threads (tlfx's FeatureComputer.loader)
#                  and by torchvision.io.decode_jpeg on the GPU (nvjpeg), best batch of the sweep;
#   peak GPU memory per batch size; one fine-tune epoch's images/s (efficientnet_lite0, bf16/fp16, SGD).
# Prints one table (and writes it as JSON to $OUT or ./gpu-bench.json).
set -euo pipefail
HERE="$(cd "$(dirname "$0")" && pwd)"
PY="${PYTHON:-$HERE/../.venv/bin/python}"
[ -x "$PY" ] || PY=python3
export PYTHONPATH="$HERE/..${PYTHONPATH:+:$PYTHONPATH}"
exec timeout 480 "$PY" - "$@" <<'EOF'
import json, os, sys, tempfile, time

import numpy as np
import torch

import tlfx
from tlfx.extraction import FeatureComputer

smoke = "--cpu-smoke" in sys.argv or not torch.cuda.is_available()
dev = torch.device("cpu" if smoke else "cuda")
N_FILES = 8 if smoke else 1000
SIZE = 32 if smoke else 224
BATCHES = [4] if smoke else [32, 64, 128, 256]
PRECISIONS = ["bf16"] if smoke else ["fp16", "bf16"]
REPS = 1 if smoke else 3
rows = []


def sync():
    if dev.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, n_images):
    fn()  # warm-up (cudnn autotune, allocator)
    sync()
    best = float("inf")
    for _ in range(REPS):
        t = time.perf_counter()
        fn()
        sync()
        best = min(best, time.perf_counter() - t)
    return n_images / best


def peak_mb():
    return torch.cuda.max_memory_allocated() / 2**20 if dev.type == "cuda" else 0.0


def make_jpegs(root, n, size=256):
    from PIL import Image

    rng = np.random.default_rng(0)
    paths = []
    for i in range(n):
        p = os.path.join(root, f"{i:05d}.jpg")
        base = rng.integers(0, 255, (size // 8, size // 8, 3), dtype=np.uint8)
        Image.fromarray(base).resize((size, size), Image.Resampling.BICUBIC).save(p, quality=90)
        paths.append(p)
    return paths


def gpu_decode_run(fc, paths, batch):
    """torchvision.io.decode_jpeg on the GPU (nvjpeg), resize + centre crop on the GPU, then the network."""
    from torchvision.io import decode_jpeg, read_file
    from torchvision.transforms.v2.functional import center_crop, resize

    data = [read_file(p) for p in paths]

    def run():
        for s in range(0, len(data), batch):
            imgs = decode_jpeg(data[s:s + batch], device=dev)
            x = torch.stack([center_crop(resize(im, fc.pre.resize, antialias=True), fc.pre.crop) for im in imgs])
            fc(x.permute(0, 2, 3, 1).contiguous())
    return run


def cpu_decode_run(fc, ds, batch):
    def run():
        for _i, _g, arr, _b in fc.loader(ds, range(len(ds)), batch):
            if arr is not None:
                fc(arr)
    return run


with tempfile.TemporaryDirectory() as tmp:
    os.makedirs(os.path.join(tmp, "imgs", "a"))
    paths = make_jpegs(os.path.join(tmp, "imgs", "a"), N_FILES)
    ds = tlfx.load_dataset(f"imagefolder:{tmp}/imgs")
    for name, weights in (("resnet50", "none"), ("efficientnet_lite0", None)):
        bb = tlfx.create_backbone(name, weights)
        for prec in PRECISIONS:
            fc = FeatureComputer(bb, image_size=SIZE, precision=prec, device=str(dev), runtime="torch")
            best = (0.0, BATCHES[0])
            for b in BATCHES:
                x = torch.randint(0, 255, (b, SIZE, SIZE, 3), dtype=torch.uint8, device=dev)
                if dev.type == "cuda":
                    torch.cuda.reset_peak_memory_stats()
                reps = max(1, (N_FILES // b))
                rate = timed(lambda: [fc(x) for _ in range(reps)], reps * b)
                rows.append({"model": name, "precision": prec, "path": "model only", "batch": b,
                             "images_per_s": rate, "peak_mb": peak_mb()})
                best = max(best, (rate, b))
            b = best[1]
            rows.append({"model": name, "precision": prec, "path": "JPEG, CPU decode", "batch": b,
                         "images_per_s": timed(cpu_decode_run(fc, ds, b), len(ds)), "peak_mb": peak_mb()})
            if dev.type == "cuda":
                rows.append({"model": name, "precision": prec, "path": "JPEG, GPU decode", "batch": b,
                             "images_per_s": timed(gpu_decode_run(fc, paths, b), len(paths)), "peak_mb": peak_mb()})

    # one fine-tune epoch (efficientnet_lite0, all layers trainable), synthetic labels on the decoded JPEGs
    bb = tlfx.create_backbone("efficientnet_lite0")
    net = bb.module.to(dev).to(memory_format=torch.channels_last).train()
    for p in net.parameters():
        p.requires_grad_(True)
    opt = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9)
    fc = FeatureComputer(bb, image_size=SIZE, precision="fp32", device="cpu", runtime="torch")
    batch = BATCHES[-1] if smoke else 64
    prec = PRECISIONS[-1]
    dtype = torch.bfloat16 if prec == "bf16" else torch.float16
    scaler = torch.amp.GradScaler(enabled=prec == "fp16" and dev.type == "cuda")
    t, seen = time.perf_counter(), 0
    for _i, _g, arr, _b in fc.loader(ds, range(len(ds)), batch):
        x = arr.to(dev).permute(0, 3, 1, 2).float().mul_(fc.scale.to(dev).view(1, 3, 1, 1)).add_(
            fc.bias.to(dev).view(1, 3, 1, 1)).contiguous(memory_format=torch.channels_last)
        y = torch.randint(0, 10, (len(x),), device=dev)
        with torch.autocast(dev.type, dtype=dtype):
            loss = torch.nn.functional.cross_entropy(net(x)[:, :10], y)
        opt.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        seen += len(x)
    sync()
    rows.append({"model": "efficientnet_lite0", "precision": prec, "path": "fine-tune epoch", "batch": batch,
                 "images_per_s": seen / (time.perf_counter() - t), "peak_mb": peak_mb()})

gpu = torch.cuda.get_device_name(0) if dev.type == "cuda" else "none (CPU smoke run)"
print(f"device: {gpu}   torch {torch.__version__}   {N_FILES} JPEG files, {SIZE} px")
print(f"{'model':<20}{'prec':<6}{'path':<18}{'batch':>6}{'images/s':>11}{'peak MB':>9}")
for r in rows:
    print(f"{r['model']:<20}{r['precision']:<6}{r['path']:<18}{r['batch']:>6}{r['images_per_s']:>11.0f}"
          f"{r['peak_mb']:>9.0f}")
with open(os.environ.get("OUT", "gpu-bench.json") if not os.environ.get("OUT", "").endswith("/") else
          os.path.join(os.environ["OUT"], "gpu-bench.json"), "w") as f:
    json.dump({"device": gpu, "smoke": smoke, "rows": rows}, f, indent=1)
EOF
