"""``tlfx export-shapes``: write the shapes dataset as an image folder, to look at or to use as ``imagefolder:DIR``."""

from __future__ import annotations

import os

import click

import tlfx


@click.command(name="export-shapes")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Folder to write DIR/<split>/<class>/*.png into.")
@click.option("--per-class", type=int, default=20, show_default=True, help="Images per class and split.")
@click.option("--split", "splits", multiple=True, type=click.Choice(["train", "test"]), default=("train", "test"),
              show_default=True, help="Splits to write (repeat the option for several).")
def export_shapes(out, per_class, splits):
    """Write the example plugin's synthetic shapes as PNG files, one sub-folder per class.

    \b
    Examples:
      tlfx export-shapes --out shapes --per-class 20
      tlfx extract --backbone colour_hog --data imagefolder:shapes --split train --out tr.h5
    """
    n = 0
    for split in splits:
        ds = tlfx.load_dataset(f"shapes:{per_class}", split=split)
        for i in range(len(ds)):
            folder = os.path.join(out, split, ds.class_names[int(ds.labels[i])])
            os.makedirs(folder, exist_ok=True)
            ds.load(i).save(os.path.join(folder, f"{ds.ids[i]}.png"))
            n += 1
    click.echo(f"wrote {n} images ({len(splits)} split(s) x {len(tlfx.load_dataset('shapes:1').class_names)} "
               f"classes x {per_class}) to {out}")
