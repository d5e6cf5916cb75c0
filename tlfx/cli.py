"""The ``tlfx`` command line. Core commands live in :mod:`tlfx.commands`; plugins add theirs via ``register_commands``."""

from __future__ import annotations

import os
import sys

import click

from . import __version__
from .errors import TlfxError
from .plugins import PLUGINS_DIR_ENV, get_plugin_manager
from .safetext import terminal


class PluginGroup(click.Group):
    """The ``tlfx`` group: plugin commands are added when click first resolves or lists a subcommand.

    By then click has parsed the group's own options, so ``--plugins-dir`` counts only where click says it is a
    group option (before the subcommand): a file name such as ``--plugins-dir=x`` among a command's arguments or
    after ``--`` is only ever an argument, and never loads code.
    """

    plugins_loaded = False

    def load_plugins(self, ctx: click.Context | None = None):
        """Load plugins once: entry points, the group's ``--plugins-dir`` folders, then ``TLFX_PLUGINS_DIR``."""
        if self.plugins_loaded:
            return
        self.plugins_loaded = True
        dirs = list(((ctx.params if ctx is not None else {}).get("plugins_dir")) or ())
        if dirs:  # through the environment, so that worker processes load the same plugins
            from . import plugins

            os.environ[PLUGINS_DIR_ENV] = os.pathsep.join(filter(None, [*dirs, os.environ.get(PLUGINS_DIR_ENV, "")]))
            if plugins._manager is not None:
                plugins.reset_plugin_manager()
        get_plugin_manager().add_commands(self)

    def get_command(self, ctx, cmd_name):
        self.load_plugins(ctx)
        return super().get_command(ctx, cmd_name)

    def list_commands(self, ctx):
        self.load_plugins(ctx)
        return super().list_commands(ctx)


@click.group(cls=PluginGroup, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
@click.version_option(__version__, prog_name="tlfx")
@click.option("--plugins-dir", multiple=True, metavar="DIR", is_eager=True,  # eager: `tlfx --plugins-dir D --help`
              help=f"Also load every *.py in DIR as a plugin (development; before the command name). "
                   f"Same as {PLUGINS_DIR_ENV}.")
def cli(plugins_dir):
    """tlfx: frozen-backbone features cached in HDF5, heads trained in seconds, compared with a fine-tune.

    \b
    Examples:
      tlfx demo                                   # the whole default job, offline, on the CPU
      tlfx extract --backbone efficientnet_lite0 --data fashion-mnist --split test --limit 2000 --out t.h5
      tlfx info t.h5
      tlfx fit --features train.h5 --head svm --out svm.tlfx
      tlfx evaluate --model svm.tlfx --features t.h5
    """


def _register_core_commands():
    from .commands import ALL

    for cmd in ALL:
        cli.add_command(cmd)


def build_cli(argv=None, load_plugins: bool = True):
    """The click group with the core commands; with ``load_plugins``, plugin commands too (entry points and
    ``TLFX_PLUGINS_DIR``). ``argv`` is accepted for compatibility and not read: click alone parses arguments."""
    if not cli.commands:
        _register_core_commands()
    if load_plugins:
        cli.load_plugins()
    return cli


def main(argv=None):
    """Entry point: one clear line and exit code 2 for bad input; no traceback unless TLFX_DEBUG=1."""
    try:
        group = build_cli(load_plugins=False)  # plugins load once click has parsed --plugins-dir
        group.main(args=argv, prog_name="tlfx", standalone_mode=False)
    except click.exceptions.Abort:
        click.echo("interrupted; run the same command again to resume", err=True)
        sys.exit(130)
    except KeyboardInterrupt:
        click.echo("interrupted; run the same command again to resume", err=True)
        sys.exit(130)
    except click.ClickException as exc:
        line = f"error: {exc.format_message()}" if isinstance(exc, TlfxError) else _click_line(exc)
        click.echo(terminal(line), err=True)  # values from files and names may hold control characters
        sys.exit(exc.exit_code)
    except click.exceptions.Exit as exc:
        sys.exit(exc.exit_code)
    except Exception as exc:
        if os.environ.get("TLFX_DEBUG") == "1":
            raise
        click.echo(terminal(f"error: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''} "
                            f"(set TLFX_DEBUG=1 for the traceback)"), err=True)
        sys.exit(1)
    sys.exit(0)


def _click_line(exc: click.ClickException) -> str:
    ctx = getattr(exc, "ctx", None)
    usage = f" (see '{ctx.command_path} --help')" if ctx is not None else ""
    return f"error: {exc.format_message()}{usage}"


if __name__ == "__main__":
    main()
