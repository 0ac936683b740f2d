"""``qis-fhir network``, ``qis-fhir keys`` and ``qis-fhir verify``."""

from __future__ import annotations

import json
import sys
from collections import Counter
from pathlib import Path

import click

from qis_fhir.errors import PacketsRejectedError


def _pin_option(f):
    return click.option(
        "--pins",
        "pins",
        type=click.Path(dir_okay=False, path_type=Path),
        default=None,
        help="Pin file recording each network's governance key and highest manifest version seen "
        "(default: $QIS_FHIR_HOME/trust/manifest_pins.json). Older manifests are refused.",
    )(f)


@click.group()
def network() -> None:
    """Create and govern a network: its governance key, fingerprint secret and signed manifest."""


def _policy_options(f):
    """The manifest policy a new or migrated network is signed with (``docs/packets.md``)."""
    f = click.option("--max-nodes-per-site", type=click.IntRange(1, 64), default=4, show_default=True,
                     help="DHT node certificates each member site may issue.")(f)
    return click.option("--min-sites", type=click.IntRange(3, 10**4), default=3, show_default=True,
                        help="Secure aggregation sums a cell only over at least this many sites with patients in "
                             "it (c colluding members need c + 2).")(f)


@network.command("new")
@click.option("--out", "out", required=True, type=click.Path(file_okay=False, path_type=Path), help="Network directory to create.")
@click.option("--min-cell-size", type=click.IntRange(1, 10**6), default=11, show_default=True, help="Cells with fewer patients are never published.")
@click.option("--network-id", default=None, help="Network name (lower-case letters, digits, . _ -); default: random.")
@click.option("--mapping-version", "mapping_versions", multiple=True,
              help="Accepted mapping version (repeatable); default: every version this release ships (v1 and v2).")
@_policy_options
def network_new(out: Path, min_cell_size: int, network_id: str | None, mapping_versions: tuple[str, ...], min_sites: int, max_nodes_per_site: int) -> None:
    """Create NET_DIR with governance_key.pem (0600, keep it with governance), network.secret (0600,
    give it to member sites only) and manifest.json (public, signed, version 1)."""
    from qis_fhir.packets.manifest import (
        DEFAULT_MAPPING_VERSIONS,
        GOVERNANCE_KEY,
        MANIFEST,
        NETWORK_SECRET,
        create_network,
    )

    m = create_network(
        out,
        network_id=network_id,
        min_cell_size=min_cell_size,
        mapping_versions=mapping_versions or DEFAULT_MAPPING_VERSIONS,
        min_sites=min_sites,
        max_nodes_per_site=max_nodes_per_site,
    )
    click.echo(f"network {m.network_id}: manifest version {m.version}, governance key {m.governance_key_id}, min cell size {m.min_cell_size}")
    click.echo(f"give members {out / MANIFEST} and {out / NETWORK_SECRET}; keep {out / GOVERNANCE_KEY} with governance")


@network.command("add-site")
@click.argument("net_dir", type=click.Path(file_okay=False, exists=True, path_type=Path))
@click.argument("site_dir", type=click.Path(file_okay=False, exists=True, path_type=Path))
def network_add_site(net_dir: Path, site_dir: Path) -> None:
    """Add the site in SITE_DIR (its site.json) to the manifest and re-sign it (version + 1)."""
    from qis_fhir.packets.keys import read_site_info
    from qis_fhir.packets.manifest import add_site

    info = read_site_info(site_dir)
    m = add_site(net_dir, site_dir)
    click.echo(f"added site {info['site_id']} key {info['key_id']}: manifest version {m.version}")


@network.command("revoke")
@click.argument("net_dir", type=click.Path(file_okay=False, exists=True, path_type=Path))
@click.argument("site_id")
@click.option("--key-id", default=None, help="Revoke only this key of the site (default: all its keys).")
def network_revoke(net_dir: Path, site_id: str, key_id: str | None) -> None:
    """Revoke SITE_ID's keys in the manifest and re-sign it (version + 1). Its packets are then refused."""
    from qis_fhir.packets.manifest import revoke

    m = revoke(net_dir, site_id, key_id=key_id)
    click.echo(f"revoked site {site_id}: manifest version {m.version}, {len(m.revoked_key_ids)} revoked key(s)")


@network.command("accept-mapping")
@click.argument("net_dir", type=click.Path(file_okay=False, exists=True, path_type=Path))
@click.argument("version")
def network_accept_mapping(net_dir: Path, version: str) -> None:
    """Accept packets built with mapping VERSION; re-sign the manifest (version + 1)."""
    from qis_fhir.packets.manifest import accept_mapping_version

    m = accept_mapping_version(net_dir, version)
    click.echo(f"accepted mapping versions {', '.join(m.accepted_mapping_versions)}: manifest version {m.version}")


@network.command("migrate")
@click.argument("net_dir", type=click.Path(file_okay=False, exists=True, path_type=Path))
@_policy_options
def network_migrate(net_dir: Path, min_sites: int, max_nodes_per_site: int) -> None:
    """Re-sign a format-v1 manifest in the current format (version + 1), adding its policy. Upgrade every
    member and node to this release first: older releases cannot read the new format."""
    from qis_fhir.packets.manifest import migrate

    m = migrate(net_dir, min_sites=min_sites, max_nodes_per_site=max_nodes_per_site)
    click.echo(f"network {m.network_id}: manifest version {m.version} in format v{m.format_version} (min sites {m.min_sites}, {m.max_nodes_per_site} node certificates per site)")


@network.command("revoke-node")
@click.argument("net_dir", type=click.Path(file_okay=False, exists=True, path_type=Path))
@click.argument("node_key_id")
def network_revoke_node(net_dir: Path, node_key_id: str) -> None:
    """Revoke one DHT node's certificate key (NODE_KEY_ID) without revoking its site; re-sign (version + 1)."""
    from qis_fhir.packets.manifest import revoke_node

    m = revoke_node(net_dir, node_key_id)
    click.echo(f"revoked node key {node_key_id}: manifest version {m.version}")


@network.command("show")
@click.argument("manifest", type=click.Path(exists=True, path_type=Path))
@_pin_option
def network_show(manifest: Path, pins: Path | None) -> None:
    """Verify MANIFEST (file or NET_DIR) and print what it says, as JSON."""
    from qis_fhir.packets.manifest import default_pin_path, load_manifest

    m = load_manifest(manifest, pinned_state=pins or default_pin_path())
    body = m.body()
    body["revoked_sites"] = sorted({s.site_id for s in m.sites if s.key_id in m.revoked_key_ids})
    click.echo(json.dumps(body, indent=2, sort_keys=True))


@click.group()
def keys() -> None:
    """Create a site's signing key pair and patient-key secret."""


@keys.command("new")
@click.option("--site-id", required=True, help="This site's id in the network (lower-case letters, digits, . _ -).")
@click.option("--out", "out", required=True, type=click.Path(file_okay=False, path_type=Path), help="Site directory to create.")
def keys_new(site_id: str, out: Path) -> None:
    """Create SITE_DIR: site_key.pem (0600), site_key.pub, site.secret (0600) and site.json.
    Refuses to overwrite an existing site. Send site.json to the network governance."""
    from qis_fhir.packets.keys import SITE_JSON, create_site, validate_site_id

    try:
        validate_site_id(site_id)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--site-id") from None
    site = create_site(site_id, out)
    click.echo(f"site {site.site_id}: key id {site.key_id}; send {out / SITE_JSON} to the network governance")


@click.command()
@click.argument("packets", type=click.Path(path_type=Path))
@click.option("--network", "manifest", required=True, type=click.Path(exists=True, path_type=Path), help="Network manifest (file or NET_DIR).")
@_pin_option
@click.option(
    "--state",
    "state",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="Replay state file (JSON) read before and written after: packets older than ones accepted in earlier "
    "runs are then refused as replays. Default: replay state lives for this file only.",
)
@click.option("--json", "as_json", is_flag=True, help="Print the counts as one JSON object.")
def verify(packets: Path, manifest: Path, pins: Path | None, state: Path | None, as_json: bool) -> None:
    """Verify every packet in PACKETS (NDJSON, or a run folder's packets.ndjson) against the network
    manifest; print counts by reason.

    Exits with PACKETS_REJECTED (10) if any packet was rejected, RUN_INCOMPLETE (13) if the run folder
    holding them did not complete."""
    from qis_fhir.packets.build import PACKETS_FILE, read_packets
    from qis_fhir.packets.manifest import default_pin_path, load_manifest
    from qis_fhir.packets.replay import MemoryReplayState
    from qis_fhir.packets.verifier import ACCEPTED, Verifier
    from qis_fhir.runfolder import PACKETS, run_file

    m = load_manifest(manifest, pinned_state=pins or default_pin_path())
    lines = read_packets(run_file(packets, PACKETS_FILE, PACKETS))
    replay = MemoryReplayState.load(state) if state is not None else MemoryReplayState()
    verifier = Verifier(m, replay)
    reasons = Counter(verifier.verify(line).reason for line in lines)
    if state is not None:
        replay.save(state)
    accepted = sum(reasons[r] for r in ACCEPTED)
    rejected = len(lines) - accepted
    result = {
        "network_id": m.network_id,
        "manifest_version": m.version,
        "packets": len(lines),
        "accepted": accepted,
        "rejected": rejected,
        "by_reason": dict(sorted(reasons.items())),
    }
    if as_json:
        click.echo(json.dumps(result, sort_keys=True))
    else:
        click.echo(f"{len(lines)} packets: {accepted} accepted, {rejected} rejected (network {m.network_id}, manifest v{m.version})")
        for reason, n in sorted(reasons.items()):
            click.echo(f"  {reason:16} {n}")
    sys.stdout.flush()
    if rejected:
        raise PacketsRejectedError(f"{rejected} of {len(lines)} packets rejected")
