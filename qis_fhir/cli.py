"""The ``qis-fhir`` command.

Only argument parsing and error-to-exit-code mapping live here. Each subcommand is defined next to
the stage it drives (``qis_fhir/<stage>/commands.py``) and loaded lazily, so ``qis-fhir node`` does
not pay for importing pandas, and ``--help`` is instant.
"""

from __future__ import annotations

import importlib
import logging
import sys

import click

from qis_fhir.errors import ExitCode, QisError

# name -> "module:attribute" of a click command or group
COMMANDS: dict[str, str] = {
    "extract": "qis_fhir.fhir.commands:extract",
    "run": "qis_fhir.pipeline_commands:run",
    "synth": "qis_fhir.synth.commands:synth",
    "bench": "qis_fhir.bench.commands:bench",
    "demo": "pipelines.demo:demo",  # the demo runs the Dagster job: it lives beside it
    "mapping": "qis_fhir.mapping.commands:mapping",
    "network": "qis_fhir.packets.commands:network",
    "keys": "qis_fhir.packets.commands:keys",
    "verify": "qis_fhir.packets.commands:verify",
    "node": "qis_fhir.dht.commands:node",
    "node-cert": "qis_fhir.dht.commands:node_cert",
    "publish": "qis_fhir.dht.commands:publish",
    "query": "qis_fhir.dht.commands:query",
    "evidence": "qis_fhir.evidence.commands:evidence",
    "report": "qis_fhir.evidence.commands:report",
    "secagg": "qis_fhir.secagg.commands:secagg",
}


class LazyGroup(click.Group):
    """A click group whose subcommands are imported only when used (click's documented pattern)."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(COMMANDS)

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        target = COMMANDS.get(cmd_name)
        if target is None:
            return None
        module_name, attr = target.split(":")
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:  # a stage not built yet
            if exc.name and module_name.startswith(exc.name):
                return None
            raise
        return getattr(module, attr, None)


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("-v", "--verbose", count=True, help="More log output (-v info, -vv debug).")
def cli(verbose: int) -> None:
    """qis-fhir: FHIR bulk export -> treatment-outcome events -> signed packets over a DHT."""
    level = logging.WARNING - 10 * min(verbose, 2)
    root = logging.getLogger()
    before = list(root.handlers)
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from qis_fhir.dht.logs import limit_root

    # a client's stderr gets at most one line per reason per second, the DHT libraries' included; only the
    # handler made here: a host that already logs (Dagster, a test runner) keeps its own handlers as they are
    limit_root([h for h in root.handlers if h not in before])


def main(argv: list[str] | None = None) -> None:
    """Console entry point: runs the click group and maps ``QisError`` to its exit code."""
    try:
        rv = cli.main(args=argv, prog_name="qis-fhir", standalone_mode=False)
    except QisError as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(int(exc.exit_code))
    except click.exceptions.Abort:
        click.echo("aborted", err=True)
        sys.exit(130)
    except click.ClickException as exc:
        exc.show()
        sys.exit(ExitCode.USAGE if exc.exit_code == 2 else exc.exit_code)
    # with standalone_mode=False click returns ctx.exit(code)'s code instead of raising
    sys.exit(rv if isinstance(rv, int) else 0)
