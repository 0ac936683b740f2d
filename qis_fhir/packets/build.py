"""Outcome events -> signed packets, under disclosure control; and the packet files.

One packet per cell = fingerprint(bucket, age band, sex) x treatment x measure x period, where the
period is the events' ``start_period`` coarsened to the mapping's ``cohorts.period`` (year by
default). Each patient counts once per cell: when a patient has several events in one cell (two
treatment episodes in a year), the earliest one is used, so ``patients`` is the number of distinct
patient keys and the mean and SD are over patients, not episodes.

Sequence number and release state: ``qis_fhir.packets.release`` (the one release policy). With an
open :class:`~qis_fhir.packets.release.Release` the policy picks the seq (``YYYYMMDD * 100 +
revision`` of the day the export stands for), holds cells that changed too little since their last
release, and releases nothing for a day older than the newest released one. Without one (tests,
tools) every publishable cell is signed at the ``seq`` given. Re-building the same events under the
same seq yields byte-identical packets (Ed25519 signatures are deterministic), which consumers accept
as duplicates, never counting them twice. The seq is never derived from patient data, so it reveals
no patient's date.

Control units (``outcomes/control.py``, mapping v2) give cells of their own, under the same
fingerprints, disclosure control and release state: ``patients`` is the denominator, ``responders``
the numerator, the period is always the measurement year (never coarsened: one period meaning per
measure), and the mean and SD are of the index value over the units with a reading, whose number the
packet carries (wire v2, ``measured``); a mean over fewer than the minimum cell size is withheld.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING

from qis_fhir.errors import InputNotFoundError, MappingError
from qis_fhir.files import atomic_write, write_json
from qis_fhir.mapping import UNKNOWN
from qis_fhir.packets.codec import PacketSigner, encode_packet
from qis_fhir.packets.keys import SiteIdentity
from qis_fhir.packets.manifest import NetworkContext
from qis_fhir.packets.model import (
    MAX_WIRE_BYTES,
    MEASURE_RE,
    SEQ_MAX,
    STAT_DECIMALS,
    TREATMENT_RE,
    Packet,
    PacketFormatError,
    packet_id_of,
)
from qis_fhir.packets.release import Release, day_number, first_seq
from qis_fhir.privacy.disclosure import check_single_granularity, disclosure_report, is_publishable
from qis_fhir.privacy.fingerprint import Fingerprinter

if TYPE_CHECKING:
    import pandas as pd

    from qis_fhir.mapping.model import MappingSet

log = logging.getLogger(__name__)

REQUIRED_COLUMNS = (
    "patient_key",
    "bucket",
    "treatment_code",
    "measure",
    "start_period",
    "age_band",
    "sex",
    "change",
    "responded",
    "mapping_version",
)
CELL_COLUMNS = ["bucket", "age_band", "sex", "treatment_code", "measure", "period"]
UNIT_REQUIRED_COLUMNS = ("patient_key", "bucket", "treatment_code", "measure", "period", "age_band", "sex", "index_value",
                         "numerator", "mapping_version")
PACKETS_FILE = "packets.ndjson"  # a run folder's packets (``qis-fhir run``; ``publish``/``verify`` of a run folder)


@dataclass
class PacketBuild:
    packets: list[Packet]
    disclosure_report: dict


def default_seq(now: datetime | None = None) -> int:
    """The seq of the first release of today (UTC): what a build without release state signs with."""
    return first_seq(day_number(now))


def _period_of(start_period: str, granularity: str) -> str:
    year, month = start_period[:4], start_period[5:7]
    if granularity == "month":
        return f"{year}-{month}"
    if granularity == "quarter":
        return f"{year}-Q{(int(month) - 1) // 3 + 1}"
    return year


def _clean_stat(x: float) -> float:
    return round(float(x), STAT_DECIMALS) + 0.0  # + 0.0 turns -0.0 into 0.0: one wire form


def build_packets(
    events: pd.DataFrame,
    mapping: MappingSet,
    site: SiteIdentity,
    network: NetworkContext,
    seq: int | None = None,
    *,
    release_state: Release | None = None,
    units: pd.DataFrame | None = None,
    in_secure_totals: set[tuple[str, ...]] | frozenset = frozenset(),
) -> PacketBuild:
    """Aggregate outcome events (and control ``units``) into signed packets; cells under the minimum size are not published.

    ``release_state``: the site's open release (``qis_fhir.packets.release.open_release``), which
    chooses the seq, holds cells that changed by fewer than ``min_cell_size`` patients since their
    last release (their earlier packet is re-emitted unchanged: a duplicate to every consumer, so two
    releases of one cell cannot be differenced to single patients), and withholds every cell of a day
    older than the newest released one. The packets are staged in it and recorded when its block
    exits cleanly. ``None``: no memory; every publishable cell is signed at ``seq`` (default: today's
    first seq), as tests and tools that sign one-off packets want.

    ``in_secure_totals``: cells (bucket, age band, sex, treatment, measure, period) whose patients this
    site put in a released secure total (``secagg.release.ReleaseLedger.contributed_cells``); such a cell
    is not published even once it is large enough, since the pooled figure would count them twice.
    """
    if release_state is not None:
        if seq is not None:
            raise ValueError("the release policy chooses the seq of a build with release state; open the release for the day instead")
        seq = release_state.seq
    seq = default_seq() if seq is None else seq
    if type(seq) is not int or not 0 <= seq <= SEQ_MAX:
        raise ValueError(f"seq must be an integer in 0..{SEQ_MAX}")
    granularity = mapping.cohorts.period  # month | quarter | year: checked by the mapping schema
    manifest = network.manifest
    if mapping.version not in manifest.accepted_mapping_versions:
        raise MappingError(
            f"mapping version {mapping.version} is not accepted by network {manifest.network_id} "
            f"(accepted: {', '.join(manifest.accepted_mapping_versions) or 'none'})"
        )
    min_cell = manifest.min_cell_size
    grouped = site_cells(events, units, mapping)

    fingerprint = Fingerprinter(network.secret, mapping.version)
    signer = PacketSigner(site.private_key, site.site_id, site.key_id)
    stale = release_state is not None and release_state.stale
    held_buckets: list[str] = []
    published_buckets: list[str] = []
    suppressed_buckets: list[str] = []
    secure_buckets: list[str] = []
    withheld = 0
    cells: list[tuple[str, ...]] = []
    packets: list[Packet] = []
    if len(grouped):
        for (bucket, age_band, sex, treatment, measure, period), row in grouped.iterrows():
            n = int(row["patients"])
            if not is_publishable(n, min_cell):
                suppressed_buckets.append(bucket)
                continue
            if not TREATMENT_RE.fullmatch(treatment) or not MEASURE_RE.fullmatch(measure):
                raise MappingError(f"treatment {treatment!r} or measure {measure!r} is not a valid packet code")
            cells.append((bucket, age_band, sex, treatment, measure, period))
            if cells[-1] in in_secure_totals:
                secure_buckets.append(bucket)
                continue
            if stale:
                withheld += 1  # a newer day is released: this day's figures are not
                continue
            published_buckets.append(bucket)
            fp = fingerprint(bucket, age_band, sex)
            figures = _figures(n, row, min_cell)
            before = None
            if release_state is not None:
                pid = packet_id_of(site.site_id, fp, treatment, measure, period, mapping.version)
                before = release_state.held(pid, n, min_cell, figures.get("measured"))
            if before is not None:
                packets.append(before)  # too few patients changed to release a new version of this cell
                held_buckets.append(bucket)
                continue
            packets.append(
                signer.sign(
                    fingerprint=fp,
                    treatment=treatment,
                    measure=measure,
                    period=period,
                    responders=int(row["responders"]),
                    mapping_version=mapping.version,
                    seq=seq,
                    **figures,
                )
            )
    check_single_granularity(cells)
    packets.sort(key=lambda p: (p.fingerprint, p.treatment, p.measure, p.period))
    report = disclosure_report(
        published_buckets,
        suppressed_buckets,
        min_cell_size=min_cell,
        mapping_version=mapping.version,
        period=granularity,
        seq=None if stale else seq,
        held_buckets=held_buckets,
        secure_buckets=secure_buckets,
    )
    if release_state is not None:
        release_state.stage(packets)
        report["release"] = {**release_state.summary(), "withheld": withheld}
    if stale:
        log.warning("packets: %d cells withheld, none released: %s is older than the newest released day %s",
                    withheld, report["release"]["day"], report["release"]["newest_released_day"])
    else:
        log.info("packets: %d cells published (%d held unchanged), %d suppressed under min cell size %d; seq %d",
                 len(packets), len(held_buckets), len(suppressed_buckets), min_cell, seq)
    return PacketBuild(packets, report)


def _figures(n: int, row: pd.Series, min_cell: int) -> dict:
    """A cell's patients, mean and SD as signed: a change cell's over all ``n``; a control cell's over
    its ``measured`` units, withheld (0, 0.0, 0.0) when fewer than ``min_cell`` have a reading, since a
    mean of a few patients comes close to one patient's own value (the verifier refuses it too)."""
    measured = row["measured"]
    if math.isnan(measured):
        return {"patients": n, "mean_change": _clean_stat(row["mean_change"]),
                "sd_change": _clean_stat(row["sd_change"] if n > 1 else 0.0)}
    measured = int(measured)
    if not is_publishable(measured, min_cell):
        return {"patients": n, "measured": 0, "mean_change": 0.0, "sd_change": 0.0}
    return {"patients": n, "measured": measured, "mean_change": _clean_stat(row["mean_change"]),
            "sd_change": _clean_stat(row["sd_change"] if measured > 1 else 0.0)}


def site_cells(events: pd.DataFrame, units: pd.DataFrame | None, mapping: MappingSet) -> pd.DataFrame:
    """Every cell of the site, change (``cell_aggregates``) and control (``control_cell_aggregates``),
    with ``measured`` NaN for change cells: what the packets are built from and what the evidence
    stage shows as the site's own figures."""
    import pandas as pd

    change = cell_aggregates(events, mapping).assign(measured=float("nan"))
    if units is None:
        if mapping.control_measures:
            raise ValueError(f"mapping {mapping.version} declares control measures: pass its control units")
        return change
    control = control_cell_aggregates(units, mapping)
    if not len(control):
        return change
    if not len(change):
        return control
    return pd.concat([change, control]).sort_index()


def _check_rows(rows: pd.DataFrame, required: tuple[str, ...], what: str, mapping: MappingSet) -> None:
    """Refuse rows without the columns a cell needs, or derived under another mapping version."""
    missing = [c for c in required if c not in rows.columns]
    if missing:
        raise ValueError(f"{what} lack columns: {', '.join(missing)}")
    wrong_version = rows["mapping_version"] != mapping.version
    if bool(wrong_version.any()):
        raise MappingError(f"{int(wrong_version.sum())} {what} were derived with another mapping version than {mapping.version}")


def _known_cohort(df: pd.DataFrame) -> None:
    """A missing age band or sex is the cohort ``unknown``, as the fingerprints have it."""
    for col in ("age_band", "sex"):
        df[col] = df[col].fillna(UNKNOWN).astype(str)


def control_cell_rows(units: pd.DataFrame, mapping: MappingSet) -> pd.DataFrame:
    """One row per control unit, with its cell (``CELL_COLUMNS``), ``patient_key``, ``index_value``
    (NaN without a reading) and ``numerator``: what ``control_cell_aggregates`` groups and secure
    aggregation (``qis_fhir.secagg.values``) sums, so both cut the same cells."""
    _check_rows(units, UNIT_REQUIRED_COLUMNS, "control units", mapping)
    unknown = sorted(set(units["measure"].astype(str)) - set(mapping.control_measures))
    if unknown:
        raise MappingError(f"control units of measures that mapping {mapping.version} does not declare as control measures: {', '.join(unknown)}")
    df = units.loc[:, ["patient_key", *CELL_COLUMNS[:-1], "period", "index_value", "numerator"]].reset_index(drop=True)
    _known_cohort(df)
    df["period"] = df["period"].astype(str)
    if bool(df.duplicated(CELL_COLUMNS + ["patient_key"]).any()):
        raise ValueError("a patient has two control units in one cell")
    df["index_value"] = df["index_value"].astype("float64")
    df["numerator"] = df["numerator"].astype(bool)
    return df


def control_cell_aggregates(units: pd.DataFrame, mapping: MappingSet) -> pd.DataFrame:
    """Control cells from ``control_units.parquet``, indexed like ``cell_aggregates``.

    ``patients`` is the denominator (units), ``responders`` the numerator, ``measured`` the units with
    an index value, ``mean_change`` and ``sd_change`` the mean and SD (ddof 1, NaN under 2) of that
    index value over them. The period is the unit's measurement year as it is: a control measure has
    no other granularity. One unit per patient per cell (the units are unique by construction; a
    repeat is refused rather than counted twice)."""
    return control_cell_rows(units, mapping).groupby(CELL_COLUMNS, sort=True, observed=True).agg(
        patients=("patient_key", "size"),
        responders=("numerator", "sum"),
        measured=("index_value", "count"),
        mean_change=("index_value", "mean"),
        sd_change=("index_value", "std"),
    ).astype({"measured": "float64"})


def cell_rows(events: pd.DataFrame, mapping: MappingSet) -> pd.DataFrame:
    """One row per patient per change cell: the cell (``CELL_COLUMNS``, the period at the mapping's
    granularity), ``patient_key``, ``change`` and ``responded``; of a patient's events in one cell the
    earliest (ties broken by event id, for determinism); events without a finite change are left out.
    What ``cell_aggregates`` groups and secure aggregation sums, so both cut the same cells."""
    import pandas as pd

    _check_rows(events, REQUIRED_COLUMNS, "outcome events", mapping)
    order = [c for c in ("start", "event_id") if c in events.columns]
    columns = [c for c in REQUIRED_COLUMNS if c != "mapping_version"] + order
    df = events.loc[:, columns].reset_index(drop=True)  # any index the caller had (concat may repeat labels)
    df["change"] = pd.to_numeric(df["change"], errors="coerce").astype("float64")
    df = df[df["change"].map(math.isfinite).astype(bool)].copy()
    _known_cohort(df)
    df["period"] = [_period_of(str(s), mapping.cohorts.period) for s in df["start_period"]]
    if order:
        df = df.sort_values(order, kind="mergesort")
    return df.drop_duplicates(subset=CELL_COLUMNS + ["patient_key"], keep="first")


def cell_aggregates(events: pd.DataFrame, mapping: MappingSet) -> pd.DataFrame:
    """Every cell's unsuppressed figures: what a packet would carry before disclosure control.

    Index ``CELL_COLUMNS`` (bucket, age band, sex, treatment code, measure, period at the mapping's
    granularity), sorted; columns ``patients``, ``responders``, ``mean_change``, ``sd_change`` (NaN
    for one patient), unrounded. One event per patient per cell, the earliest (``cell_rows``). The
    packet builder publishes from this, and the evidence stage shows it beside the network's figures
    as the site's own (they stay on site).
    """
    return cell_rows(events, mapping).groupby(CELL_COLUMNS, sort=True, observed=True).agg(
        patients=("patient_key", "size"),
        responders=("responded", "sum"),
        mean_change=("change", "mean"),
        sd_change=("change", "std"),
    )


def write_packets(path: Path | str, packets: list[Packet]) -> None:
    """NDJSON: one packet's wire encoding (itself one JSON object) per line."""
    atomic_write(Path(path), b"".join(encode_packet(p) + b"\n" for p in packets))


def read_packets(path: Path | str) -> list[bytes]:
    """The raw lines of a packet file (blank lines skipped), unverified: pass each to ``Verifier.verify``."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise InputNotFoundError(f"packet file {path} does not exist") from None
    return [line.rstrip(b"\r") for line in data.split(b"\n") if line.strip()]


def write_disclosure_report(path: Path | str, report: dict) -> None:
    write_json(Path(path), report)


__all__ = [
    "MAX_WIRE_BYTES",
    "PACKETS_FILE",
    "PacketBuild",
    "PacketFormatError",
    "build_packets",
    "cell_aggregates",
    "cell_rows",
    "control_cell_aggregates",
    "control_cell_rows",
    "default_seq",
    "read_packets",
    "site_cells",
    "write_disclosure_report",
    "write_packets",
]
