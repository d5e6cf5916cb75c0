import json

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


@click.command()
@click.option("--json", "as_json", is_flag=True)
def backbones(as_json):
    """List backbones, and whether their pretrained weights are available offline.

    \b
    Examples:
      tlfx backbones
      tlfx backbones --json
    """
    rows = []
    for e in _registry("backbone").entries():
        check = e.meta.get("weights_available")
        ok, where = check() if check else (None, "see --weights")
        rows.append({"name": e.name, "plugin": e.plugin, "description": e.description, "offline": ok, "weights": where})
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    for r in rows:
        flag = {True: "offline", False: "missing", None: "-"}[r["offline"]]
        click.echo(f"{r['name']:<22} {flag:<8} {r['description']}")
        if r["offline"] is False:
            click.echo(f"{'':<31}weights: {r['weights']}")


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
