"""``tlfx similar``: nearest images in a store to an image or a stored id, and near-duplicate pairs."""

import csv
import io
import json

import click


@click.command()
@click.argument("store", type=click.Path(dir_okay=False))
@click.option("--image", type=click.Path(dir_okay=False), default=None, metavar="FILE",
              help="Query image, embedded with the store's own backbone configuration.")
@click.option("--id", "id_", default=None, metavar="ID", help="Query by a stored image's id.")
@click.option("--duplicates", is_flag=True, help="List near-duplicate pairs across the store instead.")
@click.option("--threshold", type=float, default=0.98, show_default=True, help="Cosine similarity of a duplicate pair.")
@click.option("--top-k", type=click.IntRange(1, 10000), default=10, show_default=True, help="Nearest images shown.")
@click.option("--format", "fmt", type=click.Choice(["table", "json", "csv"]), default="table", show_default=True)
@click.option("--html", "html_out", type=click.Path(dir_okay=False), default=None, metavar="FILE",
              help="Also write a contact sheet (self-contained HTML with the images).")
@click.option("--index", "index", type=click.Choice(["exact", "faiss", "auto"]), default="exact", show_default=True,
              help="exact: chunked search, bounded memory. faiss (extra 'ann'): every vector in memory; exact for a "
                   "query, approximate (IVF) for --duplicates. auto: faiss where measured to pay and it fits in memory.")
def similar(store, image, id_, duplicates, threshold, top_k, fmt, html_out, index):
    """Find the images of a store most similar to a query (cosine search on the stored features), or its
    near-duplicate pairs. The output says which index answered and whether the answer is exact (json and csv:
    fields index and exact; table: a line on stderr).

    \b
    Examples:
      tlfx similar train.h5 --image query.png --top-k 5
      tlfx similar train.h5 --id cats/001.png --format json
      tlfx similar train.h5 --duplicates --threshold 0.98 --html dups.html
      tlfx similar big.h5 --duplicates --index auto --format json
    """
    from ..errors import TlfxError
    from ..export import open_complete
    from ..similar import choose_index, contact_sheet, embed_query, nearest, row_of_id
    from ..similar import duplicates as find_dups

    if sum(x is not None and x is not False for x in (image, id_, duplicates or None)) != 1:
        raise TlfxError("give exactly one of --image FILE, --id ID or --duplicates")
    st = open_complete(store)
    used = choose_index(st, index, "duplicates" if duplicates else "nearest")
    if duplicates:
        rows, total = find_dups(st, threshold, index=used["index"])
        cols = ["rank", "similarity", "id_a", "class_a", "id_b", "class_b"]
        groups = [(f"pairs with cosine similarity >= {threshold}", rows)]
        note = f"{total} pairs found, {len(rows)} shown" if total > len(rows) else f"{total} pairs"
    else:
        query = row_of_id(st, id_)[1] if id_ is not None else embed_query(st, image)
        rows = nearest(st, query, top_k, index=used["index"])
        cols = ["rank", "similarity", "id", "class", "label"]
        groups = [(f"nearest to {id_ if id_ is not None else image}", rows)]
        note = None
    if fmt != "table":
        rows = [{**r, "index": used["index"], "exact": used["exact"]} for r in rows]
        cols = [*cols, "index", "exact"]
    _print(rows, cols, fmt)
    if fmt == "table":
        if note:
            click.echo(note, err=True)
        click.echo(f"index: {used['index']} ({'exact' if used['exact'] else 'approximate'}; {used['why']})", err=True)
    if html_out:
        from ..safetext import terminal

        with open(html_out, "w", encoding="utf-8") as f:
            f.write(contact_sheet(st, f"tlfx similar: {store}", groups))
        click.echo(f"contact sheet: {terminal(html_out)}", err=True)


def _print(rows, cols, fmt):
    from ..safetext import terminal

    if fmt == "json":  # json.dumps escapes control characters itself
        click.echo(json.dumps([{c: r[c] for c in cols} for r in rows], indent=2, ensure_ascii=True))
    elif fmt == "csv":  # csv of foreign names: still printed on a terminal, so control characters made visible
        buf = io.StringIO()
        w = csv.writer(buf, lineterminator="\n")
        w.writerow(cols)
        w.writerows([[terminal(r[c]) for c in cols] for r in rows])
        click.echo(buf.getvalue(), nl=False)
    else:
        shown = [[terminal(f"{r[c]:.4f}" if c == "similarity" else r[c]) for c in cols] for r in rows]
        widths = [max([len(c)] + [len(s[i]) for s in shown]) for i, c in enumerate(cols)]
        click.echo("  ".join(c.ljust(w) for c, w in zip(cols, widths)).rstrip())
        for s in shown:
            click.echo("  ".join(v.ljust(w) for v, w in zip(s, widths)).rstrip())


COMMANDS = [similar]
