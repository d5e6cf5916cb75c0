"""``tlfx export`` and ``tlfx import-features``: a store's features to numpy / parquet / CSV, and a parquet back."""

import click


@click.command()
@click.argument("store", type=click.Path(dir_okay=False))
@click.option("--format", "fmt", type=click.Choice(["npy", "parquet", "csv"]), required=True,
              help="npy: a folder (features.npy, labels.npy, ids.txt, ids.json, meta.json); parquet: one file "
                   "(columns id, label, class, vector; metadata 'tlfx'); csv: id, label, class, f0..fD-1.")
@click.option("--out", required=True, type=click.Path(), metavar="PATH", help="File (parquet, csv) or folder (npy) to write.")
@click.option("--overwrite", is_flag=True, help="Replace an existing --out.")
@click.option("--row-group-size", type=click.IntRange(1, 1 << 24), default=65536, show_default=True,
              help="Rows per parquet row group (rows read from the store at a time).")
def export(store, fmt, out, overwrite, row_group_size):
    """Write a store's features, ids, labels, class names and configuration for other tools.

    \b
    Examples:
      tlfx export train.h5 --format parquet --out train.parquet
      tlfx export train.h5 --format npy --out train_npy
      tlfx export test.h5 --format csv --out test.csv --overwrite
    """
    from ..export import export_store
    from ..safetext import terminal

    n = export_store(store, fmt, out, overwrite=overwrite, row_group_size=row_group_size)
    click.echo(f"wrote {n} rows to {terminal(out)} ({fmt})")


@click.command("import-features")
@click.argument("parquet", type=click.Path(dir_okay=False))
@click.option("--out", required=True, type=click.Path(dir_okay=False), metavar="F.h5", help="The store to write.")
@click.option("--overwrite", is_flag=True, help="Replace an existing --out.")
def import_features(parquet, out, overwrite):
    """Make a feature store from a parquet of vectors (column 'vector'; optional 'id', 'label'; class names from
    tlfx's metadata), so heads can be fitted on features made by another tool.

    The store's configuration is 'imported:<file name>': models fitted on it evaluate only on stores imported from
    a file of the same name.

    \b
    Examples:
      tlfx import-features train.parquet --out train.h5
      tlfx fit train.h5 --head knn --out knn.tlfx
    """
    from ..export import import_features as run
    from ..safetext import terminal

    n = run(parquet, out, overwrite=overwrite)
    click.echo(f"imported {n} rows into {terminal(out)}")


COMMANDS = [export, import_features]
