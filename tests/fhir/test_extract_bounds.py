"""Bounds on the work and memory one input file can cost: decompression bombs built here, in
miniature, with the ratio of input to cap of the originals (a 58 KB gzip of 20 million ``{}``
Bundle entries took 2.5 GB and wrote a 2.67 GB quarantine; a 4.9 KB gzip of five million newlines
wrote 714 MB; 2 GiB of spaces in a 2 MB gzip took 686 MB). Memory is the peak RSS of a child
process, compared with a child extracting the same file without the bomb; the bound is a measured
figure (docs/extract.md, "Bounds") with generous headroom."""

from __future__ import annotations

import gzip
import json
import zlib

from extract_helpers import (
    BASE_OBSERVATION,
    assert_counts_add_up,
    extract,
    extract_in_child,
    label,
    peak_mib_without_the_bomb,
    resource,
    write_ndjson,
)

# measured: each bomb below adds 0-4 MiB of peak RSS to its file without the bomb; reading the bomb
# whole, as before, added 80-115 MiB (measured on the code before streaming)
MEMORY_HEADROOM_MIB = 25


def _gzip_stream(path, pieces) -> None:
    """Write a gzip file from byte pieces without holding the whole decompressed content."""
    z = zlib.compressobj(9, zlib.DEFLATED, 31)
    with open(path, "wb") as fh:
        for piece in pieces:
            fh.write(z.compress(piece))
        fh.write(z.flush())


def _quarantine_lines(out):
    return (out / "quarantine.ndjson").read_bytes().splitlines()


def test_bundle_of_a_million_empty_entries_is_capped_counted_and_flat_in_memory(tmp_path):
    """20 million entries against a cap of 200,000 is 100x: here 1,000,000 against 10,000."""
    entries, cap = 1_000_000, 10_000
    export = tmp_path / "e"
    export.mkdir()
    name = "bomb.json.gz"
    _gzip_stream(export / name, [b'{"resourceType":"Bundle","type":"collection","entry":[{}',
                                 *([b",{}" * 10_000] * ((entries - 1) // 10_000)), b",{}" * ((entries - 1) % 10_000), b"]}"])
    assert (export / name).stat().st_size < 10_000
    out = tmp_path / "out"
    summary, peak = extract_in_child(export, out, max_bundle_entries=cap)
    base = peak_mib_without_the_bomb(tmp_path, name, b'{"resourceType":"Bundle","type":"collection","entry":[{}]}',
                                     max_bundle_entries=cap)
    assert peak - base < MEMORY_HEADROOM_MIB, (peak, base)
    f = label(name)
    assert summary["by_file"][f] == {"read": entries, "accepted": 0, "quarantined": entries, "skipped": 0}
    assert summary["quarantine_reasons"] == {"not_an_object": cap, "too_many_entries": entries - cap}
    assert summary["caps_hit"] == {f: {"max_bundle_entries": entries - cap,
                                       "max_quarantine_lines": {"not_an_object": cap - 1000}}}
    records = [json.loads(x) for x in _quarantine_lines(out)]
    assert len(records) == 1001  # 1,000 entries without a resource, one record for the rest
    assert records[-1]["reason"] == "too_many_entries" and records[-1]["line"] == cap + 1
    assert records[-1]["lines"] == entries - cap
    assert (out / "quarantine.ndjson").stat().st_size < 1001 * 250
    assert summary["quarantine_written"] + cap - 1000 == summary["totals"]["quarantined"]
    assert_counts_add_up(summary)


def test_blank_lines_write_a_bounded_quarantine_and_are_all_counted(tmp_path):
    """Five million newlines in 4.9 KB of gzip wrote a 714 MB quarantine: 5,000 times the default
    record cap. Here 200,000 lines against a cap of 40."""
    n, cap = 200_000, 40
    export = tmp_path / "e"
    export.mkdir()
    (export / "Observation.000.ndjson.gz").write_bytes(gzip.compress(b"\n" * n, 9))
    (export / "Patient.ndjson.gz").write_bytes(gzip.compress(b" \t \n" * n, 9))  # whitespace runs too
    out = tmp_path / "out"
    summary, peak = extract_in_child(export, out, max_quarantine_lines=cap)
    base = peak_mib_without_the_bomb(tmp_path, "Observation.000.ndjson.gz", b"\n", max_quarantine_lines=cap)
    assert peak - base < MEMORY_HEADROOM_MIB, (peak, base)
    for name in ("Observation.000.ndjson.gz", "Patient.ndjson.gz"):
        assert summary["by_file"][name] == {"read": n, "accepted": 0, "quarantined": n, "skipped": 0}
        assert summary["caps_hit"][name] == {"max_quarantine_lines": {"blank_line": n - cap}}
    assert summary["quarantine_reasons"] == {"blank_line": 2 * n}
    assert len(_quarantine_lines(out)) == 2 * cap
    assert (out / "quarantine.ndjson").stat().st_size < 2 * cap * 250
    assert_counts_add_up(summary)


def test_spaces_inside_a_bundle_cost_no_memory_and_its_entries_are_read(tmp_path):
    """2 GiB of spaces took 686 MB (the file was read whole); here 64 MiB of spaces between two
    entries: the entries are extracted, and memory does not follow the spaces."""
    spaces = 64 << 20
    export = tmp_path / "e"
    export.mkdir()
    entry = json.dumps({"resource": BASE_OBSERVATION}).encode()
    head = b'{"resourceType":"Bundle","type":"collection","entry":['
    _gzip_stream(export / "b.json.gz", [head, entry, *([b" " * (1 << 20)] * (spaces >> 20)), b",", entry, b"]}"])
    assert (export / "b.json.gz").stat().st_size < 200_000
    summary, peak = extract_in_child(export, tmp_path / "out")
    base = peak_mib_without_the_bomb(tmp_path, "b.json.gz", head + entry + b"," + entry + b"]}")
    assert peak - base < MEMORY_HEADROOM_MIB, (peak, base)
    assert summary["by_file"][label("b.json.gz")] == {"read": 2, "accepted": 2, "quarantined": 0, "skipped": 0}
    assert summary["rows"]["observations"] == 2
    assert summary["caps_hit"] == {}


def test_a_json_file_is_read_no_further_than_max_json_bytes(tmp_path):
    export = tmp_path / "e"
    export.mkdir()
    _gzip_stream(export / "b.json.gz", [b'{"resourceType":"Bundle","entry":[', *([b" " * (1 << 20)] * 8), b"]}"])
    write_ndjson(export, "Observation.ndjson", [BASE_OBSERVATION])
    summary, records, tables = extract(export, tmp_path / "out", max_json_bytes=4 << 20)
    assert [(r["file"], r["line"], r["reason"]) for r in records] == [(label("b.json.gz"), 0, "line_too_long")]
    assert len(tables["observations"]) == 1
    assert_counts_add_up(summary)


def _bundle(n: int, **changes) -> bytes:
    return json.dumps({"resourceType": "Bundle", "type": "collection", "entry": [
        {"resource": resource(BASE_OBSERVATION, id=f"o{i}", **changes)} for i in range(1, n + 1)]}).encode()


def test_a_bundle_at_the_entry_cap_extracts_whole_and_one_over_is_counted(tmp_path):
    export = tmp_path / "e"
    export.mkdir()
    (export / "b.json").write_bytes(_bundle(50))
    summary, records, tables = extract(export, tmp_path / "out", max_bundle_entries=50)
    assert records == [] and len(tables["observations"]) == 50 and summary["caps_hit"] == {}
    summary, records, tables = extract(export, tmp_path / "out2", max_bundle_entries=49)
    assert [(r["line"], r["reason"]) for r in records] == [(50, "too_many_entries")]
    assert "lines" not in records[0]  # one record, one entry
    assert len(tables["observations"]) == 49
    assert summary["caps_hit"] == {label("b.json"): {"max_bundle_entries": 1}}
    assert summary["limits"]["max_bundle_entries"] == 49
    assert_counts_add_up(summary)


def test_a_bundle_entry_over_the_line_cap_is_quarantined_unbuilt_and_the_others_read(tmp_path):
    """Entry sizes are measured while scanning, to within ijson's 64 KiB reads: 300 KB over a 4 KiB cap."""
    big = resource(BASE_OBSERVATION, id="big", note=[{"text": "x" * 300_000}])
    doc = {"resourceType": "Bundle", "type": "collection", "entry": [
        {"resource": resource(BASE_OBSERVATION, id="a")}, {"resource": big}, {"resource": resource(BASE_OBSERVATION, id="b")},
        {"resource": "y" * 300_000}]}
    (tmp_path / "e").mkdir()
    (tmp_path / "e" / "b.json").write_text(json.dumps(doc))
    summary, records, tables = extract(tmp_path / "e", tmp_path / "out", max_line_bytes=4096)
    assert [(r["line"], r["reason"]) for r in records] == [(2, "line_too_long"), (4, "line_too_long")]
    assert sorted(tables["observations"]["source_line"]) == [1, 3]
    assert_counts_add_up(summary)


def test_a_single_resource_json_file_over_the_line_cap_is_not_parsed(tmp_path):
    (tmp_path / "e").mkdir()
    (tmp_path / "e" / "one.json").write_text(json.dumps(resource(BASE_OBSERVATION, note=[{"text": "x" * 10_000}])))
    summary, records, _ = extract(tmp_path / "e", tmp_path / "out", max_line_bytes=4096)
    assert [(r["line"], r["reason"]) for r in records] == [(1, "line_too_long")]
    assert_counts_add_up(summary)


def test_quarantine_records_are_capped_per_file_and_reason_and_every_line_counted(tmp_path):
    items = [b"{bad"] * 30 + [b"  "] * 5 + [BASE_OBSERVATION] * 3
    write_ndjson(tmp_path / "e", "Observation.ndjson", items)
    write_ndjson(tmp_path / "e", "Observation.001.ndjson", [b"{bad"] * 4)
    summary, records, tables = extract(tmp_path / "e", tmp_path / "out", max_quarantine_lines=10)
    written = {}
    for r in records:
        written[r["file"], r["reason"]] = written.get((r["file"], r["reason"]), 0) + 1
    assert written == {("Observation.ndjson", "invalid_json"): 10, ("Observation.ndjson", "blank_line"): 5,
                       ("Observation.001.ndjson", "invalid_json"): 4}
    assert summary["caps_hit"] == {"Observation.ndjson": {"max_quarantine_lines": {"invalid_json": 20}}}
    assert summary["quarantine_reasons"] == {"invalid_json": 34, "blank_line": 5}
    assert summary["quarantine_written"] == 19 and summary["limits"]["max_quarantine_lines"] == 10
    assert len(tables["observations"]) == 3
    assert_counts_add_up(summary)
