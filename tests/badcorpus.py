"""A generated corpus of awkward and broken image files, as found in uncurated folders."""

from __future__ import annotations

import io
import os

import numpy as np
from PIL import Image

# name -> "ok" (must decode, with a check) or "skip" (must be recorded in /skipped)
EXPECTED = {
    "zero_byte.jpg": "skip",
    "text_named.jpg": "skip",
    "truncated.jpg": "skip",
    "truncated.png": "skip",
    "cmyk.jpg": "ok",
    "gray16.png": "ok",
    "palette_transparent.png": "ok",
    "rgba.png": "ok",
    "la.png": "ok",
    "exif_rotated.jpg": "ok",
    "animated.gif": "ok",
    "one_pixel.png": "ok",
    "bomb.png": "skip",
    "unreadable.png": "skip",
    "broken_symlink.png": "skip",
    "good.jpg": "ok",
}


def gradient(w=64, h=48):
    x = np.linspace(0, 255, w, dtype=np.float32)[None, :].repeat(h, 0)
    y = np.linspace(0, 255, h, dtype=np.float32)[:, None].repeat(w, 1)
    return np.stack([x, y, 255 - x], -1).astype(np.uint8)


def write_corpus(directory) -> dict[str, str]:
    """Write every file of EXPECTED into ``directory`` (a class folder); returns EXPECTED."""
    d = str(directory)
    os.makedirs(d, exist_ok=True)
    rgb = Image.fromarray(gradient())
    open(os.path.join(d, "zero_byte.jpg"), "wb").close()
    with open(os.path.join(d, "text_named.jpg"), "w") as f:
        f.write("this is not an image\n" * 20)
    buf = io.BytesIO()
    rgb.resize((256, 256)).save(buf, "JPEG", quality=90)
    with open(os.path.join(d, "truncated.jpg"), "wb") as f:
        f.write(buf.getvalue()[: len(buf.getvalue()) // 3])
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (256, 256, 3), dtype=np.uint8)).save(buf, "PNG")
    with open(os.path.join(d, "truncated.png"), "wb") as f:
        f.write(buf.getvalue()[: len(buf.getvalue()) // 2])
    rgb.convert("CMYK").save(os.path.join(d, "cmyk.jpg"), "JPEG")
    g16 = (np.linspace(0, 65535, 64 * 48).reshape(48, 64)).astype(np.uint16)
    Image.fromarray(g16).save(os.path.join(d, "gray16.png"))
    pal = rgb.convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    pal.info["transparency"] = 0
    pal.save(os.path.join(d, "palette_transparent.png"), transparency=0)
    rgba = rgb.convert("RGBA")
    rgba.putalpha(128)
    rgba.save(os.path.join(d, "rgba.png"))
    Image.merge("LA", (rgb.convert("L"), Image.new("L", rgb.size, 200))).save(os.path.join(d, "la.png"))
    # EXIF orientation 6 = rotate 90 CW for display: stored 64x48 landscape, displayed 48x64 portrait
    exif = Image.Exif()
    exif[0x0112] = 6
    rgb.save(os.path.join(d, "exif_rotated.jpg"), "JPEG", exif=exif.tobytes())
    frames = [Image.new("RGB", (32, 32), c) for c in ((255, 0, 0), (0, 255, 0), (0, 0, 255))]
    frames[0].save(os.path.join(d, "animated.gif"), save_all=True, append_images=frames[1:], duration=100, loop=0)
    Image.new("RGB", (1, 1), (10, 200, 30)).save(os.path.join(d, "one_pixel.png"))
    _write_bomb_png(os.path.join(d, "bomb.png"))
    Image.fromarray(gradient()).save(os.path.join(d, "unreadable.png"))
    os.chmod(os.path.join(d, "unreadable.png"), 0)
    os.symlink(os.path.join(d, "does_not_exist.png"), os.path.join(d, "broken_symlink.png"))
    rgb.save(os.path.join(d, "good.jpg"), "JPEG", quality=95)
    return dict(EXPECTED)


def _write_bomb_png(path):
    """A tiny PNG that claims 100000 x 100000 pixels (10 gigapixels): decoding it would exhaust memory."""
    import struct
    import zlib

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", 100_000, 100_000, 8, 0, 0, 0, 0)
    idat = zlib.compress(b"\x00" * 1024)
    with open(path, "wb") as f:
        f.write(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b""))
