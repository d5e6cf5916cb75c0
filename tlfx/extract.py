"""The extraction engine: run a frozen backbone once over a dataset and stream features into a FeatureStore."""

from __future__ import annotations

import os
import queue
import threading
import time
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from .backbone import Backbone, FeatureExtractor, create_backbone
from .datasets import ImageDataset, load_dataset
from .errors import TlfxError
from .images import BadImage, preprocess_image
from .runtime import autocast, default_workers, pick_device, resolve_precision
from .store import StoreWriter, covered_until, store_attrs_base

DTYPES = ("float32", "float16")


class _Decoded(Dataset):
    """Decodes and preprocesses item ``i`` in a worker; a bad file becomes a recorded skip, never an exception."""

    def __init__(self, ds: ImageDataset, pre):
        self.ds, self.pre = ds, pre

    def __len__(self):
        return len(self.ds)

    def __getitem__(self, i):
        try:
            img = self.ds.load(i, target=self.pre.resize)
            return i, preprocess_image(img, self.pre), ""
        except BadImage as exc:
            return i, None, str(exc)
        except Exception as exc:  # any decoder failure is one skipped file, not the end of a long run
            return i, None, f"{type(exc).__name__}: {exc}"[:200]


def _collate(items):
    idx = [i for i, a, _ in items]
    good = [(i, a) for i, a, _ in items if a is not None]
    bad = [(i, r) for i, a, r in items if a is None]
    arr = torch.from_numpy(np.stack([a for _, a in good])) if good else None
    return idx, [i for i, _ in good], arr, bad


class FeatureComputer:
    """A backbone ready to turn batches of uint8 HWC images into pooled features, as fast as the device allows."""

    def __init__(self, backbone: Backbone, layers="penultimate", pooling="avg", image_size=None,
                 precision="auto", device=None, compile=False):
        self.backbone = backbone
        self.device = pick_device(device)
        self.precision = resolve_precision(precision, self.device)
        self.pre = backbone.preprocess.with_image_size(image_size)
        self.model = FeatureExtractor(backbone, layers, pooling).to(self.device).to(memory_format=torch.channels_last)
        self.model.eval()
        self.layers = self.model.layers
        self._forward = torch.compile(self.model) if compile else self.model
        self.mean = torch.tensor(self.pre.mean, device=self.device).view(1, 3, 1, 1) * 255.0
        self.std = torch.tensor(self.pre.std, device=self.device).view(1, 3, 1, 1) * 255.0

    def __call__(self, batch_uint8_nhwc: torch.Tensor) -> np.ndarray:
        x = batch_uint8_nhwc.to(self.device, non_blocking=True).permute(0, 3, 1, 2)  # NHWC memory = channels_last
        x = (x.float() - self.mean) / self.std
        x = x.contiguous(memory_format=torch.channels_last)
        with torch.inference_mode(), autocast(self.device, self.precision):
            out = self._forward(x)
        return out.float().cpu().numpy()

    def loader(self, ds: ImageDataset, indices, batch_size=64, workers=None):
        workers = default_workers() if workers is None else workers
        return DataLoader(
            torch.utils.data.Subset(_Decoded(ds, self.pre), list(indices)),
            batch_size=batch_size,
            num_workers=workers,
            collate_fn=_collate,
            pin_memory=self.device.type == "cuda",
            prefetch_factor=4 if workers else None,
            persistent_workers=False,
        )


@dataclass
class ExtractResult:
    path: str
    n: int
    dim: int
    skipped: int
    seconds: float
    images_per_s: float
    resumed_from: int = 0
    already_complete: bool = False

    def summary(self) -> str:
        if self.already_complete:
            return f"{self.path} is already complete ({self.n} images x {self.dim}); nothing to do"
        resumed = f", resumed at item {self.resumed_from}" if self.resumed_from else ""
        return (f"extracted {self.n} images x {self.dim} features in {self.seconds:.1f} s "
                f"({self.images_per_s:.0f} images/s), {self.skipped} skipped{resumed} -> {self.path}")


class _PartWriter:
    """Writes finished parts on a background thread so HDF5 I/O overlaps the network."""

    def __init__(self, writer: StoreWriter):
        self.writer = writer
        self.q: queue.Queue = queue.Queue(maxsize=2)
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self):
        while True:
            job = self.q.get()
            if job is None:
                return
            if self.error is None:
                try:
                    self.writer.write_part(*job)
                except BaseException as exc:
                    self.error = exc

    def put(self, *job):
        if self.error:
            raise self.error
        self.q.put(job)

    def close(self):
        self.q.put(None)
        self.thread.join()
        if self.error:
            raise self.error


def extract(backbone: str | Backbone = "efficientnet_lite0", data: str | ImageDataset = "digits", out: str = "features.h5",
            *, split: str | None = None, root: str | None = None, limit: int | None = None,
            layers="penultimate", pooling: str = "avg", image_size: int | None = None, weights: str | None = None,
            batch_size: int = 64, workers: int | None = None, precision: str = "auto", device: str | None = None,
            dtype: str = "float32", part_size: int | None = None, overwrite: bool = False, strict: bool = False,
            compile: bool = False, progress: bool = False) -> ExtractResult:
    """Run a frozen backbone over a dataset once and write an HDF5 FeatureStore at ``out``.

    >>> tlfx.extract("efficientnet_lite0", "fashion-mnist", "t.h5", split="test", limit=2000)

    Resumes an incomplete store made with the same configuration; refuses a different one unless ``overwrite``.
    """
    if dtype not in DTYPES:
        raise TlfxError(f"unknown dtype {dtype!r}; valid choices: {', '.join(DTYPES)}")
    if batch_size < 1:
        raise TlfxError(f"--batch-size must be at least 1, got {batch_size}")
    ds = data if isinstance(data, ImageDataset) else load_dataset(data, split=split, root=root, limit=limit)
    bb = backbone if isinstance(backbone, Backbone) else create_backbone(backbone, weights)
    computer = FeatureComputer(bb, layers, pooling, image_size, precision, device, compile)
    part_size = part_size or max(batch_size, (2048 // batch_size) * batch_size)
    attrs = {
        **store_attrs_base(),
        **bb.config(computer.layers, pooling, image_size),
        "precision": computer.precision,
        "dtype": dtype,
        "dataset": ds.spec,
        "split": ds.split or "all",
        "data_root": ds.root or (os.path.abspath(root) if root else ""),
        "limit": limit or 0,
        "dataset_fingerprint": ds.fingerprint(),
        "class_names": ds.class_names,
        "n_items": len(ds),
        "part_size": part_size,
    }
    t0 = time.perf_counter()
    with StoreWriter(out, attrs, overwrite=overwrite) as writer:
        if writer.already_complete:
            from .store import FeatureStore

            st = FeatureStore(out)
            return ExtractResult(out, len(st), int(st.attrs.get("dim", 0)), len(st.skipped), 0.0, 0.0,
                                 already_complete=True)
        part_size = int(writer.attrs.get("part_size", part_size))
        start = covered_until(writer.parts(), len(ds))
        n_done, n_skipped, dim = _run(computer, ds, writer, start, part_size, batch_size, workers, strict, progress)
        seconds = time.perf_counter() - t0
        stats = {"seconds": seconds, "images_per_s": n_done / seconds if seconds else 0.0,
                 "device": str(computer.device), "resumed_from": start, "torch": torch.__version__}
        writer.finalize(stats)
    from .store import FeatureStore

    st = FeatureStore(out)
    return ExtractResult(out, len(st), int(st.attrs.get("dim", dim)), len(st.skipped), seconds,
                         n_done / seconds if seconds else 0.0, resumed_from=start)


def _run(computer: FeatureComputer, ds, writer, start, part_size, batch_size, workers, strict, progress):
    from tqdm import tqdm

    n = len(ds)
    bar = tqdm(total=n, initial=start, unit="img", disable=not progress, dynamic_ncols=True, smoothing=0.1)
    pw = _PartWriter(writer)
    n_done = n_skipped = dim = 0
    part_start = start
    buf_feats, buf_idx, buf_skip = [], [], []

    def flush(end):
        nonlocal part_start, buf_feats, buf_idx, buf_skip
        feats = np.concatenate(buf_feats) if buf_feats else np.zeros((0, dim), np.float32)
        pw.put(part_start, end, feats, ds.labels[buf_idx], [ds.ids[i] for i in buf_idx],
               [(ds.ids[i], r) for i, r in buf_skip])
        part_start, buf_feats, buf_idx, buf_skip = end, [], [], []

    try:
        if start < n:
            # batches never straddle a part boundary: parts are whole numbers of batches from their start
            for idx, good, arr, bad in computer.loader(ds, range(start, n), batch_size, workers):
                if bad:
                    if strict:
                        i, reason = bad[0]
                        raise TlfxError(f"cannot read {ds.ids[i]!r}: {reason} (--strict); fix or remove it, "
                                        f"then run again to resume")
                    buf_skip += bad
                    n_skipped += len(bad)
                if arr is not None:
                    f = computer(arr)
                    dim = f.shape[1]
                    buf_feats.append(f)
                    buf_idx += good
                n_done += len(idx)
                bar.update(len(idx))
                last = idx[-1] + 1
                if last - part_start >= part_size or last == n:
                    flush(last)
        pw.close()
    except BaseException:
        try:
            pw.close()
        except BaseException:
            pass
        raise
    finally:
        bar.close()
    return n_done, n_skipped, dim


def embed_images(computer: FeatureComputer, paths: list[str], batch_size=32):
    """Features for image files (``tlfx predict``): returns (features of readable files, ok paths, [(path, reason)])."""
    from .datasets import FileDataset

    ds = FileDataset("files", None, "/", [os.path.abspath(p).lstrip("/") for p in paths], [-1] * len(paths), [])
    feats, ok, bad = [], [], []
    for _idx, good, arr, skipped in computer.loader(ds, range(len(ds)), batch_size, workers=0):
        if arr is not None:
            feats.append(computer(arr))
            ok += [paths[i] for i in good]
        bad += [(paths[i], r) for i, r in skipped]
    return (np.concatenate(feats) if feats else np.zeros((0, 0), np.float32)), ok, bad
