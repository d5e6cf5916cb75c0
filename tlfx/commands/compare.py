import sys

import click

from ..config import POOLINGS, TTAS
from ..engines import search_engine_options
from ..errors import TlfxError
from ..safetext import terminal
from ._options import IMAGE_SIZE, PRECISIONS, normalize_option, runtime_option
from ._trust import trust_options


@click.command()
@click.option("--train", "train", default=None, type=str, metavar="F.h5", help="Training feature store (store mode).")
@click.option("--test", "test", default=None, type=str, metavar="T.h5",
              help="Test feature store (same backbone configuration and classes); used once per row.")
@click.option("--data", default=None, metavar="SPEC",
              help="Sweep mode: a dataset (digits, fashion-mnist, imagefolder:DIR, ...) to extract with every "
                   "--backbones x --layers configuration instead of --train/--test stores.")
@click.option("--backbones", default=None, metavar="A,B,...", help="Sweep mode: backbones to compare (tlfx backbones).")
@click.option("--layers", default="penultimate", show_default=True, metavar="L1,L2,...",
              help="Sweep mode: layer choices to compare, e.g. penultimate,multi.")
@click.option("--limit", type=click.IntRange(min=1), default=None, metavar="N",
              help="Sweep mode: the first N training images.")
@click.option("--test-limit", type=click.IntRange(min=1), default=None, metavar="M",
              help="Sweep mode: the first M test images.")
@click.option("--root", default=None, metavar="DIR", help="Sweep mode: where a built-in dataset's files are.")
@click.option("--train-split", default="train", show_default=True, help="Sweep mode: the split to train on.")
@click.option("--test-split", default="test", show_default=True, help="Sweep mode: the split to test on.")
@click.option("--cache", default=None, type=click.Path(file_okay=False), metavar="DIR",
              help="Sweep mode: the store cache (default OUT/stores); complete stores are reused, incomplete ones resume.")
@click.option("--image-size", type=IMAGE_SIZE, default=None, metavar="PX",
              help="Sweep mode: input size for every backbone (default: each backbone's own).")
@click.option("--pooling", type=click.Choice(POOLINGS), default="avg", show_default=True, help="Sweep mode: pooling.")
@click.option("--precision", type=click.Choice(PRECISIONS + ("int8",)), default="auto", show_default=True,
              help="Sweep mode: compute precision of the backbones (int8: NNCF-quantized, OpenVINO runtime).")
@runtime_option("Sweep mode: as tlfx extract's; ")
@click.option("--batch-size", type=click.IntRange(min=1), default=64, show_default=True, help="Sweep mode: batch size.")
@click.option("--tta", type=click.Choice(TTAS), default="none", show_default=True,
              help="Sweep mode: test-time augmentation at extraction (flip: mean of an image's and its mirror's features).")
@click.option("--device", default="auto", show_default=True, help="Sweep mode: auto, cpu, cuda or cuda:N.")
@click.option("--heads", default=None, metavar="A,B,...",
              help="Comma-separated heads (tlfx heads). Default: every registered head.")
@click.option("--search", is_flag=True, help="Choose each head's hyperparameters by cross-validation on the training store.")
@click.option("--cv", "folds", type=int, default=3, show_default=True, help="Folds for --search.")
@click.option("--baseline", default=None, metavar="BACKBONE",
              help="Re-extract the same images with this backbone (e.g. pixels) and run the same heads on them.")
@click.option("--finetune", multiple=True, type=str, metavar="M",
              help="A fine-tuned (or any tlfx) model file to add as a row, scored once on the test images; "
                   "repeatable. Both modes: in sweep mode the model is one more row of the merged report.")
@click.option("--learning-curve", default="1,5,10,50,100,all", show_default=True, metavar="K,K,...|none",
              help="Labelled examples per class for the learning curves.")
@click.option("--bootstrap", "n_boot", type=click.IntRange(min=0), default=1000, show_default=True,
              help="Bootstrap resamples for the CIs.")
@click.option("--seed", type=click.IntRange(0, 2**32 - 1), default=0, show_default=True,
              help="Seed of every random choice (same seed, same numbers).")
@click.option("--gallery", type=click.IntRange(min=0), default=24, show_default=True, help="Misclassified test images to show.")
@click.option("--allow-incomplete", is_flag=True, help="Accept stores whose extraction has not finished.")
@trust_options
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Directory for report.html/.json/.md.")
@click.option("--quiet", is_flag=True, help="No progress display.")
@normalize_option
@search_engine_options
def compare(train, test, data, backbones, layers, limit, test_limit, root, train_split, test_split, cache, image_size,
            pooling, precision, runtime, batch_size, tta, device, heads, search, folds, baseline, finetune, learning_curve,
            n_boot, seed, gallery, allow_incomplete, trust_types, trust_pickle, out, quiet, normalize, engine, address):
    """Compare heads (and a raw-pixel baseline, and fine-tuned models) on the same splits: quality beside cost.

    Writes DIR/report.html (one self-contained page), DIR/report.json (every number) and DIR/report.md.

    Sweep mode (--data and --backbones instead of --train/--test): every backbone x --layers configuration is
    extracted into a store cache keyed by its full configuration (reused when complete, resumed when not), the
    heads are compared on each, and one report shows the grid, the cost of each backbone and paired tests
    (McNemar) between the best row and the others; each configuration's own report is under DIR/configs/.
    --finetune models are scored once on the same test images and join the merged report as rows of their own.

    \b
    Examples:
      tlfx compare --train tr.h5 --test te.h5 --out report
      tlfx compare --train tr.h5 --test te.h5 --heads linear,logistic,svm,random_forest,knn \\
                   --search --baseline pixels --out report
      tlfx compare --train tr.h5 --test te.h5 --heads svm --finetune ft.tlfx --learning-curve none --out r2
      tlfx compare --train tr.h5 --test te.h5 --search --engine ray --address auto --out r3
      tlfx compare --train tr.h5 --test te.h5 --heads svm,logistic --search --normalize none,power --out r4
      tlfx compare --data digits --backbones pixels_grey,efficientnet_lite0 --heads linear,logistic,knn \\
                   --out sweep
      tlfx compare --data digits --backbones pixels_grey,efficientnet_lite0 --heads logistic \\
                   --finetune ft.tlfx --out sweep-ft
      tlfx compare --data fashion-mnist --limit 10000 --test-limit 2000 \\
                   --backbones efficientnet_lite0,efficientnet_lite1,pixels_grey --layers penultimate,multi \\
                   --heads linear,svm,knn --out sweep --cache ~/.cache/tlfx/stores
    """
    from ..compare import compare as run
    from ..heads import list_heads

    if data is not None or backbones is not None:
        if train is not None or test is not None:
            raise TlfxError("pass either --data with --backbones (sweep mode) or --train and --test (store mode), "
                            "not both")
        if not data or not backbones:
            raise TlfxError("sweep mode needs both --data SPEC and --backbones A,B,...; e.g. --data digits "
                            "--backbones pixels_grey,efficientnet_lite0")
        if baseline:
            raise TlfxError("--baseline is for store mode (--train/--test); in sweep mode add the baseline to "
                            "--backbones (e.g. pixels_grey) instead")
        if allow_incomplete:
            raise TlfxError("--allow-incomplete is for store mode (--train/--test); a sweep resumes incomplete "
                            "stores itself")
        return _sweep(data, backbones, layers, heads or list_heads(), out, cache=cache, limit=limit,
                      test_limit=test_limit, root=root, train_split=train_split, test_split=test_split,
                      image_size=image_size, pooling=pooling, precision=precision, runtime=runtime,
                      batch_size=batch_size, tta=tta, device=device, search=search, folds=folds,
                      learning_curve=learning_curve, n_boot=n_boot, seed=seed, gallery=gallery, quiet=quiet,
                      engine=engine, address=address, normalize=normalize,
                      finetune=finetune, trust=(trust_types, trust_pickle))
    if train is None or test is None:
        raise TlfxError("compare needs --train F.h5 and --test T.h5 (store mode), or --data SPEC and --backbones "
                        "A,B,... (sweep mode)")
    rep = run(train, test, heads or list_heads(), out, search=search, folds=folds, baseline=baseline,
              finetune=finetune, learning_curve=learning_curve, allow_incomplete=allow_incomplete, n_boot=n_boot,
              seed=seed, gallery=gallery, progress=not quiet,
              trust_types=trust_types, trust_pickle=trust_pickle, engine=engine, address=address,
              argv=_argv(), normalize=normalize)
    best = next(r for r in rep["rows"] if r["id"] == rep["best"])
    labels = {r["id"]: terminal(r["label"]) for r in rep["rows"]}  # model names come from other people's files
    width = max(len(v) for v in labels.values())
    click.echo(f"{'row':<{width}}  accuracy  macro-F1  fit time")
    for r in rep["rows"]:
        fit = r["timing"].get("fit_seconds")
        click.echo(f"{labels[r['id']]:<{width}}  {r['accuracy']:8.3f}  {r['macro_f1']:8.3f}  "
                   f"{'-' if fit is None else f'{fit:7.2f} s'}")
    for w in rep.get("warnings") or []:
        click.echo(f"warning: {terminal(w['message'])}", err=True)
    click.echo(f"best: {labels[best['id']]} (accuracy {best['accuracy']:.3f}); report: {terminal(out)}/report.html")


def _sweep(data, backbones, layers, heads, out, *, cache, limit, test_limit, root, train_split, test_split,
           image_size, pooling, precision, runtime, batch_size, tta, device, search, folds, learning_curve, n_boot, seed,
           gallery, quiet, engine, address, normalize=None, finetune=(), trust=((), False)):
    from ..sweep import SweepOptions, sweep

    opts = SweepOptions(data=data, root=root, limit=limit, test_limit=test_limit, train_split=train_split,
                        test_split=test_split, pooling=pooling, image_size=image_size, precision=precision,
                        runtime=runtime, device=None if device == "auto" else device, batch_size=batch_size, tta=tta)
    rep = sweep(data, backbones, layers, heads, out, cache=cache, opts=opts, search=search, folds=folds,
                learning_curve=learning_curve, n_boot=n_boot, seed=seed, gallery=gallery, progress=not quiet,
                engine=engine, address=address, argv=_argv(), normalize=normalize, finetune=finetune,
                trust_types=trust[0], trust_pickle=trust[1])
    best = next(r for r in rep["rows"] if r["id"] == rep["best"])
    labels = {r["id"]: terminal(r["label"]) for r in rep["rows"]}
    width = max(len(v) for v in labels.values())
    click.echo(f"{'row':<{width}}  accuracy  macro-F1  fit time  total cost")
    for r in sorted(rep["rows"], key=lambda r: -r["accuracy"]):
        t = r["timing"]
        fit = "-" if t["fit_seconds"] is None else f"{t['fit_seconds']:7.2f} s"
        click.echo(f"{labels[r['id']]:<{width}}  {r['accuracy']:8.3f}  {r['macro_f1']:8.3f}  {fit:>8}  "
                   f"{t['total_cost_seconds']:8.1f} s")
    for p in rep["paired"][:3]:
        click.echo(terminal(p["sentence"]))
    click.echo(f"best: {labels[best['id']]} (accuracy {best['accuracy']:.3f}); report: {terminal(out)}/report.html")


def _argv():
    args = sys.argv
    return ["compare", *args[args.index("compare") + 1:]] if "compare" in args else None


COMMANDS = [compare]
