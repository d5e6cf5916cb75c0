"""Classification metrics shared by ``tlfx evaluate``, the demo and any model kind (head, finetune, ...).

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
    cm = np.zeros((n_classes, n_classes), dtype=np.int64)
    np.add.at(cm, (y_true, y_pred), 1)
    return cm


def classification_report_dict(y_true, y_pred, class_names) -> dict:
    """Accuracy, macro-F1 (over classes present in ``y_true`` or ``y_pred``), per-class precision / recall / F1 /
    support and the confusion matrix, as plain JSON-ready Python values. Labels are indices into ``class_names``."""
    y_true = np.asarray(y_true, dtype=np.int64)
    y_pred = np.asarray(y_pred, dtype=np.int64)
    names = list(class_names)
    k = max(len(names), int(y_true.max(initial=-1)) + 1, int(y_pred.max(initial=-1)) + 1)
    names += [str(i) for i in range(len(names), k)]
    cm = confusion_matrix(y_true, y_pred, k)
    tp = np.diag(cm).astype(np.float64)
    support = cm.sum(axis=1)
    predicted = cm.sum(axis=0)
    precision = np.divide(tp, predicted, out=np.zeros(k), where=predicted > 0)
    recall = np.divide(tp, support, out=np.zeros(k), where=support > 0)
    denom = precision + recall
    f1 = np.divide(2 * precision * recall, denom, out=np.zeros(k), where=denom > 0)
    present = (support > 0) | (predicted > 0)
    n = int(len(y_true))
    return {
        "n": n,
        "accuracy": float(tp.sum() / n) if n else 0.0,
        "macro_f1": float(f1[present].mean()) if present.any() else 0.0,
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
