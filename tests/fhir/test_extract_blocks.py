"""The Arrow block path for bulk Observation files gives exactly the per-line path's outputs.

Each test extracts the same export twice, with ``block_path=True`` and ``block_path=False`` (the
per-line reader: the reference and the default), and compares the four tables, the summary (all but ``seconds``) and
the quarantine file byte for byte. Small block sizes make the block path split lines across reads.
"""

from __future__ import annotations

import json

import numpy as np
import pyarrow.parquet as pq
import pytest
from extract_helpers import BASE_OBSERVATION, BP_PANEL, SECRET, resource, write_ndjson
from test_extract_quarantine import BAD_OBSERVATION_LINES

from qis_fhir.fhir import extract_export
from qis_fhir.fhir import extract as extract_module
from qis_fhir.fhir.blocks import ObservationBlocks
from qis_fhir.fhir.schema import TABLES

OBS = BASE_OBSERVATION
UCUM = "http://unitsofmeasure.org"


def _outputs(export, out, **kwargs) -> tuple[dict, dict, bytes]:
    summary = extract_export(export, out, secret=SECRET, **kwargs).to_dict()
    summary.pop("seconds")
    tables = {name: pq.read_table(out / "extract" / f"{name}.parquet") for name in TABLES}
    return summary, tables, (out / "quarantine.ndjson").read_bytes()


@pytest.fixture
def decided(monkeypatch):
    """Rows the Arrow path decided itself, so a test can tell the block path was really taken."""
    counts = []
    original = ObservationBlocks.rows

    def counting(self, mask, cols):
        table = original(self, mask, cols)
        counts.append(table.num_rows)
        return table

    monkeypatch.setattr(ObservationBlocks, "rows", counting)
    return counts


def assert_same_outputs(export, tmp_path, **kwargs) -> tuple[dict, bytes]:
    block = _outputs(export, tmp_path / "block", block_path=True, **kwargs)
    line = _outputs(export, tmp_path / "line", block_path=False, **kwargs)
    assert block[0] == line[0]
    for name in TABLES:
        assert block[1][name].equals(line[1][name]), name
    # equals() holds -0.0 == 0.0: compare the stored bits of the values too
    bits = [t["observations"].column("value").to_numpy().view(np.int64) for t in (block[1], line[1])]
    assert np.array_equal(*bits)
    assert block[2] == line[2]
    return block[0], block[2]


def test_synthea_fixture_gives_identical_outputs(fixtures_dir, tmp_path, decided):
    summary, quarantine = assert_same_outputs(fixtures_dir / "synthea-r4-105", tmp_path, validate="sample")
    assert summary["quarantine_reasons"] == {"missing_unit": 64, "unknown_unit": 30}
    assert sum(decided) > 10_000  # most Synthea Observations are decided by Arrow alone


@pytest.mark.parametrize("block_bytes", [8 << 20, 4096])
def test_synthetic_export_gives_identical_outputs(tmp_path, decided, monkeypatch, block_bytes):
    from qis_fhir.synth import generate_export

    monkeypatch.setattr(extract_module, "BLOCK_BYTES", block_bytes)
    export = tmp_path / "export"
    generate_export(export, patients=30, seed=7, observations=4_000, truth_path=tmp_path / "truth.json",
                    encounters=False)
    summary, _ = assert_same_outputs(export, tmp_path, validate="sample", sample_rate=0.05)
    assert summary["validated"] > 0
    assert sum(decided) > 3_000


def _readable_lines() -> list[bytes | dict]:
    """Lines Arrow reads without refusing the block, but which only the per-line path can decide:
    Arrow and orjson read them differently, or they are not of the common shape."""
    ok = json.dumps(OBS).encode()
    return [
        ok.replace(b'"final"', b'"final", "note": NaN'),  # invalid JSON for orjson, not for Arrow
        ok.replace(b'"final"', b'"final", "note": -Infinity'),
        ok.replace(b'"final"', b'"final", "deep": ' + b"[" * 1100 + b"]" * 1100),  # over orjson's depth limit
        ok.replace(b'"Cholesterol"', '"Cholest\u00e9rol"'.encode()),  # non-ASCII, valid UTF-8
        ok.replace(b'"Cholesterol"', b'"Cholesterol\\ud83d\\ude00"'),  # an escaped surrogate pair
        ok.replace(b'"code": "mg/dL"}', b'"code": "mg/dL", "comparator": null}'),
        ok.replace(b'"code": "mg/dL"}', b'"code": "mg/dL", "comparator": "<"}'),
        ok.replace(b"190.5", b"-0"),
        ok.replace(b"190.5", b"0"),
        ok.replace(b"190.5", b"190"),
        ok.replace(b"190.5", b"9007199254740993"),
        resource(OBS, effectiveDateTime="2020-01-02T03:04:05.1234567+00:00"),
        resource(OBS, effectiveDateTime="2020-01-02 03:04:05Z"),
        resource(OBS, effectiveDateTime="0000-01-02T03:04:05Z"),
        resource(OBS, effectiveDateTime="2020-01-02T03:04:05-00:00"),
        resource(OBS, effectiveDateTime="2020-01-02T03:04:05+0100"),
        resource(OBS, effectiveDateTime="2020-01-02T03:04:05.123Z"),
        resource(OBS, effectiveDateTime="2020-01-02T03:04:05.123456-05:30"),
        resource(OBS, effectiveDateTime="2020-01-02"),
        resource(OBS, effectiveDateTime="last tuesday"),
        resource(OBS, effectiveDateTime=None, effectivePeriod={"start": "2020-01-02T03:04:05Z"}),
        resource(OBS, effectiveDateTime=None),
        resource(OBS, id="x" * 65),
        resource(OBS, id="a/b"),
        resource(OBS, id=None),
        resource(OBS, subject={"reference": "Patient/1/_history/2"}),
        resource(OBS, subject={"reference": "https://server/fhir/Patient/7"}),
        resource(OBS, subject={"reference": "Patient/"}),
        resource(OBS, subject={"reference": "Group/1"}),
        resource(OBS, subject=None),
        resource(OBS, code={"coding": [{"system": "http://snomed.info/sct", "code": "1"},
                                       {"system": "http://loinc.org", "code": "2093-3"}]}),
        resource(OBS, code={"coding": [{"system": "", "code": "2093-3"}]}),
        resource(OBS, code={"coding": []}),
        resource(OBS, code={"coding": [None]}),
        resource(OBS, code={"text": "x"}),
        resource(OBS, status=""),
        resource(OBS, status=None),
        resource(OBS, valueQuantity={"value": 5.5, "unit": "mg/dL"}),  # not UCUM: the unit field decides
        resource(OBS, valueQuantity={"value": 5.5, "system": UCUM, "code": "(score)"}),
        resource(OBS, valueQuantity={"value": 5.5, "system": UCUM}),
        resource(OBS, valueQuantity={"system": UCUM, "code": "mg/dL"}),
        resource(OBS, valueQuantity=None),
        resource(OBS, valueQuantity=None, valueString="positive"),
        resource(OBS, component=None, valueQuantity={"value": 1.5, "system": UCUM, "code": "mg/dL"}),
        BP_PANEL,
        resource(BP_PANEL, component=[{"code": {"coding": [{"system": "http://loinc.org", "code": "8462-4"}]},
                                       "valueQuantity": {"value": 80, "system": UCUM}}] + BP_PANEL["component"]),
        resource(OBS, resourceType="Condition"),
        resource(OBS, resourceType=None),
        b"{}",
    ]


def _refusing_lines() -> list[bytes | dict]:
    """Lines that make Arrow refuse the whole block (every line of it then goes the per-line way)."""
    ok = json.dumps(OBS).encode()
    return [
        ok + b" " + ok,  # two objects on one line
        "\ufeff".encode() + ok,  # a byte-order mark
        ok.replace(b"190.5", b"1e400"),
        ok.replace(b'"id": "obs-1"', b'"id": "obs-1", "id": "obs-2"'),  # a duplicate key
        ok.replace(b'"status": "final"', b'"status": 5'),  # another JSON type than the column's
        ok + b"\r",  # CRLF
        resource(OBS, effectiveDateTime="2020-02-30T03:04:05+00:00"),  # not a calendar date
        b"",
        b"  ",
        b"[]",
    ]


def _mixed_export(tmp_path, bad_lines) -> tuple:
    items: list[bytes | dict] = []
    n = 0
    for bad in bad_lines:
        for _ in range(3):
            n += 1
            items.append(resource(OBS, id=f"ok-{n}", valueQuantity=dict(OBS["valueQuantity"], value=n + 0.25)))
        items.append(bad)
    export = tmp_path / "export"
    path = write_ndjson(export, "Observation.000.ndjson", items)
    path.write_bytes(path.read_bytes() + json.dumps(resource(OBS, id="last")).encode())  # no final newline
    return export, len(items) + 1


def test_lines_only_the_per_line_path_decides_give_identical_outputs(tmp_path, decided):
    export, lines = _mixed_export(tmp_path, _readable_lines())
    summary, quarantine = assert_same_outputs(export, tmp_path, validate="sample", sample_rate=0.3,
                                              max_line_bytes=4000)
    assert summary["totals"]["read"] == lines
    assert summary["quarantine_reasons"]["invalid_json"] == 3  # NaN, -Infinity, nesting over 1024
    assert summary["accepted_without_rows"] == {"Observation": 2}
    assert sum(decided) >= 3 * len(_readable_lines())  # the good lines between them: decided by Arrow
    assert quarantine.count(b"\n") == summary["totals"]["quarantined"]


@pytest.mark.parametrize("block_bytes", [8 << 20, 700, 3000])
def test_malformed_lines_mixed_into_good_ones_give_identical_outputs(tmp_path, monkeypatch, decided, block_bytes):
    monkeypatch.setattr(extract_module, "BLOCK_BYTES", block_bytes)
    bad = [*BAD_OBSERVATION_LINES.values(), *_refusing_lines(), *_readable_lines()]
    export, lines = _mixed_export(tmp_path, bad)
    summary, quarantine = assert_same_outputs(export, tmp_path, validate="sample", sample_rate=0.3,
                                              max_line_bytes=4000)
    assert summary["totals"]["read"] == lines
    assert quarantine.count(b"\n") == summary["totals"]["quarantined"]
    if block_bytes < 4096:  # small blocks: Arrow still reads the blocks without a refusing line
        assert sum(decided) > 0


def test_line_longer_than_a_block_is_quarantined_unread(tmp_path, monkeypatch):
    monkeypatch.setattr(extract_module, "BLOCK_BYTES", 1024)
    long_line = resource(OBS, id="long", note="y" * 5000)
    items = [resource(OBS, id="a"), long_line, resource(OBS, id="b"), long_line]
    export = tmp_path / "export"
    path = write_ndjson(export, "Observation.000.ndjson", items)
    path.write_bytes(path.read_bytes()[:-1])  # the last long line has no newline
    summary, quarantine = assert_same_outputs(export, tmp_path, max_line_bytes=2000)
    assert summary["quarantine_reasons"] == {"line_too_long": 2}
    assert [json.loads(x)["line"] for x in quarantine.splitlines()] == [2, 4]


def test_blocks_are_freed_when_lines_of_them_were_rejected(tmp_path, monkeypatch):
    """The collector is paused during extraction; a rejected line's traceback cycle must not keep its
    block alive (it did: 2 million Observations peaked at 2.1 GiB)."""
    import gc

    monkeypatch.setattr(extract_module, "BLOCK_BYTES", 2048)
    # a panel with one component dropped: observation_checked keeps the Reject, a cycle with its frame
    bad = resource(BP_PANEL, component=[{"code": {"coding": [{"system": "http://loinc.org", "code": "8462-4"}]},
                                         "valueQuantity": {"value": 80, "system": UCUM}}] + BP_PANEL["component"])
    items = [resource(OBS, id=f"ok-{i}") if i % 3 else bad for i in range(60)]
    write_ndjson(tmp_path / "export", "Observation.000.ndjson", items)
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        gc.collect()
        summary = extract_export(tmp_path / "export", tmp_path / "out", secret=SECRET, validate="off",
                                 block_path=True)
        gc.set_debug(gc.DEBUG_SAVEALL)
        gc.collect()
        frames = [o for o in gc.garbage if type(o).__name__ == "frame" and o.f_code.co_name == "_block"]
    finally:
        gc.set_debug(0)
        gc.garbage.clear()
        if was_enabled:
            gc.enable()
    assert summary.dropped_components == {"missing_unit": 20}
    assert frames == []


_VALUES = {
    "id": ["obs-a", "x" * 64, "x" * 65, "a/b", "", None, 5, "\u00e9t\u00e9"],
    "subject": [{"reference": "Patient/p1"}, {"reference": "Patient/p2"}, {"reference": "Patient/"},
                {"reference": "Patient/a/b"}, {"reference": "Group/1"}, {"display": "x"}, None, "Patient/p1"],
    "code": [OBS["code"], {"coding": []}, {"coding": [{"system": "http://loinc.org"}]}, None,
             {"coding": [{"system": "s", "code": "c"}, {"system": "http://loinc.org", "code": "1-8"}]}],
    "status": ["final", "", None, 7, "amended"],
    "effectiveDateTime": ["2020-01-02T03:04:05+00:00", "2020-01-02T03:04:05Z", "2020-01-02T03:04:05.5Z",
                          "2020-01-02T03:04:05.123-04:00", "2020-13-02T03:04:05Z", "2020", "2020-01-02", None, 5,
                          "2020-01-02T03:04:05"],
    "value": [1.5, 0, -0.0, 7, 2**60, 1e300, "5", None, True, float("nan")],
    "unit": ["mg/dL", "mm[Hg]", "(score)", None, 5],
    "unit_system": [UCUM, "http://example.org", None],
    "component": [None, BP_PANEL["component"], [], [{"code": OBS["code"]}]],
}


@pytest.mark.parametrize("seed", range(8))
def test_random_field_values_give_identical_outputs(tmp_path, monkeypatch, decided, seed):
    """Observations with fields drawn from valid, odd and wrong values: whatever the mix, both readers
    agree. Blocks of a few lines, so that Arrow reads the blocks free of values it refuses."""
    import random

    monkeypatch.setattr(extract_module, "BLOCK_BYTES", 1500)
    rng = random.Random(seed)
    items = []
    for i in range(60):
        obs = resource(OBS, id=f"obs-{i}")
        for field in rng.sample(sorted(_VALUES), k=rng.randint(0, 3)):
            choice = rng.choice(_VALUES[field])
            if field in ("value", "unit", "unit_system"):
                vq = dict(obs["valueQuantity"])
                key = {"value": "value", "unit": "code", "unit_system": "system"}[field]
                vq[key] = choice
                obs["valueQuantity"] = vq
            elif choice is None:
                obs.pop(field, None)
            else:
                obs[field] = choice
        items.append(json.dumps(obs).encode())  # json.dumps writes NaN for float("nan"): invalid JSON
    write_ndjson(tmp_path / "export", "Observation.000.ndjson", items)
    summary, _ = assert_same_outputs(tmp_path / "export", tmp_path, validate="sample", sample_rate=0.2)
    assert summary["totals"]["read"] == 60
    assert sum(decided) > 0
