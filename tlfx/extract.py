"""The extraction engine: run a frozen backbone once over a dataset and stream features into a FeatureStore."""

from __future__ import annotations

import dataclasses
import functools
import os
import queue
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from .backbone import Backbone, FeatureExtractor, Preprocess, create_backbone
from .datasets import ImageDataset, load_dataset
from .errors import TlfxError
from .fold import fold_batchnorm as fold_bn
from .images import BadImage, preprocess_image, resize_plan
from .runtime import autocast, decode_threads, default_workers, pick_device, resolve_precision, tune_allocator, worker_init
from .store import StoreWriter, covered_until, store_attrs_base

DTYPES = ("float32", "float16")
# resamplings that torch's uint8 antialiased interpolate reproduces (bilinear: exactly; bicubic: within 2 levels)
_BATCH_RESIZE = ("bilinear", "bicubic")


class _Decoded(Dataset):
    """Decodes and preprocesses item ``i`` in a worker; a bad file becomes a recorded skip, never an exception.

    An image smaller than the network's input (an upscale, e.g. 28 px Fashion-MNIST to 256) comes back at its own
    size: :func:`_collate` resizes such images a whole batch at a time with torch, several times faster than Pillow
    per image, to the same pixels.
    """

    def __init__(self, ds: ImageDataset, pre: Preprocess, batch_resize: bool = True):
        self.ds, self.pre = ds, pre
        self.batch_resize = batch_resize and pre.interpolation in _BATCH_RESIZE

    def __len__(self):
        return len(self.ds)

    def __getitem__(self, i):
        try:
            img = self.ds.load(i, target=self.pre.resize)
            if self.batch_resize and min(img.size) < self.pre.resize:
                return i, np.asarray(img, dtype=np.uint8), ""
            return i, preprocess_image(img, self.pre), ""
        except BadImage as exc:
            return i, None, str(exc)
        except Exception as exc:  # any decoder failure is one skipped file, not the end of a long run
            return i, None, f"{type(exc).__name__}: {exc}"[:200]


def _batch_resize(arrays: list[np.ndarray], pre: Preprocess) -> torch.Tensor:
    """Same-size uint8 HWC images -> resized and centre-cropped uint8 NHWC batch (torch, antialiased like Pillow)."""
    h, w = arrays[0].shape[:2]
    nw, nh, left, top = resize_plan(w, h, pre)
    x = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2)  # channels_last view: torch's fast uint8 kernel
    y = torch.nn.functional.interpolate(x, size=(nh, nw), mode=pre.interpolation, antialias=True)
    return y[:, :, top:top + pre.crop, left:left + pre.crop].permute(0, 2, 3, 1)


def _collate(items, pre: Preprocess | None = None):
    """Items ``(index, uint8 HWC array | None, reason)`` -> ``(indices, good indices, uint8 NHWC batch | None, bad)``."""
    idx = [i for i, a, _ in items]
    good = [(i, a) for i, a, _ in items if a is not None]
    bad = [(i, r) for i, a, r in items if a is None]
    if not good:
        return idx, [], None, bad
    crop = pre.crop if pre is not None else good[0][1].shape[0]
    if all(a.shape[:2] == (crop, crop) for _, a in good):
        return idx, [i for i, _ in good], torch.from_numpy(np.stack([a for _, a in good])), bad
    out = torch.empty((len(good), crop, crop, 3), dtype=torch.uint8)
    groups: dict[tuple, list[int]] = {}
    for k, (_, a) in enumerate(good):
        if a.shape[:2] == (crop, crop):
            out.numpy()[k] = a
        else:
            groups.setdefault(a.shape, []).append(k)
    for ks in groups.values():
        out[ks] = _batch_resize([good[k][1] for k in ks], pre)
    return idx, [i for i, _ in good], out, bad


class _ThreadedBatches:
    """Batches decoded by a thread pool inside this process (Pillow and torch release the GIL while they work).

    Used when there are no worker processes: decoding and the network take turns on all cores instead of
    competing for them, and batches need no copy between processes.
    """

    def __init__(self, decoded: _Decoded, indices: list[int], batch_size: int, threads: int, pin: bool = False):
        self.decoded, self.indices, self.batch_size, self.threads, self.pin = decoded, indices, batch_size, threads, pin
        self._collate = functools.partial(_collate, pre=decoded.pre)

    def collate(self, items):
        idx, good, arr, bad = self._collate(items)
        if self.pin and arr is not None:  # page-locked, so the copy to the GPU can run non-blocking
            arr = arr.pin_memory()
        return idx, good, arr, bad

    def __len__(self):
        return -(-len(self.indices) // self.batch_size)

    def __iter__(self):
        chunks = (self.indices[s:s + self.batch_size] for s in range(0, len(self.indices), self.batch_size))
        if self.threads <= 1:
            for chunk in chunks:
                yield self.collate([self.decoded[i] for i in chunk])
            return
        with ThreadPoolExecutor(self.threads, thread_name_prefix="tlfx-decode") as pool:
            for chunk in chunks:
                yield self.collate(list(pool.map(self.decoded.__getitem__, chunk)))


class FeatureComputer:
    """A backbone ready to turn batches of uint8 HWC images into pooled features, as fast as the device allows.

    Runs the network in ``precision`` (``auto``: bf16 autocast on CPUs with AMX/AVX512-BF16 and on CUDA, see
    :func:`tlfx.runtime.resolve_precision`), channels_last, under ``torch.inference_mode``; features come back
    float32 whatever the compute precision. Batch norms that directly follow a convolution are folded into it
    (:mod:`tlfx.fold`; on a copy, so ``backbone`` itself is not changed). ``compile=True`` wraps the network in
    ``torch.compile`` (minutes of compilation on a small CPU; see docs/performance.md).
    """

    def __init__(self, backbone: Backbone, layers="penultimate", pooling="avg", image_size=None,
                 precision="auto", device=None, compile=False, fold_batchnorm=True, runtime="torch", calibration=None):
        from .openvino_runtime import resolve_runtime

        self.backbone = backbone
        self.device = pick_device(device)
        self.runtime = resolve_runtime(runtime, self.device, precision)
        self.precision = "int8" if precision == "int8" else resolve_precision(precision, self.device)
        if self.device.type == "cpu":
            tune_allocator()
        self.pre = backbone.preprocess.with_image_size(image_size)
        self.folded = 0
        if fold_batchnorm:
            backbone.module.eval()
            module, self.folded = fold_bn(backbone.module, keep=backbone.resolve_layers(layers))
            if self.folded:  # the caller's backbone stays untouched; hooks see the same layer names
                backbone = dataclasses.replace(backbone, module=module)
        self.model = FeatureExtractor(backbone, layers, pooling).to(self.device).to(memory_format=torch.channels_last)
        self.model.eval()
        self.layers = self.model.layers
        self.compiled = bool(compile)
        # static shapes: one compilation, reused; a short last batch is padded to that shape (see __call__)
        self._forward = torch.compile(self.model, dynamic=False) if compile else self.model
        self._compiled_batch = 0
        # (x / 255 - mean) / std == x * scale + bias, applied in place on the NHWC batch
        mean, std = torch.tensor(self.pre.mean), torch.tensor(self.pre.std)
        self.scale = (1.0 / (255.0 * std)).to(self.device)
        self.bias = (-mean / std).to(self.device)
        self.calibration = None
        self._openvino = self._build_openvino(pooling, calibration) if self.runtime == "openvino" else None

    def _build_openvino(self, pooling, calibration):
        """The converted (cached) OpenVINO model of ``self.model``; ``calibration``: the dataset for INT8, or None."""
        from . import openvino_runtime as ovr

        with torch.inference_mode():
            dim = int(self.model(torch.zeros((1, 3, self.pre.crop, self.pre.crop))).shape[1])
        config = {"layers": list(self.layers), "pooling": pooling, "preprocess": self.pre.to_dict()}
        calibrate = None
        if self.precision == "int8":
            config["calibration"] = {"items": ovr.CALIBRATION_ITEMS, "seed": ovr.CALIBRATION_SEED}
            if calibration is not None:
                calibrate = functools.partial(self._calibration_batches, calibration)
        ov = ovr.OpenVINOFeatures(self.model, self.scale, self.bias, self.pre.crop, dim, self.precision, config,
                                  calibrate, threads=torch.get_num_threads())
        self.calibration = ov.calibration
        return ov

    def _calibration_batches(self, ds: ImageDataset):
        """A seeded sample of the dataset's images (not its first ones: folders are sorted by class), decoded."""
        from . import openvino_runtime as ovr

        n = min(ovr.CALIBRATION_ITEMS, len(ds))
        idx = sorted(np.random.default_rng(ovr.CALIBRATION_SEED).choice(len(ds), n, replace=False).tolist())
        batches = [arr.numpy() for _i, _g, arr, _b in self.loader(ds, idx, 32, workers=0) if arr is not None]
        return batches, {"items": sum(len(b) for b in batches), "seed": ovr.CALIBRATION_SEED, "dataset": ds.spec,
                         "split": ds.split or "all", "dataset_fingerprint": ds.fingerprint()}

    def __call__(self, batch_uint8_nhwc: torch.Tensor) -> np.ndarray:
        """Features (float32 ``[N, D]``) of a uint8 ``[N, H, W, 3]`` batch already resized and cropped."""
        if self._openvino is not None:
            return self._openvino(batch_uint8_nhwc)
        n = len(batch_uint8_nhwc)
        x = batch_uint8_nhwc.to(self.device, non_blocking=True).float()
        if self.compiled:
            if n < self._compiled_batch:  # a short last batch would cost a whole new compilation
                x = torch.cat([x, x.new_zeros((self._compiled_batch - n, *x.shape[1:]))])
            self._compiled_batch = max(self._compiled_batch, n)
        x.mul_(self.scale).add_(self.bias)
        x = x.permute(0, 3, 1, 2)  # NCHW view of NHWC memory: channels_last without a copy
        with torch.inference_mode(), autocast(self.device, self.precision):
            out = self._forward(x)
        return out[:n].float().cpu().numpy()

    def loader(self, ds: ImageDataset, indices, batch_size=64, workers=None):
        """Iterable of ``(indices, good indices, uint8 NHWC batch | None, [(index, reason)])`` in order.

        ``workers``: decoding processes (default :func:`tlfx.runtime.default_workers`); 0 decodes on a thread pool
        in this process between batches.
        """
        workers = default_workers() if workers is None else workers
        decoded = _Decoded(ds, self.pre)
        indices = list(indices)
        if workers <= 0:
            return _ThreadedBatches(decoded, indices, batch_size, decode_threads(), pin=self.device.type == "cuda")
        return DataLoader(
            torch.utils.data.Subset(decoded, indices),
            batch_size=batch_size,
            num_workers=workers,
            collate_fn=functools.partial(_collate, pre=self.pre),
            pin_memory=self.device.type == "cuda",
            prefetch_factor=4,
            worker_init_fn=worker_init,
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

    @classmethod
    def of_complete_store(cls, path: str) -> ExtractResult:
        """The result of a run that found its store already complete (nothing to do)."""
        from .store import FeatureStore

        st = FeatureStore(path)
        return cls(path, len(st), int(st.attrs.get("dim", 0)), len(st.skipped), 0.0, 0.0, already_complete=True)

    def summary(self) -> str:
        if self.already_complete:
            return f"{self.path} is already complete ({self.n} images x {self.dim}); nothing to do"
        resumed = f", resumed at item {self.resumed_from}" if self.resumed_from else ""
        return (f"extracted {self.n} images x {self.dim} features in {self.seconds:.1f} s "
                f"({self.images_per_s:.0f} images/s), {self.skipped} skipped{resumed} -> {self.path}")


def store_attributes(ds, config: dict, precision: str, dtype: str, root, limit, part_size: int) -> dict:
    """The attributes of a new store: backbone configuration, precision, dataset provenance (every engine)."""
    return {
        **store_attrs_base(),
        **config,
        "precision": precision,
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
            compile: bool = False, progress: bool = False, runtime: str = "torch") -> ExtractResult:
    """Run a frozen backbone over a dataset once and write an HDF5 FeatureStore at ``out``.

    >>> tlfx.extract("efficientnet_lite0", "fashion-mnist", "t.h5", split="test", limit=2000)

    Resumes an incomplete store made with the same configuration; refuses a different one unless ``overwrite``.
    ``runtime``: ``torch`` (the API's default, as before), ``openvino``, or ``auto`` (the CLI's default: OpenVINO on
    a CPU when it is installed, else torch);
    ``precision="int8"`` quantizes with NNCF on a seeded sample of this dataset (OpenVINO only).
    """
    if dtype not in DTYPES:
        raise TlfxError(f"unknown dtype {dtype!r}; valid choices: {', '.join(DTYPES)}")
    if batch_size < 1:
        raise TlfxError(f"--batch-size must be at least 1, got {batch_size}")
    ds = data if isinstance(data, ImageDataset) else load_dataset(data, split=split, root=root, limit=limit)
    bb = backbone if isinstance(backbone, Backbone) else create_backbone(backbone, weights)
    computer = FeatureComputer(bb, layers, pooling, image_size, precision, device, compile, runtime=runtime,
                               calibration=ds)
    part_size = part_size or max(batch_size, (2048 // batch_size) * batch_size)
    config = {**bb.config(computer.layers, pooling, image_size), "runtime": computer.runtime}
    if computer.calibration:
        config["calibration"] = computer.calibration
    attrs = store_attributes(ds, config, computer.precision, dtype, root, limit, part_size)
    t0 = time.perf_counter()
    with StoreWriter(out, attrs, overwrite=overwrite) as writer:
        if writer.already_complete:
            return ExtractResult.of_complete_store(out)
        part_size = int(writer.attrs.get("part_size", part_size))
        start = covered_until(writer.parts(), len(ds))
        n_done, n_skipped, dim = _run(computer, ds, writer, start, part_size, batch_size, workers, strict, progress)
        seconds = time.perf_counter() - t0
        stats = {"seconds": seconds, "images_per_s": n_done / seconds if seconds else 0.0,
                 "device": str(computer.device), "resumed_from": start, "torch": torch.__version__,
                 "openvino_cached": bool(computer._openvino and computer._openvino.cached)}
        writer.finalize(stats)
    from .store import FeatureStore

    st = FeatureStore(out)
    return ExtractResult(out, len(st), int(st.attrs.get("dim", dim)), len(st.skipped), seconds,
                         n_done / seconds if seconds else 0.0, resumed_from=start)


def _run(computer: FeatureComputer, ds, writer, start, part_size, batch_size, workers, strict, progress):
    from .progress import progress_bar

    n = len(ds)
    bar = progress_bar(total=n, initial=start, unit="img", desc="extract", disable=not progress, dynamic_ncols=True,
                       smoothing=0.1)
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
