"""Options shared by several commands."""

import click

from ..config import IMAGE_SIZES, POOLINGS, RUNTIMES

PRECISIONS = ("auto", "fp32", "bf16", "fp16")  # tlfx.runtime.PRECISIONS, without importing torch
IMAGE_SIZE = click.IntRange(*IMAGE_SIZES)  # refused before any work starts


def data_options(f):
    f = click.option("--limit", type=int, default=None, metavar="N",
                     help="Use only the first N items (quick runs); 1 to 10^12.")(f)
    f = click.option("--root", type=str, default=None, metavar="DIR",
                     help="Where a built-in dataset's files are (e.g. Fashion-MNIST IDX files).")(f)
    f = click.option("--split", type=str, default=None, help="Dataset split: train, test (val, all where the data has them).")(f)
    f = click.option("--data", "data", required=True, metavar="SPEC",
                     help="imagefolder:DIR, csv:FILE, fashion-mnist, digits, cifar10, or a plugin's.")(f)
    return f


def backbone_options(f):
    f = click.option("--weights", type=str, default=None, metavar="PATH",
                     help="Local state-dict file instead of the backbone's default pretrained weights.")(f)
    f = click.option("--image-size", type=IMAGE_SIZE, default=None, metavar="PX",
                     help="Input size in pixels, 16 to 2048 (default: the weights' own crop size).")(f)
    f = click.option("--pooling", type=click.Choice(POOLINGS), default="avg", show_default=True,
                     help="Global pooling of each chosen layer.")(f)
    f = click.option("--layers", default="penultimate", show_default=True,
                     help="penultimate, multi (pooled last stages + penultimate), or comma-separated module names.")(f)
    f = click.option("--backbone", default="efficientnet_lite0", show_default=True,
                     help="A registered backbone (tlfx backbones), or timm:<name>.")(f)
    return f


def runtime_options(f, int8: bool = False):
    f = click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda or cuda:N.")(f)
    f = click.option("--precision", type=click.Choice(PRECISIONS + (("int8",) if int8 else ())), default="auto",
                     show_default=True,
                     help="auto: bf16 on CPUs with AMX/AVX512-BF16, fp16/bf16 on CUDA, else fp32"
                          + ("; int8: NNCF-quantized (OpenVINO runtime)." if int8 else "."))(f)
    return f


def runtime_option(help_prefix: str = ""):
    """The extraction runtime, default auto (also TLFX_RUNTIME): ``tlfx extract`` and ``tlfx compare``'s sweep mode."""
    return click.option("--runtime", type=click.Choice(RUNTIMES), default="auto", show_default=True, envvar="TLFX_RUNTIME",
                        help=help_prefix + "auto: OpenVINO on a CPU when installed (pip install 'tlfx[openvino]'), "
                                           "torch on CUDA or without it. Also TLFX_RUNTIME.")


def extraction_runtime_option(f):
    """--runtime and an --precision that offers int8 (extraction only; fine-tuning stays torch)."""
    return runtime_option()(runtime_options(f, int8=True))


NORMALIZE_HELP = ("Feature normalisation fitted on the training rows in front of the head and saved with it: none, l2, "
                  "power (signed square root + L2), pca-whiten (PCA whitening + L2; pca-whiten:N keeps N components). "
                  "With --search, a comma list (none,l2,power) is cross-validated too.")


def normalize_option(f):
    """--normalize for commands that fit heads (fit, compare)."""
    return click.option("--normalize", default="none", show_default=True, metavar="METHOD[,METHOD...]",
                        help=NORMALIZE_HELP)(f)
