"""Collect without a DHT: answers fed straight to the verify-and-keep-newest layer.

What a clinician's site relies on: only verified packets about the cohort asked for are used, every
refused one is counted by its reason, a site's newer release replaces its older one (and an old seq
of a held cell is still data), and hospitals appear under pseudonyms with their data date.
"""

from __future__ import annotations

import dataclasses

import pytest

from qis_fhir.evidence.collect import SITE_ROW_COLUMNS, cohort_grid, collect_answers
from qis_fhir.packets.codec import decode_packet, encode_packet
from qis_fhir.packets.manifest import load_manifest
from qis_fhir.privacy.fingerprint import cohort_table

HTN_F = ("hypertension", "40-64", "female")
HTN_M = ("hypertension", "40-64", "male")
T2D_OLD = ("type2_diabetes", "65+", "unknown")


def _collect(enet, answers, manifest=None, **kw):
    grid = cohort_grid(enet.context, enet.mapping)
    return collect_answers(answers, manifest or enet.context.manifest, grid, enet.mapping.version, **kw)


def _forged(wire: bytes) -> bytes:
    return encode_packet(dataclasses.replace(decode_packet(wire), signature=bytes(64)))


def _tampered(wire: bytes) -> bytes:
    p = decode_packet(wire)
    return encode_packet(dataclasses.replace(p, responders=p.responders + 5))


def test_the_grid_is_every_cohort_the_mapping_defines_including_empty_ones(enet):
    grid = cohort_grid(enet.context, enet.mapping)
    cohorts = set(grid.values())
    assert len(grid) == len(cohorts) == 4 * 5 * 4  # buckets x (4 bands + unknown) x (4 sexes incl. unknown)
    assert ("prediabetes", "unknown", "other") in cohorts  # a cohort no site is likely to fill is still asked for
    assert grid == cohort_table(enet.context.secret, enet.mapping)


def test_forged_tampered_revoked_and_misfiled_packets_are_counted_by_reason(enet, tmp_path):
    good = enet.wire("site-a", HTN_F)
    other_cohort = enet.wire("site-b", HTN_M)
    revoked = enet.wire("site-r", HTN_F)
    answers = {
        enet.fp(*HTN_F): [good, _forged(enet.wire("site-b", HTN_F)), _tampered(enet.wire("site-c", HTN_F)),
                          revoked, other_cohort, b"{not a packet", good],  # good arrives twice (two replicas)
        enet.fp(*HTN_M): [other_cohort],
        enet.fp(*T2D_OLD): [],
    }
    c = _collect(enet, answers, manifest=load_manifest(enet.revoked_copy(tmp_path / "net")))
    assert c.rejected == {"bad_signature": 2, "revoked_key": 1, "wrong_fingerprint": 1, "malformed": 1}
    assert c.rejected_per_cohort() == {HTN_F: 5}
    assert sorted((p.site_id, p.fingerprint) for p in c.packets) == sorted(
        [("site-a", enet.fp(*HTN_F)), ("site-b", enet.fp(*HTN_M))]
    )
    assert c.answered == 2  # the empty cohort answered nothing
    assert c.received == 7 == len(c.packets) + sum(c.rejected.values())  # the second copy of good is the same packet
    # with the manifest before the revocation, the same site-r packet is data
    before = _collect(enet, {enet.fp(*HTN_F): [revoked]})
    assert [p.site_id for p in before.packets] == ["site-r"] and not before.rejected


def test_rejected_counts_from_the_client_are_kept(enet):
    fp = enet.fp(*HTN_F)
    c = _collect(enet, {fp: [enet.wire("site-a", HTN_F)]}, rejected_before={fp: {"revoked_key": 3}})
    assert c.rejected == {"revoked_key": 3}
    assert c.rejected_per_cohort() == {HTN_F: 3}
    assert len(c.packets) == 1


def test_newest_seq_wins_and_an_old_seq_of_another_cell_is_still_data(enet):
    old = enet.wire("site-a", HTN_F, patients=20, seq=20241101)
    new = enet.wire("site-a", HTN_F, patients=31, seq=20241201)
    held = enet.wire("site-a", HTN_F, treatment="TX_0002", patients=12, seq=20240901)  # a held cell, re-sent unchanged
    c = _collect(enet, {enet.fp(*HTN_F): [new, old, held, old]})
    assert sorted((p.treatment, p.seq, p.patients) for p in c.packets) == [("TX_0001", 20241201, 31), ("TX_0002", 20240901, 12)]
    assert c.superseded == 1  # old: repeated bytes from two replicas are one packet
    assert not c.rejected
    [site] = c.sites()
    assert (site["site_id"], site["packets"], site["as_of"], site["oldest_as_of"]) == ("site-a", 2, 20241201, 20240901)


def test_an_answer_for_a_fingerprint_outside_the_grid_is_a_bug_not_data(enet):
    with pytest.raises(ValueError, match="outside the cohort grid"):
        _collect(enet, {"0" * 64: []})


def test_site_rows_are_pseudonymous_and_decode_the_cohort(enet):
    fp_f, fp_old = enet.fp(*HTN_F), enet.fp(*T2D_OLD)
    answers = {
        fp_f: [enet.wire("site-c", HTN_F, patients=40, responders=30, mean=-12.25, sd=4.5, seq=20241130),
               enet.wire("site-a", HTN_F, patients=11, responders=2, mean=1.5, sd=0.0)],
        fp_old: [enet.wire("site-c", T2D_OLD, treatment="TX_0005", measure="hba1c", period="2023", patients=15, responders=9,
                           mean=-0.6, sd=0.3)],
    }
    c = _collect(enet, answers, local_site_id="site-b")  # the collecting site published nothing here
    assert c.labels == {"site-a": "Hospital A", "site-b": "Hospital B", "site-c": "Hospital C"}
    rows = c.site_rows()
    assert list(rows.columns) == SITE_ROW_COLUMNS
    assert rows.to_dict("records") == [
        {"condition": "hypertension", "age_band": "40-64", "sex": "female", "treatment": "TX_0001", "measure": "systolic_bp",
         "period": "2024", "mapping_version": "v1", "site": "Hospital A", "patients": 11, "responders": 2, "mean": 1.5,
         "sd": 0.0, "as_of": 20241201, "measured": 11},
        {"condition": "hypertension", "age_band": "40-64", "sex": "female", "treatment": "TX_0001", "measure": "systolic_bp",
         "period": "2024", "mapping_version": "v1", "site": "Hospital C", "patients": 40, "responders": 30, "mean": -12.25,
         "sd": 4.5, "as_of": 20241130, "measured": 40},
        {"condition": "type2_diabetes", "age_band": "65+", "sex": "unknown", "treatment": "TX_0005", "measure": "hba1c",
         "period": "2023", "mapping_version": "v1", "site": "Hospital C", "patients": 15, "responders": 9, "mean": -0.6,
         "sd": 0.3, "as_of": 20241201, "measured": 15},
    ]
    assert not rows.astype(str).apply(lambda col: col.str.contains("site-")).any().any()
