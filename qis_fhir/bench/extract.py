"""Bench section ``extract``: extraction throughput and memory, side by side with its baselines.

On one synthetic export of ``options.observations`` Observations (default 200,000), in one run:

- ``qis_per_s``: Observation lines per CPU second of ``extract_export`` with the default
  ``--validate sample`` (default rate, 0.2 %), measured in a child process so its peak RSS (``peak_rss_mib``) is the
  extraction's alone, not this process's test data. ``qis_off_per_s``: the same with ``--validate off``.
- ``orjson_per_s``: the same files read line by line and parsed with ``orjson.loads`` (parse only).
- ``pydantic_per_s``: ``fhir.resources`` R4B ``Observation.model_validate_json`` on an evenly spread
  sample of the same lines (``pydantic_sample`` lines), extrapolated to a rate.
- ``floors_us_per_line``: CPU µs per line of the steps no extraction under the contract can skip
  (orjson parse, own HMAC key, sample CRC, sampled validation), and the ceilings they put on the ratio
  to orjson with everything else free (``bound_vs_orjson_sample``, ``bound_vs_orjson_off``).

Rates use CPU time (``time.process_time`` / the child's rusage), not wall time: these machines are
shared, and CPU time is what the other helpers' load does not inflate. Module imports, pyarrow's
one-off lazy pandas import and the first ``model_validate_json`` (which builds the model's validators,
~1 s; reported as ``validation_warmup_s``) happen before the child's clock starts. Targets (issue 2): at least 0.5x
the orjson rate, at least 15x the pydantic rate, peak RSS under 1 GiB for 2 million Observations.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from qis_fhir.fhir.validation import DEFAULT_SAMPLE_RATE as SAMPLE_RATE

DEFAULT_OBSERVATIONS = 200_000
PYDANTIC_SAMPLE = 2_000
TARGET_VS_ORJSON = 0.5
TARGET_VS_PYDANTIC = 15.0
TARGET_RSS_MIB_AT_2M = 1024


def _child() -> None:
    """Run one extraction and print its CPU seconds, wall seconds, summary totals and peak RSS (JSON)."""
    import resource

    args = json.loads(sys.argv[1])
    import pyarrow as pa

    from qis_fhir.fhir import extract_export

    from fhir.resources.R4B.observation import Observation

    pa.array(["warm-up"])  # pyarrow imports pandas on its first conversion: a one-off, not throughput
    # The first model_validate_json builds the model's validators (~1 s): start-up, not throughput.
    # Validate one real line of the export before the clock starts and report that cost on its own.
    first = next(p for p in sorted(Path(args["export"]).iterdir()) if p.name.startswith("Observation."))
    with open(first, "rb") as fh:
        line = fh.readline()
    warm0 = time.process_time()
    Observation.model_validate_json(line)
    warmup_s = time.process_time() - warm0
    cpu0, wall0 = time.process_time(), time.perf_counter()
    summary = extract_export(
        args["export"], args["out"], secret=b"bench-secret-not-for-real-use-32b", validate=args["validate"]
    )
    cpu, wall = time.process_time() - cpu0, time.perf_counter() - wall0
    rss_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    print(json.dumps({"cpu_s": cpu, "wall_s": wall, "totals": summary.totals, "rows": summary.rows,
                      "validated": summary.validated, "peak_rss_mib": rss_kib / 1024,
                      "validation_warmup_s": warmup_s}))


def _extract_in_child(export: Path, out: Path, validate: str) -> dict:
    code = "from qis_fhir.bench.extract import _child; _child()"
    args = json.dumps({"export": str(export), "out": str(out), "validate": validate})
    proc = subprocess.run([sys.executable, "-c", code, args], capture_output=True, text=True, timeout=3600)
    if proc.returncode != 0:
        raise RuntimeError(f"extract bench child failed: {proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _observation_files(export: Path) -> list[Path]:
    return sorted(p for p in export.iterdir() if p.name.startswith("Observation.") and p.name.endswith(".ndjson"))


def _orjson_rate(files: list[Path]) -> tuple[int, float]:
    import orjson

    loads = orjson.loads
    n = 0
    cpu0 = time.process_time()
    for path in files:
        with open(path, "rb", buffering=1 << 20) as fh:
            for line in fh:
                loads(line)
                n += 1
    return n, n / (time.process_time() - cpu0)


def _pydantic_rate(files: list[Path], total: int, sample: int) -> tuple[int, float]:
    from fhir.resources.R4B.observation import Observation

    step = max(1, total // sample)
    lines: list[bytes] = []
    i = 0
    for path in files:
        with open(path, "rb") as fh:
            for line in fh:
                if i % step == 0 and len(lines) < sample:
                    lines.append(line)
                i += 1
    Observation.model_validate_json(lines[0])  # build the model's validators before timing
    cpu0 = time.process_time()
    for line in lines:
        Observation.model_validate_json(line)
    return len(lines), len(lines) / (time.process_time() - cpu0)


def _floors(files: list[Path], lines_wanted: int = 50_000) -> dict:
    """CPU µs per line of the steps no Observation extraction can skip, on the first lines of the
    export: the fastest JSON parse (orjson), the row's own HMAC key (the contract), and the CRC-32
    that picks the validation sample. Measured in this process, next to each other, so their ratios
    hold under the same load."""
    import zlib

    import orjson

    from qis_fhir.fhir.keys import OwnKeys

    lines: list[bytes] = []
    for path in files:
        with open(path, "rb") as fh:
            for line in fh:
                lines.append(line)
                if len(lines) == lines_wanted:
                    break
        if len(lines) == lines_wanted:
            break
    n = len(lines)
    ids = [orjson.loads(line)["id"] for line in lines]
    key = OwnKeys(b"bench-secret-not-for-real-use-32b").for_type("Observation")
    crc = zlib.crc32
    loads = orjson.loads

    def per_line(fn) -> float:
        best = float("inf")
        for _ in range(3):  # best of three: the machine is shared
            cpu0 = time.process_time()
            fn()
            best = min(best, time.process_time() - cpu0)
        return best / n * 1e6

    def parse_all() -> None:
        for x in lines:
            loads(x)

    def key_all() -> None:
        for i in ids:
            key(i)

    def crc_all() -> None:
        for x in lines:
            crc(x)

    return {
        "orjson_us": per_line(parse_all),
        "hmac_key_us": per_line(key_all),
        "sample_crc_us": per_line(crc_all),
    }


def run(options) -> dict:
    """Generate the export, time the three contenders on it, measure peak RSS; return the figures."""
    from qis_fhir.synth import generate_export

    target = options.observations or DEFAULT_OBSERVATIONS
    with tempfile.TemporaryDirectory(prefix="qis-bench-extract-") as tmp:
        tmp_path = Path(tmp)
        export = tmp_path / "export"
        t0 = time.perf_counter()
        generate_export(export, patients=max(50, target // 400), seed=options.seed, observations=target,
                        truth_path=tmp_path / "truth.json", encounters=False)
        synth_s = time.perf_counter() - t0
        files = _observation_files(export)
        only_obs = tmp_path / "observations"  # the Observation files alone: rates are per Observation line
        only_obs.mkdir()
        for path in files:
            os.link(path, only_obs / path.name)
        size = sum(p.stat().st_size for p in files)
        observations, orjson_per_s = _orjson_rate(files)
        sampled = _extract_in_child(only_obs, tmp_path / "out-sample", "sample")
        off = _extract_in_child(only_obs, tmp_path / "out-off", "off")
        pyd_n, pydantic_per_s = _pydantic_rate(files, observations, PYDANTIC_SAMPLE)
        floors = _floors(files)
    read = sampled["totals"]["read"]
    if read != observations:
        raise RuntimeError(f"extraction read {read} lines, the files hold {observations}")
    qis_per_s = observations / sampled["cpu_s"]
    qis_off_per_s = observations / off["cpu_s"]
    # Upper bounds on the ratio to orjson, every other step (field checks, dates, Parquet) taken as
    # free: a line must be parsed (orjson is the fastest parser here), keyed, and, with the default
    # sample, CRC'd and validated at the default rate (pydantic's cost per line: 1e6 / pydantic_per_s µs).
    parse = floors["orjson_us"]
    validation_us = SAMPLE_RATE * 1e6 / pydantic_per_s
    bound_off = parse / (parse + floors["hmac_key_us"])
    bound_sample = parse / (parse + floors["hmac_key_us"] + floors["sample_crc_us"] + validation_us)
    return {
        "observations": observations,
        "bytes_per_line": round(size / observations),
        "qis_per_s": round(qis_per_s),
        "qis_off_per_s": round(qis_off_per_s),
        "qis_wall_s": round(sampled["wall_s"], 2),
        "orjson_per_s": round(orjson_per_s),
        "pydantic_per_s": round(pydantic_per_s),
        "pydantic_sample": pyd_n,
        "validated": sampled["validated"],
        "rows_observations": sampled["rows"]["observations"],
        "quarantined": sampled["totals"]["quarantined"],
        "qis_vs_orjson": round(qis_per_s / orjson_per_s, 3),
        "qis_off_vs_orjson": round(qis_off_per_s / orjson_per_s, 3),
        "qis_vs_pydantic": round(qis_per_s / pydantic_per_s, 1),
        "peak_rss_mib": round(max(sampled["peak_rss_mib"], off["peak_rss_mib"]), 1),
        "validation_warmup_s": round(sampled["validation_warmup_s"], 3),
        "synth_s": round(synth_s, 1),
        "floors_us_per_line": {k: round(v, 3) for k, v in floors.items()} | {
            "validation_sampled_us": round(validation_us, 3)},
        "bound_vs_orjson_sample": round(bound_sample, 3),
        "bound_vs_orjson_off": round(bound_off, 3),
        "clock": "cpu",
        "targets": {"vs_orjson": TARGET_VS_ORJSON, "vs_pydantic": TARGET_VS_PYDANTIC,
                    "peak_rss_mib_at_2m": TARGET_RSS_MIB_AT_2M},
    }
