"""Fine-tune plugin: ``tlfx finetune`` (full or partial fine-tuning of any torch backbone) and the ``finetune``
model kind, which ``tlfx evaluate``, ``tlfx predict`` and ``tlfx compare --finetune`` read like a head model.

A finetune model file is the same zip container as a head model: ``meta.json`` plus ``weights.safetensors``
(the whole fine-tuned network), so loading it runs no code. The architecture is rebuilt from the registered
backbone (random init) and the weights are loaded into it. This module stays light (no torch at import);
the engine is :mod:`tlfx_plugins.finetune_train`.
"""

from __future__ import annotations

import os
import sys
import zipfile

import click

import tlfx
from tlfx.errors import TlfxError
from tlfx.models import Model, Trust, bad_record, check_field, check_pixels, check_preprocess, no_network, register_model_kind

WEIGHTS_MEMBER = "weights.safetensors"


class FinetuneModel(Model):
    """A fine-tuned network with its record (backbone, base weights, preprocessing, classes, training history)."""

    kind = "finetune"
    reads_features = False  # predicts from the images a store points to, not from its cached features

    def __init__(self, meta: dict, state_dict: dict):
        super().__init__(meta)
        self.state_dict = state_dict
        self._net = None
        self._fast_net = None
        self._device = None

    # ------------------------------------------------------------------------------------------ files
    def save_members(self, z: zipfile.ZipFile):
        from safetensors.torch import save

        z.writestr(WEIGHTS_MEMBER, save({k: v.contiguous() for k, v in self.state_dict.items()}))

    @classmethod
    def load(cls, z: zipfile.ZipFile, meta: dict, trust: Trust = Trust()) -> FinetuneModel:
        from safetensors.torch import load

        where = getattr(z, "filename", None) or "model"
        validate_finetune_meta(meta, where)
        data = cls.read_member(z, WEIGHTS_MEMBER, "fine-tune again")  # size-bounded; safetensors holds no code
        try:
            state = load(data)
        except Exception as exc:
            raise TlfxError(f"model {where!r}: {WEIGHTS_MEMBER} is not readable ({type(exc).__name__}); "
                            f"it is damaged, fine-tune again") from None
        return cls(meta, state)

    # ---------------------------------------------------------------------------------------- network
    def network(self, device=None):
        """The fine-tuned torch module (rebuilt from the backbone registry, weights loaded), in eval mode."""
        if self._net is None:
            import torch

            from tlfx.backbone import create_backbone
            from tlfx.runtime import pick_device
            from tlfx_plugins.finetune_train import FinetuneNet

            m = self.meta
            with no_network():  # the architecture only (random init): nothing to download
                bb = create_backbone(m["backbone"], weights="none")
            net = FinetuneNet(bb.module, m.get("classifier"), len(self.class_names), m.get("head_in_features"))
            try:
                net.load_state_dict(self.state_dict)
            except RuntimeError as exc:
                lines = str(exc).strip().splitlines()
                raise TlfxError(f"the fine-tuned weights do not fit backbone {m['backbone']!r} as installed here "
                                f"({(lines[1] if len(lines) > 1 else lines[0]).strip()[:160]}); "
                                f"use the tlfx/timm/torchvision versions it was made with") from None
            self._device = pick_device(device)
            self._net = net.to(self._device).to(memory_format=torch.channels_last).eval()
        return self._net

    def _preprocess(self):
        from tlfx.preprocess import Preprocess

        p = self.meta["preprocess"]
        return Preprocess(p["resize"], p["crop"], tuple(p["mean"]), tuple(p["std"]), p.get("interpolation", "bilinear"))

    def _run(self, ds, indices, batch_size=64, workers=None):
        from tlfx.pipeline import Normalizer
        from tlfx.runtime import default_workers, resolve_precision
        from tlfx_plugins.finetune_train import eval_batches, predict_proba

        if self._fast_net is None:  # inference only: batch norms folded into the convolutions
            from tlfx.bn_folding import fold_batchnorm

            self._fast_net = fold_batchnorm(self.network())[0]
        net = self._fast_net
        pre = self._preprocess()
        workers = default_workers() if workers is None else workers
        indices = list(indices)
        batches = eval_batches(ds, indices, pre, batch_size, workers if len(indices) > 256 else 0, self._device)
        precision = resolve_precision("auto", self._device)
        return predict_proba(net, batches, Normalizer(pre, self._device), self._device, precision, len(self.class_names))

    def predict_proba_images(self, paths: list[str]):
        """Probabilities for image files: ``(proba [n_ok, n_classes], ok_paths, [(path, reason)])``."""
        import numpy as np

        from tlfx.datasets import FileDataset

        paths = [os.fspath(p) for p in paths]
        ds = FileDataset("files", None, "/", [os.path.abspath(p).lstrip("/") for p in paths], [-1] * len(paths), [])
        proba, idx, bad = self._run(ds, range(len(paths)), batch_size=32, workers=0)
        if not idx:
            proba = np.zeros((0, len(self.class_names)))
        return proba, [paths[i] for i in idx], [(paths[i], r) for i, r in bad]

    def predict_proba_store(self, store):
        """Probabilities for the rows of a FeatureStore, in row order, from the images its ids point to.

        The store's attrs say which dataset, split, root and limit it was extracted from; the images are read
        again (the cached features are not used). A row whose image cannot be read any more gets uniform
        probabilities and a warning.
        """
        import numpy as np

        ds, index = dataset_of_store(store)
        ids = store.ids
        rows = np.asarray([index[i] for i in ids], dtype=np.int64)
        k = len(self.class_names)
        out = np.full((len(ids), k), 1.0 / max(k, 1))
        if not len(rows):
            return out
        proba, idx, bad = self._run(ds, rows)
        where = {int(d): r for r, d in enumerate(rows)}
        for p, d in zip(proba, idx):
            out[where[int(d)]] = p
        if bad:
            print(f"warning: {len(bad)} image(s) of {store.path!r} could not be read again (e.g. {ds.ids[bad[0][0]]}: "
                  f"{bad[0][1]}); they count as uniform predictions", file=sys.stderr)
        return out


def validate_finetune_meta(meta: dict, where: str):
    """The fields a finetune record must have, with their types and ranges (one line naming the bad field)."""
    check_field(where, "backbone", meta.get("backbone"), (str,), optional=False)
    check_preprocess(where, "preprocess", meta.get("preprocess"), optional=False)
    check_pixels(where, "image_size", meta.get("image_size"))
    check_field(where, "classifier", meta.get("classifier"), (str,))
    check_field(where, "head_in_features", meta.get("head_in_features"), (int,))
    n = meta.get("head_in_features")
    if n is not None and not 1 <= n <= 1 << 16:
        raise bad_record(where, f"field 'head_in_features' is {n}, outside 1..65536")


def dataset_of_store(store):
    """Re-open the dataset a store was extracted from; returns ``(dataset, {store id: dataset index})``.

    Refuses with one line when the store's ids are not all found (data moved or changed).
    """
    from tlfx.datasets import FileDataset, load_dataset

    a = store.attrs
    spec, split = a.get("dataset"), a.get("split")
    root = a.get("data_root") or None
    limit = int(a.get("limit") or 0) or None
    if not spec:
        raise TlfxError(f"store {store.path!r} does not record its dataset, so a fine-tuned model cannot re-read its "
                        f"images; extract it again with this tlfx")
    ds, first_error = None, None
    for sp in ([split, None] if split == "all" else [split]):
        try:
            ds = load_dataset(spec, sp, root=root, limit=limit)
            break
        except TlfxError as exc:
            first_error = first_error or exc
    ids = store.ids
    if ds is not None:
        index = {str(i): n for n, i in enumerate(ds.ids)}
        if all(i in index for i in ids):
            return ds, index
    if root and os.path.isdir(root):  # files addressed relative to the recorded absolute root (spec path moved)
        fds = FileDataset(spec, split, root, ids, store.labels, store.class_names)
        sample = range(0, len(ids), max(1, len(ids) // 20))
        if ids and all(os.path.isfile(fds.path(n)) for n in sample):
            return fds, {i: n for n, i in enumerate(ids)}
    if first_error is not None and ds is None:
        raise TlfxError(f"cannot re-read the images of store {store.path!r} ({first_error.message}); a fine-tuned model "
                        f"predicts from images, not cached features")
    raise TlfxError(f"the images of store {store.path!r} (dataset {spec!r}, split {split!r}) are no longer where it "
                    f"says; a fine-tuned model predicts from images, so restore them or extract the store again")


register_model_kind("finetune", FinetuneModel)


# ------------------------------------------------------------------------------------------------ command
@click.command("finetune")
@click.option("--backbone", default="efficientnet_lite0", show_default=True,
              help="A registered backbone that is a torch module (tlfx backbones), or timm:<name>.")
@click.option("--data", "data", required=True, metavar="SPEC",
              help="imagefolder:DIR, csv:FILE, fashion-mnist, digits, cifar10, or a plugin's.")
@click.option("--split", default="train", show_default=True, help="The split to train on (a validation part is held out).")
@click.option("--root", default=None, metavar="DIR", help="Where a built-in dataset's files are.")
@click.option("--limit", type=int, default=None, metavar="N", help="Use only the first N items (quick runs).")
@click.option("--epochs", type=int, required=True, metavar="E", help="Epochs to train (a resumed run counts the done ones).")
@click.option("--image-size", type=int, default=None, metavar="PX", help="Input size (default: the weights' crop size).")
@click.option("--unfreeze", default="all", show_default=True, metavar="all|last:N|head",
              help="What trains: everything, the last N stages + new layer, or the new layer only.")
@click.option("--lr", type=float, default=None, help="Peak learning rate of the new layer (default adamw 1e-3, sgd 0.05).")
@click.option("--lr-decay", type=float, default=0.7, show_default=True,
              help="Each earlier unfrozen stage trains at this times the next one's rate (floor 0.05 x --lr).")
@click.option("--optimizer", type=click.Choice(["adamw", "sgd"]), default="adamw", show_default=True)
@click.option("--weight-decay", type=float, default=None, help="Default: adamw 0.01, sgd 5e-4 (none on biases/norms).")
@click.option("--augment", default="flip,crop", show_default=True, metavar="LIST",
              help="Comma-separated: flip, crop, scale, rotate, color, erase; or none.")
@click.option("--val-fraction", type=float, default=0.1, show_default=True,
              help="Held-out share of the training split for early stopping and the best epoch (0: none).")
@click.option("--batch-size", type=int, default=64, show_default=True)
@click.option("--label-smoothing", type=float, default=0.1, show_default=True)
@click.option("--schedule", type=click.Choice(["onecycle", "cosine"]), default="onecycle", show_default=True)
@click.option("--precision", type=click.Choice(["auto", "fp32", "bf16", "fp16"]), default="auto", show_default=True,
              help="auto: bf16 autocast on CPUs with AMX/AVX512-BF16, bf16/fp16 on CUDA, else fp32.")
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda or cuda:N.")
@click.option("--patience", type=int, default=3, show_default=True,
              help="Stop after this many epochs without validation improvement (0: never).")
@click.option("--weights", default=None, metavar="PATH", help="Local state-dict file instead of the default pretrained weights.")
@click.option("--workers", type=int, default=None, help="Decoding worker processes (default: cores - 1).")
@click.option("--seed", type=click.IntRange(0, 2**32 - 1), default=0, show_default=True)
@click.option("--restart", is_flag=True, help="Ignore an existing checkpoint OUT.ckpt and start from the pretrained weights.")
@click.option("--quiet", is_flag=True, help="No progress output.")
@click.option("--out", required=True, type=click.Path(dir_okay=False), metavar="M", help="The model file to write.")
def finetune_command(out, restart, quiet, **options):
    """Fine-tune a pretrained backbone on images (all of it, its last stages, or a new layer only).

    Writes a model file that tlfx evaluate, tlfx predict and tlfx compare --finetune use like a head model.
    A checkpoint OUT.ckpt is written after each epoch: run the same command again to resume a killed run
    (or with a larger --epochs to train on). Progress shows loss, accuracy and images/s.

    \b
    Examples:
      tlfx finetune --data fashion-mnist --limit 5000 --image-size 64 --epochs 2 --unfreeze last:2 --out ft.tlfx
      tlfx finetune --data imagefolder:photos --epochs 10 --augment flip,scale,color --out photos-ft.tlfx
      tlfx finetune --backbone resnet18 --weights resnet18.pth --data csv:labels.csv --epochs 5 --optimizer sgd --out r18.tlfx
      tlfx evaluate --model ft.tlfx --features test.h5
      tlfx compare --train tr.h5 --test te.h5 --heads svm,linear --finetune ft.tlfx --out report
    """
    from tlfx_plugins.finetune_config import FinetuneConfig

    options["device"] = None if options["device"] == "auto" else options["device"]
    cfg = FinetuneConfig(**options).validate()  # bad values end here, before torch is imported

    from tlfx_plugins.finetune_train import finetune

    model = finetune(out, cfg, restart=restart, quiet=quiet, progress=not quiet and sys.stderr.isatty())
    if model is not None:
        m = model.meta
        val = f", best val accuracy {m['best_val_accuracy']:.4f} (epoch {m['best_epoch']})" \
            if m.get("best_val_accuracy") is not None else ""
        click.echo(f"{out}: {m['backbone']} fine-tuned ({m['unfreeze']}) for {m['epochs']} epoch(s), "
                   f"{m['train_seconds']:.1f} s, {m['images_per_s']:.0f} img/s{val}")


@tlfx.hookimpl
def register_commands(cli):
    cli.add_command(finetune_command)
