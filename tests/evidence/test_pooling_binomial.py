"""The between-hospital proportion: binomial-normal model on the exact likelihood, validated by simulation."""

from __future__ import annotations

import numpy as np
import pytest
from pooling_sim import binomial_sites, counts_row, frame
from scipy import integrate, special, stats

from qis_fhir.evidence.pooling import TAU_BOUND, _site_logliks, binomial_normal_re, pool_cells

pytestmark = pytest.mark.timeout(300)


def quad_loglik(mu: float, tau: float, r, n) -> float:
    """The same marginal likelihood by adaptive quadrature (scipy.integrate.quad), site by site."""
    total = 0.0
    for ri, ni in zip(r, n):
        def f(z):
            return stats.binom.pmf(ri, ni, special.expit(mu + tau * z)) * stats.norm.pdf(z)
        peak = (special.logit((ri + 0.5) / (ni + 1)) - mu) / tau if tau > 0 else 0.0
        total += np.log(integrate.quad(f, -12, 12, points=[float(np.clip(peak, -11, 11))], limit=500,
                                       epsabs=0, epsrel=1e-12)[0])
    return total


@pytest.mark.parametrize("n, r, mu, tau", [
    (5, 0, 0.0, 1.0), (200, 60, -1.0, 0.5), (5000, 4990, 1.0, 1.0), (300, 0, -3.0, 1.0), (1000, 300, 0.5, 0.01),
])
def test_adaptive_quadrature_matches_scipy_quad(n, r, mu, tau):
    n_, r_ = np.array([n], float), np.array([r], float)
    log_comb = special.gammaln(n_ + 1) - special.gammaln(r_ + 1) - special.gammaln(n_ - r_ + 1)
    ours = _site_logliks([mu], [tau], r_, n_, log_comb)[0, 0]
    assert ours == pytest.approx(quad_loglik(mu, tau, [r], [n]), abs=1e-6)


def test_fit_is_the_maximum_of_the_exact_likelihood_including_sites_at_0_and_100_percent():
    r, n = np.array([0, 7, 12, 30, 15]), np.array([25, 40, 33, 30, 60])  # one site at 0 %, one at 100 %
    fit = binomial_normal_re(r, n)
    best = quad_loglik(fit.mu, fit.tau, r, n)
    # 21 adaptive nodes are 9e-5 off here (tau near 2 and two sites at a bound: the hardest integrands);
    # a log-likelihood difference that small moves no estimate in its third decimal
    assert fit.loglik == pytest.approx(best, abs=2e-4)
    # no step of 0.01 in mu or tau improves the likelihood computed independently by scipy.integrate.quad
    for d_mu, d_tau in [(0.01, 0), (-0.01, 0), (0, 0.01), (0, -0.01), (0.01, 0.01), (-0.01, -0.01)]:
        assert quad_loglik(fit.mu + d_mu, fit.tau + d_tau, r, n) < best
    assert fit.tau > 1.0  # the 0 % and 100 % sites are real between-hospital spread, not noise
    assert 0 < fit.lo < fit.estimate < fit.hi < 1 and fit.pi_lo < fit.lo and fit.pi_hi > fit.hi
    assert fit.weight.sum() == pytest.approx(1.0) and (fit.weight > 0).all()


def test_no_point_of_a_grid_beats_the_fit():
    # a bounded quasi-Newton search (TNC) stopped at tau = 0 on small sites such as these where the
    # likelihood still rises with tau; a 121 x 121 grid over mu and tau must never find a better point
    rng = np.random.default_rng(5)
    mu_grid, tau_grid = np.meshgrid(np.linspace(-4, 4, 121), np.linspace(0, 4, 121))
    checked = 0
    for case in [([41, 22, 36], [92, 76, 89]), ([14, 38, 51], [45, 87, 99])] + [
            binomial_sites(rng, int(rng.integers(2, 8)), 0.3, 1.0, 5, 100) for _ in range(20)]:
        r, n = np.asarray(case[0], float), np.asarray(case[1], float)
        if not 0 < r.sum() < n.sum():
            continue
        fit = binomial_normal_re(r, n)
        log_comb = special.gammaln(n + 1) - special.gammaln(r + 1) - special.gammaln(n - r + 1)
        grid = _site_logliks(mu_grid.ravel(), tau_grid.ravel(), r, n, log_comb).sum(axis=1)
        assert fit.loglik >= grid.max() - 1e-9
        checked += 1
    assert checked >= 15


def test_re_interval_covers_the_true_typical_proportion_about_95_percent_of_the_time():
    # 10 hospitals of 20-199 patients, typical proportion 30 %, tau 0.5 on the logit scale; 400 seeded
    # replications: measured 96.2 % (a z interval in place of t(k-1): 91.8 %, which the lower bound rejects).
    # The binomial SE of 400 replications is 1.1 points.
    rng = np.random.default_rng(20241201)
    true_mu, covered, taus = special.logit(0.3), 0, []
    for _ in range(400):
        r, n = binomial_sites(rng, 10, 0.3, 0.5)
        fit = binomial_normal_re(r, n)
        covered += fit.lo <= special.expit(true_mu) <= fit.hi
        taus.append(fit.tau)
    assert 0.93 <= covered / 400 <= 0.98
    assert np.mean(taus) == pytest.approx(0.5, abs=0.1)


def test_with_no_between_hospital_spread_it_agrees_with_the_pooled_proportion():
    # tau = 0: over 200 seeded replications the ML tau is 0 in 69 % and the two then agree exactly;
    # measured: 97 % within 0.5 percentage points, the largest difference 1.08 points
    rng = np.random.default_rng(7)
    diffs = []
    for _ in range(200):
        r, n = binomial_sites(rng, 10, 0.3, 0.0)
        diffs.append(abs(binomial_normal_re(r, n).estimate - r.sum() / n.sum()))
    assert max(diffs) < 0.015
    assert np.mean(np.array(diffs) < 0.005) >= 0.95
    assert np.median(diffs) < 1e-6


def test_cells_where_nobody_or_everybody_responded_need_no_continuity_correction():
    rows = frame([counts_row(n, 0, f"Hospital {s}", treatment="TX_NONE") for s, n in (("A", 30), ("B", 45), ("C", 20))]
                 + [counts_row(n, n, f"Hospital {s}", treatment="TX_ALL") for s, n in (("A", 30), ("B", 45))])
    cells = pool_cells(rows).set_index("treatment")
    none, every = cells.loc["TX_NONE"], cells.loc["TX_ALL"]
    assert (none["resp_re"], none["resp_tau"], none["resp_re_lo"]) == (0.0, 0.0, 0.0)
    assert none["resp_re_hi"] == pytest.approx(none["resp_pooled_hi"])
    assert np.isnan(none["resp_pi_lo"])
    assert (every["resp_re"], every["resp_re_hi"]) == (1.0, 1.0)


def test_sites_all_at_0_or_100_percent_but_split_stop_at_the_tau_limit():
    # the likelihood rises with tau for ever here; the fit holds tau at its limit and says nothing precise
    fit = binomial_normal_re([0, 10, 0], [10, 10, 30])
    assert fit.tau == TAU_BOUND
    assert fit.lo < 1e-6 and fit.hi > 1 - 1e-6 and np.isfinite(fit.mu)


def test_one_site_at_0_percent_pulls_the_estimate_without_a_correction():
    # 0.5 added to a 0 % site's cells would pretend a quarter of a responder; the exact likelihood uses 0
    rows = frame([counts_row(200, 0, "Hospital A"), counts_row(50, 10, "Hospital B"), counts_row(50, 12, "Hospital C")])
    cell = pool_cells(rows).iloc[0]
    fit = binomial_normal_re([0, 10, 12], [200, 50, 50])
    assert cell["resp_re"] == pytest.approx(fit.estimate, rel=1e-6)
    assert cell["resp_tau"] > 0.5 and cell["resp_re"] < 0.2
    assert cell["resp_pi_lo"] < cell["resp_re_lo"] < cell["resp_re"] < cell["resp_re_hi"] < cell["resp_pi_hi"]
