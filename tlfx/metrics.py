"""Classification metrics: the one implementation behind ``tlfx evaluate``, ``tlfx compare`` and the demo.

>>> from tlfx.metrics import classification_report_dict, format_report
>>> rep = classification_report_dict([0, 1, 1], [0, 1, 0], ["cat", "dog"])
>>> rep["accuracy"], rep["macro_f1"]
"""

from __future__ import annotations

import numpy as np


def confusion_matrix(y_true, y_pred, n_classes: int) -> np.ndarray:
    """``cm[i, j]`` = rows of true class ``i`` predicted as ``j``."""
    y_true = np.asarray(y_true, dtype=np.int64)
    y_pred = np.asarray(y_pred, dtype=np.int64)
    return np.bincount(y_true * n_classes + y_pred, minlength=n_classes * n_classes).reshape(n_classes, n_classes)


def per_class_scores(cm: np.ndarray) -> dict:
    """Precision, recall, F1 and support per class from a confusion matrix (0 where undefined)."""
    tp = np.diag(cm).astype(np.float64)
    predicted, support = cm.sum(0).astype(np.float64), cm.sum(1).astype(np.float64)
    precision = np.divide(tp, predicted, out=np.zeros_like(tp), where=predicted > 0)
    recall = np.divide(tp, support, out=np.zeros_like(tp), where=support > 0)
    denom = precision + recall
    f1 = np.divide(2 * precision * recall, denom, out=np.zeros_like(tp), where=denom > 0)
    return {"precision": precision, "recall": recall, "f1": f1, "support": support.astype(np.int64)}


def macro_f1(cm: np.ndarray) -> float:
    """Macro-F1 over the classes present in the truth or the predictions (scikit-learn's convention)."""
    present = (cm.sum(0) + cm.sum(1)) > 0
    return float(per_class_scores(cm)["f1"][present].mean()) if present.any() else 0.0


def bootstrap_ci(y, p, k: int, n_boot: int = 1000, seed: int = 0, level: float = 0.95) -> dict:
    """Percentile bootstrap intervals of accuracy and macro-F1 over test examples (fixed seed)."""
    y, p = np.asarray(y, dtype=np.int64), np.asarray(p, dtype=np.int64)
    n = len(y)
    if n == 0 or n_boot <= 0:
        return {"accuracy": [None, None], "macro_f1": [None, None]}
    rng = np.random.default_rng(seed)
    codes = y * k + p
    accs = np.empty(n_boot)
    f1s = np.empty(n_boot)
    for b in range(n_boot):
        cm = np.bincount(codes[rng.integers(0, n, n)], minlength=k * k).reshape(k, k)
        accs[b] = np.trace(cm) / n
        f1s[b] = macro_f1(cm)
    lo, hi = (1 - level) / 2 * 100, (1 + level) / 2 * 100
    return {"accuracy": [float(np.percentile(accs, lo)), float(np.percentile(accs, hi))],
            "macro_f1": [float(np.percentile(f1s, lo)), float(np.percentile(f1s, hi))]}


def scores(y, p, k: int, n_boot: int, seed: int) -> dict:
    """The numbers of one comparison row: accuracy and macro-F1 with bootstrap intervals, per-class scores,
    the confusion matrix and the error count."""
    cm = confusion_matrix(y, p, k)
    ci = bootstrap_ci(y, p, k, n_boot, seed)
    return {
        "accuracy": float(np.trace(cm) / max(len(y), 1)),
        "accuracy_ci95": ci["accuracy"],
        "macro_f1": macro_f1(cm),
        "macro_f1_ci95": ci["macro_f1"],
        "per_class": {name: [round(float(v), 6) for v in vals] for name, vals in per_class_scores(cm).items()},
        "confusion": cm.tolist(),
        "n_test": int(len(y)),
        "n_errors": int(len(y) - np.trace(cm)),
    }


def classification_report_dict(y_true, y_pred, class_names) -> dict:
    """Accuracy, macro-F1 (over classes present in ``y_true`` or ``y_pred``), per-class precision / recall / F1 /
    support and the confusion matrix, as plain JSON-ready Python values. Labels are indices into ``class_names``."""
    y_true = np.asarray(y_true, dtype=np.int64)
    y_pred = np.asarray(y_pred, dtype=np.int64)
    names = list(class_names)
    k = max(len(names), int(y_true.max(initial=-1)) + 1, int(y_pred.max(initial=-1)) + 1)
    names += [str(i) for i in range(len(names), k)]
    cm = confusion_matrix(y_true, y_pred, k)
    s = per_class_scores(cm)
    precision, recall, f1, support = s["precision"], s["recall"], s["f1"], s["support"]
    n = int(len(y_true))
    return {
        "n": n,
        "accuracy": float(np.trace(cm) / n) if n else 0.0,
        "macro_f1": macro_f1(cm),
        "per_class": [
            {"class": names[i], "precision": float(precision[i]), "recall": float(recall[i]), "f1": float(f1[i]),
             "support": int(support[i])}
            for i in range(k)
        ],
        "class_names": names,
        "confusion_matrix": cm.tolist(),
    }


def format_report(rep: dict, title: str | None = None) -> str:
    """The report as text: headline numbers, a per-class table and the confusion matrix (rows: true class)."""
    lines = []
    if title:
        lines.append(title)
    lines.append(f"accuracy {rep['accuracy']:.4f}   macro-F1 {rep['macro_f1']:.4f}   ({rep['n']} rows)")
    lines.append("")
    w = max([len("class")] + [len(r["class"]) for r in rep["per_class"]])
    lines.append(f"{'class':<{w}}  precision  recall     f1  support")
    for r in rep["per_class"]:
        lines.append(f"{r['class']:<{w}}  {r['precision']:9.3f}  {r['recall']:6.3f}  {r['f1']:5.3f}  {r['support']:7d}")
    lines.append("")
    cm = rep["confusion_matrix"]
    k = len(cm)
    cw = max(4, len(str(max((max(row) for row in cm), default=0))) + 1)
    lines.append("confusion matrix (rows: true class, columns: predicted, in class order):")
    lines.append(f"{'':<{w}} " + "".join(f"{j:>{cw}}" for j in range(k)))
    for i, row in enumerate(cm):
        lines.append(f"{rep['class_names'][i]:<{w}} " + "".join(f"{v:>{cw}}" for v in row) + f"   ({i})")
    return "\n".join(lines)


def mcnemar_exact(b: int, c: int) -> float:
    """Two-sided exact McNemar p-value for ``b`` and ``c`` discordant pairs (A right/B wrong, A wrong/B right).

    Under "A and B are equally accurate" each discordant pair is a fair coin: p = 2 * P(X <= min(b, c)) for
    X ~ Binomial(b + c, 1/2), capped at 1 (1 when there is no discordant pair). Computed with exact integers:
    ``mcnemar_exact(1, 9)`` = 2 * (C(10,0) + C(10,1)) / 2**10 = 22/1024 = 0.021484375.
    """
    b, c = int(b), int(c)
    if b < 0 or c < 0:
        raise ValueError(f"discordant counts must be >= 0, got b={b}, c={c}")
    n, m = b + c, min(b, c)
    if n == 0:
        return 1.0
    term, tail = 1, 1  # C(n, 0)
    for k in range(1, m + 1):
        term = term * (n - k + 1) // k
        tail += term
    return min(1.0, 2 * tail / 2**n)


def paired_comparison(correct_a, correct_b, n_boot: int = 1000, seed: int = 0, level: float = 0.95) -> dict:
    """A against B on the same test images (boolean "was right" arrays in the same order).

    Returns the accuracy difference A - B, the discordant counts (``a_only``: A right and B wrong; ``b_only``),
    McNemar's exact p-value and a paired percentile-bootstrap interval of the difference (the same resampled
    images for both, fixed seed).
    """
    a = np.asarray(correct_a, dtype=bool)
    b = np.asarray(correct_b, dtype=bool)
    if a.shape != b.shape or a.ndim != 1:
        raise ValueError(f"paired predictions must be two 1-D arrays of one length, got {a.shape} and {b.shape}")
    n = len(a)
    a_only, b_only = int(np.sum(a & ~b)), int(np.sum(~a & b))
    diff = float((a_only - b_only) / n) if n else 0.0
    ci = [None, None]
    if n and n_boot > 0:
        d = a.astype(np.int8) - b.astype(np.int8)
        rng = np.random.default_rng(seed)
        boots = np.array([d[rng.integers(0, n, n)].mean() for _ in range(n_boot)])
        lo, hi = (1 - level) / 2 * 100, (1 + level) / 2 * 100
        ci = [float(np.percentile(boots, lo)), float(np.percentile(boots, hi))]
    return {"n": n, "difference": diff, "difference_ci95": ci, "a_only": a_only, "b_only": b_only,
            "p_value": mcnemar_exact(a_only, b_only)}
