"""The export looks like a server's $export: part files, valid FHIR R4 lines, consistent references."""

from __future__ import annotations

import itertools
import subprocess
import sys
from pathlib import Path

import orjson
import pytest
from synth_helpers import iter_lines, read_type

from qis_fhir.errors import AlreadyExistsError, QisError
from qis_fhir.synth import default_truth_path, generate_export

TYPES = {"Patient", "Condition", "MedicationRequest", "Observation", "Encounter"}


def _bytes_of(export_dir: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(export_dir.iterdir())}


def test_same_seed_writes_same_bytes_and_other_seed_differs(tmp_path: Path) -> None:
    a = generate_export(tmp_path / "a", patients=150, seed=7, observations=3000)
    b = generate_export(tmp_path / "b", patients=150, seed=7, observations=3000)
    c = generate_export(tmp_path / "c", patients=150, seed=8, observations=3000)
    assert _bytes_of(a.out_dir) == _bytes_of(b.out_dir)
    assert a.truth_path.read_bytes() == b.truth_path.read_bytes()
    other = _bytes_of(c.out_dir)
    same = _bytes_of(a.out_dir)
    assert other.keys() == same.keys()
    assert all(other[k] != same[k] for k in same), "a different seed must change every file"


def test_every_line_is_json_of_its_files_type_with_unique_ids(medium_export) -> None:
    seen_types = set()
    for path in medium_export.files:
        rtype = path.name.split(".")[0]
        seen_types.add(rtype)
        ids = set()
        n = 0
        for line in iter_lines(path):
            res = orjson.loads(line)
            assert res["resourceType"] == rtype, path.name
            assert res["id"] not in ids
            ids.add(res["id"])
            n += 1
        assert n > 0
    assert seen_types == TYPES
    assert sum(medium_export.counts.values()) == sum(
        sum(1 for _ in iter_lines(p)) for p in medium_export.files
    )


def test_parts_split_at_max_lines_and_are_numbered(tmp_path: Path) -> None:
    r = generate_export(tmp_path / "x", patients=60, seed=1, observations=2500, max_lines_per_file=1000)
    obs_parts = sorted(p.name for p in r.out_dir.glob("Observation.*.ndjson"))
    assert obs_parts[:3] == ["Observation.000.ndjson", "Observation.001.ndjson", "Observation.002.ndjson"]
    lengths = [sum(1 for _ in iter_lines(r.out_dir / n)) for n in obs_parts]
    assert all(n == 1000 for n in lengths[:-1]) and 0 < lengths[-1] <= 1000
    assert sum(lengths) == r.counts["Observation"]


def test_references_resolve(medium_export) -> None:
    d = medium_export.out_dir
    patients = {r["id"] for r in read_type(d, "Patient")}
    encounters = {r["id"] for r in read_type(d, "Encounter")}
    conditions = {}
    for r in read_type(d, "Condition"):
        conditions[r["id"]] = r["subject"]["reference"]
    with_reason = without_reason = 0
    for rtype in ("Condition", "MedicationRequest", "Observation", "Encounter"):
        for r in read_type(d, rtype):
            subject = r["subject"]["reference"]
            assert subject.startswith("Patient/") and subject[8:] in patients
            if "encounter" in r:
                assert r["encounter"]["reference"][10:] in encounters
            if rtype == "MedicationRequest":
                refs = r.get("reasonReference", [])
                if refs:
                    with_reason += 1
                    cid = refs[0]["reference"].removeprefix("Condition/")
                    assert cid in conditions
                    assert conditions[cid] == subject, "reasonReference points at another patient's condition"
                else:
                    without_reason += 1
    # both linkage paths (reasonReference, patient + time) must be exercised
    assert with_reason > 5 * without_reason > 0


@pytest.mark.parametrize(
    ("rtype", "module", "cls"),
    [
        ("Patient", "patient", "Patient"),
        ("Condition", "condition", "Condition"),
        ("MedicationRequest", "medicationrequest", "MedicationRequest"),
        ("Observation", "observation", "Observation"),
        ("Encounter", "encounter", "Encounter"),
    ],
)
def test_sample_validates_against_fhir_r4b_models(medium_export, rtype: str, module: str, cls: str) -> None:
    import importlib

    model = getattr(importlib.import_module(f"fhir.resources.R4B.{module}"), cls)
    path = sorted(medium_export.out_dir.glob(f"{rtype}.*.ndjson"))[0]
    # every 37th line plus every BP panel / unit-less component among the first Observation lines
    sample = list(itertools.islice(iter_lines(path), 0, None, 37))[:150]
    if rtype == "Observation":
        sample += [ln for ln in itertools.islice(iter_lines(path), 3000) if b'"component"' in ln][:50]
    assert sample
    for line in sample:
        model.model_validate_json(line)


def test_patients_carry_identifying_text_for_privacy_tests(medium_export) -> None:
    p = next(read_type(medium_export.out_dir, "Patient"))
    assert p["name"][0]["family"] and p["name"][0]["given"][0]
    assert p["address"][0]["line"][0] and p["birthDate"]
    div = p["text"]["div"]
    assert p["name"][0]["family"] in div and p["birthDate"] in div  # free text that must never leak
    assert any(i.get("system") == "http://hl7.org/fhir/sid/us-ssn" for i in p["identifier"])


def test_gzip_parts_hold_the_same_lines(tmp_path: Path) -> None:
    plain = generate_export(tmp_path / "plain", patients=80, seed=5, max_lines_per_file=700)
    gz = generate_export(tmp_path / "gz", patients=80, seed=5, max_lines_per_file=700, gzip=True)
    assert [p.name + ".gz" for p in plain.files] == [p.name for p in gz.files]
    import gzip

    for p, g in zip(plain.files, gz.files, strict=True):
        assert gzip.decompress(g.read_bytes()) == p.read_bytes()
    again = generate_export(tmp_path / "gz2", patients=80, seed=5, max_lines_per_file=700, gzip=True)
    assert [p.read_bytes() for p in gz.files] == [p.read_bytes() for p in again.files]


def test_observations_target_is_reached(tmp_path: Path) -> None:
    r = generate_export(tmp_path / "big", patients=40, seed=2, observations=25_000)
    assert 25_000 <= r.counts["Observation"] <= 25_000 + 4  # a visit writes up to 4 vitals
    assert r.counts["Observation"] == sum(1 for p in r.files if p.name.startswith("Observation")
                                          for _ in iter_lines(p))
    # padding adds routine vital signs only, from its own random stream: the clinical content and
    # the answer key are those of the unpadded export
    small = generate_export(tmp_path / "small", patients=40, seed=2)
    for rtype in ("Patient", "Condition", "MedicationRequest", "Encounter"):
        assert (r.out_dir / f"{rtype}.000.ndjson").read_bytes() == (small.out_dir / f"{rtype}.000.ndjson").read_bytes()
    big_lines = {ln for p in r.out_dir.glob("Observation.*") for ln in iter_lines(p)}
    small_lines = [ln for p in small.out_dir.glob("Observation.*") for ln in iter_lines(p)]
    assert all(ln in big_lines for ln in small_lines)
    added = big_lines.difference(small_lines)
    assert len(added) == r.counts["Observation"] - small.counts["Observation"]
    vitals = (b'"8867-4"', b'"29463-7"', b'"39156-5"', b'"8302-2"')
    assert all(any(code in ln for code in vitals) for ln in added)
    truth_big = orjson.loads(r.truth_path.read_bytes())
    truth_small = orjson.loads(small.truth_path.read_bytes())
    assert truth_big["cohorts"] == truth_small["cohorts"]
    assert truth_big["observations_target"] == 25_000


def test_truth_file_lives_beside_the_export_not_in_it(tmp_path: Path) -> None:
    r = generate_export(tmp_path / "site-a", patients=20, seed=1)
    assert r.truth_path == default_truth_path(tmp_path / "site-a") == tmp_path / "site-a.truth.json"
    assert not any("truth" in p.name or p.suffix == ".json" for p in r.out_dir.iterdir())
    with pytest.raises(QisError, match="inside the export folder"):
        generate_export(tmp_path / "site-b", patients=20, seed=1, truth_path=tmp_path / "site-b" / "t.json")
    custom = generate_export(tmp_path / "site-c", patients=20, seed=1, truth_path=tmp_path / "keys" / "c.json")
    assert custom.truth_path.is_file()


def test_refuses_to_mix_with_an_existing_export(tmp_path: Path) -> None:
    generate_export(tmp_path / "s", patients=30, seed=1, max_lines_per_file=50)
    with pytest.raises(AlreadyExistsError):
        generate_export(tmp_path / "s", patients=30, seed=2)
    r = generate_export(tmp_path / "s", patients=30, seed=2, overwrite=True)
    names = sorted(p.name for p in r.out_dir.iterdir())
    assert names == sorted(p.name for p in r.files), "stale parts of the first run must be gone"


@pytest.mark.parametrize("kwargs", [{"patients": 0}, {"observations": -1}, {"site_profile": "mars"}])
def test_bad_arguments_are_usage_errors(tmp_path: Path, kwargs: dict) -> None:
    args = {"patients": 5, "seed": 1} | kwargs
    with pytest.raises(QisError) as info:
        generate_export(tmp_path / "bad", **args)
    assert int(info.value.exit_code) == 2


def test_cli_writes_export_and_help_works(tmp_path: Path) -> None:
    repo = Path(__file__).resolve().parents[2]
    out = tmp_path / "cli"
    proc = subprocess.run(
        [sys.executable, "-m", "qis_fhir", "synth", "--patients", "25", "--seed", "4", "--out", str(out),
         "--gzip", "--observations", "1000", "--site-profile", "rural"],
        cwd=repo, capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert "Observation" in proc.stdout
    assert (tmp_path / "cli.truth.json").is_file()
    assert sorted(p.name for p in out.iterdir())[0].endswith(".ndjson.gz")
    again = subprocess.run([sys.executable, "-m", "qis_fhir", "synth", "--patients", "25", "--seed", "4",
                            "--out", str(out)], cwd=repo, capture_output=True, text=True, timeout=120)
    assert again.returncode == 8 and "already holds" in again.stderr
    helped = subprocess.run([sys.executable, "-m", "qis_fhir", "synth", "--help"], cwd=repo,
                            capture_output=True, text=True, timeout=120)
    assert helped.returncode == 0 and "--site-profile" in helped.stdout
