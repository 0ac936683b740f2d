"""Adding a condition, a treatment or a whole clinical domain is a YAML change only.

Copies the shipped v1 set to a temporary ``v3``, adds YAML, and derives events with unchanged code.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from qis_fhir.mapping import ICD10CM, MAPPINGS_ROOT, load_mapping
from qis_fhir.outcomes import derive_outcome_events

V1 = MAPPINGS_ROOT / "v1"

NEW_BUCKETS = """
  obstructive_airway:
    description: Asthma and COPD
    codes:
      snomed:
        - "195967001"   # Asthma
        - "233678006"   # Childhood asthma
        - "185086009"   # Chronic obstructive bronchitis
      icd10cm: ["J45.909", "J44.9"]
    measures: [fev1]
"""
NEW_TREATMENTS = """
  TX_0101:
    display: Albuterol inhaler
    rxnorm: ["745679", "351137"]
    buckets: [obstructive_airway]
  TX_0102:
    display: Amlodipine 5 MG oral tablet
    rxnorm: ["197361"]
    buckets: [hypertension]
"""
NEW_MEASURES = """
  fev1:
    description: FEV1 by spirometry
    loinc: "20150-9"
    panels: []
    unit: "L"
    direction: higher
    baseline_days: 90
    followup_days: [14, 180]
    threshold: 0.2
    plausible_range: [0.1, 8]
    episode_gap_days: 120
"""


@pytest.fixture
def v3(tmp_path) -> Path:
    d = Path(shutil.copytree(V1, tmp_path / "v3"))
    (d / "mapping.yaml").write_text((d / "mapping.yaml").read_text().replace("version: v1", "version: v3"))
    with (d / "conditions.yaml").open("a") as f:
        f.write(NEW_BUCKETS)
    with (d / "treatments.yaml").open("a") as f:
        f.write(NEW_TREATMENTS)
    with (d / "outcomes.yaml").open("a") as f:
        f.write(NEW_MEASURES)
    # a new code for an existing bucket: hypertensive heart disease coded in ICD-10-CM
    text = (d / "conditions.yaml").read_text()
    (d / "conditions.yaml").write_text(text.replace('        - "I10"  ', '        - "I11.9"\n        - "I10"  '))
    return d


def test_new_domain_condition_and_treatment_yield_events(v3, tb):
    mapping = load_mapping(v3)
    assert mapping.version == "v3" and mapping.content_hash != load_mapping(V1).content_hash
    tb.obs(patient="x", when=2000, value=1.0)  # data runs past every window

    tb.patient("asthma-1")  # new domain, higher is better
    c = tb.condition(patient="asthma-1", code="195967001", onset=-300)
    tb.request(patient="asthma-1", code="745679", when=0, reasons=[c])
    tb.obs(patient="asthma-1", when=-30, value=2.10, code="20150-9", unit="L", panel=None)
    tb.obs(patient="asthma-1", when=20, value=2.45, code="20150-9", unit="L", panel=None)

    tb.patient("asthma-2")  # linked by time, no improvement
    tb.condition(patient="asthma-2", code="J45.909", system=ICD10CM, onset=-300)
    tb.request(patient="asthma-2", code="351137", when=0)
    tb.obs(patient="asthma-2", when=-1, value=3.0, code="20150-9", unit="L", panel=None)
    tb.obs(patient="asthma-2", when=100, value=3.1, code="20150-9", unit="L", panel=None)

    tb.patient("htn-1")  # new code in an old bucket + new treatment for an old bucket
    c = tb.condition(patient="htn-1", code="I11.9", system=ICD10CM, onset=-50)
    tb.request(patient="htn-1", code="197361", when=0, reasons=[c])
    tb.obs(patient="htn-1", when=-1, value=165.0)
    tb.obs(patient="htn-1", when=45, value=148.0)

    result = derive_outcome_events(tb.tables(), mapping)
    ev = result.events.set_index("patient_key")
    assert ev.loc["asthma-1", ["bucket", "treatment_code", "measure"]].tolist() == ["obstructive_airway", "TX_0101", "fev1"]
    assert bool(ev.loc["asthma-1", "responded"]) is True  # +0.35 L >= 0.2 L
    assert bool(ev.loc["asthma-2", "responded"]) is False  # +0.1 L
    assert ev.loc["htn-1", ["bucket", "treatment_code"]].tolist() == ["hypertension", "TX_0102"]
    assert bool(ev.loc["htn-1", "responded"]) is True
    assert set(result.events["mapping_version"]) == {"v3"}
    assert result.summary["by_bucket"]["obstructive_airway"]["events"] == 2

    # the same tables under v1 know none of it
    assert derive_outcome_events(tb.tables(), load_mapping(V1)).events.empty
