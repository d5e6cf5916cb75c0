"""Built-in datasets: imagefolder, csv, fashion-mnist (IDX files, offline), digits (scikit-learn), cifar10."""

from __future__ import annotations

import csv
import errno
import gzip
import io
import os
import stat
import zlib

import numpy as np

import tlfx
from tlfx.datasets import IMAGE_EXTENSIONS, ArrayDataset, FileDataset
from tlfx.errors import TlfxError
from tlfx.images import file_kind, open_regular
from tlfx.safetext import terminal

FASHION_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
                   "Ankle boot"]
FASHION_DIRS = ["/usr/share/datasets/fashion-mnist", "~/.cache/tlfx/fashion-mnist"]
SPLIT_DIRS = {"train": ("train",), "test": ("test",), "val": ("val", "valid", "validation")}


def _reason(exc: OSError) -> str:
    return {errno.EACCES: "permission denied", errno.EPERM: "permission denied", errno.ENOENT: "broken symlink",
            errno.ELOOP: "symlink loop"}.get(exc.errno, exc.strerror or type(exc).__name__)


def _dir_key(path):
    st = os.stat(path)
    return st.st_dev, st.st_ino


def _scan(directory, rel, skips):
    """Entries of ``directory`` sorted by name; an unlistable folder becomes a skip ``(rel/, reason)``."""
    try:
        with os.scandir(directory) as it:
            return sorted(it, key=lambda e: e.name)
    except OSError as exc:
        skips.append((rel + "/", f"cannot list folder: {_reason(exc)}"))
        return []


class _Lister:
    """Lists image files under class folders, following links to folders at most once.

    Every folder is listed once, identified by device and inode: a link (or bind mount) that leads to a folder
    already listed or about to be (the dataset folder itself, a split or class folder, an ancestor: a loop) is
    recorded as a skip, never walked again. Links to folders outside the dataset folder are followed, so a class
    may live on another disk. A file reached twice (two links, a hard link) is listed once, under its first path.
    """

    def __init__(self, directory, reserved=(), fence=None):
        self.directory = directory
        self.fence = fence  # (dataset folder, split folder), real paths: links from one split into another are refused
        self.visited = set(reserved)  # (st_dev, st_ino) of folders listed or reserved for their own walk
        self.files: dict = {}  # (st_dev, st_ino) -> first relative path
        self.skips: list[tuple[str, str]] = []

    def rel(self, path):
        return os.path.relpath(path, self.directory)

    def walk(self, top):
        """Relative paths of the image files under ``top`` (itself already in ``visited``), in os.walk order."""
        out = []
        stack = [(top, None)]  # depth first, sub-folders in name order: the order of os.walk
        while stack:
            d, key = stack.pop()
            if key is not None:
                if key in self.visited:
                    self.skips.append((self.rel(d) + "/", "folder already listed (a link loop or a second link to "
                                       "it); listed once"))
                    continue
                self.visited.add(key)
            subdirs = []
            for e in _scan(d, self.rel(d), self.skips):
                path = os.path.join(d, e.name)
                try:
                    st = os.stat(path)
                except OSError as exc:  # a broken link: an image name stays an item, its decode says why
                    if e.name.lower().endswith(IMAGE_EXTENSIONS):
                        out.append(self.rel(path))
                    elif exc.errno == errno.ELOOP:
                        self.skips.append((self.rel(path), "symlink loop"))
                    continue
                if stat.S_ISDIR(st.st_mode):
                    if e.is_symlink() and self.crosses_split(path):
                        self.skips.append((self.rel(path) + "/", "link into another split; not followed"))
                        continue
                    subdirs.append((path, (st.st_dev, st.st_ino)))
                elif e.name.lower().endswith(IMAGE_EXTENSIONS):
                    self._file(path, st, out)
            stack += reversed(subdirs)
        return out

    def crosses_split(self, path) -> bool:
        """Whether ``path`` leads into the dataset folder but outside the chosen split (test images into train)."""
        if not self.fence:
            return False
        real = os.path.realpath(path)
        return _inside(real, self.fence[0]) and not _inside(real, self.fence[1])

    def _file(self, path, st, out):
        rel = self.rel(path)
        if not stat.S_ISREG(st.st_mode):
            self.skips.append((rel, f"not a regular file ({file_kind(st.st_mode)})"))
            return
        key = (st.st_dev, st.st_ino)
        first = self.files.setdefault(key, rel)
        if first != rel:
            self.skips.append((rel, f"same file as {first} (reached twice through links); listed once"))
        else:
            out.append(rel)


def _inside(path, folder) -> bool:
    return path == folder or path.startswith(folder.rstrip(os.sep) + os.sep)


def _class_dirs(directory, skips=None):
    """Class folder names under ``directory`` (hidden ones left out); a broken link there is recorded in ``skips``."""
    try:
        entries = sorted(os.scandir(directory), key=lambda e: e.name)
    except OSError as exc:
        raise TlfxError(f"cannot list folder {terminal(directory)!r}: {_reason(exc)}; check its permissions") from None
    names = []
    for e in entries:
        if e.name.startswith("."):
            continue
        if e.is_dir():
            names.append(e.name)
        elif skips is not None and e.is_symlink() and not os.path.exists(e.path):
            skips.append((e.name + "/", "broken symlink where a class folder may be meant"))
    return names


def _keys(paths):
    keys = set()
    for p in paths:
        try:
            keys.add(_dir_key(p))
        except OSError:
            pass
    return keys


def imagefolder(arg, split=None, root=None):
    """``imagefolder:DIR``: one sub-folder per class (``DIR/train``, ``DIR/test``, ``DIR/val`` for splits).

    Links are followed, each folder and file at most once (see :class:`_Lister`); what cannot be listed or used
    is in ``listing_skips``.
    """
    top = directory = os.path.expanduser(arg)
    if not os.path.isdir(directory):
        raise TlfxError(f"imagefolder directory {arg!r} does not exist; pass imagefolder:DIR with one sub-folder per class")
    subdirs = _class_dirs(directory)
    split_dirs = {s: next((d for d in names if d in subdirs), None) for s, names in SPLIT_DIRS.items()}
    reserved = _keys([top] + [os.path.join(top, d) for d in split_dirs.values() if d])
    skips = []
    if any(split_dirs.values()):
        chosen = split or "train"
        if not split_dirs.get(chosen):
            have = [s for s, d in split_dirs.items() if d]
            raise TlfxError(f"folder {arg!r} has no {chosen!r} sub-folder; valid splits: {', '.join(have)}")
        directory = os.path.join(directory, split_dirs[chosen])
        subdirs = _class_dirs(directory, skips)
    elif split not in (None, "all"):
        raise TlfxError(f"folder {arg!r} has no {split!r} sub-folder (no train/test split); drop --split")
    else:
        subdirs = _class_dirs(directory, skips)
    if not subdirs:
        raise TlfxError(f"folder {directory!r} has no class sub-folders; put each class's images in DIR/<class>/")
    fence = (os.path.realpath(top), os.path.realpath(directory)) if directory != top else None
    lister = _Lister(directory, reserved, fence)
    lister.skips += skips
    class_dirs = [os.path.join(directory, c) for c in subdirs]
    owner = {}
    for cls, path in zip(subdirs, class_dirs):  # a class folder linked under two names is listed under the first
        try:
            owner.setdefault(_dir_key(path), cls)
        except OSError:
            pass
    lister.visited |= set(owner)
    paths, labels = [], []
    for label, (cls, path) in enumerate(zip(subdirs, class_dirs)):
        try:
            first = owner.get(_dir_key(path), cls)
        except OSError as exc:
            lister.skips.append((cls + "/", f"cannot list folder: {_reason(exc)}"))
            continue
        if first != cls:
            lister.skips.append((cls + "/", f"same folder as {first}/ (a link); listed once, as class {first}"))
            continue
        if os.path.islink(path) and lister.crosses_split(path):
            lister.skips.append((cls + "/", "link into another split; not followed"))
            continue
        found = lister.walk(path)
        paths += found
        labels += [label] * len(found)
    ds = FileDataset(f"imagefolder:{arg}", split, directory, paths, labels, subdirs)
    ds.listing_skips = lister.skips
    return ds


MAX_CSV_BYTES = 2 << 30
MAX_IDX_BYTES = 1 << 30  # uncompressed; Fashion-MNIST's largest file is 47 MB


def _read_csv(path, arg) -> list[list[str]]:
    """The rows of a CSV data file: a regular UTF-8 file of at most MAX_CSV_BYTES, or one clear error."""
    try:
        with open_regular(path, MAX_CSV_BYTES) as fb, io.TextIOWrapper(fb, encoding="utf-8", newline="") as f:
            return list(csv.reader(f))
    except OSError as exc:
        raise TlfxError(f"cannot read CSV file {arg!r}: {exc.strerror or exc}; pass csv:FILE, a text file with rows "
                        f"path,label[,split]") from None
    except (UnicodeDecodeError, csv.Error) as exc:
        raise TlfxError(f"CSV file {arg!r} is not valid UTF-8 CSV ({str(exc)[:120]}); save it as UTF-8 text with "
                        f"rows path,label[,split]") from None


def csv_dataset(arg, split=None, root=None):
    path = os.path.expanduser(arg)
    if not os.path.lexists(path):
        raise TlfxError(f"CSV file {arg!r} does not exist; pass csv:FILE with rows path,label[,split]")
    rows = [r for r in _read_csv(path, arg) if r and not r[0].startswith("#")]
    if rows and [c.strip().lower() for c in rows[0][:2]] == ["path", "label"]:
        rows = rows[1:]
    has_split = any(len(r) >= 3 for r in rows)
    if split not in (None, "all"):
        if not has_split:
            raise TlfxError(f"CSV {arg!r} has no split column; drop --split or add a third column path,label,split")
        rows = [r for r in rows if len(r) >= 3 and r[2].strip() == split]
    bad = next((r for r in rows if len(r) < 2), None)
    if bad is not None:
        raise TlfxError(f"CSV {arg!r} row {bad!r} has no label; each row is path,label[,split]")
    base = root or os.path.dirname(os.path.abspath(path))
    names = sorted({r[1].strip() for r in rows if r[1].strip()})
    index = {n: i for i, n in enumerate(names)}
    labels = [index.get(r[1].strip(), -1) for r in rows]
    rels = [os.path.relpath(os.path.join(base, os.path.expanduser(r[0].strip())), base) for r in rows]
    return FileDataset(f"csv:{arg}", split, base, rels, labels, names)


_IDX_DTYPES = {0x08: np.uint8}  # the only element type Fashion-MNIST (and MNIST) use


def _read_idx(path, ndim_expected: int):
    """An IDX array (``ndim_expected`` dimensions, unsigned bytes), validated before any data is trusted."""
    try:
        with open_regular(path, MAX_IDX_BYTES) as raw:
            f = gzip.GzipFile(fileobj=raw, mode="rb") if path.endswith(".gz") else raw
            header = f.read(4)
            if len(header) < 4 or header[:2] != b"\0\0":
                raise ValueError("no IDX header (magic 0x0000)")
            dtype = _IDX_DTYPES.get(header[2])
            if dtype is None:
                raise ValueError(f"element type 0x{header[2]:02x}, expected 0x08 (unsigned byte)")
            if header[3] != ndim_expected:
                raise ValueError(f"{header[3]} dimensions, expected {ndim_expected}")
            dims = f.read(4 * ndim_expected)
            if len(dims) < 4 * ndim_expected:
                raise ValueError("header cut short")
            shape = tuple(int.from_bytes(dims[4 * i: 4 * i + 4], "big") for i in range(ndim_expected))
            size = int(np.prod(shape, dtype=object))
            if size > MAX_IDX_BYTES:
                raise ValueError(f"shape {shape} claims {size} bytes, more than the {MAX_IDX_BYTES} allowed")
            data = f.read(size + 1)
            if len(data) != size:
                raise ValueError(f"shape {shape} needs {size} bytes of data, the file holds {len(data)}")
    except (OSError, EOFError, ValueError, zlib.error) as exc:
        raise TlfxError(f"malformed IDX file {path!r}: {getattr(exc, 'strerror', None) or exc}; replace it with the "
                        f"original Fashion-MNIST file (apt-get install --reinstall dataset-fashion-mnist)") from None
    return np.frombuffer(data, dtype=dtype).reshape(shape)


def _find_idx(directory, stem):
    for name in (stem, stem + ".gz"):
        p = os.path.join(directory, name)
        if os.path.isfile(p):
            return p
    return None


def _fashion_arrays(split, img_path, lab_path):
    images, labels = _read_idx(img_path, 3), _read_idx(lab_path, 1)
    if len(images) != len(labels) or (len(labels) and int(labels.max()) >= len(FASHION_CLASSES)):
        raise TlfxError(f"IDX files {img_path!r} and {lab_path!r} do not match ({len(images)} images, {len(labels)} "
                        f"labels, labels 0-{len(FASHION_CLASSES) - 1} expected); replace them with the originals")
    return ArrayDataset("fashion-mnist", split, images, labels, FASHION_CLASSES)


def fashion_mnist(arg, split=None, root=None):
    split = split or "train"
    prefix = "train" if split == "train" else "t10k"
    # TLFX_FASHION_MNIST_DIRS (os.pathsep-separated) replaces the default search path
    dirs = os.environ.get("TLFX_FASHION_MNIST_DIRS")
    dirs = [d for d in dirs.split(os.pathsep) if d] if dirs is not None else FASHION_DIRS
    candidates = [root] if root else [os.path.expanduser(d) for d in dirs]
    if root:
        candidates += [os.path.join(root, "FashionMNIST", "raw")]
    for d in candidates:
        img = _find_idx(d, f"{prefix}-images-idx3-ubyte")
        lab = _find_idx(d, f"{prefix}-labels-idx1-ubyte")
        if img and lab:
            return _fashion_arrays(split, img, lab)
    if os.environ.get("TLFX_DOWNLOAD") == "1":
        import torchvision

        target = os.path.expanduser("~/.cache/tlfx")
        ds = torchvision.datasets.FashionMNIST(target, train=split == "train", download=True)
        return ArrayDataset("fashion-mnist", split, ds.data.numpy(), ds.targets.numpy(), FASHION_CLASSES)
    raise TlfxError(
        f"Fashion-MNIST IDX files not found in {', '.join(candidates)}; apt-get install dataset-fashion-mnist, "
        f"pass --root DIR, or set TLFX_DOWNLOAD=1 to let torchvision download them"
    )


def digits(arg, split=None, root=None):
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    d = load_digits()
    images = np.round(d.images * (255.0 / 16.0)).astype(np.uint8)
    idx = np.arange(len(images))
    tr, te = train_test_split(idx, test_size=0.25, random_state=0, stratify=d.target)
    if split in (None, "train"):
        sel, split = np.sort(tr), "train"
    elif split == "test":
        sel = np.sort(te)
    else:
        sel = idx
    return ArrayDataset("digits", split, images[sel], d.target[sel], [str(i) for i in range(10)], index=sel)


def cifar10(arg, split=None, root=None):
    import torchvision

    split = split or "train"
    directory = os.path.expanduser(root or arg or "~/.cache/tlfx/cifar10")
    download = os.environ.get("TLFX_DOWNLOAD") == "1"
    if not download and not os.path.isdir(os.path.join(directory, "cifar-10-batches-py")):
        raise TlfxError(
            f"CIFAR-10 not found in {directory!r}: put torchvision's cifar-10-batches-py folder there "
            f"(cifar10:DIR or --root DIR), or set TLFX_DOWNLOAD=1 to let torchvision download it"
        )
    ds = torchvision.datasets.CIFAR10(directory, train=split == "train", download=download)
    return ArrayDataset("cifar10", split, ds.data, ds.targets, ds.classes)


@tlfx.hookimpl
def register_datasets(register):
    register("imagefolder", imagefolder, description="imagefolder:DIR, one sub-folder per class "
             "(DIR/train and DIR/test for splits); links are followed, each folder and file listed once",
             splits=("train", "test", "val", "all"), needs_argument=True,
             argument="DIR")
    register("csv", csv_dataset, description="csv:FILE with rows path,label[,split]; paths relative to the CSV",
             splits=("train", "test", "val", "all"), needs_argument=True, argument="FILE")
    register("fashion-mnist", fashion_mnist, description="Fashion-MNIST 60k/10k, 28 px grey (IDX files; Debian "
             "package dataset-fashion-mnist)", splits=("train", "test"))
    register("digits", digits, description="scikit-learn's 8x8 digits, 1797 images, 75/25 stratified split",
             splits=("train", "test", "all"))
    register("cifar10", cifar10, description="CIFAR-10 in torchvision's folder format (cifar10:DIR or --root)",
             splits=("train", "test"))
