"""``qis-fhir node``, ``qis-fhir publish`` and ``qis-fhir query``."""

from __future__ import annotations

import asyncio
import logging
import sys
from pathlib import Path

import click

from qis_fhir.errors import InputNotFoundError

_node_options = [
    click.option("--ksize", type=click.IntRange(2, 64), default=20, show_default=True, help="Replicas per key (Kademlia k)."),
    click.option("--alpha", type=click.IntRange(1, 16), default=3, show_default=True, help="Parallel RPCs per lookup round."),
]


bind_option = click.option(  # every command that runs a client (publish, query, run)
    "--bind", default=None, metavar="HOST[:PORT]",
    help="Local address for this client's UDP socket ([IPV6][:PORT] for IPv6); replies come back to it. "
         "Default: every local address (0.0.0.0, or :: when all --bootstrap peers are IPv6), a free port.",
)


def _with(options: list):
    def deco(f):
        for opt in reversed(options):
            f = opt(f)
        return f

    return deco


def _stdout_logging(level: int) -> None:
    """Node logs, ours and the libraries', go to stdout only, rate-limited per reason
    (``qis_fhir.dht.logs``; the package's chatty INFO lines are held back to warnings)."""
    from qis_fhir.dht.logs import route_to

    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    route_to(handler, level)


@click.command()
@click.option("--listen", "listen", required=True, help="The one HOST:PORT to bind ([IPV6]:PORT for IPv6), e.g. 10.1.2.3:8468 or 127.0.0.1:0 (port 0: any free port, written to DATA_DIR/node.json). 0.0.0.0 binds every IPv4 address.")
@click.option("--bootstrap", default="", help="Known nodes, HOST:PORT[,HOST:PORT...] (omit for the first node).")
@click.option("--data-dir", required=True, type=click.Path(file_okay=False, path_type=Path), help="Where the node keeps packets.sqlite3 and node.json.")
@click.option("--network", "network", required=True, type=click.Path(path_type=Path), help="Network manifest (manifest.json or its directory); re-read when it changes.")
@_with(_node_options)
@click.option("--ttl-days", type=click.FloatRange(min=0, min_open=True), default=30.0, show_default=True, help="Packets expire this long after their origin last published them.")
@click.option("--republish-interval", type=click.FloatRange(min=0.1), default=3600.0, show_default=True, help="Seconds before a holder republishes a key nobody re-stored.")
@click.option("--refresh-interval", type=click.FloatRange(min=0.1), default=3600.0, show_default=True, help="Seconds between routing-table refreshes.")
@click.option("--maintenance-interval", type=click.FloatRange(min=0.05), default=60.0, show_default=True, help="Seconds between upkeep passes (expiry, republish, refresh).")
@click.option("--rpc-timeout", type=click.FloatRange(min=0.1), default=3.0, show_default=True, help="Seconds to wait for a reply (one retry follows).")
@click.option("--log-level", type=click.Choice(["debug", "info", "warning"]), default="info", show_default=True)
@click.option("--operator", "operators", multiple=True, metavar="HOST",
              help="Address whose `stats` requests are answered (repeat for several). Default: 127.0.0.1 and ::1.")
def node(listen: str, bootstrap: str, data_dir: Path, network: Path, ksize: int, alpha: int, ttl_days: float,
         republish_interval: float, refresh_interval: float, maintenance_interval: float, rpc_timeout: float, log_level: str,
         operators: tuple[str, ...]) -> None:
    """Run a DHT node until SIGTERM or SIGINT: verifies every packet stored on it, keeps them in SQLite, republishes.

    DATA_DIR must hold the node's certificate (`qis-fhir node-cert`); exits 18 when it is missing or
    the network refuses it (expired, revoked, beyond its site's bound)."""
    from qis_fhir.dht.address import parse_address, parse_addresses
    from qis_fhir.dht.node import NodeConfig
    from qis_fhir.dht.service import serve
    from qis_fhir.packets.manifest import load_manifest

    _stdout_logging(getattr(logging, log_level.upper()))
    host, port = parse_address(listen, allow_port_zero=True)
    load_manifest(network)  # fail now, with the manifest's own error, before binding anything
    config = NodeConfig(
        host=host,
        port=port,
        bootstrap=tuple(parse_addresses(bootstrap)),
        ksize=ksize,
        alpha=alpha,
        ttl=ttl_days * 86400.0,
        republish_interval=republish_interval,
        refresh_interval=refresh_interval,
        maintenance_interval=maintenance_interval,
        rpc_timeout=rpc_timeout,
        **({"operators": tuple(operators)} if operators else {}),
    )
    asyncio.run(serve(config, data_dir, network))


@click.command("node-cert")
@click.option("--site", "site_dir", required=True, type=click.Path(file_okay=False, path_type=Path), help="The member site's directory (its site_key.pem signs the certificate).")
@click.option("--network", "network", required=True, type=click.Path(path_type=Path), help="Network manifest (format v2): its max_nodes_per_site bounds --index.")
@click.option("--index", type=click.IntRange(min=0), required=True, help="Which of the site's node certificates (0 .. max_nodes_per_site - 1); it fixes the node id.")
@click.option("--node-dir", required=True, type=click.Path(file_okay=False, path_type=Path), help="The node's --data-dir: node_key.pem is made there if missing, node_cert.json written.")
@click.option("--days", type=click.FloatRange(min=0, min_open=True), default=365.0, show_default=True, help="Validity.")
def node_cert(site_dir: Path, network: Path, index: int, node_dir: Path, days: float) -> None:
    """Certify a DHT node's key as node INDEX of a member site; the node loads it from its data dir."""
    from qis_fhir.dht.certs import write_node_cert
    from qis_fhir.packets.keys import load_site
    from qis_fhir.packets.manifest import load_manifest

    cert = write_node_cert(node_dir, load_site(site_dir), load_manifest(network), index, days=days)
    click.echo(f"node {cert.node_id.hex()} (site key {cert.site_key_id}, index {cert.index}, node key {cert.node_key_id}) certified in {node_dir}")


def _read_wires(path: Path) -> list[bytes]:
    from qis_fhir.packets.build import read_packets

    wires = read_packets(path)
    if not wires:
        raise InputNotFoundError(f"packet file {path} holds no packets")
    return wires


@click.command()
@click.argument("packets", type=click.Path(path_type=Path))
@click.option("--bootstrap", required=True, help="Nodes to start from, HOST:PORT[,HOST:PORT...].")
@click.option("--network", "network", required=True, type=click.Path(path_type=Path), help="Network manifest the packets are verified against first.")
@_with(_node_options)
@bind_option
@click.option("--ttl-days", type=click.FloatRange(min=0, min_open=True), default=30.0, show_default=True, help="Lifetime asked for (nodes cap it at theirs).")
@click.option("--json", "as_json", is_flag=True, help="Print the report as one JSON object.")
def publish(packets: Path, bootstrap: str, network: Path, ksize: int, alpha: int, bind: str | None, ttl_days: float, as_json: bool) -> None:
    """Publish PACKETS (a packets.ndjson file, or a run folder from `qis-fhir run`); reports how many
    replicas confirmed each packet. A run folder's publish stage is recorded in it, as `run --bootstrap`
    records it: publish_report.json, and stage `publish` in run.json once every packet was confirmed.

    Exits 13 when the run folder holding the packets did not complete, 11 when no peer answers, 12
    when some packet was confirmed by no replica, 10 when some packet failed verification here (those
    are never sent; a revoked or unknown site key fails them all). `qis-fhir run --bootstrap` exits the same way.
    """
    import json

    from qis_fhir.dht.client import publish as do_publish
    from qis_fhir.packets.build import PACKETS_FILE
    from qis_fhir.runfolder import PACKETS, require_run, run_file
    from qis_fhir.stages import PUBLISH_REPORT, publish_run

    options = {"ksize": ksize, "alpha": alpha, "ttl": ttl_days * 86400.0, "bind": bind}
    if packets.is_dir() and require_run(packets, PACKETS) is not None:  # a run folder: the run's publish stage
        _read_wires(packets / PACKETS_FILE)  # none to publish is an error here too, before the run is touched
        report = publish_run(packets, network, bootstrap, **options)  # raises, the report written, on a failure
        click.echo(f"report: {packets / PUBLISH_REPORT}", err=True)
    else:
        report = do_publish(_read_wires(run_file(packets, PACKETS_FILE, PACKETS)), bootstrap, network, **options)
    summary = report.to_dict()
    if as_json:
        click.echo(json.dumps(summary, sort_keys=True))
    else:
        click.echo(
            f"published {summary['confirmed']}/{summary['packets']} packets to {summary['nodes_contacted']} nodes; "
            f"replicas per packet: min {summary['min_replicas']}, histogram {summary['replicas_histogram']}"
        )
        if summary["refused_by_nodes"]:
            click.echo(f"refusals by nodes: {summary['refused_by_nodes']}")
        if summary["rejected_locally"]:
            click.echo(f"not sent (failed verification here): {summary['rejected_locally']}")
    report.raise_for_failure()


@click.command()
@click.argument("fingerprint")
@click.option("--bootstrap", required=True, help="Nodes to start from, HOST:PORT[,HOST:PORT...].")
@click.option("--network", "network", required=True, type=click.Path(path_type=Path), help="Network manifest every received packet is verified against.")
@_with(_node_options)
@bind_option
@click.option("--quorum", type=click.IntRange(1, 64), default=None, help="Stop once this many closest nodes agree on the key's content (faster; default: ask all k closest).")
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), default=None, help="Write the verified packets here as NDJSON (default: stdout).")
@click.option("--json", "as_json", is_flag=True, help="Print the summary as one JSON object on stdout (packets go to --out only).")
def query(fingerprint: str, bootstrap: str, network: Path, ksize: int, alpha: int, bind: str | None, quorum: int | None, out: Path | None, as_json: bool) -> None:
    """Fetch every site's packets for FINGERPRINT, verified here, one per (site, packet id) at its newest seq."""
    import json

    from qis_fhir.dht.client import query as do_query

    result = do_query(fingerprint.strip().lower(), bootstrap, network, ksize=ksize, alpha=alpha, quorum=quorum, bind=bind)
    summary = result.to_dict()
    ndjson = b"".join(w + b"\n" for w in result.wires)
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_bytes(ndjson)
    if as_json:
        click.echo(json.dumps(summary, sort_keys=True))
    else:
        if out is None:
            sys.stdout.buffer.write(ndjson)
            sys.stdout.flush()
        click.echo(
            f"{summary['packets']} packets from {len(summary['sites'])} sites; {summary['hops']} hops, "
            f"{summary['nodes_asked']} nodes asked, {summary['holders']} held it; rejected here: {summary['rejected'] or 'none'}",
            err=True,
        )
