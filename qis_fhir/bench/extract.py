"""Bench section ``extract``: extraction throughput and memory, side by side with its baselines.

On one synthetic export of ``options.observations`` Observations (default 200,000), or on the Observation
lines of a real export (``--export DIR``, repeated up to that many), in one run:

- ``qis_per_s``: Observation lines per CPU second of ``extract_export`` with the default
  ``--validate sample`` (default rate, 0.2 %). ``qis_off_per_s``: the same with ``--validate off``.
- ``orjson_per_s``: the same files read line by line and parsed with ``orjson.loads`` (parse only).
- ``pydantic_per_s``: ``fhir.resources`` R4B ``Observation.model_validate_json`` on an evenly spread
  sample of the same lines (``pydantic_sample`` lines), extrapolated to a rate.
- ``parts_us_per_line``: CPU µs per line, side by side, of ``orjson.loads``, of the fast path's own
  parse (msgspec into its typed structs, ``fhir/fastpath.py``) and of the sampled model validation;
  ``fast_parse_vs_orjson`` is the second over the first: what the fast path's parse costs in orjson
  parses, the rest of the extraction being field checks, keys, dates, Arrow and Parquet.
- ``peak_rss_mib``: peak RSS of a separate child that extracts the whole export once (``--validate
  sample``), so the memory figure is the extraction's alone at the export's full size; its CPU rate
  is ``qis_whole_export_per_s`` (timed alone, so not comparable to the others: see below).

The CPU speed of these shared VMs drifts by up to 2x within seconds, so contenders timed one after
another gave ratios that swung by as much. All contenders are therefore timed in ONE child process,
interleaved: the export is written as about-equal part files (slices); each slice goes through every
contender back to back (orjson, extraction sample, extraction off, pydantic, the two parses), in forward order
on even slices and reverse order on odd ones, over enough rounds to time at least ``MIN_TIMED_SLICES``
slices; rates are sums of lines over sums of CPU time, and ratios come from those. Each slice's
extraction is a full ``extract_export`` of a folder holding just that part file, so it pays the fixed
per-call cost once per slice; that cost and its share of the extraction time are reported under
``interleaved`` (``extract_call_overhead_ms``, ``extract_overhead_share``, ~1 % at the default size).

Rates use CPU time (``time.process_time``), not wall time: these machines are shared, and CPU time is
what other processes' load does not inflate. Module imports, pyarrow's one-off lazy pandas import,
the first ``model_validate_json`` (reported as ``validation_warmup_s``, from the whole-export child)
and one extraction happen before any clock starts. Targets: at least 0.5x the orjson rate,
at least 15x the pydantic rate, peak RSS under 1 GiB for 2 million Observations.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import click

from qis_fhir.fhir.validation import DEFAULT_SAMPLE_RATE as SAMPLE_RATE

DEFAULT_OBSERVATIONS = 200_000
PYDANTIC_SAMPLE = 2_000  # lines validated per round, spread evenly over every slice...
PYDANTIC_MIN_STEP = 25  # ...but never more than 1 line in 25, so pydantic never dominates a small run
# The export is cut into about-equal part files of at most SLICE_LINES lines, each one interleaved
# slice. One extract_export call costs a fixed ~4 ms (Parquet writers, summary) that a real run pays
# once per export and the bench once per slice: at 40,000 lines (~0.3 s of extraction) that is about
# 1 %, reported as ``interleaved.extract_overhead_share`` (not subtracted: the rates are slightly
# pessimistic). Small exports get at least MIN_SLICES slices (and a larger share).
SLICE_LINES = 40_000
MIN_SLICES = 4
MIN_TIMED_SLICES = 10  # rounds over all slices until at least this many slices were timed
TARGET_VS_ORJSON = 0.5
TARGET_VS_PYDANTIC = 15.0
TARGET_RSS_MIB_AT_2M = 1024
_SECRET = b"bench-secret-not-for-real-use-32b"


def _child() -> None:
    """Run one extraction and print its CPU seconds, wall seconds, summary totals and peak RSS (JSON)."""
    import resource

    args = json.loads(sys.argv[1])
    import pyarrow as pa
    from fhir.resources.R4B.observation import Observation

    from qis_fhir.fhir import extract_export

    pa.array(["warm-up"])  # pyarrow imports pandas on its first conversion: a one-off, not throughput
    # The first model_validate_json builds the model's validators (~1 s): start-up, not throughput.
    # Validate one real line of the export before the clock starts and report that cost on its own.
    with open(_observation_files(Path(args["export"]))[0], "rb") as fh:
        line = fh.readline()
    warm0 = time.process_time()
    Observation.model_validate_json(line)
    warmup_s = time.process_time() - warm0
    cpu0, wall0 = time.process_time(), time.perf_counter()
    summary = extract_export(
        args["export"], args["out"], secret=_SECRET, validate=args["validate"]
    )
    cpu, wall = time.process_time() - cpu0, time.perf_counter() - wall0
    rss_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    print(json.dumps({"cpu_s": cpu, "wall_s": wall, "totals": summary.totals, "rows": summary.rows,
                      "validated": summary.validated, "peak_rss_mib": rss_kib / 1024,
                      "validation_warmup_s": warmup_s}))


def _in_child(function: str, args: dict) -> dict:
    """Run ``function`` of this module in a fresh interpreter with ``args``; its last stdout line (JSON)."""
    code = f"from qis_fhir.bench.extract import {function}; {function}()"
    proc = subprocess.run([sys.executable, "-c", code, json.dumps(args)], capture_output=True, text=True, timeout=3600)
    if proc.returncode != 0:
        raise RuntimeError(f"extract bench child {function} failed: {proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _observation_files(export: Path) -> list[Path]:
    return sorted(p for p in export.iterdir() if p.name.startswith("Observation.") and p.name.endswith(".ndjson"))


CONTENDERS = ("orjson", "qis", "qis_off", "pydantic", "parses")


def _interleaved_child() -> None:
    """Time every contender slice by slice, interleaved, in this one process; print the sums (JSON).

    The machine's CPU speed drifts by up to 2x within seconds, so contenders timed one after another
    get different machines and their ratios swing. Here each slice (one part file of the export) is
    run through all contenders back to back, in forward order on even slices and reverse order on odd
    ones, so a drift within a slice hits every contender about equally; rates come from CPU-time sums
    over all slices and rounds.
    """
    import shutil

    import msgspec
    import orjson
    import pyarrow as pa
    from fhir.resources.R4B.observation import Observation

    from qis_fhir.fhir import extract_export
    from qis_fhir.fhir.fastpath import observation_decoder

    args = json.loads(sys.argv[1])
    slices = [Path(s) for s in args["slices"]]
    scratch = Path(args["scratch"])
    step = int(args["pydantic_step"])
    clock = time.process_time
    loads = orjson.loads
    fast_decode = observation_decoder().decode
    DecodeError = msgspec.DecodeError

    # Warm-up (not throughput): pyarrow's lazy pandas import, the model's validators, one extraction.
    pa.array(["warm-up"])
    one_line = Path(args["one_line"])
    Observation.model_validate_json(next(one_line.iterdir()).read_bytes())
    calls = 0

    def extract(folder: Path, validate: str):
        nonlocal calls
        calls += 1
        out = scratch / f"out-{calls}"
        cpu0 = clock()
        summary = extract_export(folder, out, secret=_SECRET, validate=validate)
        cpu = clock() - cpu0
        shutil.rmtree(out)
        return cpu, summary

    extract(one_line, "sample")
    # Fixed cost of one extract_export call (Parquet writers, summary), paid once per slice here but
    # once per export in real use: measured on a one-line folder, median of five.
    overhead = sorted(extract(one_line, "sample")[0] for _ in range(5))[2]

    cpu = dict.fromkeys(CONTENDERS, 0.0)
    lines_done = dict.fromkeys(CONTENDERS, 0)
    part_cpu = {"orjson_us": 0.0, "msgspec_us": 0.0}
    validated = {"qis": 0, "qis_off": 0}
    n_slice = 0
    for _ in range(int(args["rounds"])):
        for folder in slices:
            path = next(folder.iterdir())
            lines = path.read_bytes().splitlines()
            sample = lines[::step]

            def run_orjson() -> None:
                n = 0
                cpu0 = clock()
                with open(path, "rb", buffering=1 << 20) as fh:
                    for line in fh:
                        loads(line)
                        n += 1
                cpu["orjson"] += clock() - cpu0
                lines_done["orjson"] += n

            def run_qis(name: str, validate: str) -> None:
                spent, summary = extract(folder, validate)
                if summary.totals["read"] != len(lines):
                    raise RuntimeError(f"extraction read {summary.totals['read']} lines of {path}, it holds {len(lines)}")
                cpu[name] += spent
                lines_done[name] += len(lines)
                validated[name] += summary.validated

            def run_pydantic() -> None:
                validate = Observation.model_validate_json
                cpu0 = clock()
                for line in sample:
                    try:
                        validate(line)
                    except ValueError:  # pydantic's ValidationError: a real export's invalid line
                        pass
                cpu["pydantic"] += clock() - cpu0
                lines_done["pydantic"] += len(sample)

            def run_parses() -> None:
                # The two parses side by side, on the slice's lines in memory.
                cpu0 = clock()
                for x in lines:
                    loads(x)
                cpu1 = clock()
                for x in lines:
                    try:
                        fast_decode(x)
                    except (DecodeError, RecursionError):
                        pass  # declined by the fast path: parsed again by orjson, counted in the extraction
                cpu2 = clock()
                part_cpu["orjson_us"] += cpu1 - cpu0
                part_cpu["msgspec_us"] += cpu2 - cpu1
                cpu["parses"] += cpu2 - cpu0
                lines_done["parses"] += len(lines)

            runs = [run_orjson, lambda: run_qis("qis", "sample"), lambda: run_qis("qis_off", "off"),
                    run_pydantic, run_parses]
            for fn in (runs if n_slice % 2 == 0 else runs[::-1]):
                fn()
            n_slice += 1
    print(json.dumps({"cpu_s": cpu, "lines": lines_done, "validated": validated, "slices": n_slice,
                      "extract_calls_timed": 2 * n_slice, "call_overhead_s": overhead,
                      "parts_us_per_line": {k: v / lines_done["parses"] * 1e6 for k, v in part_cpu.items()}}))


def _repeat_observations(source: Path, export: Path, target: int, per_file: int) -> None:
    """Write ``source``'s Observation lines, repeated in order until ``target``, as part files of at
    most ``per_file`` lines: the bench on a real export's shapes (panels, codings, non-ASCII text).
    Repeats are kinder to the date and patient-key caches than a real export of that size would be."""
    import secrets

    from qis_fhir.fhir.sources import Labeller, discover, line_blocks

    sources, _ = discover(source, Labeller(secrets.token_bytes(32)))  # labels are not used here
    lines = [
        line
        for src in sources
        if src.resource_type == "Observation"
        for block in line_blocks(src, 1 << 20)
        for line in block
        if line
    ]
    if not lines:
        raise click.UsageError(f"{source} has no Observation NDJSON files to time")
    export.mkdir(parents=True)
    written = part = 0
    while written < target:
        n = min(per_file, target - written)
        with open(export / f"Observation.{part:03d}.ndjson", "wb") as fh:
            for i in range(written, written + n):
                fh.write(lines[i % len(lines)] + b"\n")
        written += n
        part += 1


def run(options) -> dict:
    """Generate the export, time the contenders interleaved on its slices, measure peak RSS; return the figures."""
    from qis_fhir.synth import generate_export

    target = options.observations or DEFAULT_OBSERVATIONS
    n_slices = max(MIN_SLICES, math.ceil(target / SLICE_LINES))
    per_file = math.ceil(target * 1.01 / n_slices)  # 1 % slack: the generator writes about ``target`` lines
    with tempfile.TemporaryDirectory(prefix="qis-bench-extract-") as tmp:
        tmp_path = Path(tmp)
        export = tmp_path / "export"
        t0 = time.perf_counter()
        if options.export is not None:
            _repeat_observations(options.export, export, target, per_file)
        else:
            generate_export(export, patients=max(50, target // 400), seed=options.seed, observations=target,
                            truth_path=tmp_path / "truth.json", encounters=False, max_lines_per_file=per_file)
        synth_s = time.perf_counter() - t0
        files = _observation_files(export)
        only_obs = tmp_path / "observations"  # the Observation files alone: rates are per Observation line
        only_obs.mkdir()
        slices = []
        for i, path in enumerate(files):
            os.link(path, only_obs / path.name)
            folder = tmp_path / "slices" / f"{i:03d}"  # one part file per folder: one extract_export per slice
            folder.mkdir(parents=True)
            os.link(path, folder / path.name)
            slices.append(folder)
        one_line = tmp_path / "one-line"
        one_line.mkdir()
        with open(files[0], "rb") as fh:
            (one_line / files[0].name).write_bytes(fh.readline())
        size = sum(p.stat().st_size for p in files)
        observations = sum(1 for path in files for _ in open(path, "rb"))
        scratch = tmp_path / "scratch"
        scratch.mkdir()
        step = max(PYDANTIC_MIN_STEP, observations // PYDANTIC_SAMPLE)
        rounds = math.ceil(MIN_TIMED_SLICES / len(slices))
        inter = _in_child("_interleaved_child", {"slices": [str(s) for s in slices], "one_line": str(one_line),
                                                 "scratch": str(scratch), "rounds": rounds, "pydantic_step": step})
        whole = _in_child("_child", {"export": str(only_obs), "out": str(tmp_path / "out-whole"), "validate": "sample"})
    read = whole["totals"]["read"]
    if read != observations:
        raise RuntimeError(f"extraction read {read} lines, the files hold {observations}")
    cpu, lines = inter["cpu_s"], inter["lines"]
    rate = {name: lines[name] / cpu[name] for name in ("orjson", "qis", "qis_off", "pydantic")}
    overhead_share = inter["extract_calls_timed"] * inter["call_overhead_s"] / (cpu["qis"] + cpu["qis_off"])
    parts = inter["parts_us_per_line"]
    # the sampled validation's cost per line at the default rate, at pydantic's measured rate
    validation_us = SAMPLE_RATE * 1e6 / rate["pydantic"]
    return {
        "observations": observations,
        "bytes_per_line": round(size / observations),
        "qis_per_s": round(rate["qis"]),
        "qis_off_per_s": round(rate["qis_off"]),
        "qis_whole_export_per_s": round(observations / whole["cpu_s"]),
        "qis_wall_s": round(whole["wall_s"], 2),
        "orjson_per_s": round(rate["orjson"]),
        "pydantic_per_s": round(rate["pydantic"]),
        "pydantic_sample": lines["pydantic"],
        "validated": whole["validated"],
        "rows_observations": whole["rows"]["observations"],
        "quarantined": whole["totals"]["quarantined"],
        "qis_vs_orjson": round(rate["qis"] / rate["orjson"], 3),
        "qis_off_vs_orjson": round(rate["qis_off"] / rate["orjson"], 3),
        "qis_vs_pydantic": round(rate["qis"] / rate["pydantic"], 1),
        "peak_rss_mib": round(whole["peak_rss_mib"], 1),
        "validation_warmup_s": round(whole["validation_warmup_s"], 3),
        "synth_s": round(synth_s, 1),
        "parts_us_per_line": {k: round(v, 3) for k, v in parts.items()} | {
            "validation_sampled_us": round(validation_us, 3)},
        "fast_parse_vs_orjson": round(parts["msgspec_us"] / parts["orjson_us"], 3),
        "interleaved": {"slices": inter["slices"], "rounds": rounds, "lines_per_slice": per_file,
                        "extract_call_overhead_ms": round(inter["call_overhead_s"] * 1e3, 2),
                        "extract_overhead_share": round(overhead_share, 4),
                        "lines_timed": {k: lines[k] for k in ("orjson", "qis", "qis_off", "pydantic")}},
        "clock": "cpu",
        "targets": {"vs_orjson": TARGET_VS_ORJSON, "vs_pydantic": TARGET_VS_PYDANTIC,
                    "peak_rss_mib_at_2m": TARGET_RSS_MIB_AT_2M},
    }
