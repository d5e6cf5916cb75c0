import json

import click


@click.command()
@click.argument("store", type=click.Path(dir_okay=False))
@click.option("--json", "as_json", is_flag=True, help="Print the attributes as JSON.")
@click.option("--verify", is_flag=True,
              help="Read every row, chunk by chunk, and check it against its checksum; name the damaged rows (exit 2).")
def info(store, as_json, verify):
    """Show what a feature store holds and how it was made.

    \b
    Examples:
      tlfx info t.h5
      tlfx info t.h5 --json
      tlfx info t.h5 --verify
    """
    from ..errors import TlfxError
    from ..safetext import terminal
    from ..store import FeatureStore

    st = FeatureStore(store)
    if verify:
        rows, checked, damaged = st.verify()
        if damaged:
            shown = ", ".join(f"{a}-{b - 1}" for a, b in damaged[:10]) + (" ..." if len(damaged) > 10 else "")
            raise TlfxError(f"feature store {store!r} has damaged rows {shown} ({sum(b - a for a, b in damaged)} of "
                            f"{rows} rows fail their checksum); extract it again")
        if not checked:
            click.echo(f"cannot verify {terminal(store)}: it was written without checksums (before tlfx added them); "
                       f"{rows} rows read without error; extract it again to add checksums")
        else:
            click.echo(f"verified: {rows} rows OK")
        return
    if as_json:  # json.dumps escapes control characters itself
        click.echo(json.dumps({**st.attrs, "n": len(st), "skipped": len(st.skipped)}, indent=2, default=str))
    else:
        click.echo(st.describe())


COMMANDS = [info]
