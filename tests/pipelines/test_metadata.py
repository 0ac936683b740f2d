"""What the UI shows of every asset before anything ran: owners, tags, a code version that changes with
the mapping, and per-partition blocking quality checks."""

from __future__ import annotations

import shutil
from importlib.metadata import version
from pathlib import Path

from dagster import AssetKey

from pipelines.assets import ALL_ASSETS, ALL_CHECKS
from qis_fhir.mapping import load_mapping

REPO = Path(__file__).resolve().parents[2]
PACKAGE_VERSION = version("qis-fhir")
#: the assets derived under the mapping set: their code version carries its content hash
TABLES = {"fhir_patients", "fhir_conditions", "fhir_medication_requests", "fhir_observations", "fhir_encounters"}
UNDER_MAPPING = {"mapping_set", *TABLES, "outcome_events", "outcome_packets", "secure_rounds"}


def _specs():
    return {key.to_user_string(): spec for a in ALL_ASSETS for key, spec in a.specs_by_key.items()}


def test_every_asset_has_owners_tags_and_a_code_version_with_the_mapping_hash():
    mapping_hash = load_mapping().content_hash  # the default set, no QIS_MAPPING_DIR
    specs = _specs()
    for name, spec in specs.items():
        assert spec.owners == ["team:qis-fhir"], name
        assert spec.tags["domain"] == "treatment-outcomes" and spec.tags["stage"], name
        expected = f"{PACKAGE_VERSION}+mapping.{mapping_hash[:12]}" if name in UNDER_MAPPING else PACKAGE_VERSION
        assert spec.code_version == expected, name
    # patient-level (pseudonymous) tables are tagged so, the network's aggregates are not
    assert {n for n, s in specs.items() if s.tags["patient_level"] == "true"} == {"fhir_export", *TABLES, "outcome_events", "outcome_events_table"}


def test_a_changed_mapping_changes_the_code_version(tmp_path, monkeypatch):
    import pipelines.assets.metadata as metadata

    mapping_dir = tmp_path / "mappings" / "v1"
    shutil.copytree(REPO / "mappings" / "v1", mapping_dir)
    before = metadata.code_version(uses_mapping=True)
    with (mapping_dir / "quality.yaml").open("a") as f:
        f.write("\n# a comment changes the content hash\n")
    monkeypatch.setenv("QIS_MAPPING_DIR", str(mapping_dir))
    monkeypatch.setattr(metadata, "_MAPPING_HASH", metadata._mapping_hash())
    assert metadata.code_version(uses_mapping=True) != before
    assert metadata.code_version(uses_mapping=False) == PACKAGE_VERSION


def test_quality_checks_are_per_partition_and_blocking():
    specs = [spec for c in ALL_CHECKS for spec in c.check_specs]
    assert {(s.asset_key, s.name) for s in specs} == {
        *((AssetKey(f"fhir_{t}"), f"{t}_quality") for t in ("patients", "conditions", "medication_requests", "observations", "encounters")),
        (AssetKey("outcome_events"), "outcome_events_quality"),
    }
    partitions = {key: spec.partitions_def for a in ALL_ASSETS for key, spec in a.specs_by_key.items()}
    for s in specs:
        assert s.blocking and s.partitions_def == partitions[s.asset_key], s.name

