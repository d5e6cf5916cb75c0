"""``tlfx fit``: train a head on cached features and save a model file."""

import click

from ..engines import search_engine_options
from ._options import normalize_option


@click.command()
@click.option("--features", required=True, type=click.Path(dir_okay=False), metavar="F.h5",
              help="Training feature store (tlfx extract).")
@click.option("--head", required=True, metavar="NAME", help="A registered head (tlfx heads): linear, logistic, svm, ...")
@click.option("--param", "params", multiple=True, metavar="KEY=VALUE",
              help="Head parameter, repeatable; values are read as int/float/bool/none/str (e.g. C=10, max_depth=none).")
@click.option("--search", is_flag=True, help="Cross-validate the head's parameter grid on the training store, keep the best.")
@click.option("--cv", type=click.IntRange(2, None), default=5, show_default=True, help="Folds for --search (stratified).")
@click.option("--seed", type=click.IntRange(0, 2**32 - 1), default=0, show_default=True, help="CV folds, seeded heads.")
@click.option("--out", required=True, type=click.Path(dir_okay=False), metavar="M",
              help="Model file to write (e.g. svm.tlfx).")
@click.option("--export-joblib", is_flag=True,
              help="Also write a pickle copy <M stem>.joblib (loads only with --trust-pickle: pickles can run code).")
@click.option("--allow-incomplete", is_flag=True, help="Train on a store whose extraction has not finished.")
@click.option("--stream/--no-stream", default=None,
              help="Train by reading the store in chunks (heads linear, sgd) instead of loading it; default: only "
                   "when its features exceed 2 GiB and neither --search nor --normalize is given.")
@click.option("--chunk-rows", type=click.IntRange(1, None), default=None, metavar="N",
              help="Rows read at a time when streaming (default: about 64 MiB of features).")
@normalize_option
@search_engine_options
def fit(features, head, params, search, cv, seed, out, export_joblib, allow_incomplete, stream, chunk_rows, normalize,
        engine, address):
    """Train a head on the features of a store and save it with the backbone configuration and class names.

    \b
    Examples:
      tlfx fit --features train.h5 --head svm --out svm.tlfx
      tlfx fit --features train.h5 --head logistic --param C=0.1 --out logreg.tlfx
      tlfx fit --features train.h5 --head knn --search --cv 5 --out knn.tlfx
      tlfx fit --features train.h5 --head svm --search --engine ray --address auto --out svm.tlfx
      tlfx fit --features train.h5 --head linear --param epochs=50 --param lr=3e-3 --out linear.tlfx
      tlfx fit --features big.h5 --head sgd --stream --chunk-rows 20000 --out sgd.tlfx
      tlfx fit --features train.h5 --head svm --normalize power --out svm-power.tlfx
      tlfx fit --features train.h5 --head logistic --search --normalize none,l2,power,pca-whiten --out lr.tlfx
    """
    from ..api import fit as fit_model
    from ..heads import parse_params
    from ..plugins import registry

    registry("head").get(head)  # unknown head -> one line with the valid choices
    parsed = parse_params(head, params)
    model = fit_model(features, head, parsed, search=search, out=out, cv=cv, seed=seed, normalize=normalize,
                      allow_incomplete=allow_incomplete, export_joblib=export_joblib, engine=engine, address=address,
                      stream=stream, chunk_rows=chunk_rows)
    meta = model.meta
    s = meta.get("search")
    if s:
        chosen = ", ".join(f"{k}={v!r}" for k, v in s["best_params"].items())
        if "normalize" in s["grid"]:
            chosen = ", ".join(x for x in (f"normalize={s['normalize']!r}", chosen) if x)
        click.echo(f"search: {len(s['results'])} settings x {s['cv_folds']} folds in {s['search_seconds']:.1f} s; "
                   f"chosen {chosen}; CV accuracy {s['cv_score']:.4f}")
    streamed = f" (streamed, {meta['streamed']['chunk_rows']} rows a chunk)" if meta.get("streamed") else ""
    shown = ", ".join(f"{k}={v!r}" for k, v in (meta.get("params") or {}).items()) or "defaults"
    norm = f" after {meta['normalize']} normalisation" if meta.get("normalize", "none") != "none" else ""
    click.echo(f"fit {head} ({shown}){norm} on {meta['n_train']} rows x {meta['n_features']} features "
               f"in {meta['fit_seconds']:.2f} s{streamed} -> {out}")
    if getattr(model, "joblib_path", None):
        click.echo(f"pickle export -> {model.joblib_path} (load it only with --trust-pickle)")


COMMANDS = [fit]
