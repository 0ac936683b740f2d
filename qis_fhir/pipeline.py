"""Run every stage, in order, on one export: ``qis-fhir run``, ``qis-fhir demo`` and the tests.

This module only decides which stage steps run (``qis_fhir.stages``, the steps the Dagster assets
call too) and in which run folder; order, blocking, report paths and the secret source are the
steps' policy, not this module's.

``out_dir`` is a run folder (``qis_fhir.runfolder``): the stages write into ``out_dir.partial``,
which replaces ``out_dir`` only once every file is written, so ``out_dir`` holds the previous
complete run until then, and never a mix of two. Publishing, a network side effect, comes after:
it amends the complete run with ``publish_report.json`` and its stage mark.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from qis_fhir.errors import InputNotFoundError
from qis_fhir.fhir.validation import DEFAULT_SAMPLE_RATE, DEFAULT_VALIDATE
from qis_fhir.outcomes.control import CONTROL_UNITS
from qis_fhir.outcomes.events import OUTCOME_EVENTS, OUTCOME_SUMMARY
from qis_fhir.packets.build import PACKETS_FILE as PACKETS
from qis_fhir.runfolder import EXTRACT, OUTCOMES, QUALITY, RUN_JSON, start_run
from qis_fhir.runfolder import PACKETS as PACKETS_STAGE
from qis_fhir.stages import DISCLOSURE_REPORT, PUBLISH_REPORT, QUALITY_PARTS, quality_report_path


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
    seq: int | None = None  # the export's day as YYYYMMDD, from which the release policy picks the seq; None: today (UTC)
    evidence: bool = True  # with bootstrap: pool the network's evidence after publishing (the demo runs it once all have published)
    progress: bool = False
    workers: int = 1  # processes for the export's files and the outcome shards (the result is the same whatever the number)
    shards: int | None = None  # patient shards of the outcome stage; None: by the extract's size


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

        quality = [str(quality_report_path(".", part)) for part in QUALITY_PARTS]
        names = [RUN_JSON, OUTCOME_EVENTS, CONTROL_UNITS, OUTCOME_SUMMARY, *quality, f"{EXTRACT_DIR}/{SUMMARY_FILE}", QUARANTINE_FILE]
        if self.packets is not None:
            names += [PACKETS, DISCLOSURE_REPORT]
        if self.publish is not None:
            names.append(PUBLISH_REPORT)
        if self.evidence is not None:
            names += [f"evidence/{Path(p).name}" for p in self.evidence["paths"].values()]
        return {n: self.out_dir / n for n in names if (self.out_dir / n).exists()}


def run_pipeline(config: RunConfig) -> RunResult:
    """Extract -> quality -> outcomes -> quality -> [packets] -> [publish -> evidence]. Returns what each stage reported."""
    from qis_fhir import stages

    if config.bootstrap and config.site_dir is None:
        raise InputNotFoundError("--bootstrap publishes packets, which need --site and --network")
    out_dir = Path(config.out_dir)
    result = RunResult(out_dir=out_dir)
    # everything that can fail on configuration, before the long extraction starts
    setup = stages.open_site(mapping_dir=config.mapping_dir, site_dir=config.site_dir, network_dir=config.network_dir,
                             site_secret_path=config.site_secret_path)

    planned = [EXTRACT, OUTCOMES, QUALITY] + ([PACKETS_STAGE] if setup.site is not None else [])
    with start_run(out_dir, command="run", planned=planned) as run:
        summary = stages.extract_step(run, config.export_dir, setup, validate=config.validate, sample_rate=config.sample_rate,
                                      progress=config.progress, workers=config.workers)
        result.extract = summary.to_dict()
        with stages.worker_server():  # one fork server from the extract's check to the events' (qis_fhir/forkserver.py)
            extract = stages.quality_step(run, setup.mapping, "extract", workers=config.workers)
            extract.raise_for_failure()  # nothing below runs on failed data
            result.outcomes = stages.outcomes_step(run, setup.mapping, shards=config.shards, workers=config.workers)
            events = stages.quality_step(run, setup.mapping, "outcome_events", workers=config.workers)
        result.quality = {"success": events.success, "warnings": extract.warnings + events.warnings,
                          "reports": {"extract": extract.to_dict(), "outcome_events": events.to_dict()}}
        events.raise_for_failure()
        if setup.site is not None:
            built = stages.packets_step(run, setup, config.seq)
            result.packets = {"packets": len(built.packets), "disclosure": built.disclosure_report}

    if config.bootstrap:
        result.publish = stages.publish_step(out_dir, setup, config.bootstrap, config.bind).to_dict()
        if config.evidence:
            evidence = stages.evidence_step(out_dir, setup, config.bootstrap, config.bind)
            result.evidence = {"provenance": evidence.provenance, "paths": {k: str(v) for k, v in evidence.paths.items()}}
    return result
