"""The extraction engine: run a frozen backbone once over a dataset and stream features into a FeatureStore."""

from __future__ import annotations

import dataclasses
import functools
import os
import queue
import threading
import time
from dataclasses import dataclass

import numpy as np
import torch

from .backbone import Backbone, PooledLayers, create_backbone
from .bn_folding import fold_batchnorm as fold_bn
from .config import DTYPES, IMAGE_SIZES, TTAS, ExtractOptions  # noqa: F401  (DTYPES, IMAGE_SIZES: re-exported)
from .datasets import ImageDataset, load_dataset
from .errors import TlfxError
from .models import check_config, no_network
from .pipeline import Normalizer, image_batches
from .runtime import autocast, pick_device, resolve_precision, tune_allocator
from .safetext import terminal
from .store import StoreWriter, covered_until, store_attrs_base

SHOWN_SKIPS = 5  # skipped items listed under extract's summary


class FeatureComputer:
    """A backbone ready to turn batches of uint8 HWC images into pooled features, as fast as the device allows.

    Runs the network in ``precision`` (``auto``: bf16 autocast on CPUs with AMX/AVX512-BF16 and on CUDA, see
    :func:`tlfx.runtime.resolve_precision`), channels_last, under ``torch.inference_mode``; features come back
    float32 whatever the compute precision. Batch norms that directly follow a convolution are folded into it
    (:mod:`tlfx.bn_folding`; on a copy, so ``backbone`` itself is not changed). ``compile=True`` wraps the network in
    ``torch.compile`` (minutes of compilation on a small CPU; see docs/performance.md). ``tta="flip"``: each
    image's features are the mean of those of the image and of its horizontal mirror (the preprocessed crop
    mirrored, the network run on both, the pooled features averaged), on either runtime.
    """

    def __init__(self, backbone: Backbone, layers="penultimate", pooling="avg", image_size=None,
                 precision="auto", device=None, compile=False, fold_batchnorm=True, runtime="torch", calibration=None,
                 tta="none"):
        from .openvino_runtime import resolve_runtime

        if tta not in TTAS:
            raise TlfxError(f"unknown tta {tta!r}; valid choices: {', '.join(TTAS)}")
        self.tta = tta
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
        self.model = PooledLayers(backbone, layers, pooling).to(self.device).to(memory_format=torch.channels_last)
        self.model.eval()
        self.layers = self.model.layers
        self.compiled = bool(compile)
        # static shapes: one compilation, reused; a short last batch is padded to that shape (see __call__)
        self._forward = torch.compile(self.model, dynamic=False) if compile else self.model
        self._compiled_batch = 0
        self.normalize = Normalizer(self.pre, self.device)
        self.scale, self.bias = self.normalize.scale, self.normalize.bias  # x * scale + bias (benchmarks use them)
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

    @classmethod
    def from_config(cls, config: dict, device=None) -> FeatureComputer:
        """The backbone a model was trained on, rebuilt from its recorded configuration, without touching the
        network; refuses weights or a configuration other than the recorded ones (what ``tlfx predict`` runs)."""
        name = config.get("backbone")
        if not name:
            raise TlfxError("the model records no backbone configuration, so it cannot run on images; use tlfx evaluate "
                            "on a feature store instead")
        w = config.get("weights") or {}
        if w.get("name") == "random-init":
            raise TlfxError(f"the model was trained on features of a randomly initialised {name!r}, which cannot be "
                            f"rebuilt; extract with pretrained or --weights file weights and fit again")
        want = w.get("sha256") or ""
        bb, first_error = None, None
        with no_network():  # a model file must not make tlfx download anything (nor wait on a hub)
            try:
                bb = create_backbone(name)
            except TlfxError as exc:
                first_error = exc
            if (bb is None or bb.weights.sha256 != want) and w.get("path") and os.path.isfile(w["path"]):
                bb = create_backbone(name, weights=w["path"])
        if bb is None:
            raise first_error
        if bb.weights.sha256 != want:
            raise TlfxError(f"backbone {name!r} weights here (sha256 {bb.weights.sha256[:16] or 'none'}) are not the ones "
                            f"the model was trained with ({w.get('name')}, sha256 {want[:16] or 'none'}, recorded path "
                            f"{w.get('path') or '-'}); place that weights file there and run again")
        layers, pooling, size = config.get("layers") or "penultimate", config.get("pooling") or "avg", config.get("image_size")
        precision = config.get("precision") or "auto"
        runtime = config.get("runtime") or "torch"  # the same runtime the features were made with (never mixed)
        tta = config.get("tta") or "none"  # and the same test-time augmentation
        if tta not in TTAS:
            raise TlfxError(f"the model records tta {terminal(str(tta))[:40]!r}, which this tlfx does not know "
                            f"(valid: {', '.join(TTAS)}); upgrade tlfx or fit the head again")
        # the same check evaluate makes against a store: the backbone as rebuilt here must make the same features
        rebuilt = {**bb.config(layers, pooling, size), "runtime": runtime, "precision": precision, "tta": tta}
        check_config(config, rebuilt, f"backbone {name!r} as installed here",
                     "install the backbone (plugin) version the model was made with, or fit the head again on its features")
        if runtime == "openvino" and device in (None, "auto"):
            device = "cpu"
        try:
            return cls(bb, layers, pooling, size, precision, device, runtime=runtime, tta=tta)
        except TlfxError:  # e.g. a bf16 model on a machine without bf16: same weights, fp32 is the safe choice
            if precision == "int8" or runtime != "torch":  # another precision would silently be another network
                raise
            return cls(bb, layers, pooling, size, "fp32", device, tta=tta)

    def __call__(self, batch_uint8_nhwc: torch.Tensor) -> np.ndarray:
        """Features (float32 ``[N, D]``) of a uint8 ``[N, H, W, 3]`` batch already resized and cropped; with
        ``tta="flip"`` the mean of the batch's and its mirror's features."""
        if self.tta == "flip":
            mirrored = torch.flip(batch_uint8_nhwc, dims=(2,))  # W of NHWC
            return (self._features(batch_uint8_nhwc) + self._features(mirrored)) / np.float32(2)
        return self._features(batch_uint8_nhwc)

    def _features(self, batch_uint8_nhwc: torch.Tensor) -> np.ndarray:
        if self._openvino is not None:
            return self._openvino(batch_uint8_nhwc)
        n = len(batch_uint8_nhwc)
        rows = 0
        if self.compiled:  # a short last batch is padded: another shape would cost a whole new compilation
            rows = self._compiled_batch
            self._compiled_batch = max(self._compiled_batch, n)
        # a batch of one runs other CPU kernels (features differ in the last bits); padded to two, an image's
        # features do not depend on the batch it came in (extract --update relies on it, and predict agrees)
        rows = max(rows, 2 if n == 1 else 0)
        x = self.normalize(batch_uint8_nhwc, rows)
        with torch.inference_mode(), autocast(self.device, self.precision):
            out = self._forward(x)
        return out[:n].float().cpu().numpy()

    def loader(self, ds: ImageDataset, indices, batch_size=64, workers=None):
        """Iterable of ``(indices, good indices, uint8 NHWC batch | None, [(index, reason)])`` in order.

        ``workers``: decoding processes (default :func:`tlfx.runtime.default_workers`); 0 decodes on a thread pool
        in this process between batches.
        """
        return image_batches(ds, indices, self.pre, batch_size, workers, pin=self.device.type == "cuda")


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
    skipped_examples: list = dataclasses.field(default_factory=list)  # a few (id, reason) from the store's /skipped
    update: dict | None = None  # extract --update: rows kept, added, dropped, changed; images extracted


    @classmethod
    def of_complete_store(cls, path: str) -> ExtractResult:
        """The result of a run that found its store already complete (nothing to do)."""
        from .store import FeatureStore

        st = FeatureStore(path)
        return cls(path, len(st), int(st.attrs.get("dim", 0)), len(st.skipped), 0.0, 0.0, already_complete=True)

    def summary(self) -> str:
        u = self.update
        if u is not None and self.already_complete:
            return (f"{terminal(self.path)} is up to date with its dataset: kept {u['kept']} rows, added 0, dropped 0; "
                    f"nothing extracted")
        if self.already_complete:
            return f"{terminal(self.path)} is already complete ({self.n} images x {self.dim}); nothing to do"
        resumed = f", resumed at item {self.resumed_from}" if self.resumed_from else ""
        if u is not None:
            changed = f" ({u['changed']} of them changed files)" if u["changed"] else ""
            lines = [f"updated {terminal(self.path)}: kept {u['kept']} rows, added {u['added']}, dropped {u['dropped']}"
                     f"{changed}; extracted {u['extracted']} images x {self.dim} features in {self.seconds:.1f} s "
                     f"({self.images_per_s:.0f} images/s), {self.skipped} skipped in all{resumed}"]
        else:
            lines = [f"extracted {self.n} images x {self.dim} features in {self.seconds:.1f} s "
                     f"({self.images_per_s:.0f} images/s), {self.skipped} skipped{resumed} -> {terminal(self.path)}"]
        lines += [f"  skipped {terminal(i)}: {terminal(r)}" for i, r in self.skipped_examples[:SHOWN_SKIPS]]
        if self.skipped > SHOWN_SKIPS:
            lines.append(f"  ... and {self.skipped - SHOWN_SKIPS} more (tlfx info shows the store's /skipped)")
        return "\n".join(lines)


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

    def abort(self):
        """Stop after a failure elsewhere: the parts queued so far are written, a write error is dropped in favour
        of the failure being raised."""
        try:
            self.close()
        except BaseException:
            pass


def extract(backbone: str | Backbone = "efficientnet_lite0", data: str | ImageDataset = "digits",
            out: str = "features.h5", **options) -> ExtractResult:
    """Run a frozen backbone over a dataset once and write an HDF5 FeatureStore at ``out``.

    >>> tlfx.extract("efficientnet_lite0", "fashion-mnist", "t.h5", split="test", limit=2000)

    ``options`` are the fields of :class:`tlfx.config.ExtractOptions` (split, root, limit, layers, pooling,
    image_size, weights, batch_size, workers, precision, device, dtype, part_size, overwrite, update, strict,
    compile, progress). Resumes an incomplete store made with the same configuration; refuses a different one unless
    ``overwrite``. ``update=True`` brings a complete store of a changed image folder up to date (:mod:`tlfx.update`).
    """
    return run_extraction(ExtractOptions(backbone=backbone, data=data, out=out, **options))


def run_extraction(opts: ExtractOptions) -> ExtractResult:
    """The local engine: :func:`extract` for an :class:`~tlfx.config.ExtractOptions`."""
    o = opts.validate()
    ds = o.data if isinstance(o.data, ImageDataset) else load_dataset(o.data, split=o.split, root=o.root, limit=o.limit)
    listing_skips = list(getattr(ds, "listing_skips", None) or [])
    if o.update:
        from .update import check_updatable

        check_updatable(ds)
    if o.strict and listing_skips:
        i, reason = listing_skips[0]
        raise TlfxError(f"cannot use '{terminal(i)}': {terminal(reason)} (--strict; {len(listing_skips)} found while "
                        f"listing the dataset); fix or remove it, then run again")
    bb = o.backbone if isinstance(o.backbone, Backbone) else create_backbone(o.backbone, o.weights)
    computer = FeatureComputer(bb, o.layers, o.pooling, o.image_size, o.precision, o.device, o.compile,
                               runtime=o.runtime, calibration=ds, tta=o.tta)
    part_size = o.part_size or max(o.batch_size, (2048 // o.batch_size) * o.batch_size)
    config = {**bb.config(computer.layers, o.pooling, o.image_size), "runtime": computer.runtime, "tta": computer.tta}
    if computer.calibration:
        config["calibration"] = computer.calibration
    attrs = store_attributes(ds, config, computer.precision, o.dtype, o.root, o.limit, part_size)
    if o.update:
        from .update import update_store

        res = update_store(o, ds, computer, attrs)
        if res is not None:  # None: no store there yet, or an unfinished one of this very dataset: extract as usual
            return res
    t0 = time.perf_counter()
    with StoreWriter(o.out, attrs, overwrite=o.overwrite) as writer:
        if writer.already_complete:
            return ExtractResult.of_complete_store(o.out)
        part_size = int(writer.attrs.get("part_size", part_size))
        start = covered_until(writer.parts(), len(ds))
        n_done, n_skipped, dim = _run(computer, ds, writer, start, part_size, o.batch_size, o.workers, o.strict,
                                      o.progress)
        seconds = time.perf_counter() - t0
        stats = {"seconds": seconds, "images_per_s": n_done / seconds if seconds else 0.0,
                 "device": str(computer.device), "resumed_from": start, "torch": torch.__version__,
                 "openvino_cached": bool(computer._openvino and computer._openvino.cached)}
        writer.finalize(stats)
    from .store import FeatureStore

    st = FeatureStore(o.out)
    skipped = st.skipped
    return ExtractResult(o.out, len(st), int(st.attrs.get("dim", dim)), len(skipped), seconds,
                         n_done / seconds if seconds else 0.0, resumed_from=start, skipped_examples=skipped[:SHOWN_SKIPS])


def _run(computer: FeatureComputer, ds, writer, start, part_size, batch_size, workers, strict, progress):
    from .progress import progress_bar

    n = len(ds)
    bar = progress_bar(total=n, initial=start, unit="img", desc="extract", disable=not progress, dynamic_ncols=True,
                       smoothing=0.1)
    pw = _PartWriter(writer)
    n_done = n_skipped = dim = 0
    part_start = start
    buf_feats, buf_idx, buf_skip = [], [], []
    # what listing could not use goes into the part that starts at item 0, so a resumed run never records it twice
    listed_skips = list(getattr(ds, "listing_skips", None) or []) if start == 0 else []
    n_skipped += len(listed_skips)

    def flush(end):
        nonlocal part_start, buf_feats, buf_idx, buf_skip, listed_skips
        feats = np.concatenate(buf_feats) if buf_feats else np.zeros((0, dim), np.float32)
        pw.put(part_start, end, feats, ds.labels[buf_idx], [ds.ids[i] for i in buf_idx],
               listed_skips + [(ds.ids[i], r) for i, r in buf_skip])
        part_start, buf_feats, buf_idx, buf_skip, listed_skips = end, [], [], [], []

    try:
        if start < n:
            # batches never straddle a part boundary: parts are whole numbers of batches from their start
            for idx, good, arr, bad in computer.loader(ds, range(start, n), batch_size, workers):
                if bad:
                    if strict:
                        i, reason = bad[0]
                        raise TlfxError(f"cannot read '{terminal(ds.ids[i])}': {terminal(reason)} (--strict); fix or "
                                        f"remove it, then run again to resume")
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
        pw.abort()
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
