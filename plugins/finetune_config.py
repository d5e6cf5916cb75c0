"""Fine-tune options and their validation, without torch: ``tlfx finetune`` refuses bad values at once."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from tlfx.errors import TlfxError

AUGMENTS = ("flip", "crop", "scale", "rotate", "color", "erase")
OPTIMIZERS = ("adamw", "sgd")
SCHEDULES = ("onecycle", "cosine")
CKPT_FORMAT = 1
DEFAULT_LR = {"adamw": 1e-3, "sgd": 0.05}
DEFAULT_WD = {"adamw": 0.01, "sgd": 5e-4}
MIN_LR_MULT = 0.05  # the earliest unfrozen group never trains slower than this fraction of --lr
# what must be equal for a checkpoint to be resumed (epochs, patience, device, precision, workers may change)
RESUME_KEYS = ("backbone", "weights", "data", "split", "root", "limit", "image_size", "unfreeze", "lr", "optimizer",
               "augment", "val_fraction", "batch_size", "label_smoothing", "schedule", "seed", "lr_decay",
               "weight_decay")


@dataclass
class FinetuneConfig:
    """Every choice of a fine-tune run (the CLI options). ``lr``/``weight_decay`` None: the optimizer's default."""

    backbone: str = "efficientnet_lite0"
    data: str = "digits"
    epochs: int = 3
    split: str | None = "train"
    root: str | None = None
    limit: int | None = None
    image_size: int | None = None
    unfreeze: str = "all"
    lr: float | None = None
    optimizer: str = "adamw"
    augment: str = "flip,crop"
    val_fraction: float = 0.1
    batch_size: int = 64
    label_smoothing: float = 0.1
    schedule: str = "onecycle"
    precision: str = "auto"
    device: str | None = None
    patience: int = 3
    weights: str | None = None
    seed: int = 0
    lr_decay: float = 0.7
    weight_decay: float | None = None
    workers: int | None = None
    extra: dict = field(default_factory=dict)

    def validate(self):
        """Refuse bad values with one line naming the value and the fix (before any heavy work)."""
        if self.epochs < 1:
            raise TlfxError(f"--epochs must be at least 1, got {self.epochs}")
        if self.batch_size < 1:
            raise TlfxError(f"--batch-size must be at least 1, got {self.batch_size}")
        if self.image_size is not None and not 16 <= self.image_size <= 1024:
            raise TlfxError(f"--image-size must be between 16 and 1024 pixels, got {self.image_size}")
        if self.lr is not None and not (self.lr > 0 and math.isfinite(self.lr)):
            raise TlfxError(f"--lr must be a positive number, got {self.lr}")
        if not 0.0 <= self.val_fraction < 0.9:
            raise TlfxError(f"--val-fraction must be in [0, 0.9) (0 = no validation split), got {self.val_fraction}")
        if not 0.0 <= self.label_smoothing < 1.0:
            raise TlfxError(f"--label-smoothing must be in [0, 1), got {self.label_smoothing}")
        if self.patience < 0:
            raise TlfxError(f"--patience must be 0 (off) or more epochs, got {self.patience}")
        if not 0.0 < self.lr_decay <= 1.0:
            raise TlfxError(f"--lr-decay must be in (0, 1], got {self.lr_decay}")
        if self.weight_decay is not None and self.weight_decay < 0:
            raise TlfxError(f"--weight-decay must be 0 or more, got {self.weight_decay}")
        if self.optimizer not in OPTIMIZERS:
            raise TlfxError(f"unknown optimizer {self.optimizer!r}; valid choices: {', '.join(OPTIMIZERS)}")
        if self.schedule not in SCHEDULES:
            raise TlfxError(f"unknown schedule {self.schedule!r}; valid choices: {', '.join(SCHEDULES)}")
        if self.workers is not None and self.workers < 0:
            raise TlfxError(f"--workers must be 0 or more, got {self.workers}")
        parse_unfreeze(self.unfreeze)
        parse_augment(self.augment)
        return self

    @property
    def resolved_lr(self) -> float:
        return self.lr if self.lr is not None else DEFAULT_LR[self.optimizer]

    @property
    def resolved_weight_decay(self) -> float:
        return self.weight_decay if self.weight_decay is not None else DEFAULT_WD[self.optimizer]


def parse_unfreeze(value: str) -> tuple[str, int]:
    """'all' -> ('all', 0); 'head' -> ('head', 0); 'last:N' -> ('last', N)."""
    v = (value or "").strip().lower()
    if v in ("all", "head"):
        return v, 0
    if v.startswith("last:"):
        try:
            n = int(v.split(":", 1)[1])
        except ValueError:
            n = 0
        if n >= 1:
            return "last", n
    raise TlfxError(f"unknown --unfreeze {value!r}; valid choices: all, head, last:N (N >= 1 stages)")


def parse_augment(value: str | None) -> list[str]:
    """'flip,crop' -> ['flip', 'crop']; 'none' or '' -> []."""
    names = [a.strip().lower() for a in (value or "").split(",") if a.strip()]
    if names == ["none"]:
        return []
    bad = [a for a in names if a not in AUGMENTS]
    if bad:
        raise TlfxError(f"unknown augmentation {bad[0]!r}; valid choices: {', '.join(AUGMENTS)}, none")
    return names
