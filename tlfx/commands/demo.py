"""``tlfx demo``: the whole default job end to end (extract, fit every head, evaluate, print a table)."""

import json
import os
import time

import click

DEFAULT_DATA = "fashion-mnist"
FALLBACK_DATA = "digits"


def _slug(s) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "-" for c in str(s))


def _available(spec: str) -> bool:
    from ..datasets import load_dataset
    from ..errors import TlfxError

    try:
        load_dataset(spec, split="test", limit=1)
    except TlfxError:
        return False
    return True


@click.command()
@click.option("--out", "out_dir", default="demo-out", show_default=True, type=click.Path(file_okay=False),
              help="Directory for the feature stores, model files and results.json (re-used by later runs).")
@click.option("--data", default=DEFAULT_DATA, show_default=True,
              help="Dataset spec with train and test splits (falls back to digits if Fashion-MNIST is missing).")
@click.option("--train-limit", type=click.IntRange(1, None), default=3000, show_default=True, metavar="N",
              help="Training images (the first N of the train split).")
@click.option("--test-limit", type=click.IntRange(1, None), default=1000, show_default=True, metavar="N",
              help="Test images (the first N of the test split).")
@click.option("--backbone", default="efficientnet_lite0", show_default=True, help="A registered backbone.")
@click.option("--layers", default="multi", show_default=True,
              help="penultimate, multi (pooled last stages + penultimate), or module names.")
@click.option("--image-size", type=int, default=None, metavar="PX", help="Input size (default: the weights' own, 224).")
@click.option("--heads", default=None, metavar="A,B", help="Heads to fit (default: every first-party head).")
@click.option("--quiet", is_flag=True, help="No progress bars.")
def demo(out_dir, data, train_limit, test_limit, backbone, layers, image_size, heads, quiet):
    """Extract Fashion-MNIST with efficientnet_lite0, fit every head, evaluate on the test split, print a table.

    The defaults run the backbone once over 4,000 images (3000 train / 1000 test at 224 px, --layers multi):
    that one-off extraction is almost all of the work (its progress is shown on stderr); each head then trains only
    on the cached feature vectors, a much smaller job. Running it again re-uses the finished stores in --out and
    only re-fits the heads. Offline: the backbone's weights come from a PyPI package and Fashion-MNIST from local
    IDX files (scikit-learn's digits is used if they are missing).

    \b
    Examples:
      tlfx demo
      tlfx demo --train-limit 10000 --test-limit 2000 --out fm10k
      tlfx demo --heads svm,logistic --image-size 112
    """
    from .. import extract as run_extract
    from ..api import evaluate, fit
    from ..heads import first_party_heads
    from ..plugins import registry

    t_start = time.perf_counter()
    if data == DEFAULT_DATA and not _available(DEFAULT_DATA):
        click.echo(f"note: Fashion-MNIST is not installed here (apt-get install dataset-fashion-mnist, or IDX files "
                   f"in ~/.cache/tlfx/fashion-mnist); using scikit-learn's {FALLBACK_DATA} instead", err=True)
        data = FALLBACK_DATA
    names = [h.strip() for h in heads.split(",") if h.strip()] if heads else first_party_heads()
    for n in names:
        registry("head").get(n)  # unknown head -> one line with the valid choices
    os.makedirs(os.path.join(out_dir, "models"), exist_ok=True)
    tag = f"{_slug(backbone)}-{_slug(layers)}-{image_size or 'default'}px"
    stores = {}
    extract_seconds = 0.0
    for split, limit in (("train", train_limit), ("test", test_limit)):
        path = os.path.join(out_dir, f"{_slug(data)}-{split}-{limit}-{tag}.h5")
        click.echo(f"extract {data} {split} (first {limit}) with {backbone}, layers {layers} -> {path}", err=True)
        res = run_extract(backbone, data, path, split=split, limit=limit, layers=layers, image_size=image_size,
                          progress=not quiet)
        extract_seconds += res.seconds
        click.echo(f"  {res.summary()}", err=True)
        stores[split] = path
    rows = []
    for name in names:
        click.echo(f"fit {name} ...", err=True)
        model_path = os.path.join(out_dir, "models", f"{name}.tlfx")
        model = fit(stores["train"], name, out=model_path)
        rep = evaluate(model_path, stores["test"])
        rows.append({"head": name, "accuracy": rep["accuracy"], "macro_f1": rep["macro_f1"],
                     "fit_seconds": model.meta["fit_seconds"], "predict_seconds": rep["predict_seconds"],
                     "model": model_path})
    total = time.perf_counter() - t_start
    results = {"data": data, "backbone": backbone, "layers": layers, "image_size": image_size,
               "train": {"path": stores["train"], "n": train_limit}, "test": {"path": stores["test"], "n": test_limit},
               "extract_seconds": extract_seconds, "total_seconds": total, "heads": rows}
    with open(os.path.join(out_dir, "results.json"), "w") as f:
        json.dump(results, f, indent=2)
    n_tr = rows and _rows_of(stores["train"])
    n_te = rows and _rows_of(stores["test"])
    click.echo(f"\n{data}: {n_tr} train / {n_te} test images, {backbone} --layers {layers}"
               f"{f' --image-size {image_size}' if image_size else ''}")
    w = max([len("head")] + [len(r["head"]) for r in rows])
    click.echo(f"{'head':<{w}}  accuracy  macro-F1  fit s")
    best = max(rows, key=lambda r: r["accuracy"]) if rows else None
    for r in rows:
        mark = "  <- best" if r is best else ""
        click.echo(f"{r['head']:<{w}}  {r['accuracy']:8.4f}  {r['macro_f1']:8.4f}  {r['fit_seconds']:5.1f}{mark}")
    click.echo(f"extraction {extract_seconds:.0f} s (0 when re-used), total {total:.0f} s; models and results.json "
               f"in {out_dir}/")


def _rows_of(path: str) -> int:
    from ..store import FeatureStore

    return len(FeatureStore(path))


COMMANDS = [demo]
