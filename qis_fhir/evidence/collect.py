"""Collect: ask the network for every cohort of the mapping, verify what comes back, keep the newest.

A member site holds the mapping and the network secret, so it can compute the fingerprint of every
cohort the mapping defines (``cohort_table``: condition bucket x age band x sex, including cohorts
this site has no patient in) and ask for all of them through one DHT client (``query_many``). Every
packet that comes back is verified again here with the manifest's ``Verifier`` (a node's word and
the client's are never the stage's guarantee), must be about the cohort it was asked under, and one
copy per (site, packet id) is kept by the one rule in ``qis_fhir.packets.newest``.

What came back is recorded, never silently dropped: packets used, packets rejected by reason
(counted per cohort asked, because a rejected packet's own treatment or measure field cannot be
trusted), older or duplicate copies superseded, and per site its packets and its data date. A
site's ``as_of`` is the day its packets' seq stands for (``release.day_of_seq``: YYYYMMDD of the run that released them). Held cells are
re-sent unchanged on purpose (disclosure control, ``docs/packets.md``), so one site's packets carry
several dates and an old seq is data, not an error.

The output is the pooling stage's input, *site rows* (``pooling.SITE_COLUMNS``): one row per site x cell with pseudonymous site
labels ("Hospital A", sorted by site id); real site ids stay in ``Collection.sites`` and
``provenance.json`` only.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from qis_fhir.evidence.pooling import CELL_KEYS, MEASURED, SITE_COLUMNS
from qis_fhir.packets.newest import newest_per_packet
from qis_fhir.packets.release import day_of_seq
from qis_fhir.privacy.fingerprint import cohort_table

if TYPE_CHECKING:
    import pandas as pd

    from qis_fhir.mapping.model import MappingSet
    from qis_fhir.packets.manifest import NetworkContext, NetworkManifest
    from qis_fhir.packets.model import Packet

SITE_ROW_COLUMNS = CELL_KEYS + SITE_COLUMNS + [MEASURED]  # the input of pooling

#: collection's own reasons, beside the verifier's (``qis_fhir.packets.verifier.REJECTED``)
WRONG_FINGERPRINT = "wrong_fingerprint"  # a verified packet for another cohort than the one asked
OTHER_MAPPING = "other_mapping_version"  # verified, but cut by another mapping version than ours
#: verified, but its wire version is not its measure's design: a control measure's packet without the
#: patients its mean covers (v1), or a change measure's with them (v2); pooling it would mix the designs
WRONG_DESIGN = "wrong_design"


@dataclass
class Collection:
    """Everything the network returned for one site's cohort grid, after verification."""

    grid: dict[str, tuple[str, str, str]]  # fingerprint -> (condition bucket, age band, sex)
    mapping_version: str
    manifest_version: int
    min_cell_size: int
    local_site_id: str | None  # the collecting site: labelled even when it published nothing
    packets: list[Packet] = field(default_factory=list)  # verified, newest per (site, packet id)
    rejected: Counter = field(default_factory=Counter)  # reason -> packets
    rejected_by_cohort: Counter = field(default_factory=Counter)  # fingerprint -> packets rejected
    superseded: int = 0  # verified copies not used: older seqs, equal-seq losers, repeats
    received: int = 0  # distinct packets received (and refused by the client): used + rejected + superseded
    answered: int = 0  # fingerprints that returned at least one packet (used or rejected)

    @property
    def labels(self) -> dict[str, str]:
        """Site id -> pseudonymous label, stable within this collection (sorted by site id)."""
        ids = {p.site_id for p in self.packets} | ({self.local_site_id} if self.local_site_id else set())
        return {sid: f"Hospital {_letters(i)}" for i, sid in enumerate(sorted(ids))}

    def sites(self) -> list[dict]:
        """Per contributing site: label, real id, packets used, newest and oldest data date (seq)."""
        by_site: dict[str, list[int]] = {}
        for p in self.packets:
            by_site.setdefault(p.site_id, []).append(day_of_seq(p.seq))
        labels = self.labels
        return [
            {"site": labels[sid], "site_id": sid, "packets": len(seqs), "as_of": max(seqs), "oldest_as_of": min(seqs)}
            for sid, seqs in sorted(by_site.items())
        ]

    def site_rows(self) -> pd.DataFrame:
        """The site rows pooling reads: one per site x cell, cohort decoded through the grid."""
        import pandas as pd

        labels = self.labels
        rows = []
        for p in self.packets:
            condition, age_band, sex = self.grid[p.fingerprint]
            rows.append((condition, age_band, sex, p.treatment, p.measure, p.period, p.mapping_version,
                         labels[p.site_id], p.patients, p.responders, p.mean_change, p.sd_change, day_of_seq(p.seq),
                         p.patients if p.measured is None else p.measured))
        df = pd.DataFrame(rows, columns=SITE_ROW_COLUMNS)
        df = df.astype({"patients": "int64", "responders": "int64", "mean": "float64", "sd": "float64", "as_of": "int64",
                        MEASURED: "int64"})
        return df.sort_values(CELL_KEYS + ["site"], kind="mergesort").reset_index(drop=True)

    def rejected_per_cohort(self) -> dict[tuple[str, str, str], int]:
        """(condition, age band, sex) -> packets rejected under that cohort's fingerprint."""
        return {self.grid[fp]: n for fp, n in self.rejected_by_cohort.items()}


def _letters(i: int) -> str:
    """0 -> A, 25 -> Z, 26 -> AA: labels for any number of sites."""
    out = ""
    i += 1
    while i:
        i, r = divmod(i - 1, 26)
        out = chr(65 + r) + out
    return out


def cohort_grid(network: NetworkContext, mapping: MappingSet) -> dict[str, tuple[str, str, str]]:
    """Fingerprint -> cohort for every cohort the mapping can produce (what this site asks for)."""
    return cohort_table(network.secret, mapping)


def collect_answers(
    answers: Mapping[str, Iterable[bytes]],
    manifest: NetworkManifest,
    grid: Mapping[str, tuple[str, str, str]],
    mapping_version: str,
    *,
    local_site_id: str | None = None,
    rejected_before: Mapping[str, Mapping[str, int]] | None = None,
    control_measures: Iterable[str] = (),
) -> Collection:
    """Verify the wires returned per asked fingerprint and keep the newest copy per (site, packet id).

    ``control_measures``: the mapping's control measure ids; their packets must be wire version 2 and
    every other measure's version 1 (``WRONG_DESIGN`` otherwise).

    ``answers``: fingerprint asked -> wire bytes received (from the DHT, or fed directly in tests).
    ``rejected_before``: fingerprint -> reason -> count, for packets a DHT client already refused
    (they never reach this function as wires but are still counted).
    """
    from qis_fhir.packets.verifier import Verifier

    verifier = Verifier(manifest)
    control = frozenset(control_measures)
    out = Collection(dict(grid), mapping_version, manifest.version, manifest.min_cell_size, local_site_id)
    verified: list[tuple[Packet, bytes]] = []
    for fp, wires in answers.items():
        if fp not in grid:
            raise ValueError("an answer for a fingerprint outside the cohort grid")  # a caller's bug, not data
        got = 0
        for reason, n in (rejected_before or {}).get(fp, {}).items():
            out.rejected[reason] += n
            out.rejected_by_cohort[fp] += n
            got += n
        for wire in dict.fromkeys(wires):  # the same bytes from several replicas are one packet
            got += 1
            verdict = verifier.check(wire)
            reason = verdict.reason
            if verdict.ok:
                p = verdict.packet
                if p.fingerprint != fp:
                    reason = WRONG_FINGERPRINT
                elif p.mapping_version != mapping_version:
                    reason = OTHER_MAPPING
                elif (p.measured is not None) != (p.measure in control):
                    reason = WRONG_DESIGN
                else:
                    verified.append((p, wire))
                    continue
            out.rejected[reason] += 1
            out.rejected_by_cohort[fp] += 1
        out.answered += got > 0
        out.received += got
    kept, out.superseded = newest_per_packet(verified)
    out.packets = [p for p, _ in kept]
    if out.received != len(out.packets) + out.superseded + sum(out.rejected.values()):
        raise AssertionError("collection lost packets: received != used + superseded + rejected")
    return out


def collect(
    network: NetworkContext,
    mapping: MappingSet,
    bootstrap: Any,
    *,
    local_site_id: str | None = None,
    **client_options: Any,
) -> Collection:
    """Query the whole cohort grid through one DHT client and collect the answers.

    Raises ``NoPeersError`` when no bootstrap peer answers. ``client_options`` go to ``DhtClient``
    (``ksize``, ``rpc_timeout``...).
    """
    from qis_fhir.dht.client import query_many

    grid = cohort_grid(network, mapping)
    results = query_many(sorted(grid), bootstrap, network.manifest, **client_options)
    return collect_answers(
        {fp: r.wires for fp, r in results.items()},
        network.manifest,
        grid,
        mapping.version,
        local_site_id=local_site_id,
        rejected_before={fp: r.rejected for fp, r in results.items()},
        control_measures=mapping.control_measures,
    )
