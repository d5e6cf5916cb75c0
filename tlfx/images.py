"""Image decoding and preprocessing, robust to the files found in uncurated folders."""

from __future__ import annotations

import contextlib
import errno
import os
import stat
import warnings

import numpy as np
from PIL import Image, ImageFile, ImageOps

from .preprocess import Preprocess

ImageFile.LOAD_TRUNCATED_IMAGES = False
MAX_PIXELS = 89_478_485  # Pillow's default bomb threshold, made a hard limit below

_RESAMPLE = {
    "nearest": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "lanczos": Image.Resampling.LANCZOS,
}


class BadImage(Exception):
    """An input that cannot be decoded; its message is the reason recorded in ``/skipped``."""


class NotRegularFile(OSError):
    """A path that names a FIFO, a device, a socket or a directory: never read, it could block or never end."""


_KINDS = ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO"), (stat.S_ISCHR, "a character device"),
          (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"))


def file_kind(mode: int) -> str:
    """What a non-regular ``st_mode`` is, in words (``a FIFO``, ``a directory``...)."""
    return next((name for test, name in _KINDS if test(mode)), "not a plain file")


def open_regular(path, max_bytes: int | None = None):
    """``path`` opened for binary reading, only if it is a regular file (at most ``max_bytes`` long).

    Opened non-blocking and then checked with ``fstat`` on the open descriptor, so a FIFO never blocks the open and
    a file swapped for something else between a check and the open is still caught. Raises
    :class:`NotRegularFile` (message ``not a regular file (a FIFO)``), or ``OSError`` from the open.
    """
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_NOCTTY", 0)
    try:
        fd = os.open(path, flags)
    except OSError as exc:
        if exc.errno == errno.ENXIO:  # a socket, or a device without a driver
            raise NotRegularFile(errno.ENXIO, "not a regular file (a socket or device)") from None
        raise
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise NotRegularFile(errno.EINVAL, f"not a regular file ({file_kind(st.st_mode)})")
        if max_bytes is not None and st.st_size > max_bytes:
            raise NotRegularFile(errno.EFBIG, f"file too large ({st.st_size} bytes, limit {max_bytes})")
        os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def to_rgb(img: Image.Image) -> Image.Image:
    """Any Pillow mode to 8-bit RGB: 16-bit grey is rescaled, not clipped; transparency goes on white."""
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):
        a = np.asarray(img, dtype=np.float64)
        hi = 65535.0 if img.mode.startswith("I;16") or a.max() > 255 else 255.0
        a = np.clip(a / hi * 255.0 + 0.5, 0, 255).astype(np.uint8)
        return Image.fromarray(a, "L").convert("RGB")
    if img.mode == "F":
        a = np.asarray(img, dtype=np.float64)
        a = np.clip(a * (255.0 if a.max() <= 1.0 else 1.0), 0, 255).astype(np.uint8)
        return Image.fromarray(a, "L").convert("RGB")
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        img = img.convert("RGBA")
        bg = Image.new("RGBA", img.size, (255, 255, 255, 255))
        return Image.alpha_composite(bg, img).convert("RGB")
    if img.mode != "RGB":
        return img.convert("RGB")
    return img


def open_image(path, target: int | None = None) -> Image.Image:
    """Open, apply EXIF orientation, take the first frame, and decode at reduced scale when much larger."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            # a file-like object holds bytes already read safely (the report's gallery, read_under_root)
            src = contextlib.nullcontext(path) if hasattr(path, "read") else open_regular(path)
            with src as fp, Image.open(fp) as img:
                if img.width * img.height > MAX_PIXELS:
                    raise BadImage(f"decompression bomb: {img.width}x{img.height} pixels")
                if target and img.format == "JPEG":
                    img.draft("RGB", (target, target))
                img.load()
                img = ImageOps.exif_transpose(img)
                return to_rgb(img)
        except BadImage:
            raise
        except Image.DecompressionBombWarning as exc:
            raise BadImage(f"decompression bomb: {exc}") from None
        except Image.DecompressionBombError as exc:
            raise BadImage(f"decompression bomb: {exc}") from None
        except NotRegularFile as exc:
            raise BadImage(exc.strerror) from None
        except FileNotFoundError:
            raise BadImage("file not found (or broken symlink)") from None
        except PermissionError:
            raise BadImage("permission denied") from None
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                raise BadImage("symlink loop") from None
            if isinstance(exc, Image.UnidentifiedImageError):
                raise BadImage("not an image (unidentified format)") from None
            raise BadImage(f"cannot decode: {_first_line(exc)}") from None
        except (SyntaxError, ValueError, EOFError) as exc:
            raise BadImage(f"cannot decode: {_first_line(exc)}") from None


def _first_line(exc: BaseException) -> str:
    return str(exc).splitlines()[0][:160] if str(exc) else type(exc).__name__


def resize_plan(w: int, h: int, pre: Preprocess) -> tuple[int, int, int, int]:
    """``(nw, nh, left, top)``: the short side resized to ``pre.resize``, then the centred ``pre.crop`` square."""
    scale = pre.resize / min(w, h)
    nw, nh = max(pre.crop, round(w * scale)), max(pre.crop, round(h * scale))
    return nw, nh, (nw - pre.crop) // 2, (nh - pre.crop) // 2


def preprocess_image(img: Image.Image, pre: Preprocess) -> np.ndarray:
    """Resize the short side to ``pre.resize``, centre-crop ``pre.crop``; uint8 HWC array.

    With a filtering resample (bilinear, bicubic, lanczos) only the crop's source box is resampled (Pillow's
    ``box=``): the pixels of resizing the whole image and then cropping (within 2 levels), without computing the
    margin that the crop throws away.
    """
    w, h = img.size
    nw, nh, left, top = resize_plan(w, h, pre)
    c = pre.crop
    resample = _RESAMPLE.get(pre.interpolation, Image.Resampling.BILINEAR)
    if (nw, nh) != (w, h) and resample != Image.Resampling.NEAREST:
        sx, sy = w / nw, h / nh
        box = (left * sx, top * sy, (left + c) * sx, (top + c) * sy)
        return np.asarray(img.resize((c, c), resample, box=box, reducing_gap=3.0), dtype=np.uint8)
    if (nw, nh) != (w, h):
        img = img.resize((nw, nh), resample, reducing_gap=3.0)
    if (nw, nh) != (c, c):
        img = img.crop((left, top, left + c, top + c))
    return np.asarray(img, dtype=np.uint8)
