import json
import os

import click


def _registry(kind):
    from ..plugins import registry

    return registry(kind)


@click.command()
@click.option("--json", "as_json", is_flag=True)
def plugins(as_json):
    """List plugins: where each comes from, its version, what it provides, and any that failed or clash.

    TLFX_LOAD_PLUGINS=a,b loads only those external plugins (tlfx's own always load); TLFX_TRACE_PLUGINS=1 logs
    every plugin load, hook call and registration to stderr.

    \b
    Examples:
      tlfx plugins
      tlfx --plugins-dir ./my_plugins plugins
      TLFX_LOAD_PLUGINS= tlfx plugins
    """
    from ..plugins import KINDS, get_plugin_manager
    from ..safetext import terminal

    pm = get_plugin_manager()
    for kind in KINDS:  # builds the registries, so hook failures and clashes are on the records
        _registry(kind)
    rows = [{"name": r.name, "source": r.source, "module": r.module, "version": r.version, "hooks": r.hooks,
             "provides": r.kinds, "error": r.error, "skipped": r.skipped} for r in pm.records]
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    for r in rows:
        if r["skipped"]:
            status = f"skipped: {r['skipped']}"
        elif r["error"]:
            status = f"FAILED: {r['error']}"
        else:
            status = ", ".join(r["provides"]) or "commands"
        click.echo(terminal(f"{r['name']:<20} {status:<34} {r['module']}  [{r['source']}]"))


def _clash_note(reg, name) -> str:
    owners = reg.clash(name)
    return f"CLASH: registered by {' and '.join(owners)}; using it fails until one is left out (tlfx plugins)" if owners else ""


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

    reg, rows = _registry("backbone"), []
    for e in reg.entries():
        try:
            st = _weights_row(e)
        except Exception as exc:  # a plugin's check must not hide the other backbones
            st = {"status": "missing", "size": None,
                  "where": f"weights check of plugin {e.plugin!r} failed: {type(exc).__name__}: {exc}"}
        rows.append({"name": e.name, "plugin": e.plugin, "description": e.description,
                     "offline": st["status"] in ("cached", "offline-only"), "status": st["status"],
                     "size": st["size"], "weights": st["where"], "clash": reg.clash(e.name)})
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    for r in rows:
        size = human_size(r["size"]) if r["size"] else ""
        about = _clash_note(reg, r["name"]) or r["description"]
        click.echo(f"{terminal(r['name']):<22} {r['status']:<13} {size:>9}  {terminal(about)}")
        if r["status"] == "missing":
            click.echo(f"{'':<47}weights: {terminal(str(r['weights']))}")


def _simple_list(kind):
    @click.command(name=f"{kind}s")
    @click.option("--json", "as_json", is_flag=True)
    def cmd(as_json):
        from ..safetext import terminal

        reg = _registry(kind)
        if as_json:
            click.echo(json.dumps([{"name": e.name, "plugin": e.plugin, "description": e.description,
                                    "clash": reg.clash(e.name)} for e in reg.entries()], indent=2))
            return
        for e in reg.entries():
            click.echo(terminal(f"{e.name:<16} {_clash_note(reg, e.name) or e.description}  [{e.plugin}]"))

    cmd.help = (f"List the registered {kind}s and the plugin each comes from.\n\n\b\nExamples:\n"
                f"  tlfx {kind}s\n  tlfx {kind}s --json")
    return cmd


COMMANDS = [plugins, backbones, _simple_list("dataset"), _simple_list("head")]
