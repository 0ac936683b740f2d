"""On demand, not in CI: time the evidence stage's pooling on a network-sized table.

    uv run --frozen python tests/benchmarks/pool_bench.py [--cells 1000] [--sites 50] [--seed 1]

Builds CELLS cells x SITES sites of simulated site rows (20-299 patients each, a between-hospital spread
of 0.5 on the logit scale, means and SDs rounded like packets), then prints the wall and CPU seconds of
``pool`` (pool_cells and site_estimates from one fit: the inverse-variance parts vectorised over all
cells, one binomial-normal fit per cell) and of ``rank_and_flag``.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import pandas as pd

from qis_fhir.evidence.flags import rank_and_flag
from qis_fhir.evidence.pooling import CELL_KEYS, SITE_COLUMNS, pool
from qis_fhir.packets.model import STAT_DECIMALS


def site_rows(cells: int, sites: int, seed: int) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    bands, sexes = ["18-39", "40-64", "65+"], ["female", "male"]
    cell_ids = np.repeat(np.arange(cells), sites)
    n = rng.integers(20, 300, cells * sites)
    typical = np.repeat(rng.normal(-0.3, 1.0, cells), sites)
    r = rng.binomial(n, 1 / (1 + np.exp(-(typical + 0.5 * rng.standard_normal(cells * sites)))))
    mean = np.repeat(rng.normal(-5, 3, cells), sites) + rng.normal(0, 1.5, cells * sites)
    return pd.DataFrame({
        "condition": "hypertension",
        "age_band": [bands[c % 3] for c in cell_ids],
        "sex": [sexes[(c // 3) % 2] for c in cell_ids],
        "treatment": [f"TX_{c // 6:04d}" for c in cell_ids],
        "measure": "sbp", "period": "2024", "mapping_version": "v1",
        "site": [f"Hospital {s:02d}" for s in np.tile(np.arange(sites), cells)],
        "patients": n, "responders": r,
        "mean": mean.round(STAT_DECIMALS), "sd": rng.uniform(5, 15, cells * sites).round(STAT_DECIMALS),
        "as_of": 20241201,
    }, columns=CELL_KEYS + SITE_COLUMNS)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cells", type=int, default=1000)
    parser.add_argument("--sites", type=int, default=50)
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    rows = site_rows(args.cells, args.sites, args.seed)
    wall, cpu = time.perf_counter(), time.process_time()
    pooled, per_site = pool(rows)
    pool_wall, pool_cpu = time.perf_counter() - wall, time.process_time() - cpu
    wall, cpu = time.perf_counter(), time.process_time()
    rank_and_flag(pooled, per_site)
    flag_wall, flag_cpu = time.perf_counter() - wall, time.process_time() - cpu
    print(f"{args.cells} cells x {args.sites} sites ({len(rows):,} site rows)")
    per_cell = 1000 * pool_cpu / args.cells
    print(f"pool:          {pool_wall:6.2f} s wall  {pool_cpu:6.2f} s CPU  ({per_cell:.1f} ms CPU per cell)")
    print(f"rank_and_flag: {flag_wall:6.2f} s wall  {flag_cpu:6.2f} s CPU")


if __name__ == "__main__":
    main()
