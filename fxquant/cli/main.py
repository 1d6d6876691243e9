"""``fxquant`` command line: one group, one error style.

Every :class:`~fxquant.errors.FxquantError` is printed as ``error: <message>`` (plus ``hint:``)
without a traceback, exit status 2 (130 for an interrupted run); ``--debug`` re-raises so the
traceback shows. Heavy modules are imported inside the commands, so ``fxquant --help`` is fast.
"""

from __future__ import annotations

import sys

import click

from fxquant import __version__
from fxquant.cli.bench import bench
from fxquant.cli.export import export, fpga_sim
from fxquant.cli.prt import prt
from fxquant.cli.show import show
from fxquant.cli.train import train
from fxquant.errors import FxquantError


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="fxquant")
@click.option("--debug", is_flag=True, help="Show Python tracebacks for errors.")
@click.pass_context
def cli(ctx: click.Context, debug: bool) -> None:
    """Schedule-aware fixed-point quantization: train, export, lower, bench."""
    ctx.obj = {"debug": debug}


for command in (train, export, bench, fpga_sim, prt, show):
    cli.add_command(command)


def main(argv: list[str] | None = None) -> None:
    debug = "--debug" in (argv if argv is not None else sys.argv[1:])
    try:
        cli.main(args=argv, prog_name="fxquant", standalone_mode=False)
    except click.exceptions.Abort:
        click.echo("error: aborted", err=True)
        sys.exit(130)
    except click.ClickException as exc:
        exc.show()
        sys.exit(2)
    except FxquantError as exc:
        if debug:
            raise
        click.echo(f"error: {exc.message}", err=True)
        if exc.hint:
            click.echo(f"hint: {exc.hint}", err=True)
        sys.exit(exc.exit_code)


if __name__ == "__main__":
    main()
