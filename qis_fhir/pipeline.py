"""Run every stage built so far, in order, on one export.

This is the one place that chains the stage APIs; ``qis-fhir run``, ``qis-fhir demo`` and the tests
call it. The Dagster assets call the same stage functions one per asset. Each stage's logic lives in
its own subpackage; this module only decides order, paths and what blocks what: a failed quality
suite stops the run before anything could be published.

``out_dir`` is a run folder (``qis_fhir.runfolder``): the stages write into ``out_dir.partial``,
which replaces ``out_dir`` only once every file is written, so ``out_dir`` holds the previous
complete run until then, and never a mix of two. Publishing, a network side effect, comes after:
it amends the complete run with ``publish_report.json`` and its stage mark.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

from qis_fhir.errors import InputNotFoundError
from qis_fhir.files import write_json
from qis_fhir.fhir.validation import DEFAULT_SAMPLE_RATE, DEFAULT_VALIDATE
from qis_fhir.outcomes.events import OUTCOME_EVENTS, OUTCOME_SUMMARY
from qis_fhir.packets.build import PACKETS_FILE as PACKETS
from qis_fhir.runfolder import (
    EVIDENCE,
    EXTRACT,
    OUTCOMES,
    PUBLISH,
    QUALITY,
    RUN_JSON,
    amend_run,
    start_run,
)
from qis_fhir.runfolder import PACKETS as PACKETS_STAGE

log = logging.getLogger(__name__)

QUALITY_REPORT = "quality_report.json"
DISCLOSURE_REPORT = "disclosure_report.json"
PUBLISH_REPORT = "publish_report.json"


@dataclass(frozen=True)
class RunConfig:
    export_dir: Path
    out_dir: Path
    mapping_dir: Path | None = None
    site_dir: Path | None = None  # with network_dir: build and sign packets
    network_dir: Path | None = None  # the manifest.json path or the directory holding it
    bootstrap: tuple[tuple[str, int], ...] = ()  # with packets: publish them to the DHT
    bind: tuple[str, int] | None = None  # the publishing client's local address; None: any, free port
    site_secret_path: Path | None = None  # patient-key secret when no site_dir is given
    validate: str = DEFAULT_VALIDATE
    sample_rate: float = DEFAULT_SAMPLE_RATE
    seq: int | None = None  # packet sequence number; None: today's UTC date as YYYYMMDD (pass the partition date)
    evidence: bool = True  # with bootstrap: pool the network's evidence after publishing (the demo runs it once all have published)
    progress: bool = False


@dataclass
class RunResult:
    out_dir: Path
    extract: dict = field(default_factory=dict)
    outcomes: dict = field(default_factory=dict)
    quality: dict = field(default_factory=dict)
    packets: dict | None = None
    publish: dict | None = None
    evidence: dict | None = None  # provenance and file paths of the evidence stage (after a publish)

    def outputs(self) -> dict[str, Path]:
        """The files this run wrote that a user looks at, by name."""
        from qis_fhir.fhir.extract import EXTRACT_DIR, QUARANTINE_FILE, SUMMARY_FILE

        names = [RUN_JSON, OUTCOME_EVENTS, OUTCOME_SUMMARY, QUALITY_REPORT, f"{EXTRACT_DIR}/{SUMMARY_FILE}", QUARANTINE_FILE]
        if self.packets is not None:
            names += [PACKETS, DISCLOSURE_REPORT]
        if self.publish is not None:
            names.append(PUBLISH_REPORT)
        if self.evidence is not None:
            names += [f"evidence/{Path(p).name}" for p in self.evidence["paths"].values()]
        return {n: self.out_dir / n for n in names if (self.out_dir / n).exists()}


def run_pipeline(config: RunConfig) -> RunResult:
    """Extract -> quality -> outcomes -> quality -> [packets] -> [publish -> evidence]. Returns what each stage reported."""
    from qis_fhir.fhir import extract_export, load_extract
    from qis_fhir.fhir.extract import QUARANTINE_FILE
    from qis_fhir.mapping import load_mapping
    from qis_fhir.outcomes import derive_outcome_events
    from qis_fhir.quality import check_tables

    export_dir, out_dir = Path(config.export_dir), Path(config.out_dir)
    if not export_dir.is_dir():
        raise InputNotFoundError(f"export directory {export_dir} does not exist")
    if (config.site_dir is None) != (config.network_dir is None):
        raise InputNotFoundError("--site and --network go together: packets need both a site key and a network")
    if config.bootstrap and config.site_dir is None:
        raise InputNotFoundError("--bootstrap publishes packets, which need --site and --network")
    result = RunResult(out_dir=out_dir)

    # Load what can fail on configuration before the long extraction starts.
    mapping = load_mapping(config.mapping_dir)
    site = network = None
    if config.site_dir is not None:
        from qis_fhir.packets import load_network, load_site
        from qis_fhir.packets.manifest import PINS

        site = load_site(config.site_dir)  # holds the site's patient-key secret too
        secret = site.patient_secret
        # pin the governance key and refuse a manifest older than one this site has seen
        network = load_network(config.network_dir, pinned_state=Path(config.site_dir) / PINS)
    else:
        from qis_fhir.privacy.secrets import load_or_create_secret

        secret = load_or_create_secret(config.site_secret_path)

    planned = [EXTRACT, QUALITY, OUTCOMES] + ([PACKETS_STAGE] if site is not None else [])
    with start_run(out_dir, command="run", planned=planned) as run:
        work = run.path
        log.info("extract: reading %s", export_dir.name)
        summary = extract_export(
            export_dir,
            work,
            secret=secret,
            validate=config.validate,
            sample_rate=config.sample_rate,
            progress=config.progress,
        )
        result.extract = summary.to_dict()
        summary.raise_if_nothing_extracted(work / QUARANTINE_FILE)  # the rule `qis-fhir extract` applies
        run.mark(EXTRACT, summary.totals)
        tables = load_extract(work)

        log.info("outcomes: mapping %s (%s)", mapping.version, mapping.content_hash[:12])
        outcome = derive_outcome_events(tables, mapping)
        tables["outcome_events"] = outcome.events
        result.outcomes = outcome.summary

        quality = check_tables(tables, mapping)
        result.quality = quality.to_dict()
        quality.write(work / QUALITY_REPORT)
        quality.raise_for_failure()  # nothing below runs on failed data
        run.mark(QUALITY, {"success": True})

        outcome.write(work)
        run.mark(OUTCOMES, outcome.summary.get("totals", {}))

        if site is not None:
            from qis_fhir.packets import build_packets, write_disclosure_report, write_packets

            built = build_packets(outcome.events, mapping, site, network, seq=config.seq)
            write_packets(work / PACKETS, built.packets)
            write_disclosure_report(work / DISCLOSURE_REPORT, built.disclosure_report)
            result.packets = {"packets": len(built.packets), "disclosure": built.disclosure_report}
            run.mark(PACKETS_STAGE, {"packets": len(built.packets)})

    if config.bootstrap:
        from qis_fhir.dht.client import publish

        with amend_run(out_dir, needs=(PACKETS_STAGE,), clears=(PUBLISH,)) as run:
            report = publish(built.packets, list(config.bootstrap), network.manifest, bind=config.bind)
            result.publish = report.to_dict()
            write_json(out_dir / PUBLISH_REPORT, result.publish)
            run.record(PUBLISH, result.publish)
            report.raise_for_failure(out_dir / PUBLISH_REPORT)  # the policy `qis-fhir publish` applies
            run.mark(PUBLISH)
        if config.evidence:
            with amend_run(out_dir, needs=(PUBLISH,), clears=(EVIDENCE,)) as run:
                result.evidence = run_evidence_stage(config, out_dir)
                run.mark(EVIDENCE)
    return result


def run_evidence_stage(config: RunConfig, out_dir: Path) -> dict:
    """The evidence stage after a successful publish: the network's pooled figures beside this run's own."""
    from qis_fhir.evidence.stage import EvidenceConfig, run_evidence

    evidence = run_evidence(EvidenceConfig(site_dir=config.site_dir, network_dir=config.network_dir, bootstrap=config.bootstrap,
                                           out_dir=out_dir, run_dir=out_dir, mapping_dir=config.mapping_dir, bind=config.bind))
    return {"provenance": evidence.provenance, "paths": {k: str(v) for k, v in evidence.paths.items()}}
