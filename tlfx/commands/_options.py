"""Options shared by several commands."""

import click

from ..config import IMAGE_SIZES, POOLINGS

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


def runtime_options(f):
    f = click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda or cuda:N.")(f)
    f = click.option("--precision", type=click.Choice(PRECISIONS), default="auto", show_default=True,
                     help="auto: bf16 on CPUs with AMX/AVX512-BF16, fp16/bf16 on CUDA, else fp32.")(f)
    return f
