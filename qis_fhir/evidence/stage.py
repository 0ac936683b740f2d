"""The evidence stage's one entry: collect the network's packets, pool them, write tables and report.

``qis-fhir evidence``, ``qis-fhir run --bootstrap`` (as its last stage) and the demo call
``run_evidence``; the stage's pieces are ``collect`` (query and verify), ``tables`` (pool and write,
with the secure totals the site released, ``SITE_DIR/secagg_released/``) and ``report`` (the HTML a clinician reads, rebuilt from the tables alone by ``qis-fhir report``).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from qis_fhir.errors import InputNotFoundError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class EvidenceConfig:
    site_dir: Path  # the site's keys directory: its id (to label its own figures) and manifest pins
    network_dir: Path  # manifest.json and network.secret (the secret computes the cohort grid)
    bootstrap: tuple[tuple[str, int], ...]
    out_dir: Path  # tables and report go to OUT_DIR/evidence/
    run_dir: Path | None = None  # a pipeline run folder: its outcome events (and control units) give the site's own figures
    mapping_dir: Path | None = None
    run_date: str | None = None  # YYYY-MM-DD recorded in provenance.json (default: today, UTC)
    bind: Any = None  # the DHT client's local address ("HOST[:PORT]"); None: the client's default
    report: bool = True


@dataclass
class EvidenceResult:
    evidence_dir: Path
    paths: dict[str, Path]
    provenance: dict


def evidence_dir_of(path: Path | str) -> Path:
    """The folder holding the tables: ``DIR/evidence`` (an ``--out`` folder) or ``DIR`` itself."""
    from qis_fhir.evidence.report import PROVENANCE_NAME
    from qis_fhir.evidence.tables import EVIDENCE_DIR

    path = Path(path)
    for candidate in (path / EVIDENCE_DIR, path):
        if (candidate / PROVENANCE_NAME).exists():
            return candidate
    raise InputNotFoundError(f"no {PROVENANCE_NAME} in {path} or {path / EVIDENCE_DIR}: run `qis-fhir evidence` first")


def run_evidence(config: EvidenceConfig) -> EvidenceResult:
    """Collect -> pool -> write tables -> report. Raises NoPeersError when no DHT peer answers."""
    from qis_fhir.evidence.collect import collect
    from qis_fhir.evidence.report import write_report
    from qis_fhir.evidence.tables import EVIDENCE_DIR, build_tables, write_tables
    from qis_fhir.mapping import load_mapping
    from qis_fhir.outcomes.events import read_outcome_tables
    from qis_fhir.packets import load_network, load_site
    from qis_fhir.packets.manifest import PINS
    from qis_fhir.runfolder import OUTCOMES, require_run
    from qis_fhir.secagg.release import LEDGER_DIR, ReleaseLedger

    site = load_site(config.site_dir)
    network = load_network(config.network_dir, pinned_state=Path(config.site_dir) / PINS)
    mapping = load_mapping(config.mapping_dir)
    local: dict = {}
    if config.run_dir is not None:
        require_run(config.run_dir, OUTCOMES)  # never the events of a run that did not complete
        local = read_outcome_tables(config.run_dir, mapping)
    options = {} if config.bind is None else {"bind": config.bind}
    collection = collect(network, mapping, list(config.bootstrap), local_site_id=site.site_id, **options)
    log.info(
        "evidence: %d packets from %d sites used, %d rejected, over %d cohorts",
        len(collection.packets), len(collection.sites()), sum(collection.rejected.values()), len(collection.grid),
    )
    # secure totals this site has released (``qis_fhir.secagg``): cells too small to publish at any one site
    secure = ReleaseLedger(Path(config.site_dir) / LEDGER_DIR).tables(mapping.version)
    tables = build_tables(collection, mapping, local_events=local.get("outcome_events"), local_units=local.get("control_units"),
                          secure_totals=secure, run_date=config.run_date)
    evidence_dir = Path(config.out_dir) / EVIDENCE_DIR
    paths = write_tables(tables, evidence_dir)
    if config.report:
        paths["report"] = write_report(evidence_dir)
    return EvidenceResult(evidence_dir, paths, tables.provenance)
