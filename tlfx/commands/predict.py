"""``tlfx predict``: backbone + head end to end on image files."""

import csv
import io
import json

import click

from ._trust import trust_options


@click.command()
@click.option("--model", "model_path", required=True, type=click.Path(dir_okay=False), metavar="M",
              help="Model file (tlfx fit, tlfx finetune).")
@click.argument("images", nargs=-1, required=True, type=click.Path())
@click.option("--top-k", type=click.IntRange(1, None), default=3, show_default=True, help="Classes shown per image.")
@click.option("--format", "fmt", type=click.Choice(["table", "json", "csv"]), default="table", show_default=True)
@trust_options
def predict(model_path, images, top_k, fmt, trust_types, trust_pickle):
    """Classify image files: rebuilds the model's backbone (same weights, layers, pooling, size), then its head.

    Files that cannot be read are reported and skipped; the others are still classified.

    \b
    Examples:
      tlfx predict --model svm.tlfx shoe.png bag.jpg
      tlfx predict --model svm.tlfx photos/*.jpg --top-k 1 --format csv > predictions.csv
    """
    from ..api import predict as predict_images
    from ..errors import TlfxError
    from ..safetext import terminal

    rows = predict_images(model_path, list(images), top_k=top_k, trust_types=trust_types, trust_pickle=trust_pickle)
    bad = [r for r in rows if "error" in r]
    if len(bad) == len(rows):
        raise TlfxError(f"none of the {len(rows)} image files could be read ({bad[0]['path']}: {bad[0]['error']}); "
                        f"pass image files (PNG, JPEG, ...)")
    if fmt == "json":
        click.echo(json.dumps(rows, indent=2))
    elif fmt == "csv":
        buf = io.StringIO()
        w = csv.writer(buf, lineterminator="\n")
        w.writerow(["path", "rank", "class", "probability", "error"])
        for r in rows:
            if "error" in r:
                w.writerow([r["path"], "", "", "", r["error"]])
            for rank, t in enumerate(r.get("top", []), 1):
                w.writerow([r["path"], rank, t["class"], f"{t['probability']:.6f}", ""])
        click.echo(buf.getvalue(), nl=False)
    else:  # file and class names come from other people: control characters shown, never sent to the terminal
        shown = [terminal(r["path"]) for r in rows]
        width = max(len(p) for p in shown)
        for p, r in zip(shown, rows):
            if "error" in r:
                click.echo(f"{p:<{width}}  unreadable: {terminal(r['error'])}")
            else:
                tops = "   ".join(f"{terminal(t['class'])} {t['probability']:.3f}" for t in r["top"])
                click.echo(f"{p:<{width}}  {tops}")
    if bad:
        click.echo(f"{len(bad)} of {len(rows)} files could not be read and were skipped", err=True)


COMMANDS = [predict]
