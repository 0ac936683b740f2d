"""On demand, not in CI: the between-hospital proportion's interval coverage by simulation.

    uv run --frozen python tests/benchmarks/pool_coverage.py [--runs 400]

For each scenario (hospitals, tau, typical share; hospitals of 20-199 patients, seeds 1..6) simulates
RUNS networks, fits the binomial-normal model and prints the share of intervals holding the true typical
share, with the t(k-1) quantile used by ``binomial_normal_re`` and with z for comparison: the table in
docs/evidence.md (Methods). About a minute at 400 runs.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
from scipy import special, stats

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "evidence"))
from pooling_sim import binomial_sites  # noqa: E402

from qis_fhir.evidence.pooling import binomial_normal_re  # noqa: E402

SCENARIOS = [(3, 0.5, 0.3), (5, 0.5, 0.3), (10, 0.5, 0.3), (20, 0.5, 0.3), (10, 1.0, 0.1), (10, 0.0, 0.3)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=400)
    args = parser.parse_args()
    z = stats.norm.ppf(0.975)
    print("| hospitals | tau | typical share | t(k-1), used | z |\n| --- | --- | --- | --- | --- |")
    for seed, (k, tau, share) in enumerate(SCENARIOS, start=1):
        rng = np.random.default_rng(seed)
        fitted = covered_t = covered_z = 0
        for _ in range(args.runs):
            r, n = binomial_sites(rng, k, share, tau)
            if not 0 < r.sum() < n.sum():
                continue
            fit = binomial_normal_re(r, n)
            fitted += 1
            covered_t += fit.lo <= share <= fit.hi
            covered_z += abs(fit.mu - special.logit(share)) <= z * fit.se
        print(f"| {k} | {tau:g} | {share:.0%} | {covered_t / fitted:.1%} | {covered_z / fitted:.1%} |", flush=True)


if __name__ == "__main__":
    main()
