"""``tlfx combine``: stores of several backbones or layers over the same images, one feature set for a head."""

import click


@click.command()
@click.argument("stores", nargs=-1, required=True, type=click.Path(dir_okay=False), metavar="A.h5 B.h5 [C.h5 ...]")
@click.option("--out", required=True, type=click.Path(dir_okay=False), metavar="F.h5", help="The combined store to write.")
@click.option("--overwrite", is_flag=True, help="Replace an existing --out.")
def combine(stores, out, overwrite):
    """Put the features of stores of the same images side by side in one store, for a head to use together.

    The stores must hold the same images in the same order (same --data, --split and --limit at extraction): the
    same ids, labels and class names. Each source's configuration, columns and file (name, sha256) are recorded;
    a head fitted on a combined store evaluates only on stores combined the same way (same sources in the same
    order), and predicts on images by running every source backbone.

    \b
    Examples:
      tlfx extract --backbone efficientnet_lite0 --data digits --split train --out lite0-train.h5
      tlfx extract --backbone pixels_grey --data digits --split train --out pix-train.h5
      tlfx combine lite0-train.h5 pix-train.h5 --out both-train.h5
      tlfx fit --features both-train.h5 --head logistic --out both.tlfx
    """
    from ..combine import combine_stores
    from ..safetext import terminal

    st = combine_stores(list(stores), out, overwrite=overwrite)
    click.echo(f"wrote {len(st)} rows x {st.attrs.get('dim')} features ({len(stores)} stores) to {terminal(out)}")


COMMANDS = [combine]
