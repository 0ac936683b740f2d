"""Keyed fingerprints: equal for one cohort across member sites, different across networks, keyed."""

from __future__ import annotations

import hashlib

import numpy as np
import pandas as pd
import pytest

from qis_fhir.mapping import MAPPINGS_ROOT, load_mapping
from qis_fhir.packets.build import build_packets
from qis_fhir.packets.keys import create_site
from qis_fhir.packets.manifest import add_site, create_network, load_network
from qis_fhir.privacy.fingerprint import Fingerprinter, cohort_fingerprint


@pytest.fixture(scope="module")
def two_networks(tmp_path_factory):
    root = tmp_path_factory.mktemp("fp")
    for n in ("one", "two"):
        create_network(root / n, network_id=n)
    sites = {}
    for name, net in (("a", "one"), ("b", "one"), ("c", "two")):
        sites[name] = create_site(f"site-{name}", root / name)
        add_site(root / net, root / name)
    return {n: load_network(root / n) for n in ("one", "two")}, sites


def _events(seed: int) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    n = 15
    change = rng.normal(-1, 1, n)
    return pd.DataFrame(
        dict(patient_key=[f"{seed}-{i}" for i in range(n)], bucket="type2_diabetes", treatment_code="TX_0001", measure="hba1c",
             start=pd.Timestamp("2024-02-01", tz="UTC"), start_period="2024-02", age_band="40-64", sex="female", change=change,
             responded=change < -1, mapping_version="v1", event_id=[f"e{seed}-{i}" for i in range(n)])
    )


def test_same_cohort_matches_across_two_sites_of_one_network(two_networks):
    nets, sites = two_networks
    mapping = load_mapping(MAPPINGS_ROOT / "v1")  # the events below say v1
    pa = build_packets(_events(1), mapping, sites["a"], nets["one"], seq=1).packets
    pb = build_packets(_events(2), mapping, sites["b"], nets["one"], seq=1).packets
    assert len(pa) == len(pb) == 1
    assert pa[0].fingerprint == pb[0].fingerprint  # different patients, same cohort: pooled together
    assert pa[0].packet_id != pb[0].packet_id  # but each site's packet is its own


def test_same_cohort_differs_across_networks(two_networks):
    nets, sites = two_networks
    mapping = load_mapping(MAPPINGS_ROOT / "v1")  # the events below say v1
    p1 = build_packets(_events(1), mapping, sites["a"], nets["one"], seq=1).packets[0]
    p2 = build_packets(_events(1), mapping, sites["c"], nets["two"], seq=1).packets[0]
    assert p1.fingerprint != p2.fingerprint


def test_fingerprint_is_keyed_not_a_bare_hash():
    secret = b"k" * 32
    fp = cohort_fingerprint(secret, "v1", "type2_diabetes", {"age_band": "40-64", "sex": "female"})
    for plain in ("type2_diabetes", "v1|type2_diabetes|40-64|female", "44054006"):
        assert fp != hashlib.sha256(plain.encode()).hexdigest()
    assert fp != cohort_fingerprint(b"j" * 32, "v1", "type2_diabetes", {"age_band": "40-64", "sex": "female"})


def test_every_dimension_changes_the_fingerprint():
    f = Fingerprinter(b"s" * 32, "v1")
    base = f("type2_diabetes", "40-64", "female")
    assert len(base) == 64 and int(base, 16) >= 0
    others = {f("hypertension", "40-64", "female"), f("type2_diabetes", "65+", "female"), f("type2_diabetes", "40-64", "male"),
              Fingerprinter(b"s" * 32, "v2")("type2_diabetes", "40-64", "female")}
    assert base not in others and len(others) == 4
    assert f("type2_diabetes", "40-64", "female") == base  # memoised, stable
    assert cohort_fingerprint(b"s" * 32, "v1", "type2_diabetes", {"sex": "female", "age_band": "40-64"}) == base  # order-free


def test_no_ambiguity_between_dimension_values():
    """Canonical JSON, not string joining: ("a|b", "c") and ("a", "b|c") must not collide."""
    f = Fingerprinter(b"s" * 32, "v1")
    assert f("a|b", "c", "x") != f("a", "b|c", "x")


def test_short_secret_is_refused():
    with pytest.raises(ValueError):
        Fingerprinter(b"short", "v1")
    assert "s" * 32 not in repr(Fingerprinter(b"s" * 32, "v1"))


def test_cohort_table_labels_every_published_fingerprint(two_networks):
    from qis_fhir.privacy.fingerprint import cohort_table

    nets, sites = two_networks
    mapping = load_mapping(MAPPINGS_ROOT / "v1")  # the events below say v1
    table = cohort_table(nets["one"].secret, mapping)
    assert len(table) == len(mapping.buckets) * (len(mapping.cohorts.age_bands) + 1) * len(set(mapping.cohorts.sexes) | {"unknown"})
    p = build_packets(_events(3), mapping, sites["a"], nets["one"], release_state=None, seq=1).packets[0]
    assert table[p.fingerprint] == ("type2_diabetes", "40-64", "female")
    assert p.fingerprint not in cohort_table(nets["two"].secret, mapping)  # another network's secret labels nothing
