import sys

import click

from ..engines import search_engine_options
from ..safetext import terminal
from ._options import normalize_option
from ._trust import trust_options


@click.command()
@click.option("--train", "train", required=True, type=str, metavar="F.h5", help="Training feature store.")
@click.option("--test", "test", required=True, type=str, metavar="T.h5",
              help="Test feature store (same backbone configuration and classes); used once per row.")
@click.option("--heads", default=None, metavar="A,B,...",
              help="Comma-separated heads (tlfx heads). Default: every registered head.")
@click.option("--search", is_flag=True, help="Choose each head's hyperparameters by cross-validation on the training store.")
@click.option("--cv", "folds", type=int, default=3, show_default=True, help="Folds for --search.")
@click.option("--baseline", default=None, metavar="BACKBONE",
              help="Re-extract the same images with this backbone (e.g. pixels) and run the same heads on them.")
@click.option("--finetune", multiple=True, type=str, metavar="M",
              help="A fine-tuned (or any tlfx) model file to add as a row; repeatable.")
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
def compare(train, test, heads, search, folds, baseline, finetune, learning_curve, n_boot, seed, gallery,
            allow_incomplete, trust_types, trust_pickle, out, quiet, normalize, engine, address):
    """Compare heads (and a raw-pixel baseline, and fine-tuned models) on the same splits: quality beside cost.

    Writes DIR/report.html (one self-contained page), DIR/report.json (every number) and DIR/report.md.

    \b
    Examples:
      tlfx compare --train tr.h5 --test te.h5 --out report
      tlfx compare --train tr.h5 --test te.h5 --heads linear,logistic,svm,random_forest,knn \\
                   --search --baseline pixels --out report
      tlfx compare --train tr.h5 --test te.h5 --heads svm --finetune ft.tlfx --learning-curve none --out r2
      tlfx compare --train tr.h5 --test te.h5 --search --engine ray --address auto --out r3
      tlfx compare --train tr.h5 --test te.h5 --heads svm,logistic --search --normalize none,power --out r4
    """
    from ..compare import compare as run
    from ..heads import list_heads

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


def _argv():
    args = sys.argv
    return ["compare", *args[args.index("compare") + 1:]] if "compare" in args else None


COMMANDS = [compare]
