"""``qis-fhir secagg run|contribute|reveal|unmask``: a site's steps of one secure-aggregation round."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import click

from qis_fhir.dht.commands import bind_option


def _round_options(f):
    for opt in reversed([
        click.option("--round", "round_file", required=True, type=click.Path(dir_okay=False, path_type=Path), help="The round reference (JSON: network_id, mapping_version, measure, period, stage, opens)."),
        click.option("--network", "network", required=True, type=click.Path(path_type=Path), help="Network directory (manifest.json and network.secret)."),
        click.option("--state-dir", required=True, type=click.Path(file_okay=False, path_type=Path), help="Where the site keeps its rounds between steps (a folder per round; secrets 0600)."),
        click.option("--bootstrap", required=True, help="DHT nodes to start from, HOST:PORT[,HOST:PORT...]."),
        click.option("--ksize", type=click.IntRange(2, 64), default=20, show_default=True, help="Replicas per key (Kademlia k)."),
        bind_option,
        click.option("--json", "as_json", is_flag=True, help="Print the step's status as one JSON object."),
    ]):
        f = opt(f)
    return f


def _setup(round_file: Path, network: Path, state_dir: Path, bootstrap: str, ksize: int, bind: str | None,
           site: Path | None, after: Path | None = None) -> Any:
    from qis_fhir.dht.address import parse_addresses
    from qis_fhir.secagg.steps import open_round

    return open_round(round_file, network_dir=network, state_dir=state_dir, bootstrap=tuple(parse_addresses(bootstrap)),
                      site_dir=site, bind=bind, after=after, ksize=ksize)


def _vector(path: Path | None) -> Any:
    from qis_fhir.secagg.steps import read_vector

    return None if path is None else read_vector(path)


def _echo(status: dict, as_json: bool) -> None:
    if as_json:
        click.echo(json.dumps(status, sort_keys=True))
    elif status.get("posted"):
        click.echo(f"posted this site's {status['posted']} message; its window closes {status['next_window_closes']}")
    elif status.get("step") == "unmask":
        click.echo(f"unmasked: {status['cells']} cells summed over {status['contributors']} contributors ({status['dropped']} dropped)")
    else:
        click.echo("nothing due now" + (f": the round opens {status['opens']}" if status.get("opens") else " (already unmasked)"))


_site = click.option("--site", "site", required=True, type=click.Path(file_okay=False, path_type=Path), help="The site directory (qis-fhir keys new).")
_vector_opt = click.option("--vector", type=click.Path(dir_okay=False, path_type=Path), default=None, help="The site's input: a 1-D uint64 .npy file, read when the round starts and kept.")
_after = click.option("--after", type=click.Path(dir_okay=False, path_type=Path), default=None, help="Value round: the round file of its presence round; only that round's contributors are revealed for.")
_cells = click.option("--cells", type=click.IntRange(min=1), default=None, help="Unmask a round this site did not take part in: its number of cells.")


@click.group()
def secagg() -> None:
    """A site's steps of a secure-aggregation round over the DHT (docs/secagg.md).

    A round runs in windows of days from its opening date; each step does what is due now and exits
    17 when called outside its window, 16 when it would change what this site already sent."""


@secagg.command()
@_round_options
@_site
@_vector_opt
@_after
@_cells
def run(round_file: Path, network: Path, state_dir: Path, bootstrap: str, ksize: int, bind: str | None, as_json: bool,
        site: Path, vector: Path | None, after: Path | None, cells: int | None) -> None:
    """Do the one step due now (what a nightly run calls): post the open phase's message, or unmask."""
    from qis_fhir.secagg.steps import advance_step

    _echo(advance_step(_setup(round_file, network, state_dir, bootstrap, ksize, bind, site, after), _vector(vector), cells=cells), as_json)


@secagg.command()
@_round_options
@_site
@_vector_opt
@_after
def contribute(round_file: Path, network: Path, state_dir: Path, bootstrap: str, ksize: int, bind: str | None, as_json: bool,
               site: Path, vector: Path | None, after: Path | None) -> None:
    """Post the due contribution message (advertise, shares, masked or consistency)."""
    from qis_fhir.secagg.steps import contribute_step

    _echo(contribute_step(_setup(round_file, network, state_dir, bootstrap, ksize, bind, site, after), _vector(vector)), as_json)


@secagg.command()
@_round_options
@_site
@_after
def reveal(round_file: Path, network: Path, state_dir: Path, bootstrap: str, ksize: int, bind: str | None, as_json: bool,
           site: Path, after: Path | None) -> None:
    """Reveal this site's shares, once the masked and consistency windows closed."""
    from qis_fhir.secagg.steps import reveal_step

    _echo(reveal_step(_setup(round_file, network, state_dir, bootstrap, ksize, bind, site, after)), as_json)


@secagg.command()
@_round_options
@click.option("--site", "site", type=click.Path(file_okay=False, path_type=Path), default=None, help="The site directory (omit to unmask as a member that only reads).")
@_cells
def unmask(round_file: Path, network: Path, state_dir: Path, bootstrap: str, ksize: int, bind: str | None, as_json: bool,
           site: Path | None, cells: int | None) -> None:
    """Sum the round once its last window closed; writes result.json (0600) in the round's state folder."""
    from qis_fhir.secagg.steps import unmask_step

    _echo(unmask_step(_setup(round_file, network, state_dir, bootstrap, ksize, bind, site), cells), as_json)


@secagg.command()
@click.option("--run", "run_dir", required=True, type=click.Path(file_okay=False, path_type=Path), help="The site's run folder (`qis-fhir run --out DIR`, past its packets): its outcome tables are the input.")
@click.option("--measure", default=None, help="Only the rounds of this measure and --period (default: every pair of the run whose rounds are under way).")
@click.option("--period", default=None, help="The period of --measure, e.g. 2024.")
@click.option("--mapping", "mapping_dir", type=click.Path(file_okay=False, path_type=Path), default=None, help="The mapping directory the run used (default: the packaged one).")
@_site
@click.option("--network", "network", required=True, type=click.Path(path_type=Path), help="Network directory (manifest.json and network.secret).")
@click.option("--state-dir", type=click.Path(file_okay=False, path_type=Path), default=None, help="Where the site keeps its rounds between nights (default: SITE/secagg_state, as the nightly Dagster job).")
@click.option("--bootstrap", required=True, help="DHT nodes to start from, HOST:PORT[,HOST:PORT...].")
@click.option("--ksize", type=click.IntRange(2, 64), default=20, show_default=True, help="Replicas per key (Kademlia k).")
@bind_option
def rounds(run_dir: Path, measure: str | None, period: str | None, mapping_dir: Path | None, site: Path, network: Path, state_dir: Path | None,
           bootstrap: str, ksize: int, bind: str | None) -> None:
    """Tonight's steps of the secure-aggregation rounds under way, from a run folder (what the nightly
    Dagster asset ``secure_rounds`` does): per (measure, period) the presence round, the value round once
    the presence round is unmasked, and the release into the site's ledger (which the evidence stage
    reads). Prints the counts and each pair's statuses as JSON."""
    from qis_fhir.dht.address import parse_addresses
    from qis_fhir.errors import UsageError
    from qis_fhir.stages import open_site, secagg_step

    if (measure is None) != (period is None):
        raise UsageError("give --measure and --period together, or neither (every pair under way)")
    setup = open_site(mapping_dir=mapping_dir, site_dir=site, network_dir=network)
    done = secagg_step(run_dir, setup, tuple(parse_addresses(bootstrap)), bind, state_dir=state_dir, ksize=ksize,
                       pairs=None if measure is None else [(measure, period)])
    click.echo(json.dumps({"counts": done.counts, "rounds": done.statuses}, sort_keys=True))
