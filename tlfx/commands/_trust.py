"""The trust options of the commands that open model files: two explicit levels, never one flag for both."""

from __future__ import annotations

import click

TRUST_HELP = ("--trust was removed because it let a .tlfx file load any type (and so run code); pass "
              "--trust-type MODULE.CLASS for each type a refusal names, or --trust-pickle for a .joblib export "
              "you made yourself")


def _refuse_plain_trust(ctx, param, value):
    if value:
        from ..errors import TlfxError

        raise TlfxError(TRUST_HELP)
    return value


def trust_options(f):
    """``--trust-type MODULE.CLASS`` (repeatable), ``--trust-pickle``, and a hidden ``--trust`` that refuses with
    one line pointing to them. The command receives ``trust_types`` (tuple) and ``trust_pickle`` (bool)."""
    f = click.option("--trust", "removed_trust", is_flag=True, hidden=True, expose_value=False,
                     callback=_refuse_plain_trust)(f)
    f = click.option("--trust-pickle", is_flag=True,
                     help="Unpickle a .joblib export (tlfx fit --export-joblib): runs any code the file holds, "
                          "so only for files you made yourself.")(f)
    f = click.option("--trust-type", "trust_types", multiple=True, metavar="MODULE.CLASS",
                     help="Also accept this type in a .tlfx head file (repeatable); a refusal names the types. "
                          "Loading a type can run its code: only for files you made yourself.")(f)
    return f
