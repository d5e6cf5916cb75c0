"""OpenVINO runtime for extraction: conversion, INT8 post-training quantization, an on-disk cache, the compiled model.

The module converted is the one that already returns the pooled, concatenated features (``PooledLayers`` with
its layer hooks), wrapped so that it takes the uint8 NHWC batch tlfx's decoder produces and normalises it itself:
the OpenVINO model's output is exactly the chosen layers, in the same order, so ``--layers multi`` and pooling
work as with torch. The batch dimension is dynamic, so one conversion serves every batch size.

Conversion (seconds) and INT8 quantization (NNCF, calibrated on a few hundred of the user's own images, tens of
seconds) are cached under ``$TLFX_CACHE_DIR/openvino`` (default ``~/.cache/tlfx/openvino``), keyed by a hash of
the network's weights and architecture plus the whole configuration (layers, pooling, image size, preprocessing,
float or int8, calibration record, batch policy, OpenVINO and NNCF versions). Entries are written to a temporary
folder and renamed into place, and carry a manifest with the sha256 of each file: an entry whose files do not
match (a crash, a full disk, an edit) is removed and rebuilt, never loaded.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import os
import shutil
import tempfile
import threading
import warnings

import numpy as np
import torch
from torch import nn

from .config import RUNTIMES
from .errors import TlfxError
from .weights import sha256_of

CACHE_FORMAT = 1
BATCH_POLICY = "dynamic-batch"
CALIBRATION_ITEMS = 300
CALIBRATION_SEED = 0
# NNCF's recipe, part of the cache key. Full bias correction instead of the fast one: on efficientnet_lite0 features
# of 2,000 Fashion-MNIST images (5-fold logistic regression) the fast one lost 1.6 points to fp32 at 224 px and 1.1
# at 96 px, the full one 0.75 and 0.05 (docs/performance.md); it costs seconds more, once per cache entry.
QUANTIZATION = {"preset": "mixed", "fast_bias_correction": False}
INSTALL_HINT = "pip install 'tlfx[openvino]' (openvino, nncf)"
_OV_PRECISION = {"fp32": "f32", "bf16": "bf16", "fp16": "f16"}
_MAX_MANIFEST = 1 << 16

stats = {"conversions": 0, "quantizations": 0, "cache_hits": 0, "rebuilt": 0}  # this process's counts (tests, bench)
_lock = threading.Lock()


def available() -> bool:
    """Whether OpenVINO can be imported here."""
    try:
        import openvino  # noqa: F401
    except Exception:  # not installed, or a broken install: torch is the fallback either way
        return False
    return True


def resolve_runtime(runtime: str | None, device: torch.device, precision: str = "auto") -> str:
    """``auto``: OpenVINO on a CPU when it is installed, torch on CUDA or without OpenVINO; explicit choices checked."""
    runtime = runtime or "auto"
    if runtime not in RUNTIMES:
        raise TlfxError(f"unknown runtime {runtime!r}; valid choices: {', '.join(RUNTIMES)}")
    if runtime == "auto":
        runtime = "openvino" if device.type == "cpu" and available() else "torch"
    if runtime == "openvino":
        if device.type != "cpu":
            raise TlfxError(f"--runtime openvino runs on the CPU, not {device}; use --device cpu or --runtime torch")
        if not available():
            raise TlfxError(f"--runtime openvino needs OpenVINO, which is not installed; {INSTALL_HINT}, "
                            f"or use --runtime torch")
    if precision == "int8" and runtime != "openvino":
        why = "OpenVINO is not installed" if not available() else f"the {runtime} runtime was chosen on {device}"
        raise TlfxError(f"--precision int8 needs the OpenVINO runtime on a CPU ({why}); {INSTALL_HINT} and use "
                        f"--runtime openvino --device cpu, or choose --precision auto")
    return runtime


def cache_root() -> str:
    """``$TLFX_CACHE_DIR/openvino``, default ``~/.cache/tlfx/openvino``."""
    base = os.environ.get("TLFX_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "tlfx")
    return os.path.join(base, "openvino")


def versions(int8: bool) -> dict:
    """OpenVINO's version, and NNCF's for INT8 (from its metadata: importing nncf takes seconds)."""
    import openvino

    out = {"openvino": openvino.__version__}
    if int8:
        from importlib.metadata import PackageNotFoundError, version

        try:
            out["nncf"] = version("nncf")
        except PackageNotFoundError:
            out["nncf"] = None
    return out


def network_hash(module: nn.Module) -> str:
    """sha256 of the network's architecture and every parameter and buffer value (after batch-norm folding)."""
    h = hashlib.sha256(repr(module).encode())
    for name, t in module.state_dict().items():
        h.update(name.encode())
        t = t.detach().cpu().clone(memory_format=torch.contiguous_format).reshape(-1)  # channels_last: strided
        h.update(str((t.dtype, tuple(t.shape))).encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


class _Uint8Input(nn.Module):
    """uint8 NHWC batch -> normalised NCHW float -> the pooled features of the chosen layers."""

    def __init__(self, features: nn.Module, scale: torch.Tensor, bias: torch.Tensor):
        super().__init__()
        self.features = features
        self.register_buffer("scale", scale.float().view(1, 3, 1, 1))
        self.register_buffer("bias", bias.float().view(1, 3, 1, 1))

    def forward(self, x):
        x = x.permute(0, 3, 1, 2).float()
        return self.features(x * self.scale + self.bias)


def cache_key(net_hash: str, config: dict) -> str:
    record = {"format": CACHE_FORMAT, "network": net_hash, "batch": BATCH_POLICY,
              **versions(bool(config.get("quantized"))), **config}
    return hashlib.sha256(json.dumps(record, sort_keys=True, default=str).encode()).hexdigest()


def _read_entry(folder: str, dim: int):
    """``(ov.Model, record)`` cached in ``folder`` if its manifest, file hashes and output width check out, else None."""
    import openvino as ov

    manifest = os.path.join(folder, "manifest.json")
    try:
        if not os.path.isfile(manifest) or os.path.islink(manifest) or os.path.getsize(manifest) > _MAX_MANIFEST:
            return None
        with open(manifest) as f:
            meta = json.load(f)
        files, record = meta["files"], meta["record"]
        for name in ("model.xml", "model.bin"):
            path = os.path.join(folder, name)
            if os.path.islink(path) or not os.path.isfile(path) or sha256_of(path) != files[name]:
                return None
        model = ov.Core().read_model(os.path.join(folder, "model.xml"))
        if len(model.outputs) != 1 or model.output(0).get_partial_shape()[1].get_length() != dim:
            return None
        return model, (record if isinstance(record, dict) else {})
    except Exception:  # unreadable or malformed: rebuilt by the caller
        return None


def _write_entry(folder: str, model, record: dict) -> None:
    """Save ``model`` into ``folder`` atomically: a temporary sibling folder, then one rename."""
    import openvino as ov

    parent = os.path.dirname(folder)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".tmp-", dir=parent)
    try:
        ov.save_model(model, os.path.join(tmp, "model.xml"), compress_to_fp16=False)
        files = {n: sha256_of(os.path.join(tmp, n)) for n in ("model.xml", "model.bin")}
        with open(os.path.join(tmp, "manifest.json"), "w") as f:
            json.dump({"files": files, "record": record}, f, sort_keys=True, default=str)
        for name in ("model.xml", "model.bin", "manifest.json"):
            fd = os.open(os.path.join(tmp, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        if os.path.lexists(folder):  # a damaged entry (checked by the caller) or one another process just wrote
            shutil.rmtree(folder, ignore_errors=True)
        try:
            os.rename(tmp, folder)
        except OSError:  # another process renamed its (equal) entry first: keep that one
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def convert(module: nn.Module, crop: int):
    """``ov.Model`` of a uint8 NHWC -> features module, with a dynamic batch dimension."""
    import openvino as ov

    example = torch.zeros((2, crop, crop, 3), dtype=torch.uint8)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.jit.trace deprecation notices: not the user's concern
        model = ov.convert_model(module, example_input=example)
    model.reshape({model.input(0): ov.PartialShape([-1, crop, crop, 3])})
    return model


def quantize(model, batches: list[np.ndarray], seed: int):
    """NNCF post-training INT8 quantization calibrated on ``batches`` (uint8 NHWC arrays)."""
    import nncf

    items = [b[i:i + 1] for b in batches for i in range(len(b))]
    if not items:
        raise TlfxError("--precision int8 needs calibration images, but none of the first ones could be read")
    torch.manual_seed(seed)
    np.random.seed(seed)
    nncf.set_log_level(logging.ERROR)
    with _quiet():
        return nncf.quantize(model, nncf.Dataset(items), subset_size=len(items),
                             preset=nncf.QuantizationPreset.MIXED,
                             fast_bias_correction=QUANTIZATION["fast_bias_correction"])


@contextlib.contextmanager
def _quiet():
    """Keep NNCF's own output out of tlfx's: its progress bars (rich, written to sys.stdout whatever its log level)
    and torch's "No CUDA runtime is found" notice, logged when NNCF's torch backend loads on a CPU machine."""
    cpp = logging.getLogger("torch.utils.cpp_extension")
    level = cpp.level
    cpp.setLevel(logging.ERROR)
    try:
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            yield
    finally:
        cpp.setLevel(level)


class OpenVINOFeatures:
    """A compiled OpenVINO model of a feature extractor: ``__call__(uint8 NHWC batch) -> float32 [N, D]``.

    ``calibrate``: for ``int8``, a function returning ``(uint8 NHWC batches, record)``, called only on a cache miss;
    None when there are no images to calibrate on (``predict``), in which case a missing entry is an error. The
    calibration record (items, seed, the dataset it came from) of the model actually used is ``self.calibration``;
    the cache key holds the count and seed, not the dataset, so train and test splits share one INT8 network.
    """

    def __init__(self, features: nn.Module, scale, bias, crop: int, dim: int, precision: str, config: dict,
                 calibrate=None, threads: int | None = None):
        import openvino as ov

        self.precision = precision
        self.int8 = precision == "int8"
        wrapped = _Uint8Input(features, scale.cpu(), bias.cpu()).eval()
        record = {**config, "crop": crop, "quantized": self.int8, **({"quantization": QUANTIZATION} if self.int8 else {})}
        self.key = cache_key(network_hash(wrapped), record)
        self.folder = os.path.join(cache_root(), self.key[:32])
        with _lock:
            entry = _read_entry(self.folder, dim)
            self.cached = entry is not None
            if entry is None:
                model, self.calibration = self._build(wrapped, crop, dim, calibrate, record)
            else:
                source = entry[1].get("calibration_source")
                model, self.calibration = entry[0], (source if isinstance(source, dict) else None)
                stats["cache_hits"] += 1
        core = ov.Core()
        cfg = {"PERFORMANCE_HINT": "LATENCY", "NUM_STREAMS": "1"}
        if not self.int8:
            cfg["INFERENCE_PRECISION_HINT"] = _OV_PRECISION.get(precision, "f32")
        if threads:
            cfg["INFERENCE_NUM_THREADS"] = int(threads)
        self.compiled = core.compile_model(model, "CPU", cfg)
        self.request = self.compiled.create_infer_request()

    def _build(self, wrapped, crop, dim, calibrate, record):
        if os.path.lexists(self.folder):
            stats["rebuilt"] += 1
        if self.int8 and calibrate is None:
            raise TlfxError(f"the INT8 OpenVINO model for this configuration is not in the cache ({self.folder}) and "
                            f"there are no images to calibrate it on here; run the same tlfx extract "
                            f"--precision int8 on this machine first (or set TLFX_CACHE_DIR to where it was made)")
        model = convert(wrapped, crop)
        stats["conversions"] += 1
        source = None
        if self.int8:
            batches, source = calibrate()
            model = quantize(model, batches, record.get("calibration", {}).get("seed", CALIBRATION_SEED))
            stats["quantizations"] += 1
        if model.output(0).get_partial_shape()[1].get_length() != dim:
            raise TlfxError(f"the converted OpenVINO model gives {model.output(0).get_partial_shape()} features, "
                            f"expected {dim}; use --runtime torch for this backbone")
        try:
            _write_entry(self.folder, model, {**record, "calibration_source": source})
        except OSError as exc:  # a read-only or full cache only costs the next run a conversion
            warnings.warn(f"cannot write the OpenVINO cache {self.folder} ({exc}); it will be converted again next time",
                          stacklevel=2)
        return model, source

    def __call__(self, batch_uint8_nhwc) -> np.ndarray:
        x = batch_uint8_nhwc.numpy() if isinstance(batch_uint8_nhwc, torch.Tensor) else batch_uint8_nhwc
        self.request.infer({0: np.ascontiguousarray(x, dtype=np.uint8)})
        return np.array(self.request.get_output_tensor(0).data, dtype=np.float32, copy=True)
