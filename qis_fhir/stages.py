"""The stage steps: the one implementation of each stage over a run folder, for every caller.

``qis-fhir run`` (``qis_fhir.pipeline``) chains these steps in one process; each Dagster asset
(``pipelines/assets/``) calls one of them. Before this layer the two chained the library functions
each their own way and drifted apart (quality checked in another order, reports at other paths,
another source for the patient-key secret, so one site could get two pseudonym sets). Every such
policy now lives here once:

* **Configuration** (:func:`open_site`): the mapping, the patient-key secret and the site's keys and
  network are loaded before the long extraction, so a bad mapping fails in a second, not after
  minutes. The secret is the site directory's when a site is configured, else the secret file; both
  at once are refused, since they would pseudonymise the same patients two ways.
* **Order and blocking**: extract -> quality of the extract tables -> outcomes -> quality of the
  events (stage ``quality`` once every suite passed) -> packets -> publish -> evidence. Each step
  checks in the run folder that what it builds on passed: the outcomes step refuses an extract
  whose suites failed, the packets step a run without the ``quality`` stage, publish a run without
  packets. So nothing is published from failed data whichever caller skipped what.
* **Secure rounds** (:func:`secagg_step`) follow the packets: a cell the site releases in the clear
  is known only then, and it stays out of every masked sum; the evidence step then pools the secure
  totals released into the site's ledger. They write nothing into the run folder (the rounds live in
  the site directory, across nights) and mark no stage.
* **Layout**: one layout, ``docs/architecture.md``: quality reports in ``quality/<part>.json``
  (``extract``, ``outcome_events``), packets, disclosure and publish reports at the top.
* **Marks**: a step marks its stage in ``run.json`` only after its files are written; a step run
  again on a complete run (:func:`amend_stage`) first unmarks its stage and every later one, whose
  files were derived from what it is about to replace.

The steps that write into a run being built take its :class:`~qis_fhir.runfolder.Run`
(from ``start_run`` or :func:`amend_stage`); publish and evidence, which follow a complete run,
take its folder and amend it themselves.
"""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from qis_fhir.errors import InputNotFoundError, QualityError, UsageError
from qis_fhir.files import write_json
from qis_fhir.memory import release_free_memory
from qis_fhir.runfolder import EVIDENCE, EXTRACT, OUTCOMES, PACKETS, PUBLISH, QUALITY, Run, amend_run

if TYPE_CHECKING:
    import pandas as pd

    from qis_fhir.dht.client import PublishReport
    from qis_fhir.evidence.stage import EvidenceResult
    from qis_fhir.fhir.extract import ExtractPlan, ExtractSummary
    from qis_fhir.mapping.model import MappingSet
    from qis_fhir.packets.build import PacketBuild
    from qis_fhir.packets.keys import SiteIdentity
    from qis_fhir.packets.manifest import NetworkContext
    from qis_fhir.quality import QualityReport

log = logging.getLogger(__name__)

#: the stages in the order a run finishes them, and what each one builds on
ORDER = (EXTRACT, OUTCOMES, QUALITY, PACKETS, PUBLISH, EVIDENCE)
NEEDS = {EXTRACT: (), OUTCOMES: (EXTRACT,), QUALITY: (OUTCOMES,), PACKETS: (QUALITY,), PUBLISH: (PACKETS,), EVIDENCE: (PUBLISH,)}

QUALITY_DIR = "quality"
#: the quality reports of a run, one per checked part: the extract tables, then the outcome events
QUALITY_PARTS = ("extract", "outcome_events")
DISCLOSURE_REPORT = "disclosure_report.json"
PUBLISH_REPORT = "publish_report.json"


def quality_report_path(folder: Path | str, part: str) -> Path:
    """``<run folder>/quality/<part>.json``."""
    return Path(folder) / QUALITY_DIR / f"{part}.json"


# ---------------------------------------------------------------------- configuration
@dataclass(frozen=True)
class SiteSetup:
    """What every step of one site's run needs, loaded once before the first step."""

    mapping: MappingSet
    mapping_dir: Path | None
    secret: bytes  # the patient-key secret
    site: SiteIdentity | None = None  # with ``network``: packets can be built, signed and published
    network: NetworkContext | None = None
    site_dir: Path | None = None
    network_dir: Path | None = None

    def require_site(self, what: str) -> None:
        if self.site is None:
            raise InputNotFoundError(f"{what} needs a site directory and a network manifest (`run --site --network`; QIS_SITE_DIR and QIS_NETWORK in Dagster)")


def open_site(
    *,
    mapping_dir: Path | str | None = None,
    site_dir: Path | str | None = None,
    network_dir: Path | str | None = None,
    site_secret_path: Path | str | None = None,
) -> SiteSetup:
    """Load the mapping, the site's keys and network, and its one patient-key secret."""
    from qis_fhir.mapping import load_mapping

    if (site_dir is None) != (network_dir is None):
        raise InputNotFoundError("a site directory and a network manifest go together (--site and --network; QIS_SITE_DIR and QIS_NETWORK): packets need both")
    if site_dir is not None and site_secret_path is not None:
        raise UsageError(
            "give a site directory or a patient-key secret file, not both (--site or --site-secret; QIS_SITE_DIR or "
            "QIS_SITE_SECRET): the site directory holds the site's secret, and two secrets would give its patients two pseudonym sets"
        )
    mapping = load_mapping(mapping_dir)
    mapping_dir = None if mapping_dir is None else Path(mapping_dir)
    if site_dir is None:
        from qis_fhir.privacy.secrets import load_or_create_secret

        return SiteSetup(mapping, mapping_dir, load_or_create_secret(site_secret_path))
    from qis_fhir.packets import load_network, load_site
    from qis_fhir.packets.manifest import PINS

    site_dir, network_dir = Path(site_dir), Path(network_dir)
    site = load_site(site_dir)
    # pin the governance key and refuse a manifest older than one this site has seen
    network = load_network(network_dir, pinned_state=site_dir / PINS)
    return SiteSetup(mapping, mapping_dir, site.patient_secret, site, network, site_dir, network_dir)


# ---------------------------------------------------------------------- run folder
@contextlib.contextmanager
def amend_stage(folder: Path | str, stage: str) -> Iterator[Run]:
    """Run ``stage`` again on a complete run: it needs the stages before it and unmarks itself and
    every later stage first (their files came from what it replaces, so none of them is current)."""
    with amend_run(folder, needs=NEEDS[stage], clears=ORDER[ORDER.index(stage):]) as run:
        yield run


def _require_marked(run: Run, stage: str, why: str) -> None:
    if stage not in run.manifest["stages"]:
        raise QualityError(f"run {run.path} has not finished stage {stage}: {why}")


def _read_report(folder: Path, part: str) -> dict | None:
    try:
        return json.loads(quality_report_path(folder, part).read_bytes())
    except FileNotFoundError:
        return None


def require_quality(folder: Path | str, part: str) -> None:
    """Raise ``QualityError`` unless ``part`` was checked in ``folder`` and every suite passed."""
    report = _read_report(Path(folder), part)
    path = quality_report_path(folder, part)
    if report is None:
        raise QualityError(f"{path} does not exist: the {part} tables were never checked; nothing is derived from unchecked data")
    if not report.get("success"):
        raise QualityError(f"the {part} tables failed their quality suites (see {path}); nothing is derived from failed data")


def read_quality_suite(folder: Path | str, part: str, table: str) -> tuple[dict, dict]:
    """The ``part`` report of ``folder`` and its suite for ``table``, as ``quality_step`` wrote them.

    What a Dagster check executed on its own reads: the verdict of the partition's last
    materialisation, without running great-expectations again. ``QualityError`` when there is none."""
    report = _read_report(Path(folder), part)
    if report is None:
        raise QualityError(f"{quality_report_path(folder, part)} does not exist: the {part} tables of this partition were never checked")
    try:
        return report, report["tables"][table]
    except KeyError:
        raise QualityError(f"{quality_report_path(folder, part)} has no suite result for table {table}") from None


# ---------------------------------------------------------------------- steps
def worker_server() -> contextlib.AbstractContextManager[None]:
    """The stages' fork server held for the steps run inside, with everything their workers import
    (``forkserver``): a caller that chains the quality, outcome and quality steps pays the imports,
    great-expectations' 3.5 s among them, once instead of once per step."""
    from qis_fhir.forkserver import OUTCOMES, QUALITY, held

    return held(*QUALITY, *OUTCOMES)


def extract_step(run: Run, export_dir: Path | str, setup: SiteSetup, *, validate: str, sample_rate: float, progress: bool = False,
                 workers: int = 1) -> ExtractSummary:
    """The export into ``extract/`` and ``quarantine.ndjson``, its files over ``workers`` processes;
    an export with nothing usable stops here."""
    from qis_fhir.fhir import extract_export

    export_dir = Path(export_dir)  # a missing one is extract_export's InputNotFoundError
    run.begin(EXTRACT)
    log.info("extract: reading %s", export_dir.name)
    return _extracted(run, extract_export(export_dir, run.path, secret=setup.secret, validate=validate, sample_rate=sample_rate,
                                          progress=progress, workers=workers))


def extract_staged_step(run: Run, plan: ExtractPlan, staging: Path, parts: list[dict], *, seconds: float) -> ExtractSummary:
    """The extract stage of an extraction whose tasks ran as steps of their own, each into ``staging``
    (``fhir.parallel.stage_task``; the Dagster extract's ops): their outputs merged into the run, as
    ``extract_step`` would have written them; an export with nothing usable stops here."""
    from qis_fhir.fhir.parallel import finish_staged

    run.begin(EXTRACT)
    return _extracted(run, finish_staged(plan, staging, run.path, parts, seconds=seconds))


def _extracted(run: Run, summary: ExtractSummary) -> ExtractSummary:
    """The rule `qis-fhir extract` applies, then the stage marked with the export's totals."""
    from qis_fhir.fhir.extract import QUARANTINE_FILE

    summary.raise_if_nothing_extracted(run.path / QUARANTINE_FILE)
    run.mark(EXTRACT, summary.totals)
    release_free_memory()  # what the extraction freed, before the quality workers start (qis_fhir/memory.py)
    return summary


def quality_step(run: Run, mapping: MappingSet, part: str, *, workers: int = 1) -> QualityReport:
    """Check ``part``'s tables against the mapping's suites and write ``quality/<part>.json``, pass or fail.
    The tables are read from the run folder in batches, validated over ``workers`` processes
    (``quality/workers.py``); the report is the same whatever their number.

    Does not raise on a failed suite: the caller reports it (``run`` raises, Dagster fails a blocking
    check), and the next step refuses to build on it. Marks ``quality`` once every part has passed."""
    from qis_fhir.outcomes.events import outcome_table_paths
    from qis_fhir.quality.checks import check_extract_tables, check_parquet_tables

    run.begin(QUALITY)
    if part == "extract":  # read in batches: the extract grows with the export (fhir/scan.py)
        report = check_extract_tables(run.path, mapping, workers=workers)
    elif part == "outcome_events":  # the events and, under a mapping with control measures, the control units
        _require_marked(run, OUTCOMES, "there are no outcome events to check")
        report = check_parquet_tables(outcome_table_paths(run.path, mapping), mapping, workers=workers)
    else:
        raise ValueError(f"no quality part {part!r}; expected one of {QUALITY_PARTS}")
    report.write(quality_report_path(run.path, part))
    reports = [_read_report(run.path, p) for p in QUALITY_PARTS]
    if all(r is not None and r.get("success") for r in reports):
        run.mark(QUALITY, {"success": True, "warnings": sum(r.get("warnings", 0) for r in reports)})
    return report


def outcomes_step(run: Run, mapping: MappingSet, *, shards: int | None = None, workers: int = 1) -> dict:
    """Treatment-outcome events from the run's extract, once its tables passed their suites, written to
    the run folder; returns their summary (``outcome_summary.json``). ``shards``, ``workers``: see
    ``derive_outcomes_sharded``; the result is the same whatever they are.

    The derivation runs in worker processes that write the tables themselves (``write_outcomes_sharded``):
    only the summary comes back, so neither the events nor what the derivation's allocators keep stay
    in the calling process beside the quality workers that check the events next."""
    from qis_fhir.outcomes.sharded import write_outcomes_sharded

    require_quality(run.path, "extract")
    run.begin(OUTCOMES)
    log.info("outcomes: mapping %s (%s)", mapping.version, mapping.content_hash[:12])
    summary = write_outcomes_sharded(run.path, mapping, shards=shards, workers=workers)
    run.mark(OUTCOMES, summary.get("totals", {}))
    return summary


def packets_step(run: Run, setup: SiteSetup, day: str | int | None) -> PacketBuild:
    """Signed packets of the run's events (and control units, mapping v2) for ``day`` (the export's date; None: today, UTC), under
    disclosure control and the release policy (``qis_fhir.packets.release``), once every suite passed.

    The site's release state stays locked until ``run`` commits and is recorded only then, so a run
    that fails or is killed after this step holds nothing back the next night, and two runs of one
    site release one after the other. The events are read back from the run folder, as every caller
    has them, so the packets are the same bytes whoever built them (same events, same seq, same key:
    Ed25519 is deterministic). The read costs 2.2 ms for the 956 events of a 3,000-patient synthetic export."""
    from qis_fhir.outcomes.events import read_outcome_tables
    from qis_fhir.packets import build_packets, write_disclosure_report, write_packets
    from qis_fhir.packets.build import PACKETS_FILE
    from qis_fhir.packets.release import open_release
    from qis_fhir.secagg.release import LEDGER_DIR, ReleaseLedger

    setup.require_site("signing packets")
    _require_marked(run, QUALITY, "packets are built only from events whose every quality suite passed")
    run.begin(PACKETS)
    release = run.hold(open_release(setup.site, day))
    tables = read_outcome_tables(run.path, setup.mapping)
    built = build_packets(tables["outcome_events"], setup.mapping, setup.site, setup.network, release_state=release,
                          units=tables.get("control_units"),
                          in_secure_totals=ReleaseLedger(setup.site_dir / LEDGER_DIR).contributed_cells(setup.mapping.version))
    write_packets(run.path / PACKETS_FILE, built.packets)
    write_disclosure_report(run.path / DISCLOSURE_REPORT, built.disclosure_report)
    run.mark(PACKETS, {"packets": len(built.packets), **built.disclosure_report["cells"]})
    return built


def publish_step(folder: Path | str, setup: SiteSetup, bootstrap: tuple[tuple[str, int], ...], bind: Any = None) -> PublishReport:
    """Publish a complete run's signed packets (as written on disk) to the site's network: :func:`publish_run`."""
    setup.require_site("publishing")
    return publish_run(folder, setup.network.manifest, list(bootstrap), bind=bind)


def publish_run(folder: Path | str, manifest: Any, bootstrap: Any, **options: Any) -> PublishReport:
    """The publish stage of a complete run folder: its packets (as written on disk) to the DHT nodes
    ``bootstrap`` under the network ``manifest`` (the object or its path), ``publish_report.json``
    written and stage ``publish`` marked in ``run.json``. ``qis-fhir publish DIR`` calls it for a run
    folder (it has a manifest, not a site); ``options`` go to ``qis_fhir.dht.client.publish``.

    Succeeds or fails by the one publish policy (``PublishReport.raise_for_failure``); a failed
    publish leaves the run complete with its packets, so the next attempt sends the same ones."""
    from qis_fhir.dht.client import publish
    from qis_fhir.packets.build import PACKETS_FILE, read_packets

    folder = Path(folder)
    with amend_stage(folder, PUBLISH) as run:
        run.begin(PUBLISH)
        report = publish(read_packets(folder / PACKETS_FILE), bootstrap, manifest, **options)
        summary = report.to_dict()
        write_json(folder / PUBLISH_REPORT, summary)
        run.record(PUBLISH, summary)
        report.raise_for_failure(folder / PUBLISH_REPORT)  # the policy `qis-fhir publish` applies
        run.mark(PUBLISH)
    return report


def evidence_step(folder: Path | str, setup: SiteSetup, bootstrap: tuple[tuple[str, int], ...], bind: Any = None, run_date: str | None = None) -> EvidenceResult:
    """The network's pooled evidence beside this run's own figures, in ``evidence/``, after a publish."""
    from qis_fhir.evidence.stage import EvidenceConfig, run_evidence

    setup.require_site("the evidence stage")
    folder = Path(folder)
    with amend_stage(folder, EVIDENCE) as run:
        run.begin(EVIDENCE)
        result = run_evidence(EvidenceConfig(site_dir=setup.site_dir, network_dir=setup.network_dir, bootstrap=tuple(bootstrap), out_dir=folder,
                                             run_dir=folder, mapping_dir=setup.mapping_dir, run_date=run_date, bind=bind))
        run.mark(EVIDENCE, {k: result.provenance[k] for k in ("cells", "packets_used", "packets_rejected") if k in result.provenance})
    return result


@dataclass(frozen=True)
class SecureRounds:
    """What one night did in the secure-aggregation rounds of a run: per (measure, period) the
    statuses ``rounds_step`` returned, and counts that name no cell (``counts``)."""

    statuses: dict[str, dict]  # "measure period" -> {"presence": ..., "value": ..., "released_cells": n} or {"missed"|"aborted": why}
    counts: dict[str, Any]


def secagg_step(folder: Path | str, setup: SiteSetup, bootstrap: tuple[tuple[str, int], ...], bind: Any = None, *,
                state_dir: Path | str | None = None, pairs: list[tuple[str, str]] | None = None, ksize: int = 20,
                clock: Callable[[], float] | None = None, schedule: Any = None) -> SecureRounds:
    """Advance this site's secure-aggregation rounds by what is due tonight, from a run past its packets.

    ``pairs``: the (measure, period) pairs to advance; by default every pair of the run's tables whose
    rounds are under way (``secagg.site.due_rounds``). Each goes through ``secagg.site.rounds_step``;
    a round this site is out of (it missed a window: ``RoundWindowError``) or that stopped safely
    (``SecAggAbortedError``: too few sites) is counted, not raised: a network's round is not this
    site's night failing. A DHT that does not answer raises (``NoPeersError``, ``PublishIncompleteError``)."""
    import time
    from collections import Counter

    from qis_fhir.errors import RoundWindowError, SecAggAbortedError
    from qis_fhir.runfolder import require_run
    from qis_fhir.secagg.round import SCHEDULE, UNMASK
    from qis_fhir.secagg.site import STATE_DIR, due_rounds, rounds_step

    setup.require_site("secure-aggregation rounds")
    folder = Path(folder)
    if require_run(folder, PACKETS) is None:  # the clear cells are this run's packets: rounds come after them
        raise InputNotFoundError(f"{folder} is not a run folder: secure rounds read a run past its packets")
    clock, schedule = clock or time.time, schedule or SCHEDULE
    state_dir = Path(state_dir) if state_dir is not None else setup.site_dir / STATE_DIR
    pairs = due_rounds(folder, setup, clock(), schedule) if pairs is None else pairs
    statuses: dict[str, dict] = {}
    steps: Counter = Counter()
    counts = {"pairs_due": len(pairs), "missed": 0, "aborted": 0, "rounds_released": 0, "cells_released": 0}
    for measure, period in pairs:
        try:
            status = rounds_step(folder, setup, measure, period, state_dir=state_dir, bootstrap=bootstrap, bind=bind, ksize=ksize,
                                 clock=clock, schedule=schedule)
        except (RoundWindowError, SecAggAbortedError) as exc:
            kind = "missed" if isinstance(exc, RoundWindowError) else "aborted"
            counts[kind] += 1
            statuses[f"{measure} {period}"] = {kind: str(exc)}
            continue
        statuses[f"{measure} {period}"] = status
        for stage in ("presence", "value"):
            if stage in status:
                steps[f"{stage}:{status[stage].get('step') or 'nothing due'}"] += 1
        if status.get("value", {}).get("step") == UNMASK and "released_cells" in status:
            counts["rounds_released"] += 1
            counts["cells_released"] += status["released_cells"]
    return SecureRounds(statuses, {**counts, "steps": dict(sorted(steps.items()))})


def table_step(folder: Path | str, table: str) -> pd.DataFrame:
    """``outcome_events`` or ``pooled_outcomes`` read from a finished run folder, for the site's database.

    ``require_run`` refuses a folder whose stage is unmarked (being rewritten, failed, crashed), so a
    database never receives events that failed their suite or a pooled table half written.
    """
    import pandas as pd

    from qis_fhir.evidence.report import POOLED_NAME
    from qis_fhir.evidence.tables import EVIDENCE_DIR
    from qis_fhir.outcomes.events import OUTCOME_EVENTS
    from qis_fhir.runfolder import require_run

    # the file, and the stages its run must have finished: only checked events, only a finished pooling
    name, stages = {"outcome_events": (OUTCOME_EVENTS, (OUTCOMES, QUALITY)),
                    "pooled_outcomes": (f"{EVIDENCE_DIR}/{POOLED_NAME}", (EVIDENCE,))}[table]
    folder = Path(folder)
    if require_run(folder, *stages) is None:
        raise InputNotFoundError(f"{folder} is not a run folder: run the stages that write {name} first")
    return pd.read_parquet(folder / name)
