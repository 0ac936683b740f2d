"""On demand, not in CI: run the extract bench several times and judge the extract targets on the median.

    uv run --frozen python tests/benchmarks/extract_targets.py [--runs 5] [--observations 200000] [--export DIR]

One bench run already interleaves its contenders (docs/benchmarks.md), but this shared VM's speed
drifts enough that single runs of the ratio spread over ~0.1; the median of several consecutive runs
is the figure to quote, with the spread beside it. Prints one table row per run (the format of
docs/benchmarks.md), then min / median / max of each ratio, and exits 1 when a median misses its target.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys

# each ratio judged here -> its target's name in the bench's own ``targets`` (qis_fhir/bench/extract.py)
TARGET_OF = {"qis_vs_orjson": "vs_orjson", "qis_vs_pydantic": "vs_pydantic"}


def one_run(observations: int, export: str | None) -> dict:
    cmd = [sys.executable, "-m", "qis_fhir", "bench", "--json", "--only", "extract", "--observations", str(observations)]
    if export:
        cmd += ["--export", export]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=3600).stdout
    return json.loads(out)["extract"]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--observations", type=int, default=200_000)
    parser.add_argument("--export", default=None, help="time a real export's Observation lines instead")
    args = parser.parse_args()
    runs = []
    print("| run | orjson/s | extract/s (sample) | extract/s (off) | pydantic/s | vs orjson | off vs orjson "
          "| vs pydantic | fast parse / orjson | peak RSS |")
    for i in range(1, args.runs + 1):
        r = one_run(args.observations, args.export)
        runs.append(r)
        print(f"| {i} | {r['orjson_per_s']:,} | {r['qis_per_s']:,} | {r['qis_off_per_s']:,} | {r['pydantic_per_s']:,} "
              f"| {r['qis_vs_orjson']:.2f} | {r['qis_off_vs_orjson']:.2f} | {r['qis_vs_pydantic']:.1f}x "
              f"| {r['fast_parse_vs_orjson']:.2f} | {r['peak_rss_mib']:.0f} MiB |", flush=True)
    targets = runs[0]["targets"]
    failed = False
    for key in ("qis_vs_orjson", "qis_off_vs_orjson", "qis_vs_pydantic", "fast_parse_vs_orjson"):
        values = [r[key] for r in runs]
        median = statistics.median(values)
        verdict = ""
        if key in TARGET_OF:
            target = targets[TARGET_OF[key]]
            ok = median >= target
            failed |= not ok
            verdict = f"  target {target}: {'met' if ok else 'MISSED'}"
        print(f"{key}: min {min(values):.3f}  median {median:.3f}  max {max(values):.3f}{verdict}")
    rss, rss_target = max(r["peak_rss_mib"] for r in runs), targets["peak_rss_mib_at_2m"]
    print(f"peak_rss_mib: max {rss:.0f} at {runs[0]['observations']:,} observations"
          f"{f'  target {rss_target} at 2,000,000: ' + ('met' if rss < rss_target else 'MISSED') if runs[0]['observations'] >= 2_000_000 else ''}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
