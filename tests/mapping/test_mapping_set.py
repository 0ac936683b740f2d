"""The shipped v1 and v2 sets, the default, versions, content hashes, and every kind of error pointing at file and line."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest

from qis_fhir.errors import ExitCode, InputNotFoundError, MappingError
from qis_fhir.mapping import DEFAULT_MAPPING_DIR, ICD10CM, MAPPINGS_ROOT, RXNORM, SNOMED, load_mapping

V1 = MAPPINGS_ROOT / "v1"


@pytest.fixture
def v1(tmp_path) -> Path:
    """A private copy of mappings/v1 to break."""
    return Path(shutil.copytree(V1, tmp_path / "v1"))


def edit(path: Path, old: str, new: str) -> int:
    """Replace ``old`` (which must occur once) and return the 1-based line where ``new`` starts."""
    text = path.read_text()
    assert text.count(old) == 1, old
    path.write_text(text.replace(old, new))
    return text[: text.index(old)].count("\n") + 1


def error_of(directory: Path) -> str:
    with pytest.raises(MappingError) as info:
        load_mapping(directory)
    assert info.value.exit_code == ExitCode.MAPPING_INVALID
    return str(info.value)


# --- the shipped set -----------------------------------------------------------------------------

@pytest.mark.parametrize("version", ["v1", "v2"])
def test_shipped_sets_cover_the_required_domains(version):
    m = load_mapping(MAPPINGS_ROOT / version)
    assert m.version == version and re.fullmatch("[0-9a-f]{64}", m.content_hash)
    assert m.bucket_for(SNOMED, "38341003") == m.bucket_for(ICD10CM, "I10") == "hypertension"
    assert m.bucket_for(SNOMED, "59621000") == "hypertension"  # US Core exports (synthea-bulk-10)
    assert m.bucket_for(SNOMED, "55822004") == m.bucket_for(ICD10CM, "E78.5") == "hyperlipidemia"
    assert m.bucket_for(SNOMED, "44054006") == m.bucket_for(ICD10CM, "E11.9") == "type2_diabetes"
    assert m.bucket_for(SNOMED, "15777000") == "prediabetes"
    assert m.bucket_for(SNOMED, "10509002") is None
    assert m.bucket_for(ICD10CM, "38341003") is None  # codes match within their own system only
    hctz, lisinopril = m.treatment_for(RXNORM, "316049"), m.treatment_for(RXNORM, "314076")
    simva, metformin, insulin = (m.treatment_for(RXNORM, c) for c in ("316672", "860975", "106892"))
    assert hctz == m.treatment_for(RXNORM, "310798") and simva == m.treatment_for(RXNORM, "314231")
    assert len({hctz, lisinopril, simva, metformin, insulin}) == 5
    assert all(t.startswith("TX_") for t in (hctz, lisinopril, simva, metformin, insulin))
    assert "hypertension" in m.treatments[lisinopril].buckets and "type2_diabetes" in m.treatments[insulin].buckets
    sbp = m.measures[m.buckets["hypertension"].measures[0]]
    assert (sbp.loinc, sbp.unit, sbp.direction) == ("8480-6", "mm[Hg]", "lower")
    assert set(sbp.panels) == {"55284-4", "85354-9"}
    assert m.measures[m.buckets["hyperlipidemia"].measures[0]].loinc == "2093-3"
    assert m.measures[m.buckets["type2_diabetes"].measures[0]].loinc == "4548-4"
    assert m.cohorts.period == "year"


@pytest.mark.parametrize(
    "age, band", [(None, "unknown"), (float("nan"), "unknown"), (-1, "unknown"), (0, "0-17"), (17.99, "0-17"),
                  (18, "18-39"), (64.5, "40-64"), (65, "65+"), (130, "65+")]
)
def test_age_band(age, band):
    assert load_mapping().age_band(age) == band


def test_default_is_mappings_v2_of_this_checkout():
    assert load_mapping().path == DEFAULT_MAPPING_DIR == MAPPINGS_ROOT / "v2" and load_mapping().version == "v2"


def test_missing_directory_is_input_not_found(tmp_path):
    with pytest.raises(InputNotFoundError):
        load_mapping(tmp_path / "v9")


def test_missing_file_is_named(v1):
    (v1 / "outcomes.yaml").unlink()
    assert "outcomes.yaml" in error_of(v1)


# --- content hash --------------------------------------------------------------------------------

def test_hash_is_over_content_not_location(v1, tmp_path):
    other = Path(shutil.copytree(v1, tmp_path / "elsewhere" / "v1"))
    assert load_mapping(v1).content_hash == load_mapping(other).content_hash == load_mapping(V1).content_hash


@pytest.mark.parametrize("name", ["conditions.yaml", "treatments.yaml", "outcomes.yaml", "cohorts.yaml", "mapping.yaml"])
def test_hash_changes_when_any_file_changes(v1, name):
    before = load_mapping(v1).content_hash
    with (v1 / name).open("a") as f:
        f.write("# a comment changes the bytes\n")
    assert load_mapping(v1).content_hash != before


def test_hash_covers_quality_yaml_and_file_names(v1):
    before = load_mapping(v1).content_hash
    (v1 / "quality.yaml").write_text("suites: {}\n")
    with_quality = load_mapping(v1).content_hash
    assert with_quality != before
    (v1 / "quality.yaml").rename(v1 / "quality2.yaml")  # same bytes, other name
    assert load_mapping(v1).content_hash not in (before, with_quality)


def test_version_must_match_directory(v1, tmp_path):
    moved = v1.rename(tmp_path / "v2")
    assert error_of(moved).startswith("mapping.yaml:4: version: version 'v1' does not match the directory name 'v2'")


# --- schema errors, each with file and line ------------------------------------------------------

def test_unquoted_code_is_refused_with_its_line(v1):
    line = edit(v1 / "conditions.yaml", '- "55822004"', "- 55822004")
    msg = error_of(v1)
    assert msg.startswith(f"conditions.yaml:{line}: buckets.hyperlipidemia.codes.snomed[0]: 55822004 must be a quoted string")


def test_bad_direction(v1):
    line = edit(v1 / "outcomes.yaml", "direction: lower\n    baseline_days: 180\n    followup_days: [42",
                "direction: down\n    baseline_days: 180\n    followup_days: [42")
    assert error_of(v1) == f"outcomes.yaml:{line}: measures.total_cholesterol.direction: 'down' is not one of lower, higher"


def test_missing_required_key_points_at_its_parent(v1):
    line = edit(v1 / "outcomes.yaml", "    threshold: 0.5\n", "")
    text = (v1 / "outcomes.yaml").read_text().splitlines()
    hba1c_line = text.index("  hba1c:") + 2  # the value of hba1c starts on the next line
    msg = error_of(v1)
    assert msg.startswith(f"outcomes.yaml:{hba1c_line}: measures.hba1c: 'threshold' is a required property")
    assert line > hba1c_line


def test_unexpected_key_points_at_the_key(v1):
    line = edit(v1 / "treatments.yaml", "    display: Lisinopril oral tablet\n",
                "    display: Lisinopril oral tablet\n    dose: 10 mg\n") + 1
    assert error_of(v1).startswith(f"treatments.yaml:{line}: treatments.TX_0002.dose: unexpected key 'dose'")


def test_treatment_id_must_be_tx_code(v1):
    line = edit(v1 / "treatments.yaml", "  TX_0004:", "  atorvastatin:")
    msg = error_of(v1)
    assert msg.startswith(f"treatments.yaml:{line}: treatments.atorvastatin: unexpected key 'atorvastatin'")
    assert "TX_" in msg


def test_followup_must_start_after_the_start_day(v1):
    line = edit(v1 / "outcomes.yaml", "followup_days: [28, 400]", "followup_days: [0, 400]")
    assert error_of(v1).startswith(f"outcomes.yaml:{line}: measures.systolic_bp.followup_days[0]: 0 is less than")


def test_several_errors_are_all_reported_in_line_order(v1):
    a = edit(v1 / "outcomes.yaml", "threshold: 10\n", "threshold: -10\n")
    b = edit(v1 / "outcomes.yaml", "threshold: 20\n", "threshold: twenty\n")
    lines = error_of(v1).splitlines()
    assert [ln.split(":")[1] for ln in lines] == [str(a), str(b)]


def test_yaml_syntax_error_has_a_line(v1):
    line = edit(v1 / "cohorts.yaml", "sexes: [female, male, other, unknown]", "sexes: [female, male")
    msg = error_of(v1)
    assert re.match(r"cohorts\.yaml:\d+: invalid YAML", msg)
    assert int(msg.split(":")[1]) >= line


def test_duplicate_key_is_refused(v1):
    text = (v1 / "treatments.yaml").read_text()
    (v1 / "treatments.yaml").write_text(text + "  TX_0001:\n    display: x\n    rxnorm: ['1']\n    buckets: [hypertension]\n")
    line = len(text.splitlines()) + 1
    assert error_of(v1).startswith(f"treatments.yaml:{line}: duplicate key 'TX_0001' (first on line ")


def test_empty_file(v1):
    (v1 / "cohorts.yaml").write_text("# nothing\n")
    assert error_of(v1) == "cohorts.yaml:1: file is empty"


# --- cross-file checks ---------------------------------------------------------------------------

def test_treatment_naming_an_unknown_bucket(v1):
    line = edit(v1 / "treatments.yaml", "buckets: [type2_diabetes]", "buckets: [diabetes_type_2]")
    assert error_of(v1).startswith(f"treatments.yaml:{line}: treatments.TX_0006.buckets[0]: unknown bucket 'diabetes_type_2'")


def test_bucket_naming_an_unknown_measure(v1):
    line = edit(v1 / "conditions.yaml", "measures: [total_cholesterol]", "measures: [ldl]")
    assert error_of(v1).startswith(f"conditions.yaml:{line}: buckets.hyperlipidemia.measures[0]: unknown measure 'ldl'")


def test_code_in_two_buckets(v1):
    line = edit(v1 / "conditions.yaml", '- "E78.5"      # Hyperlipidemia, unspecified', '- "I10"')
    first = (v1 / "conditions.yaml").read_text().splitlines().index('        - "I10"        # Essential (primary) hypertension') + 1
    assert error_of(v1) == (
        f"conditions.yaml:{line}: buckets.hyperlipidemia.codes.icd10cm[0]: "
        f"icd10cm code 'I10' is already in bucket 'hypertension' (line {first})"
    )


def test_icd10cm_codes_match_with_or_without_the_dot():
    """HL7 writes ICD-10-CM with the dot; exports in the field also send E119 or e11.9."""
    m = load_mapping()
    assert m.bucket_for(ICD10CM, "E119") == m.bucket_for(ICD10CM, " e11.9 ") == "type2_diabetes"
    assert m.bucket_for(ICD10CM, "E785") == "hyperlipidemia" and m.bucket_for(ICD10CM, "r7303") == "prediabetes"
    assert m.bucket_for(SNOMED, "44054006.") is None  # SNOMED CT codes match exactly


def test_same_icd10cm_code_written_differently_in_two_buckets(v1):
    line = edit(v1 / "conditions.yaml", '- "E78.5"      # Hyperlipidemia, unspecified', '- "i10."')
    assert error_of(v1).startswith(
        f"conditions.yaml:{line}: buckets.hyperlipidemia.codes.icd10cm[0]: icd10cm code 'i10.' is already in bucket 'hypertension'"
    )


def test_rxnorm_code_in_two_treatments(v1):
    line = edit(v1 / "treatments.yaml", '- "259255"   # Atorvastatin 80 MG Oral Tablet', '- "316672"')
    assert error_of(v1).startswith(f"treatments.yaml:{line}: treatments.TX_0004.rxnorm[0]: rxnorm code '316672' is already treatment TX_0003")


@pytest.mark.parametrize(
    "bands, message",
    [
        ('["0-17", "18-39", "35-64", "65+"]', "age band '35-64' overlaps '18-39'"),
        ('["0-17", "18-39", "40-64", "60+"]', "age band '60+' overlaps '40-64'"),
        ('["0-17", "20-39", "40-64", "65+"]', "gap between age bands '0-17' and '20-39'"),
        ('["5-17", "18-39", "40-64", "65+"]', "the youngest age band must start at 0"),
        ('["0-17", "39-18", "40+"]', "age band '39-18' ends before it starts"),
        ('["0-17", "18 to 39"]', "does not match"),
    ],
)
def test_bad_age_bands(v1, bands, message):
    line = edit(v1 / "cohorts.yaml", '["0-17", "18-39", "40-64", "65+"]', bands)
    msg = error_of(v1)
    assert msg.startswith(f"cohorts.yaml:{line}: age_bands[")
    assert message in msg


def test_bad_period(v1):
    line = edit(v1 / "cohorts.yaml", "period: year", "period: week")
    assert error_of(v1) == f"cohorts.yaml:{line}: period: 'week' is not one of month, quarter, year"


def test_empty_followup_window(v1):
    line = edit(v1 / "outcomes.yaml", "followup_days: [84, 400]", "followup_days: [400, 84]")
    assert error_of(v1) == f"outcomes.yaml:{line}: measures.hba1c.followup_days: follow-up window [400, 84] is empty"


def test_empty_plausible_range(v1):
    line = edit(v1 / "outcomes.yaml", "plausible_range: [2, 25]", "plausible_range: [25, 2]")
    assert error_of(v1) == f"outcomes.yaml:{line}: measures.hba1c.plausible_range: plausible range [25, 2] is empty"


# --- new keys of mapping v2: washout and treatment classes ----------------------------------------
@pytest.fixture
def v2(tmp_path) -> Path:
    """A private copy of mappings/v2 to break."""
    return Path(shutil.copytree(MAPPINGS_ROOT / "v2", tmp_path / "v2"))


def test_v2_declares_a_year_of_washout_and_the_treatment_classes():
    m = load_mapping(MAPPINGS_ROOT / "v2")
    assert m.washout_days == 365
    assert set(m.treatment_classes) == {"antihypertensive", "statin", "glucose_lowering"}
    # every code of the classes is mapped, strengths of one drug to one treatment
    assert all(m.treatment_for(RXNORM, c) for codes in m.treatment_classes.values() for c in codes)
    hctz, metoprolol = m.treatment_for(RXNORM, "316049"), m.treatment_for(RXNORM, "866414")
    assert m.treatment_for(RXNORM, "316052") == hctz and m.treatment_for(RXNORM, "866412") == metoprolol
    assert len({hctz, metoprolol, m.treatment_for(RXNORM, "897718"), m.treatment_for(RXNORM, "197361")}) == 4


def test_v1_declares_neither():
    m = load_mapping(MAPPINGS_ROOT / "v1")
    assert m.washout_days is None and m.treatment_classes == {}


def test_washout_of_zero_days_is_refused(v2):
    line = edit(v2 / "outcomes.yaml", "washout_days: 365\n", "washout_days: 0\n")
    assert error_of(v2) == f"outcomes.yaml:{line}: washout_days: 0 is less than the minimum of 1"


def test_washout_is_one_per_mapping_not_per_measure(v2):
    line = edit(v2 / "outcomes.yaml", "    episode_gap_days: 400\n\n  total_cholesterol",
                "    episode_gap_days: 400\n    washout_days: 365\n\n  total_cholesterol") + 1
    assert error_of(v2).startswith(f"outcomes.yaml:{line}: measures.systolic_bp.washout_days: unexpected key")


def test_a_mapping_without_washout_derives_every_start(v2):
    edit(v2 / "outcomes.yaml", "washout_days: 365\n", "")
    assert load_mapping(v2).washout_days is None


def test_unquoted_class_code_is_refused_with_its_line(v2):
    line = edit(v2 / "treatments.yaml", '    - "897718"   # Verapamil Hydrochloride 40 MG\n', "    - 897718   # Verapamil\n")
    assert error_of(v2).startswith(f"treatments.yaml:{line}: treatment_classes.antihypertensive[9]:")
