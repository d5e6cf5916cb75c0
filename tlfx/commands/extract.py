import click

from ..config import DTYPES, TTAS, ExtractOptions
from ._options import backbone_options, data_options, extraction_runtime_option


@click.command()
@backbone_options
@data_options
@extraction_runtime_option
@click.option("--out", required=True, type=click.Path(dir_okay=False), help="The HDF5 store to write (or resume).")
@click.option("--batch-size", type=click.IntRange(min=1), default=64, show_default=True, help="Images per network call.")
@click.option("--workers", type=click.IntRange(min=0), default=None, help="Decoding worker processes (default: cores - 1).")
@click.option("--dtype", type=click.Choice(DTYPES), default="float32", show_default=True,
              help="Stored feature type (compute precision is --precision).")
@click.option("--tta", type=click.Choice(TTAS), default="none", show_default=True,
              help="Test-time augmentation: flip averages the features of each image and of its horizontal mirror "
                   "(twice the network time); recorded in the store, and predict repeats it.")
@click.option("--part-size", type=click.IntRange(min=1), default=None, help="Items per durable part (default ~2048).")
@click.option("--overwrite", is_flag=True, help="Replace an existing store made with another configuration.")
@click.option("--update", is_flag=True, help="Bring a store of a changed image folder (or CSV) up to date: keep the "
              "rows of files still there, drop removed ones, extract only new files.")
@click.option("--strict", is_flag=True, help="Fail on the first unreadable image instead of skipping it.")
@click.option("--compile", "compile_", is_flag=True, help="torch.compile the backbone (see docs/performance.md).")
@click.option("--quiet", is_flag=True, help="No progress bar.")
@click.option("--engine", type=click.Choice(["local", "ray"]), default="local", show_default=True,
              help="local: this machine; ray: actors on a Ray cluster (pip install tlfx[ray]; docs/scaling.md).")
@click.option("--address", default=None, metavar="ADDR", help="Ray cluster to join (auto, HOST:PORT); default: a local one.")
@click.option("--num-workers", type=click.IntRange(min=1), default=None, metavar="N",
              help="Ray actors (default: as many as fit).")
@click.option("--gpus-per-worker", type=click.FloatRange(min=0), default=None, metavar="G",
              help="GPUs per Ray actor (default 0: CPU).")
def extract(compile_, quiet, engine, address, num_workers, gpus_per_worker, **fields):
    """Run a frozen backbone once over a dataset and cache its features in an HDF5 store.

    An interrupted run resumes when the same command is run again. After files were added to or removed from
    the folder, --update extracts only the new files and keeps every other row as it was.

    \b
    Examples:
      tlfx extract --data fashion-mnist --split test --limit 2000 --out t.h5
      tlfx extract --backbone resnet18 --data imagefolder:photos --layers multi --out photos.h5
      tlfx extract --data imagefolder:photos --runtime openvino --precision int8 --out photos-int8.h5
      tlfx extract --backbone resnet18 --data imagefolder:photos --layers multi --out photos.h5 --update
      tlfx extract --data imagefolder:photos --tta flip --out photos-flip.h5
      tlfx extract --backbone vgg16 --weights vgg16.pth --data csv:labels.csv --split train --out tr.h5
      tlfx extract --data imagefolder:/shared/photos --out /shared/p.h5 --engine ray --address auto --gpus-per-worker 1
    """
    from ..engines import extract_with
    from ..errors import TlfxError

    if engine == "ray":  # Ray workers run torch
        if fields["runtime"] == "openvino" or fields["precision"] == "int8":
            raise TlfxError("--engine ray runs torch; drop --runtime openvino / --precision int8 or use --engine local")
        fields["runtime"] = "torch"
    opts = ExtractOptions(**fields, compile=compile_, progress=not quiet)
    res = extract_with(engine, opts, address=address, num_workers=num_workers, gpus_per_worker=gpus_per_worker)
    click.echo(res.summary())


COMMANDS = [extract]
