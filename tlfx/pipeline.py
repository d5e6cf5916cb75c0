"""The image pipeline shared by extraction and fine-tuning: decode, resize, collate, batch, normalise.

An item is decoded and preprocessed (:class:`DecodedImages`), a batch of items becomes one uint8 NHWC tensor
(:func:`collate`, which resizes small images a whole batch at a time with torch), batches come from worker
processes or from a thread pool in this process (:func:`image_batches`), and :class:`Normalizer` turns a uint8
batch into the network's float input on the device. ``tlfx extract`` and the fine-tune's evaluation read images
through exactly this code, so both see the same pixels; fine-tuning adds its augmentation on top.
"""

from __future__ import annotations

import functools
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Subset

from .datasets import ImageDataset
from .images import BadImage, preprocess_image, resize_plan
from .preprocess import Preprocess
from .runtime import decode_threads, default_workers, worker_init

# resamplings that torch's uint8 antialiased interpolate reproduces (bilinear: exactly; bicubic: within 2 levels)
BATCH_RESIZE = ("bilinear", "bicubic")


class DecodedImages(Dataset):
    """Decodes and preprocesses item ``i`` -> ``(i, uint8 HWC array | None, reason)``; a bad file is a skip.

    A bad file becomes a recorded skip, never an exception. An image smaller than the network's input (an
    upscale, e.g. 28 px Fashion-MNIST to 256) comes back at its own size when ``batch_resize``: :func:`collate`
    resizes such images a whole batch at a time with torch, several times faster than Pillow per image, to the
    same pixels.
    """

    def __init__(self, ds: ImageDataset, pre: Preprocess, batch_resize: bool = True):
        self.ds, self.pre = ds, pre
        self.batch_resize = batch_resize and pre.interpolation in BATCH_RESIZE

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


def batch_resize(arrays: list[np.ndarray], pre: Preprocess) -> torch.Tensor:
    """Same-size uint8 HWC images -> resized and centre-cropped uint8 NHWC batch (torch, antialiased like Pillow)."""
    h, w = arrays[0].shape[:2]
    nw, nh, left, top = resize_plan(w, h, pre)
    x = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2)  # channels_last view: torch's fast uint8 kernel
    y = torch.nn.functional.interpolate(x, size=(nh, nw), mode=pre.interpolation, antialias=True)
    return y[:, :, top:top + pre.crop, left:left + pre.crop].permute(0, 2, 3, 1)


def collate(items, pre: Preprocess | None = None):
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
        out[ks] = batch_resize([good[k][1] for k in ks], pre)
    return idx, [i for i, _ in good], out, bad


class ThreadedBatches:
    """Batches decoded by a thread pool inside this process (Pillow and torch release the GIL while they work).

    Used when there are no worker processes: decoding and the network take turns on all cores instead of
    competing for them, and batches need no copy between processes.
    """

    def __init__(self, decoded: DecodedImages, indices: list[int], batch_size: int, threads: int, pin: bool = False):
        self.decoded, self.indices, self.batch_size, self.threads, self.pin = decoded, indices, batch_size, threads, pin
        self._collate = functools.partial(collate, pre=decoded.pre)

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


def image_batches(ds: ImageDataset, indices, pre: Preprocess, batch_size: int = 64, workers: int | None = None,
                  pin: bool = False):
    """Iterable of ``(indices, good indices, uint8 NHWC batch | None, [(index, reason)])`` in order.

    ``workers``: decoding processes (default :func:`tlfx.runtime.default_workers`); 0 decodes on a thread pool
    in this process between batches. ``pin``: page-locked batches (for a CUDA device).
    """
    workers = default_workers() if workers is None else workers
    decoded = DecodedImages(ds, pre)
    indices = list(indices)
    if workers <= 0:
        return ThreadedBatches(decoded, indices, batch_size, decode_threads(), pin=pin)
    return DataLoader(
        Subset(decoded, indices),
        batch_size=batch_size,
        num_workers=workers,
        collate_fn=functools.partial(collate, pre=pre),
        pin_memory=pin,
        prefetch_factor=4,
        worker_init_fn=worker_init,
        persistent_workers=False,
    )


class Normalizer:
    """uint8 NHWC batch -> ``(x / 255 - mean) / std`` as float32 NCHW on the device, in channels_last memory.

    Computed as ``x * scale + bias`` in place on the NHWC batch; the result is an NCHW view of that memory
    (channels_last without a copy).
    """

    def __init__(self, pre: Preprocess, device: torch.device):
        self.device = device
        mean, std = torch.tensor(pre.mean), torch.tensor(pre.std)
        self.scale = (1.0 / (255.0 * std)).to(device)
        self.bias = (-mean / std).to(device)

    def __call__(self, batch_uint8_nhwc: torch.Tensor, rows: int = 0) -> torch.Tensor:
        """The network's input for a uint8 ``[N, H, W, 3]`` batch; zero rows are appended up to ``rows``."""
        x = batch_uint8_nhwc.to(self.device, non_blocking=True).float()
        if rows > len(x):
            x = torch.cat([x, x.new_zeros((rows - len(x), *x.shape[1:]))])
        x.mul_(self.scale).add_(self.bias)
        return x.permute(0, 3, 1, 2)
