import json

import click


@click.command()
@click.argument("store", type=click.Path(dir_okay=False))
@click.option("--json", "as_json", is_flag=True, help="Print the attributes as JSON.")
def info(store, as_json):
    """Show what a feature store holds and how it was made.

    \b
    Examples:
      tlfx info t.h5
      tlfx info t.h5 --json
    """
    from ..store import FeatureStore

    st = FeatureStore(store)
    if as_json:
        click.echo(json.dumps({**st.attrs, "n": len(st), "skipped": len(st.skipped)}, indent=2, default=str))
    else:
        click.echo(st.describe())


COMMANDS = [info]
