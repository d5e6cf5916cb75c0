"""Built-in datasets: imagefolder, csv, fashion-mnist (IDX files, offline), digits (scikit-learn), cifar10."""

from __future__ import annotations

import csv
import gzip
import os

import numpy as np

import tlfx
from tlfx.datasets import IMAGE_EXTENSIONS, ArrayDataset, FileDataset
from tlfx.errors import TlfxError

FASHION_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
                   "Ankle boot"]
FASHION_DIRS = ["/usr/share/datasets/fashion-mnist", "~/.cache/tlfx/fashion-mnist"]
SPLIT_DIRS = {"train": ("train",), "test": ("test",), "val": ("val", "valid", "validation")}


def _class_dirs(directory):
    return sorted(e.name for e in os.scandir(directory) if e.is_dir() and not e.name.startswith("."))


def imagefolder(arg, split=None, root=None):
    directory = os.path.expanduser(arg)
    if not os.path.isdir(directory):
        raise TlfxError(f"imagefolder directory {arg!r} does not exist; pass imagefolder:DIR with one sub-folder per class")
    subdirs = _class_dirs(directory)
    split_dirs = {s: next((d for d in names if d in subdirs), None) for s, names in SPLIT_DIRS.items()}
    if any(split_dirs.values()):
        chosen = split or "train"
        if not split_dirs.get(chosen):
            have = [s for s, d in split_dirs.items() if d]
            raise TlfxError(f"folder {arg!r} has no {chosen!r} sub-folder; valid splits: {', '.join(have)}")
        directory = os.path.join(directory, split_dirs[chosen])
        subdirs = _class_dirs(directory)
    elif split not in (None, "all"):
        raise TlfxError(f"folder {arg!r} has no {split!r} sub-folder (no train/test split); drop --split")
    if not subdirs:
        raise TlfxError(f"folder {directory!r} has no class sub-folders; put each class's images in DIR/<class>/")
    paths, labels = [], []
    for label, cls in enumerate(subdirs):
        for dirpath, dirnames, filenames in os.walk(os.path.join(directory, cls), followlinks=True):
            dirnames.sort()
            for f in sorted(filenames):
                if f.lower().endswith(IMAGE_EXTENSIONS):
                    paths.append(os.path.relpath(os.path.join(dirpath, f), directory))
                    labels.append(label)
    return FileDataset(f"imagefolder:{arg}", split, directory, paths, labels, subdirs)


def csv_dataset(arg, split=None, root=None):
    path = os.path.expanduser(arg)
    if not os.path.isfile(path):
        raise TlfxError(f"CSV file {arg!r} does not exist; pass csv:FILE with rows path,label[,split]")
    with open(path, newline="", encoding="utf-8") as f:
        rows = [r for r in csv.reader(f) if r and not r[0].startswith("#")]
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


def _read_idx(path):
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rb") as f:
        data = f.read()
    ndim = data[3]
    shape = tuple(int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)


def _find_idx(directory, stem):
    for name in (stem, stem + ".gz"):
        p = os.path.join(directory, name)
        if os.path.isfile(p):
            return p
    return None


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
            return ArrayDataset("fashion-mnist", split, _read_idx(img), _read_idx(lab), FASHION_CLASSES)
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
             "(DIR/train and DIR/test for splits)", splits=("train", "test", "val", "all"), needs_argument=True,
             argument="DIR")
    register("csv", csv_dataset, description="csv:FILE with rows path,label[,split]; paths relative to the CSV",
             splits=("train", "test", "val", "all"), needs_argument=True, argument="FILE")
    register("fashion-mnist", fashion_mnist, description="Fashion-MNIST 60k/10k, 28 px grey (IDX files; Debian "
             "package dataset-fashion-mnist)", splits=("train", "test"))
    register("digits", digits, description="scikit-learn's 8x8 digits, 1797 images, 75/25 stratified split",
             splits=("train", "test", "all"))
    register("cifar10", cifar10, description="CIFAR-10 in torchvision's folder format (cifar10:DIR or --root)",
             splits=("train", "test"))
