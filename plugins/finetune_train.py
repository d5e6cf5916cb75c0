"""The fine-tune engine behind ``tlfx finetune`` (imported only when a fine-tune runs or a finetune model predicts).

A registered backbone's torch module gets a new classification layer for the dataset's classes; ``--unfreeze``
chooses what trains (``all``, ``head``, or ``last:N`` stages + the new layer), earlier groups with lower learning
rates. Each finished epoch is checkpointed atomically to ``OUT.ckpt`` (tensors and plain containers only, so it
loads with ``torch.load(weights_only=True)``); running the same command again resumes after the last finished
epoch. The result is a :class:`tlfx_plugins.finetune.FinetuneModel` file.
"""

from __future__ import annotations

import functools
import math
import os
import sys
import time
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from tlfx import __version__
from tlfx.backbone import Backbone, create_backbone, pool
from tlfx.datasets import ImageDataset, load_dataset
from tlfx.errors import TlfxError
from tlfx.pipeline import DecodedImages, Normalizer, collate, image_batches
from tlfx.preprocess import Preprocess
from tlfx.runtime import autocast, default_workers, pick_device, resolve_precision, worker_init
from tlfx_plugins.finetune_config import (  # noqa: F401  (re-exported)
    AUGMENTS,
    CKPT_FORMAT,
    DEFAULT_LR,
    DEFAULT_WD,
    MIN_LR_MULT,
    OPTIMIZERS,
    RESUME_KEYS,
    SCHEDULES,
    FinetuneConfig,
    parse_augment,
    parse_unfreeze,
)


# ------------------------------------------------------------------------------------------------ network
class FinetuneNet(nn.Module):
    """A backbone module with a new classification layer.

    With ``classifier`` (the path of the backbone's final ``nn.Linear``) that layer is replaced in place;
    without, a linear layer on the pooled output is added as ``head``.
    """

    def __init__(self, body: nn.Module, classifier: str | None, n_classes: int, head_in: int | None = None):
        super().__init__()
        self.body = body
        self.head: nn.Linear | None = None
        if classifier:
            parent_name, _, leaf = classifier.rpartition(".")
            parent = body.get_submodule(parent_name) if parent_name else body
            old = getattr(parent, leaf)
            setattr(parent, leaf, nn.Linear(old.in_features, n_classes))
            self.head_path = f"body.{classifier}"
        else:
            if head_in is None:
                raise ValueError("head_in is needed for a backbone without a classifier layer")
            self.head = nn.Linear(head_in, n_classes)
            self.head_path = "head"

    def forward(self, x):
        out = self.body(x)
        if self.head is not None:
            out = self.head(pool(out).float())
        return out


def probe_dim(module: nn.Module, size: int) -> int:
    """Width of a backbone's pooled output (for backbones without a classifier layer)."""
    was = module.training
    module.eval()
    with torch.no_grad():
        d = pool(module(torch.zeros(1, 3, size, size))).shape[1]
    module.train(was)
    return int(d)


def build_network(bb: Backbone, n_classes: int, image_size: int, head_in: int | None = None) -> FinetuneNet:
    if bb.classifier is None and head_in is None:
        head_in = probe_dim(bb.module, image_size)
    return FinetuneNet(bb.module, bb.classifier, n_classes, head_in)


def _stage_of(name: str, stages: list[str]) -> int | None:
    for k, s in enumerate(stages):
        if name == s or name.startswith(s + "."):
            return k
    return None


def param_groups(net: FinetuneNet, stages: list[str], unfreeze: str, lr: float, lr_decay: float,
                 weight_decay: float) -> list[dict]:
    """Switch on ``requires_grad`` for what ``unfreeze`` asks and return optimizer groups, earliest first.

    Backbone parameters are grouped by stage (a stage ends at the module named in ``backbone.stages``; what
    follows the last stage end, e.g. a final 1x1 conv, belongs to the last stage). The new layer trains at
    ``lr``; each earlier group at ``lr_decay`` times the next one, never below ``MIN_LR_MULT * lr``.
    Biases and norm weights (1-d tensors) get no weight decay.
    """
    mode, n = parse_unfreeze(unfreeze)
    for p in net.parameters():
        p.requires_grad_(False)
    head_prefix = net.head_path + "."
    named = list(net.named_parameters())
    head = [(k, p) for k, p in named if k.startswith(head_prefix)]
    body = [(k[len("body."):], p) for k, p in named if not k.startswith(head_prefix)]
    # stage of every body parameter: stage k covers (end of stage k-1, end of stage k]; what precedes stage 0's
    # end is stage 0, what follows the last stage's end belongs to the last stage. Walk backwards from the end.
    groups_of: list[int] = [0] * len(body)
    current = max(len(stages) - 1, 0)
    for pos in range(len(body) - 1, -1, -1):
        s_ = _stage_of(body[pos][0], stages)
        if s_ is not None:
            current = s_
        groups_of[pos] = current
    n_stages = max(len(stages), 1)
    if mode == "head":
        first = n_stages  # nothing of the body
    elif mode == "all":
        first = 0
    else:
        first = max(0, n_stages - n)
    chosen: dict[int, list] = {}
    for (k, p), g in zip(body, groups_of):
        if g >= first:
            chosen.setdefault(g, []).append((k, p))
    ordered = [("stage:" + (stages[g] if g < len(stages) else str(g)), chosen[g]) for g in sorted(chosen)]
    ordered.append(("classifier", [(net.head_path + "." + k.split(".")[-1], p) for k, p in head]))
    groups = []
    n_groups = len(ordered)
    for j, (name, params) in enumerate(ordered):
        mult = max(MIN_LR_MULT, lr_decay ** (n_groups - 1 - j))
        for p in (p for _, p in params):
            p.requires_grad_(True)
        decay = [p for _, p in params if p.ndim > 1]
        no_decay = [p for _, p in params if p.ndim <= 1]
        for ps, wd in ((decay, weight_decay), (no_decay, 0.0)):
            if ps:
                groups.append({"params": ps, "name": name, "lr_mult": mult, "max_lr": lr * mult, "lr": lr * mult,
                               "weight_decay": wd})
    return groups


def set_train_mode(net: nn.Module):
    """Train mode, but frozen batch-norm layers keep their running statistics (eval mode)."""
    net.train()
    for m in net.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            own = list(m.parameters(recurse=False))
            if own and not any(p.requires_grad for p in own):
                m.eval()


# ------------------------------------------------------------------------------------------------ schedule
class Schedule:
    """Learning rate (and momentum, for one-cycle) as a pure function of the step: resumable from a step count."""

    def __init__(self, kind: str, total_steps: int, step: int = 0):
        self.kind, self.total, self.step = kind, max(1, int(total_steps)), int(step)

    def factor(self, step: int) -> float:
        t = min(1.0, step / self.total)
        if self.kind == "onecycle":  # torch's OneCycleLR shape: up for 25 %, cosine down to max/1e4
            pct, start, end = 0.25, 1 / 25, 1 / 25e4
            if t < pct:
                return start + (1 - start) * (1 - math.cos(math.pi * t / pct)) / 2
            return end + (1 - end) * (1 + math.cos(math.pi * (t - pct) / (1 - pct))) / 2
        warm = min(0.05, 0.5)  # cosine with a 5 % linear warm-up
        if t < warm:
            return 0.1 + 0.9 * t / warm
        return 0.5 * (1 + math.cos(math.pi * (t - warm) / (1 - warm)))

    def apply(self, opt: torch.optim.Optimizer):
        f = self.factor(self.step)
        for g in opt.param_groups:
            g["lr"] = g["max_lr"] * f
            if self.kind == "onecycle":  # momentum moves opposite to the learning rate, 0.95 -> 0.85 -> 0.95
                m = 0.95 - 0.10 * f
                if "betas" in g:
                    g["betas"] = (m, g["betas"][1])
                elif "momentum" in g:
                    g["momentum"] = m

    def state_dict(self) -> dict:
        return {"kind": self.kind, "step": self.step, "total_steps": self.total}


# ------------------------------------------------------------------------------------------------ data
def _train_transform(pre: Preprocess, augment: list[str]):
    import torchvision.transforms.v2 as T

    ops = []
    if "scale" in augment:
        ops.append(T.RandomResizedCrop(pre.crop, scale=(0.35, 1.0), antialias=True))
    elif "crop" in augment:
        ops.append(T.RandomCrop(pre.crop))
    else:
        ops.append(T.CenterCrop(pre.crop))
    if "flip" in augment:
        ops.append(T.RandomHorizontalFlip())
    if "rotate" in augment:
        ops.append(T.RandomRotation(12))
    if "color" in augment:
        ops.append(T.ColorJitter(0.3, 0.3, 0.3))
    if "erase" in augment:
        ops.append(T.RandomErasing(p=0.25))
    return T.Compose(ops)


class AugmentedImages(Dataset):
    """Training item ``k`` -> ``(dataset index, uint8 HWC array | None, reason)``, the shared pipeline's item.

    The image is decoded and resized by :class:`tlfx.pipeline.DecodedImages` (the evaluation's Pillow resize, to
    ``resize`` x ``resize``) so training and evaluation see images at the same scale; augmentation (torchvision
    v2) crops, flips, rotates from there to ``crop``. An unreadable file is a skip, never the end of a run.
    """

    def __init__(self, ds: ImageDataset, indices, pre: Preprocess, augment: list[str]):
        self.indices = list(indices)
        base = Preprocess(pre.resize, pre.resize, pre.mean, pre.std, pre.interpolation)
        self.decoded = DecodedImages(ds, base, batch_resize=False)
        self.tf = _train_transform(pre, augment)

    def __len__(self):
        return len(self.indices)

    def __getitem__(self, k):
        i, a, reason = self.decoded[int(self.indices[k])]
        if a is None:
            return i, None, reason
        try:
            x = self.tf(torch.tensor(a).permute(2, 0, 1).contiguous())
            return i, x.permute(1, 2, 0).numpy(), ""
        except Exception as exc:  # one file the augmentation cannot take is a skip, not the end of the run
            return i, None, f"{type(exc).__name__}: {exc}"[:200]


def train_batches(items: AugmentedImages, pre: Preprocess, batch_size: int, workers: int, shuffle_seed: int,
                  device: torch.device):
    """Shuffled training batches in the shared pipeline's format: ``(indices, good indices, uint8 NHWC, bad)``."""
    return DataLoader(items, batch_size=batch_size, shuffle=True, generator=torch.Generator().manual_seed(shuffle_seed),
                      num_workers=workers, collate_fn=functools.partial(collate, pre=pre),
                      pin_memory=device.type == "cuda", prefetch_factor=4 if workers else None,
                      worker_init_fn=worker_init, drop_last=False)


def eval_batches(ds: ImageDataset, indices, pre: Preprocess, batch_size: int = 64, workers: int | None = None,
                 device: torch.device | None = None):
    """Evaluation batches: extraction's own (:func:`tlfx.pipeline.image_batches`), the same pixels, in order."""
    indices = [int(i) for i in indices]
    return image_batches(ds, indices, pre, batch_size, workers, pin=bool(device is not None and device.type == "cuda"))


def predict_proba(net: nn.Module, batches, norm: Normalizer, device, precision: str, n_classes: int):
    """Softmax probabilities for every readable item: (proba [n, k], dataset indices, [(index, reason)])."""
    net.eval()
    probs, idx, bad = [], [], []
    with torch.inference_mode():
        for _, good, arr, skipped in batches:
            bad += skipped
            if arr is None:
                continue
            with autocast(device, precision):
                logits = net(norm(arr))
            probs.append(torch.softmax(logits.float(), 1).cpu().numpy())
            idx += good
    proba = np.concatenate(probs) if probs else np.zeros((0, n_classes), np.float32)
    return proba, idx, bad


# ------------------------------------------------------------------------------------------------ checkpoint
def save_checkpoint(path: str, state: dict):
    """torch.save under a temporary name, fsync, rename: a kill leaves the previous checkpoint intact."""
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise TlfxError(f"cannot write checkpoint {path!r}: {exc.strerror or exc}") from None


def load_checkpoint(path: str) -> dict:
    """Read a checkpoint safely: tensors and plain containers only (``weights_only=True``), no code runs."""
    try:
        ck = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise TlfxError(f"checkpoint {path!r} is unreadable ({type(exc).__name__}); delete it or pass --restart "
                        f"to start over") from None
    if not isinstance(ck, dict) or ck.get("format") != CKPT_FORMAT:
        raise TlfxError(f"{path!r} is not a tlfx fine-tune checkpoint; delete it or pass --restart")
    return ck


def resume_key(cfg: FinetuneConfig, weights_sha: str) -> dict:
    d = asdict(cfg)
    key = {k: d[k] for k in RESUME_KEYS}
    key["lr"] = cfg.resolved_lr
    key["weight_decay"] = cfg.resolved_weight_decay
    key["weights"] = weights_sha or (cfg.weights or "default")
    key["augment"] = ",".join(parse_augment(cfg.augment))
    key["unfreeze"] = cfg.unfreeze.strip().lower()
    return key


def _check_resume(ck: dict, key: dict, path: str):
    old = ck.get("key") or {}
    diff = [k for k in RESUME_KEYS if old.get(k) != key.get(k)]
    if diff:
        detail = "; ".join(f"--{k.replace('_', '-')}: checkpoint {old.get(k)!r} vs now {key.get(k)!r}" for k in diff[:3])
        raise TlfxError(f"checkpoint {path!r} is from another configuration ({detail}); run with the same options "
                        f"to resume, or pass --restart to start over")


# ------------------------------------------------------------------------------------------------ split
def split_train_val(labels: np.ndarray, indices: np.ndarray, val_fraction: float, seed: int):
    """Stratified when every class has 2+ items and the split can hold one of each; else a seeded shuffle."""
    if val_fraction <= 0 or len(indices) < 4:
        return indices, indices[:0]
    n_val = max(1, int(round(len(indices) * val_fraction)))
    y = labels[indices]
    counts = np.bincount(y)
    present = counts[counts > 0]
    rng = np.random.default_rng(seed)
    if present.min() >= 2 and n_val >= len(present) and len(indices) - n_val >= len(present):
        from sklearn.model_selection import train_test_split

        tr, va = train_test_split(indices, test_size=n_val, random_state=seed, stratify=y)
        return np.sort(tr), np.sort(va)
    perm = rng.permutation(indices)
    return np.sort(perm[n_val:]), np.sort(perm[:n_val])


# ------------------------------------------------------------------------------------------------ training
class _Log:
    def __init__(self, quiet: bool):
        self.quiet = quiet

    def __call__(self, msg: str):
        if not self.quiet:
            print(msg, file=sys.stderr, flush=True)


@dataclass
class _Data:
    """What a fine-tune reads: the dataset, its preprocessing, the train / validation split, the training items."""

    ds: ImageDataset
    pre: Preprocess
    n_classes: int
    tr_idx: np.ndarray
    va_idx: np.ndarray
    train_items: AugmentedImages
    workers: int
    augment: list[str]


@dataclass
class _Training:
    """The network and what trains it, on its device."""

    net: FinetuneNet
    opt: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    criterion: nn.Module
    sched: Schedule
    norm: Normalizer
    device: torch.device
    precision: str
    trainable: int
    total_params: int


@dataclass
class _Progress:
    """What the checkpoint carries from one epoch to the next (and from a killed run to its resumption)."""

    epochs_done: int = 0
    history: list = field(default_factory=list)
    best: dict = field(default_factory=lambda: {"epoch": 0, "val_accuracy": None})
    best_state: dict | None = None  # None: the current weights are the best
    prev_state: dict | None = None  # the weights of the last checkpoint
    train_seconds: float = 0.0
    stopped: bool = False
    skipped: dict = field(default_factory=dict)


def _config(config: FinetuneConfig | None, options: dict) -> FinetuneConfig:
    cfg = config or FinetuneConfig(**options)
    if config is not None and options:
        cfg = FinetuneConfig(**{**asdict(config), **options})
    return cfg.validate()


def _check_out(out: str):
    out_dir = os.path.dirname(os.path.abspath(out))
    if not os.path.isdir(out_dir):
        raise TlfxError(f"--out {out!r}: directory {out_dir!r} does not exist; create it first")
    if not os.access(out_dir, os.W_OK):
        raise TlfxError(f"--out {out!r}: directory {out_dir!r} is not writable; choose another path")


def _load_labelled(cfg: FinetuneConfig) -> tuple[ImageDataset, np.ndarray]:
    ds = load_dataset(cfg.data, split=cfg.split, root=cfg.root, limit=cfg.limit)
    labeled = np.flatnonzero(ds.labels >= 0)
    if len(np.unique(ds.labels[labeled])) < 2:
        raise TlfxError(f"dataset {cfg.data!r} has fewer than 2 labelled classes; fine-tuning needs at least 2")
    return ds, labeled


def _load_backbone(cfg: FinetuneConfig) -> Backbone:
    bb = create_backbone(cfg.backbone, cfg.weights)
    if not any(True for _ in bb.module.parameters()):
        raise TlfxError(f"backbone {cfg.backbone!r} has no trainable parameters; fine-tune a network backbone")
    return bb


def _setup_data(cfg: FinetuneConfig, ds: ImageDataset, labeled: np.ndarray, pre: Preprocess) -> _Data:
    """The seeded train / validation split and the augmented training items."""
    augment = parse_augment(cfg.augment)
    tr_idx, va_idx = split_train_val(ds.labels, labeled, cfg.val_fraction, cfg.seed)
    workers = default_workers() if cfg.workers is None else cfg.workers
    return _Data(ds, pre, len(ds.class_names), tr_idx, va_idx, AugmentedImages(ds, tr_idx, pre, augment), workers,
                 augment)


def _setup_training(cfg: FinetuneConfig, bb: Backbone, data: _Data) -> _Training:
    """The network with its new layer, the parameter groups ``--unfreeze`` chooses, optimizer and schedule."""
    device = pick_device(cfg.device)
    precision = resolve_precision(cfg.precision, device)
    torch.manual_seed(cfg.seed)
    net = build_network(bb, data.n_classes, data.pre.crop)
    groups = param_groups(net, bb.stages, cfg.unfreeze, cfg.resolved_lr, cfg.lr_decay, cfg.resolved_weight_decay)
    trainable = sum(p.numel() for g in groups for p in g["params"])
    total_params = sum(p.numel() for p in net.parameters())
    net = net.to(device).to(memory_format=torch.channels_last)
    if cfg.optimizer == "adamw":
        opt = torch.optim.AdamW(groups, lr=cfg.resolved_lr, weight_decay=cfg.resolved_weight_decay)
    else:
        opt = torch.optim.SGD(groups, lr=cfg.resolved_lr, momentum=0.9, nesterov=True,
                              weight_decay=cfg.resolved_weight_decay)
    scaler = torch.amp.GradScaler(device.type, enabled=(precision == "fp16" and device.type == "cuda"))
    criterion = nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing)
    sched = Schedule(cfg.schedule, math.ceil(len(data.tr_idx) / cfg.batch_size) * cfg.epochs)
    return _Training(net, opt, scaler, criterion, sched, Normalizer(data.pre, device), device, precision, trainable,
                     total_params)


def _resume(ckpt_path: str, key: dict, cfg: FinetuneConfig, tr: _Training, log: _Log) -> _Progress:
    """Load the checkpoint into the network, optimizer, schedule and RNG; what it says was done so far."""
    ck = load_checkpoint(ckpt_path)
    _check_resume(ck, key, ckpt_path)
    tr.net.load_state_dict(ck["model"])
    tr.opt.load_state_dict(ck["optimizer"])
    for g in tr.opt.param_groups:  # the schedule owns the learning rates; keep the groups' targets current
        g["max_lr"] = cfg.resolved_lr * g["lr_mult"]
    tr.sched.step = int(ck["schedule"]["step"])
    if "scaler" in ck and tr.scaler.is_enabled():
        tr.scaler.load_state_dict(ck["scaler"])
    torch.set_rng_state(ck["rng"]["torch"])
    st = _Progress(int(ck["epoch"]), list(ck["history"]), dict(ck["best"]), ck.get("best_state"), ck["model"],
                   float(ck["train_seconds"]), bool(ck.get("stopped")), dict(ck.get("skipped") or {}))
    log(f"resuming from {ckpt_path}: {st.epochs_done} epoch(s) done"
        + (f", early-stopped at epoch {st.epochs_done}" if st.stopped else ""))
    return st


def _train_step(tr: _Training, x: torch.Tensor, y: torch.Tensor) -> tuple[float, int]:
    """One optimizer step on a uint8 NHWC batch; returns (loss, correct predictions)."""
    tr.sched.apply(tr.opt)
    xb, yb = tr.norm(x), y.to(tr.device, non_blocking=True)
    with autocast(tr.device, tr.precision):
        logits = tr.net(xb)
    loss = tr.criterion(logits.float(), yb)
    tr.opt.zero_grad(set_to_none=True)
    tr.scaler.scale(loss).backward()
    tr.scaler.step(tr.opt)
    tr.scaler.update()
    tr.sched.step += 1
    return float(loss.detach()), int((logits.detach().argmax(1) == yb).sum())


def _train_epoch(cfg: FinetuneConfig, data: _Data, tr: _Training, epoch: int, skipped: dict, progress: bool,
                 log: _Log, log_every: float) -> dict:
    """One pass over the training images; unreadable ones go to ``skipped``. Returns the epoch's training record."""
    set_train_mode(tr.net)
    loader = train_batches(data.train_items, data.pre, cfg.batch_size, data.workers, cfg.seed * 100003 + epoch,
                           tr.device)
    t0 = time.perf_counter()
    seen, loss_sum, correct, last_line = 0, 0.0, 0, 0.0
    bar = None
    if progress:
        from tlfx.progress import progress_bar

        bar = progress_bar(total=len(data.tr_idx), unit="img", desc=f"epoch {epoch + 1}/{cfg.epochs}", file=sys.stderr,
                           leave=False, dynamic_ncols=True)
    try:
        for _, good, x, bad in loader:
            for i, reason in bad:
                skipped[str(data.ds.ids[i])] = reason
            if x is None:
                continue
            y = torch.as_tensor(data.ds.labels[np.asarray(good, dtype=np.int64)], dtype=torch.long)
            loss, right = _train_step(tr, x, y)
            n = len(y)
            seen += n
            loss_sum += loss * n
            correct += right
            el = time.perf_counter() - t0
            if bar is not None:
                bar.update(n + len(bad))
                bar.set_postfix(loss=f"{loss_sum / seen:.3f}", acc=f"{correct / seen:.3f}", ips=f"{seen / el:.0f}")
            elif el - last_line >= log_every:  # no terminal: a plain progress line now and then
                last_line = el
                log(f"epoch {epoch + 1}/{cfg.epochs}  {seen}/{len(data.tr_idx)} img  loss {loss_sum / seen:.4f}  "
                    f"acc {correct / seen:.4f}  {seen / el:.0f} img/s")
    finally:
        if bar is not None:
            bar.close()
    if not seen:
        raise TlfxError(f"no training image of {cfg.data!r} could be read ({len(skipped)} skipped, e.g. "
                        f"{next(iter(skipped.items()), ('', ''))}); check the data")
    train_time = time.perf_counter() - t0
    return {"epoch": epoch + 1, "train_loss": loss_sum / seen, "train_accuracy": correct / seen,
            "train_seconds": train_time, "images_per_s": seen / train_time, "lr": tr.opt.param_groups[-1]["lr"]}


def _validate(cfg: FinetuneConfig, data: _Data, tr: _Training, skipped: dict) -> dict:
    """Accuracy and loss on the held-out images, read exactly as extraction reads them."""
    tv = time.perf_counter()
    batches = eval_batches(data.ds, data.va_idx, data.pre, max(cfg.batch_size, 64), data.workers, tr.device)
    proba, vidx, vbad = predict_proba(tr.net, batches, tr.norm, tr.device, tr.precision, data.n_classes)
    for i, reason in vbad:
        skipped[str(data.ds.ids[i])] = reason
    vy = data.ds.labels[np.asarray(vidx, dtype=np.int64)] if vidx else np.zeros(0, np.int64)
    return {"val_accuracy": float((proba.argmax(1) == vy).mean()) if len(vy) else 0.0,
            "val_loss": float(-np.log(np.clip(proba[np.arange(len(vy)), vy], 1e-12, 1)).mean()) if len(vy) else 0.0,
            "val_seconds": time.perf_counter() - tv}


def _record_epoch(st: _Progress, rec: dict, cfg: FinetuneConfig, has_val: bool) -> bool:
    """Add the epoch to the history, track the best weights and early stopping; returns whether it improved."""
    epoch = rec["epoch"]
    st.history.append(rec)
    improved = not has_val or st.best["val_accuracy"] is None or rec["val_accuracy"] > st.best["val_accuracy"]
    if improved:
        st.best = {"epoch": epoch, "val_accuracy": rec.get("val_accuracy")}
        st.best_state = None  # the current weights are the best: stored once, as "model"
    elif st.best_state is None:
        st.best_state = st.prev_state  # the weights of the last checkpoint, the best so far
    if has_val and cfg.patience and epoch - st.best["epoch"] >= cfg.patience and epoch < cfg.epochs:
        st.stopped = True
    return improved


def _epoch_line(rec: dict, cfg: FinetuneConfig, improved: bool, stopped: bool) -> str:
    line = (f"epoch {rec['epoch']}/{cfg.epochs}  loss {rec['train_loss']:.4f}  acc {rec['train_accuracy']:.4f}  "
            f"{rec['images_per_s']:.0f} img/s  {rec['train_seconds']:.1f} s")
    if "val_accuracy" in rec:
        line += f"  | val loss {rec['val_loss']:.4f}  acc {rec['val_accuracy']:.4f}" + ("  *" if improved else "")
    if stopped:
        line += f"  | early stop: no val improvement for {cfg.patience} epoch(s)"
    return line


def _checkpoint(ckpt_path: str, key: dict, tr: _Training, st: _Progress):
    """Write the finished epoch atomically; its weights become ``prev_state``."""
    state = {k: v.detach().to("cpu", copy=True) for k, v in tr.net.state_dict().items()}
    save_checkpoint(ckpt_path, {
        "format": CKPT_FORMAT, "key": key, "epoch": st.epochs_done, "model": state, "optimizer": tr.opt.state_dict(),
        "schedule": tr.sched.state_dict(), "scaler": tr.scaler.state_dict() if tr.scaler.is_enabled() else {},
        "rng": {"torch": torch.get_rng_state()}, "history": st.history, "best": st.best, "best_state": st.best_state,
        "train_seconds": st.train_seconds, "stopped": st.stopped, "skipped": st.skipped, "tlfx_version": __version__,
    })
    st.prev_state = state


def _run_epoch(cfg: FinetuneConfig, data: _Data, tr: _Training, st: _Progress, ckpt_path: str, key: dict,
               progress: bool, log: _Log, log_every: float):
    """Train one epoch, validate, log its line and checkpoint it."""
    t0 = time.perf_counter()
    rec = _train_epoch(cfg, data, tr, st.epochs_done, st.skipped, progress, log, log_every)
    if len(data.va_idx):
        rec.update(_validate(cfg, data, tr, st.skipped))
    st.train_seconds += time.perf_counter() - t0
    improved = _record_epoch(st, rec, cfg, bool(len(data.va_idx)))
    log(_epoch_line(rec, cfg, improved, st.stopped))
    st.epochs_done += 1
    _checkpoint(ckpt_path, key, tr, st)


def _model_meta(cfg: FinetuneConfig, bb: Backbone, data: _Data, tr: _Training, st: _Progress) -> dict:
    """The model file's record: what was trained, on what, how, and how well."""
    pre, ds = data.pre, data.ds
    ips = [h["images_per_s"] for h in st.history]
    return {
        "name": f"finetune-{cfg.backbone}",
        "head": "finetune",
        "backbone": cfg.backbone,
        "base_weights": {"name": bb.weights.name, "sha256": bb.weights.sha256},
        "image_size": pre.crop,
        "preprocess": pre.to_dict(),
        "class_names": list(ds.class_names),
        "classifier": bb.classifier,
        "head_path": tr.net.head_path,
        "head_in_features": int(tr.net.head.in_features) if tr.net.head is not None else None,
        "unfreeze": cfg.unfreeze,
        "epochs": len(st.history),
        "epochs_requested": cfg.epochs,
        "early_stopped": st.stopped,
        "best_epoch": st.best["epoch"],
        "best_val_accuracy": st.best.get("val_accuracy"),
        "train_seconds": st.train_seconds,
        "images_per_s": float(np.mean(ips)) if ips else None,
        "n_train": int(len(data.tr_idx)),
        "n_val": int(len(data.va_idx)),
        "trainable_parameters": int(tr.trainable),
        "total_parameters": int(tr.total_params),
        "precision": tr.precision,
        "device": str(tr.device),
        "history": st.history,
        "skipped": [[i, r] for i, r in sorted(st.skipped.items())][:1000],
        "params": {"lr": cfg.resolved_lr, "optimizer": cfg.optimizer, "augment": ",".join(data.augment),
                   "batch_size": cfg.batch_size, "label_smoothing": cfg.label_smoothing, "schedule": cfg.schedule,
                   "lr_decay": cfg.lr_decay, "weight_decay": cfg.resolved_weight_decay, "val_fraction": cfg.val_fraction,
                   "patience": cfg.patience, "seed": cfg.seed, "unfreeze": cfg.unfreeze, "epochs": cfg.epochs},
        "data": {"spec": cfg.data, "split": ds.split, "root": ds.root or cfg.root, "limit": cfg.limit,
                 "fingerprint": ds.fingerprint()},
        "config": {"backbone": cfg.backbone, "weights": {"name": bb.weights.name, "sha256": bb.weights.sha256},
                   "layers": ["finetune"], "pooling": None, "image_size": pre.crop, "preprocess": pre.to_dict(),
                   "precision": tr.precision},
        "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "tlfx_version": __version__,
    }


def _final_model(out: str, cfg: FinetuneConfig, bb: Backbone, data: _Data, tr: _Training, st: _Progress, log: _Log):
    """Write the model file with the best epoch's weights (the last ones without validation)."""
    from tlfx_plugins.finetune import FinetuneModel

    final = st.best_state if st.best_state is not None else {k: v.detach().cpu() for k, v in tr.net.state_dict().items()}
    model = FinetuneModel(_model_meta(cfg, bb, data, tr, st), final)
    model.save(out)
    model.path = out
    best_txt = (f", best val accuracy {st.best['val_accuracy']:.4f} at epoch {st.best['epoch']}"
                if st.best.get("val_accuracy") is not None else "")
    log(f"done: {len(st.history)} epoch(s) in {st.train_seconds:.1f} s{best_txt} -> {out}")
    return model


def finetune(out: str, config: FinetuneConfig | None = None, *, restart: bool = False, quiet: bool = True,
             progress: bool = False, stop_after: int | None = None, log_every: float = 60.0, **options):
    """Fine-tune ``config.backbone`` on ``config.data`` and write a finetune model file to ``out``.

    >>> finetune("ft.tlfx", backbone="efficientnet_lite0", data="fashion-mnist", limit=5000, epochs=2,
    ...          image_size=64, unfreeze="last:2")

    Resumes from ``out + '.ckpt'`` when it exists (same configuration; ``epochs`` may grow); ``restart`` ignores
    it. ``stop_after`` ends the run after that many epochs in this call, as a kill would (tests, time boxes).
    Returns the :class:`tlfx_plugins.finetune.FinetuneModel`.
    """
    cfg = _config(config, options)
    log = _Log(quiet)
    _check_out(out)
    ckpt_path = out + ".ckpt"
    ds, labeled = _load_labelled(cfg)
    bb = _load_backbone(cfg)
    data = _setup_data(cfg, ds, labeled, bb.preprocess.with_image_size(cfg.image_size))
    tr = _setup_training(cfg, bb, data)
    key = resume_key(cfg, bb.weights.sha256)
    st = _resume(ckpt_path, key, cfg, tr, log) if os.path.exists(ckpt_path) and not restart else _Progress()
    log(f"fine-tuning {cfg.backbone} ({cfg.unfreeze}: {tr.trainable:,} of {tr.total_params:,} parameters trainable) "
        f"on {len(data.tr_idx)} train / {len(data.va_idx)} val images of {cfg.data}, {data.pre.crop} px, "
        f"{tr.precision} on {tr.device}")
    epochs_this_call = 0
    while st.epochs_done < cfg.epochs and not st.stopped and (stop_after is None or epochs_this_call < stop_after):
        _run_epoch(cfg, data, tr, st, ckpt_path, key, progress, log, log_every)
        epochs_this_call += 1
    if len(st.history) < cfg.epochs and not st.stopped:
        log(f"stopped after epoch {len(st.history)} of {cfg.epochs}; run the same command again to resume")
        return None
    return _final_model(out, cfg, bb, data, tr, st, log)
