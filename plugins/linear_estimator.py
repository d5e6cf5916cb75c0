"""The ``linear`` head's estimator class: a torch ``nn.Linear`` layer trained on cached features.

AdamW with decoupled weight decay, full-batch (``batch_size=0``) or mini-batch, early stopping on a stratified
validation split, CUDA when present, deterministic for a given ``seed``. The learned layer is kept as numpy arrays
(``coef_``, ``intercept_``, ``mean_``, ``scale_``), so a saved model holds plain arrays and no torch pickle, and
prediction needs no torch at all.
``fit_store`` (``streaming = True``) trains the same layer on a feature store read chunk by chunk (``_fit_rows``):
standardisation statistics from one streaming pass, mini-batch AdamW over seeded shuffled chunks, early stopping on
held-out rows kept in memory (capped at 64 MiB). ``fit(X, y)`` is unchanged by it.
torch is imported inside ``fit`` only. The ``linear_head`` plugin registers this class.
"""

from __future__ import annotations

import math

import numpy as np

from tlfx.heads import SEED_BOUNDS, Bounds
from tlfx_plugins.head_base import ClassifierHead, softmax


def _val_split(y_idx, fraction, seed):
    """Stratified train/validation row indices; classes with fewer than 2 rows stay in training."""
    rng = np.random.default_rng(seed)
    val = []
    for c in np.unique(y_idx):
        rows = rng.permutation(np.flatnonzero(y_idx == c))
        k = int(round(len(rows) * fraction))
        if len(rows) >= 2 and k >= 1:
            val.append(rows[:min(k, len(rows) - 1)])
    val = np.sort(np.concatenate(val)) if val else np.zeros(0, np.int64)
    train = np.setdiff1d(np.arange(len(y_idx)), val)
    return train, val

class LinearHead(ClassifierHead):
    """Softmax regression trained with torch.

    ``lr``, ``weight_decay``: AdamW; ``epochs``: passes over the training rows (see ``min_steps``);
    ``batch_size``: rows per step (0 = full batch); ``val_fraction``: held out for early stopping (0 = none,
    train all ``epochs``);
    ``patience``: epochs without a lower validation loss before stopping (the best epoch's weights are kept);
    ``min_steps``: the fewest optimizer steps ``epochs`` epochs make: on data so small that ``epochs`` passes
    are fewer steps, each epoch becomes several passes (validation and patience count these longer epochs),
    so a few hundred rows get the same optimisation budget as a large set; ``standardize``: scale features
    to unit variance; ``device``: auto, cpu, cuda; ``seed``: init, shuffling, split.
    """

    param_types = {"lr": (float,), "weight_decay": (float,), "epochs": (int,), "batch_size": (int,),
                   "val_fraction": (float,), "patience": (int,), "min_steps": (int,), "standardize": (bool,),
                   "device": (str,), "seed": (int,)}
    param_bounds = {"lr": Bounds(0, low_open=True), "weight_decay": Bounds(0), "epochs": Bounds(1),
                    "batch_size": Bounds(0), "val_fraction": Bounds(0, 1, high_open=True), "patience": Bounds(0),
                    "min_steps": Bounds(0), "seed": SEED_BOUNDS}
    streaming = True  # fit_store: trains on a store chunk by chunk

    def __init__(self, lr=1e-3, weight_decay=1e-2, epochs=100, batch_size=256, val_fraction=0.1, patience=8,
                 min_steps=1000, standardize=True, device="auto", seed=0):
        self.lr = lr
        self.weight_decay = weight_decay
        self.epochs = epochs
        self.batch_size = batch_size
        self.val_fraction = val_fraction
        self.patience = patience
        self.min_steps = min_steps
        self.standardize = standardize
        self.device = device
        self.seed = seed

    def _fit(self, X, y_idx, n_classes):
        import torch
        from torch import nn

        from tlfx.runtime import pick_device

        if not 0 <= self.val_fraction < 1:
            raise ValueError(f"LinearHead: val_fraction={self.val_fraction!r} must be in [0, 1)")
        device = pick_device(self.device)
        X = np.asarray(X, dtype=np.float32)
        self.mean_ = X.mean(axis=0) if self.standardize else np.zeros(X.shape[1], np.float32)
        scale = X.std(axis=0) if self.standardize else np.ones(X.shape[1], np.float32)
        self.scale_ = np.where(scale > 1e-12, scale, 1.0).astype(np.float32)
        Xs = (X - self.mean_) / self.scale_
        tr, va = _val_split(y_idx, self.val_fraction, self.seed) if self.val_fraction > 0 else (np.arange(len(y_idx)), [])
        threads = torch.get_num_threads()
        if device.type == "cpu" and X.size < 2_000_000:
            torch.set_num_threads(1)  # tiny matmuls: thread wake-ups cost more than they save on a busy CPU
        try:
            self._train(torch, nn, device, Xs, y_idx, tr, va, n_classes)
        finally:
            torch.set_num_threads(threads)

    def _epochs(self, torch, layer, loss_fn, Xv, yv, one_epoch) -> float:
        """Run ``one_epoch()`` up to ``epochs`` times, stopping early when the loss on ``(Xv, yv)`` (None: no
        held-out rows) has not improved for ``patience`` epochs; keep the best epoch's weights as ``coef_`` and
        ``intercept_``. Returns the best held-out loss (inf without held-out rows)."""
        best, best_state, bad_epochs = np.inf, None, 0
        self.n_epochs_ = 0
        for _epoch in range(self.epochs):
            layer.train()
            one_epoch()
            self.n_epochs_ += 1
            if Xv is None:
                continue
            with torch.no_grad():
                val_loss = float(loss_fn(layer(Xv), yv))
            if val_loss < best - 1e-6:
                best, bad_epochs = val_loss, 0
                best_state = [p.detach().clone() for p in layer.parameters()]
            else:
                bad_epochs += 1
                if bad_epochs >= self.patience:
                    break
        if best_state is not None:
            with torch.no_grad():
                for p, b in zip(layer.parameters(), best_state):
                    p.copy_(b)
        self.coef_ = layer.weight.detach().cpu().numpy().astype(np.float32)
        self.intercept_ = layer.bias.detach().cpu().numpy().astype(np.float32)
        return best

    def _train(self, torch, nn, device, Xs, y_idx, tr, va, n_classes):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed)
            gen = torch.Generator().manual_seed(self.seed)
            layer = nn.Linear(Xs.shape[1], n_classes).to(device)
            opt = torch.optim.AdamW(layer.parameters(), lr=self.lr, weight_decay=self.weight_decay)
            loss_fn = nn.CrossEntropyLoss()
            Xt = torch.from_numpy(Xs[tr]).to(device)
            yt = torch.from_numpy(y_idx[tr]).to(device)
            Xv = torch.from_numpy(Xs[va]).to(device) if len(va) else None
            yv = torch.from_numpy(y_idx[va]).to(device) if len(va) else None
            bs = len(tr) if self.batch_size <= 0 else min(self.batch_size, len(tr))
            # 100 epochs of 81 rows are 100 steps: too few for AdamW at 1e-3 to move far from the random init
            passes = max(1, math.ceil(self.min_steps / max(1, self.epochs * math.ceil(len(tr) / bs))))
            def one_epoch():
                for _ in range(passes):
                    order = torch.randperm(len(tr), generator=gen).to(device)
                    for i in range(0, len(tr), bs):
                        idx = order[i:i + bs]
                        opt.zero_grad(set_to_none=True)
                        loss_fn(layer(Xt[idx]), yt[idx]).backward()
                        opt.step()

            best = self._epochs(torch, layer, loss_fn, Xv, yv, one_epoch)
        self.passes_per_epoch_ = passes
        self.best_val_loss_ = float(best) if np.isfinite(best) else None

    def _fit_rows(self, rows, targets, n_classes):
        """The streaming fit (see ``fit_store``): one pass for mean/scale and the held-out rows, then epochs of
        mini-batch AdamW over shuffled chunks; ``batch_size=0`` accumulates the gradient over every chunk (one exact
        full-batch step per pass)."""
        import torch
        from torch import nn

        from tlfx.runtime import pick_device
        from tlfx.streaming import holdout, scan

        if not 0 <= self.val_fraction < 1:
            raise ValueError(f"LinearHead: val_fraction={self.val_fraction!r} must be in [0, 1)")
        device = pick_device(self.device)
        va = holdout(targets, self.val_fraction, self.seed, rows.dim)
        mean, var, Xv = scan(rows, targets >= 0, va, self.standardize)
        self.mean_ = mean.astype(np.float32)
        scale = np.sqrt(var)
        self.scale_ = np.where(scale > 1e-12, scale, 1.0).astype(np.float32)
        train = targets >= 0
        train[va] = False
        threads = torch.get_num_threads()
        if device.type == "cpu" and int(train.sum()) * rows.dim < 2_000_000:
            torch.set_num_threads(1)
        try:
            self._train_chunks(torch, nn, device, rows, targets, train, (Xv - self.mean_) / self.scale_,
                               targets[va], n_classes)
        finally:
            torch.set_num_threads(threads)

    def _train_chunks(self, torch, nn, device, rows, targets, train, Xv, yv, n_classes):
        from tlfx.streaming import shuffled_chunks

        n_tr = int(train.sum())
        rng = np.random.default_rng(self.seed)
        mean, scale = self.mean_, self.scale_
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed)
            layer = nn.Linear(rows.dim, n_classes).to(device)
            opt = torch.optim.AdamW(layer.parameters(), lr=self.lr, weight_decay=self.weight_decay)
            loss_fn = nn.CrossEntropyLoss()
            sum_loss = nn.CrossEntropyLoss(reduction="sum")
            Xv = torch.from_numpy(np.ascontiguousarray(Xv, dtype=np.float32)).to(device) if len(yv) else None
            yv = torch.from_numpy(yv).to(device) if len(yv) else None
            full = self.batch_size <= 0
            bs = n_tr if full else min(self.batch_size, n_tr)
            passes = max(1, math.ceil(self.min_steps / max(1, self.epochs * math.ceil(n_tr / bs))))
            def one_epoch():
                for _ in range(passes):
                    if full:
                        opt.zero_grad(set_to_none=True)
                    for X, y in shuffled_chunks(rows, targets, train, rng):
                        Xs = np.subtract(X, mean, dtype=np.float32)
                        Xs /= scale  # in place: one chunk-sized temporary
                        Xt = torch.from_numpy(Xs).to(device)
                        yt = torch.from_numpy(y).to(device)
                        if full:  # the mean loss over all training rows, accumulated chunk by chunk
                            (sum_loss(layer(Xt), yt) / n_tr).backward()
                            continue
                        for i in range(0, len(yt), bs):
                            opt.zero_grad(set_to_none=True)
                            loss_fn(layer(Xt[i:i + bs]), yt[i:i + bs]).backward()
                            opt.step()
                    if full:
                        opt.step()

            best = self._epochs(torch, layer, loss_fn, Xv, yv, one_epoch)
        self.passes_per_epoch_ = passes
        self.best_val_loss_ = float(best) if np.isfinite(best) else None

    def _proba(self, X):
        Xs = (np.asarray(X, dtype=np.float64) - self.mean_) / self.scale_
        return softmax(Xs @ self.coef_.T.astype(np.float64) + self.intercept_)
