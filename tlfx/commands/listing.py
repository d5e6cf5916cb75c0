import json
import os

import click


def _registry(kind):
    from ..plugins import registry

    return registry(kind)


@click.command()
@click.option("--json", "as_json", is_flag=True)
def plugins(as_json):
    """List loaded plugins, where they come from, and any that failed to load.

    \b
    Examples:
      tlfx plugins
      tlfx --plugins-dir ./my_plugins plugins
    """
    from ..errors import TlfxError
    from ..plugins import DuplicateNameError, get_plugin_manager

    pm = get_plugin_manager()
    clashes = []
    for kind in ("backbone", "head", "dataset"):
        try:
            _registry(kind)
        except DuplicateNameError as exc:  # still list everything: this command is where users look for the culprit
            clashes.append(exc)

    def errors(r):
        found = ([r.error] if r.error else []) + [e.message for e in clashes if r.name in e.plugins]
        return "; ".join(found) or None

    rows = [{"name": r.name, "source": r.source, "module": r.module, "provides": r.kinds, "error": errors(r)}
            for r in pm.records]
    if as_json:
        click.echo(json.dumps(rows, indent=2))
    else:
        for r in rows:
            status = f"FAILED: {r['error']}" if r["error"] else ", ".join(r["provides"]) or "commands"
            click.echo(f"{r['name']:<20} {status:<34} {r['module']}  [{r['source']}]")
    if clashes:
        raise TlfxError(clashes[0].message)


def _weights_row(e) -> dict:
    """Status of a backbone's default weights: cached / downloadable / offline-only / missing, size when known."""
    status_fn, check = e.meta.get("weights_status"), e.meta.get("weights_available")
    if status_fn:
        st = status_fn()
    elif check:
        ok, where = check()
        # weights that tlfx cannot download (shipped in a package, placed by hand): there or not
        is_file = ok and isinstance(where, str) and os.path.isfile(where)
        st = {"status": ("offline-only" if is_file else "built-in") if ok else "missing",
              "size": os.path.getsize(where) if is_file else None, "where": where}
    elif e.meta.get("takes_argument"):
        st = {"status": "per-model", "size": None, "where": "downloaded on first use for the model named after ':'"}
    else:
        st = {"status": "-", "size": None, "where": "see --weights"}
    return st


@click.command()
@click.option("--json", "as_json", is_flag=True)
def backbones(as_json):
    """List backbones and their default weights: cached (ready offline), downloadable (fetched on first use),
    offline-only (shipped in a package), built-in (none needed) or missing; with the size when known.

    \b
    Examples:
      tlfx backbones
      tlfx backbones --json
      TLFX_OFFLINE=1 tlfx backbones        # what works on an air-gapped machine
    """
    from ..safetext import terminal
    from ..weights import human_size

    rows = []
    for e in _registry("backbone").entries():
        st = _weights_row(e)
        rows.append({"name": e.name, "plugin": e.plugin, "description": e.description,
                     "offline": st["status"] in ("cached", "offline-only"), "status": st["status"],
                     "size": st["size"], "weights": st["where"]})
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    for r in rows:
        size = human_size(r["size"]) if r["size"] else ""
        click.echo(f"{terminal(r['name']):<22} {r['status']:<13} {size:>9}  {terminal(r['description'])}")
        if r["status"] == "missing":
            click.echo(f"{'':<47}weights: {terminal(str(r['weights']))}")


def _simple_list(kind):
    @click.command(name=f"{kind}s")
    @click.option("--json", "as_json", is_flag=True)
    def cmd(as_json):
        entries = _registry(kind).entries()
        if as_json:
            click.echo(json.dumps([{"name": e.name, "plugin": e.plugin, "description": e.description}
                                   for e in entries], indent=2))
            return
        for e in entries:
            click.echo(f"{e.name:<16} {e.description}  [{e.plugin}]")

    cmd.help = (f"List the registered {kind}s and the plugin each comes from.\n\n\b\nExamples:\n"
                f"  tlfx {kind}s\n  tlfx {kind}s --json")
    return cmd


COMMANDS = [plugins, backbones, _simple_list("dataset"), _simple_list("head")]
