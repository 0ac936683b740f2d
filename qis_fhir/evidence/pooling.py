"""Pool the sites' outcome figures per cell (cohort x treatment x measure x period).

Each site sends, per cell, patients ``n``, responders ``r`` and the mean and SD of the change, rounded
to ``STAT_DECIMALS``. In a control cell ``n`` is the denominator, ``r`` the numerator (controlled, or
poorly controlled) and the mean and SD are of the index reading over ``measured`` patients only (those
with a reading in the year; 0 when the site withheld the mean): every figure about the mean below
weighs a site by ``measured``, never by ``n``. A change cell's ``measured`` is its ``n``. Two views of the same figures are given side by side (``docs/evidence.md``,
Methods):

- *all patients as if from one hospital*: sum(r)/sum(n) with a Wilson interval, and the combined
  sample's mean and SD with a t interval. With no patient in two sites this equals a central analysis
  of the same patients (the mean up to ``mean_tolerance``, the bound the packets' rounding allows).
- *between hospitals*: random effects. The proportion uses a binomial-normal model on the logit scale
  fitted by maximum likelihood on the exact binomial likelihood with adaptive Gauss-Hermite quadrature,
  so sites at 0 % or 100 % need no continuity correction; the mean change uses inverse-variance
  weights with DerSimonian-Laird tau^2 (truncated at 0) and the Hartung-Knapp-Sidik-Jonkman interval
  with the max(1, q) modification. Prediction intervals (from 3 sites) follow Higgins et al. 2009.

The inverse-variance parts are vectorised over all cells at once (``inverse_variance_re``); the
binomial-normal fit runs once per cell with two or more sites and some but not all responders
(6.2 ms CPU per 50-site cell, ``tests/benchmarks/pool_bench.py``).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
from scipy import optimize, special, stats

from qis_fhir.packets.model import STAT_DECIMALS

CELL_KEYS = ["condition", "age_band", "sex", "treatment", "measure", "period", "mapping_version"]
SITE_COLUMNS = ["site", "patients", "responders", "mean", "sd", "as_of"]
#: optional site-row column: the patients the mean and SD cover (control cells); absent = ``patients``
MEASURED = "measured"
#: optional site-row column: 0 for a hospital's own packet, k >= 1 for a total over k hospitals pooled
#: by secure aggregation (``qis_fhir.secagg``), which is one row (one study to the between-hospital
#: models: only the total is known) but k hospitals to the ``sites`` count; absent = 0
SECURE_SITES = "secure_sites"

#: Gauss-Hermite nodes per site in the adaptive quadrature. Against scipy.integrate.quad a site's marginal
#: log-likelihood agrees to < 1e-9 for 5..5,000 patients and tau <= 1, and to 1e-5 at the hardest case
#: measured (5,000 patients, none responding, tau = 3); 31 nodes would gain 2 digits there for twice the time
#: (test_pooling_binomial.py).
GH_NODES = 21
_GH_X, _GH_W = np.polynomial.hermite.hermgauss(GH_NODES)
_GH_LOGW = np.log(_GH_W) + _GH_X**2  # weights for integrating g(x) (not g(x) e^{-x^2})
#: limits of the binomial-normal fit (logit scale). tau = 10 already spreads hospitals' proportions over
#: 1e-9 .. 1 - 1e-9; only cells where every site is at 0 % or 100 % reach it (their likelihood rises with
#: tau without end), and mu is then fitted with tau held there, within |mu| <= 20
MU_BOUND, TAU_BOUND = 20.0, 10.0
#: continuity correction added to r and n - r of a site at 0 % or 100 %, used ONLY for the descriptive
#: Q and I^2 of the proportion (never for its estimate, interval or tau)
Q_CORRECTION = 0.5


# ---------------------------------------------------------------------------------------------
# intervals of one sample


def wilson_interval(r, n, level: float = 0.95) -> tuple[np.ndarray, np.ndarray]:
    """Wilson score interval of r/n, vectorised; stays inside [0, 1] and is sensible at 0 % and 100 %."""
    r, n = np.asarray(r, dtype=float), np.asarray(n, dtype=float)
    z = stats.norm.ppf(0.5 + level / 2)
    with np.errstate(invalid="ignore", divide="ignore"):
        p = r / n
        centre = (p + z * z / (2 * n)) / (1 + z * z / n)
        half = z / (1 + z * z / n) * np.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    # exact bounds at 0 % and 100 %: the formula gives 1 - 1e-16 there, an interval missing its own estimate
    lo = np.where(r == 0, 0.0, np.clip(centre - half, 0.0, 1.0))
    hi = np.where(r == n, 1.0, np.clip(centre + half, 0.0, 1.0))
    return lo, hi


def t_interval(mean, sd, n, level: float = 0.95) -> tuple[np.ndarray, np.ndarray]:
    """mean +- t(n-1) sd / sqrt(n), vectorised; NaN where n < 2 (no SD)."""
    mean, sd, n = (np.asarray(a, dtype=float) for a in (mean, sd, n))
    ok = n >= 2
    half = np.full(mean.shape, np.nan)
    half[ok] = stats.t.ppf(0.5 + level / 2, n[ok] - 1) * sd[ok] / np.sqrt(n[ok])
    return mean - half, mean + half


# ---------------------------------------------------------------------------------------------
# inverse-variance random effects, every group at once


def _group_sum(groups: np.ndarray, x, n_groups: int) -> np.ndarray:
    """Sum of x per group code 0..n_groups-1 (float even when empty: bincount of nothing is int)."""
    return np.bincount(groups, weights=x, minlength=n_groups).astype(float)


@dataclass(frozen=True)
class IVResult:
    """Per group (index = group code): k, estimate, interval, prediction interval, tau^2, Q, ...;
    per study (same order as the input): ``weight``, the share of its group's RE weight."""

    k: np.ndarray
    estimate: np.ndarray
    lo: np.ndarray
    hi: np.ndarray
    se: np.ndarray  # DerSimonian-Laird standard error, 1 / sqrt(sum w*)
    se_hksj: np.ndarray  # Hartung-Knapp-Sidik-Jonkman with max(1, q): never below ``se``
    pi_lo: np.ndarray
    pi_hi: np.ndarray
    tau2: np.ndarray
    q: np.ndarray
    q_p: np.ndarray
    i2: np.ndarray  # fraction 0..1
    fixed: np.ndarray  # fixed-effect (common-effect) estimate
    fixed_se: np.ndarray
    weight: np.ndarray


def inverse_variance_re(effects, variances, groups=None, level: float = 0.95, n_groups: int | None = None) -> IVResult:
    """DerSimonian-Laird random effects with the HKSJ interval, for many meta-analyses at once.

    ``groups`` gives each study's meta-analysis (codes 0..n_groups-1; None: one meta-analysis).
    tau^2 = max(0, (Q - (k-1)) / (S1 - S2/S1)); the interval is estimate +- t(k-1) * SE_HKSJ with
    SE_HKSJ^2 = max(1, q) / sum w*, q = sum w* (y - estimate)^2 / (k-1): the max(1, q) keeps it from
    ever being narrower than the DL interval, which the plain HKSJ can be when studies agree more than
    chance predicts. The prediction interval is estimate +- t(k-2) sqrt(tau^2 + SE_HKSJ^2) (Higgins
    et al. 2009; from k = 3). I^2 = max(0, (Q - (k-1)) / Q). Groups with k < 2 get NaN.
    Reproduces metafor's DL fit of the 13 BCG trials (test_pooling.py).
    """
    y, v = np.asarray(effects, dtype=float), np.asarray(variances, dtype=float)
    if y.shape != v.shape or y.ndim != 1:
        raise ValueError("effects and variances must be 1-D arrays of the same length")
    if not np.all(np.isfinite(y)) or not np.all(np.isfinite(v)) or np.any(v <= 0):
        raise ValueError("effects must be finite and variances finite and > 0")
    g = np.zeros(len(y), dtype=np.intp) if groups is None else np.asarray(groups, dtype=np.intp)
    m = int(n_groups if n_groups is not None else (g.max() + 1 if len(g) else 0))

    def total(x):
        return _group_sum(g, x, m)

    k = np.bincount(g, minlength=m)
    w = 1.0 / v
    s1, s2 = total(w), total(w * w)
    with np.errstate(invalid="ignore", divide="ignore"):
        fixed = total(w * y) / s1
        q = total(w * (y - fixed[g]) ** 2)
        df = k - 1.0
        tau2 = np.maximum(0.0, (q - df) / (s1 - s2 / s1))
        tau2[k < 2] = np.nan
        ws = 1.0 / (v + tau2[g])
        sws = total(ws)
        est = total(ws * y) / sws
        se = 1.0 / np.sqrt(sws)
        q_hk = total(ws * (y - est[g]) ** 2) / df
        se_hk = np.sqrt(np.maximum(1.0, q_hk) / sws)
        tcrit = stats.t.ppf(0.5 + level / 2, np.where(k >= 2, df, np.nan))
        tpi = stats.t.ppf(0.5 + level / 2, np.where(k >= 3, k - 2.0, np.nan))
        pi_half = tpi * np.sqrt(tau2 + se_hk**2)
        i2 = np.maximum(0.0, np.divide(q - df, q, out=np.zeros(m), where=q > df))
        q_p = stats.chi2.sf(q, df)
        weight = ws / sws[g]
        fixed_se = 1.0 / np.sqrt(s1)
    few = k < 2
    for a in (est, se, se_hk, q, q_p, i2, fixed):
        a[few] = np.nan
    weight[few[g]] = np.nan
    return IVResult(
        k=k, estimate=est, lo=est - tcrit * se_hk, hi=est + tcrit * se_hk, se=se, se_hksj=se_hk,
        pi_lo=est - pi_half, pi_hi=est + pi_half, tau2=tau2, q=q, q_p=q_p, i2=i2,
        fixed=fixed, fixed_se=np.where(few, np.nan, fixed_se), weight=weight,
    )


# ---------------------------------------------------------------------------------------------
# binomial-normal random effects (one meta-analysis)


@dataclass(frozen=True)
class BinomialRE:
    """Maximum-likelihood binomial-normal fit: logit(p_site) ~ N(mu, tau^2)."""

    mu: float  # logit of the typical hospital's proportion
    se: float  # Wald standard error of mu from the observed information
    tau: float  # between-hospital SD on the logit scale
    lo: float  # interval and prediction interval, proportion scale
    hi: float
    pi_lo: float
    pi_hi: float
    weight: np.ndarray  # each site's share of the information about mu (sums to 1)
    loglik: float

    @property
    def estimate(self) -> float:
        return float(special.expit(self.mu))


def _site_logliks(mu, tau, r: np.ndarray, n: np.ndarray, log_comb: np.ndarray,
                  mode: np.ndarray | None = None) -> np.ndarray:
    """Each site's marginal log-likelihood log integral Bin(r | n, expit(mu + tau z)) phi(z) dz.

    ``mu`` and ``tau`` are arrays of P parameter points (the result is P x k), so a finite-difference
    gradient or Hessian costs one call. Adaptive Gauss-Hermite: the nodes are centred on each site's
    mode of the integrand and scaled by its curvature, so a large site (sharp integrand) is integrated
    as well as a small one. The log-integrand is strictly concave in z (second derivative <= -1), so
    Newton's method finds the mode; ``mode`` (P x k, updated in place) starts it from the previous
    call's modes, which the optimiser's small steps leave close: 2-3 Newton steps instead of 6-10.
    """
    mu, tau = np.asarray(mu, dtype=float)[:, None], np.asarray(tau, dtype=float)[:, None]
    z = np.zeros((mu.shape[0], len(n))) if mode is None else mode.copy()
    tt = tau * tau
    # the mode solves z = tau (r - n p(z)) with 0 <= p <= 1, so it lies in [tau (r - n), tau r] (tau >= 0):
    # Newton steps that leave the bracket are replaced by bisection, so the search always converges
    lo, hi = np.minimum(tau * (r - n), tau * r), np.maximum(tau * (r - n), tau * r)
    z = np.clip(z, lo, hi)
    for _ in range(200):
        p = special.expit(mu + tau * z)
        grad = tau * (r - n * p) - z  # decreasing in z
        lo, hi = np.where(grad > 0, z, lo), np.where(grad > 0, hi, z)
        new = z + grad / (tt * n * p * (1 - p) + 1.0)
        new = np.where((new >= lo) & (new <= hi), new, 0.5 * (lo + hi))
        done = np.max(np.abs(new - z)) < 1e-10
        z = new
        if done:
            break
    if mode is not None:
        mode[...] = z
    p = special.expit(mu + tau * z)
    scale = np.sqrt(2.0) / np.sqrt(tt * n * p * (1 - p) + 1.0)
    zq = z[..., None] + scale[..., None] * _GH_X
    eta = mu[..., None] + tau[..., None] * zq
    logf = (r[:, None] * special.log_expit(eta) + (n - r)[:, None] * special.log_expit(-eta) - 0.5 * zq * zq
            + _GH_LOGW)
    top = logf.max(axis=-1)
    return log_comb + np.log(scale) - 0.5 * np.log(2 * np.pi) + top + np.log(np.exp(logf - top[..., None]).sum(axis=-1))


#: finite-difference step in (mu, tau): central differences of a log-likelihood summed in float64
#: (|l| up to ~1e4) keep about 7 significant digits of the gradient and 4 of the Hessian
_HESS_STEP = 1e-3
_HESS_POINTS = np.array([[0, 0], [1, 0], [-1, 0], [0, 1], [0, -1], [1, 1], [1, -1], [-1, 1], [-1, -1]],
                        dtype=float) * _HESS_STEP


def _hessian(f: np.ndarray) -> np.ndarray:
    """2 x 2 Hessian from the nine values at ``_HESS_POINTS``."""
    h = _HESS_STEP
    d_mumu = (f[1] - 2 * f[0] + f[2]) / h**2
    d_tt = (f[3] - 2 * f[0] + f[4]) / h**2
    d_mut = (f[5] - f[6] - f[7] + f[8]) / (4 * h * h)
    return np.array([[d_mumu, d_mut], [d_mut, d_tt]])


def binomial_normal_re(r, n, level: float = 0.95, start: tuple[float, float] | None = None) -> BinomialRE:
    """Fit the binomial-normal random-effects model by maximum likelihood (k >= 2 sites).

    The estimate is expit(mu), the proportion of a typical (median) hospital; its interval is
    mu +- t(k-1) SE on the logit scale (t rather than z: with few hospitals the ML tau is biased low; for
    10 hospitals and tau = 0.5 a z interval covered 92 % of 400 simulations, t 96 %,
    test_pooling_binomial.py), the prediction interval mu +- t(k-2) sqrt(tau^2 + SE^2) (from k = 3).
    Needs 0 < sum r < sum n: with no responder at all (or all) the logit-scale estimate is infinite.
    The likelihood is even in tau, so the central differences may step below tau = 0.
    """
    r, n = np.asarray(r, dtype=float), np.asarray(n, dtype=float)
    k = len(r)
    if k < 2:
        raise ValueError("the between-hospital model needs at least two sites")
    if not 0 < r.sum() < n.sum():
        raise ValueError("the between-hospital model needs some but not all patients to respond")
    log_comb = special.gammaln(n + 1) - special.gammaln(r + 1) - special.gammaln(n - r + 1)
    modes = np.zeros((len(_HESS_POINTS), k))

    def nll_at(theta) -> np.ndarray:
        pts = np.asarray(theta, dtype=float) + _HESS_POINTS
        return -_site_logliks(pts[:, 0], pts[:, 1], r, n, log_comb, modes).sum(axis=1)

    cache: dict[tuple[float, float], np.ndarray] = {}

    def stencil(theta) -> np.ndarray:
        key = (float(theta[0]), float(theta[1]))
        if key not in cache:
            cache.clear()
            cache[key] = nll_at(theta)
        return cache[key]

    def nll(theta):
        return stencil(theta)[0]

    def grad(theta):
        f = stencil(theta)
        return np.array([f[1] - f[2], f[3] - f[4]]) / (2 * _HESS_STEP)

    def hess(theta):
        return _hessian(stencil(theta))

    if start is None:
        start = (float(special.logit(r.sum() / n.sum())), 0.5)
    # Newton steps in a trust region over (mu, tau) with tau on the whole real line: the likelihood is even
    # in tau, so |tau| of the optimum is the MLE, tau = 0 included, and no bound is needed. tau starts
    # away from 0, where its gradient vanishes by symmetry. One 9-point stencil gives the value, gradient
    # and Hessian: about 6 iterations, a third of the likelihood evaluations of a quasi-Newton search.
    x0 = np.array([np.clip(start[0], -MU_BOUND, MU_BOUND), np.clip(max(start[1], 0.1), 0.1, TAU_BOUND)])
    # trust-exact may stop with "a bad approximation caused failure to predict improvement": the
    # finite-difference noise floor, reached at the optimum (over 400 simulated cells of 2-59 sites, a
    # Nelder-Mead polish from such stops gained < 5e-7 in log-likelihood), so the stop is accepted
    fit = optimize.minimize(nll, x0, jac=grad, hess=hess, method="trust-exact", options={"gtol": 1e-6, "maxiter": 200})
    mu, tau = float(fit.x[0]), abs(float(fit.x[1]))
    if tau > TAU_BOUND:  # every site at 0 % or 100 %: the likelihood rises with tau for ever
        tau = TAU_BOUND
        mu = float(optimize.minimize_scalar(lambda m: -_site_logliks([m], [tau], r, n, log_comb).sum(),
                                            bounds=(-MU_BOUND, MU_BOUND), method="bounded").x)
    f = stencil((mu, tau))
    h = _HESS_STEP
    (d_mumu, d_mut), (_, d_tt) = _hessian(f)
    det = d_mumu * d_tt - d_mut * d_mut
    if tau > 1e-3 and d_tt > 0 and det > 0:
        var_mu = d_tt / det
    else:  # tau at (or next to) its boundary 0: its curvature says nothing about mu's spread
        var_mu = 1.0 / d_mumu if d_mumu > 0 else np.inf  # flat in mu (tau at its limit): no precision
    se = float(np.sqrt(var_mu))
    crit = stats.t.ppf(0.5 + level / 2, k - 1)
    # each site's observed information about mu: its share of the fit's weight
    site = -_site_logliks(mu + np.array([0.0, h, -h]), np.full(3, tau), r, n, log_comb)
    site_info = np.maximum((site[1] - 2 * site[0] + site[2]) / h**2, 0.0)
    if k >= 3:
        pi_half = stats.t.ppf(0.5 + level / 2, k - 2) * np.sqrt(tau * tau + var_mu)
        pi_lo, pi_hi = float(special.expit(mu - pi_half)), float(special.expit(mu + pi_half))
    else:
        pi_lo = pi_hi = float("nan")
    return BinomialRE(
        mu=mu, se=se, tau=tau, lo=float(special.expit(mu - crit * se)), hi=float(special.expit(mu + crit * se)),
        pi_lo=pi_lo, pi_hi=pi_hi, weight=site_info / site_info.sum(), loglik=-float(f[0]),
    )


# ---------------------------------------------------------------------------------------------
# cells


def _typed_rows(site_rows: pd.DataFrame) -> pd.DataFrame:
    """The site rows with numeric columns typed, sorted by cell and site; refuses impossible rows."""
    missing = [c for c in CELL_KEYS + SITE_COLUMNS if c not in site_rows.columns]
    if missing:
        raise ValueError(f"site rows lack columns {missing}")
    rows = site_rows.astype({"patients": "int64", "responders": "int64", "mean": "float64", "sd": "float64",
                             "as_of": "int64"})
    if MEASURED not in rows.columns:
        rows[MEASURED] = rows["patients"]
    rows[MEASURED] = rows[MEASURED].astype("int64")
    if SECURE_SITES not in rows.columns:
        rows[SECURE_SITES] = 0
    rows[SECURE_SITES] = rows[SECURE_SITES].fillna(0).astype("int64")
    n, r, sd, nm = rows["patients"], rows["responders"], rows["sd"], rows[MEASURED]
    bad = ((n < 1) | (r < 0) | (r > n) | (nm < 0) | (nm > n) | ~np.isfinite(rows["mean"]) | ~np.isfinite(sd)
           | (sd < 0))
    if bad.any():
        raise ValueError(f"{int(bad.sum())} site rows have patients < 1, responders or measured outside 0..patients, "
                         "or a missing, infinite or negative mean/SD")
    dup = rows.duplicated(CELL_KEYS + ["site"])
    if dup.any():
        raise ValueError(f"{int(dup.sum())} site rows repeat a site within a cell (keep the newest packet per site)")
    return rows.sort_values(CELL_KEYS + ["site"], kind="stable").reset_index(drop=True)


def pool(site_rows: pd.DataFrame, level: float = 0.95) -> tuple[pd.DataFrame, pd.DataFrame]:
    """``(pool_cells(...), site_estimates(...))`` from one fit: callers needing both pay once."""
    rows = _typed_rows(site_rows)
    # rows are sorted by cell, so g (the cell code of each row) is non-decreasing and each cell's rows
    # are one slice
    g = rows.groupby(CELL_KEYS, sort=False, dropna=False).ngroup().to_numpy()
    grouped = rows.groupby(g, sort=True)
    cells = grouped[CELL_KEYS].first().reset_index(drop=True)
    m = len(cells)
    n = rows["patients"].to_numpy(dtype=float)
    r = rows["responders"].to_numpy(dtype=float)
    nm = rows[MEASURED].to_numpy(dtype=float)  # the patients behind each site's mean and SD
    mean = rows["mean"].to_numpy(dtype=float)
    sd = rows["sd"].to_numpy(dtype=float)

    def total(x):
        return _group_sum(g, x, m)

    k = np.bincount(g, minlength=m)  # rows: the studies of the between-hospital models
    secure = rows[SECURE_SITES].to_numpy()
    big_n, big_r, big_nm = total(n), total(r), total(nm)
    out = cells.assign(
        sites=total(np.where(secure > 0, secure, 1)).astype(np.int64), secure_sites=total(secure).astype(np.int64),
        patients=big_n.astype(np.int64), responders=big_r.astype(np.int64), measured=big_nm.astype(np.int64),
        as_of_min=grouped["as_of"].min().to_numpy(), as_of_max=grouped["as_of"].max().to_numpy(),
    )
    per_site = rows.copy()
    per_site.loc[per_site[MEASURED] == 0, ["mean", "sd"]] = np.nan  # withheld: no mean to show, not a mean of 0

    # binary, as one hospital
    out["resp_pooled"] = big_r / big_n
    out["resp_pooled_lo"], out["resp_pooled_hi"] = wilson_interval(big_r, big_n, level)
    per_site["resp"] = r / n
    per_site["resp_lo"], per_site["resp_hi"] = wilson_interval(r, n, level)

    # binary, between hospitals: Q and I^2 from the logit-scale inverse-variance approximation
    c = np.where((r == 0) | (r == n), Q_CORRECTION, 0.0)
    iv_logit = inverse_variance_re(np.log((r + c) / (n - r + c)), 1 / (r + c) + 1 / (n - r + c), g, level, m)
    out["resp_q"], out["resp_q_p"], out["resp_i2"] = iv_logit.q, iv_logit.q_p, iv_logit.i2
    _binomial_columns(out, per_site, g, k, r, n, iv_logit, level)

    # continuous, as one hospital: the combined sample's mean and SD (ddof 1, as the packets' SD), over
    # the patients each mean covers (a site that withheld its mean, measured 0, adds nothing)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_all = total(nm * mean) / big_nm
        ss = total(np.maximum(nm - 1, 0) * sd * sd + nm * (mean - mean_all[g]) ** 2)
        sd_all = np.where(big_nm >= 2, np.sqrt(ss / (big_nm - 1)), np.nan)
    out["mean_pooled"], out["sd_pooled"] = mean_all, sd_all
    out["mean_pooled_lo"], out["mean_pooled_hi"] = t_interval(mean_all, sd_all, big_nm, level)
    # each packet mean is within half a unit of its last decimal of the exact mean, so their n-weighted
    # average is too; the second term bounds the float error of summing k products and dividing
    eps = np.finfo(float).eps
    with np.errstate(invalid="ignore", divide="ignore"):
        out["mean_tolerance"] = 0.5 * 10.0**-STAT_DECIMALS + (k + 2) * eps * total(nm * np.abs(mean)) / big_nm

    # continuous, between hospitals: sites with n >= 2 and SD > 0 (a site's mean needs a variance)
    per_site["mean_lo"], per_site["mean_hi"] = t_interval(mean, sd, nm, level)
    usable = (nm >= 2) & (sd > 0)
    iv = inverse_variance_re(mean[usable], (sd * sd / np.maximum(nm, 1))[usable], g[usable], level, m)
    out["mean_re_sites"] = iv.k
    for col, a in (("mean_re", iv.estimate), ("mean_re_lo", iv.lo), ("mean_re_hi", iv.hi), ("mean_pi_lo", iv.pi_lo),
                   ("mean_pi_hi", iv.pi_hi), ("mean_tau", np.sqrt(iv.tau2)), ("mean_i2", iv.i2), ("mean_q", iv.q),
                   ("mean_q_p", iv.q_p)):
        out[col] = a
    mean_weight = np.full(len(rows), np.nan)
    mean_weight[usable] = iv.weight
    per_site["mean_weight"] = mean_weight
    est = iv.estimate[g]
    outside = usable & ((per_site["mean_lo"].to_numpy() > est) | (per_site["mean_hi"].to_numpy() < est))
    _weight_summary(out, "mean", g, m, mean_weight, outside, iv.k >= 2)
    return out, per_site


def _binomial_columns(out, per_site, g, k, r, n, iv_logit: IVResult, level: float) -> None:
    """resp_re ... resp_sites_outside and the per-site resp_weight: one binomial-normal fit per cell."""
    m = len(out)
    names = ("resp_re", "resp_re_lo", "resp_re_hi", "resp_pi_lo", "resp_pi_hi", "resp_tau")
    cols = {c: np.full(m, np.nan) for c in names}
    weight = np.full(len(r), np.nan)
    starts = np.searchsorted(g, np.arange(m + 1))
    big_r, big_n = out["responders"].to_numpy(), out["patients"].to_numpy()
    lo_w, hi_w = out["resp_pooled_lo"].to_numpy(), out["resp_pooled_hi"].to_numpy()
    for cell in np.flatnonzero(k >= 2):
        s = slice(starts[cell], starts[cell + 1])
        if 0 < big_r[cell] < big_n[cell]:
            start = (iv_logit.estimate[cell], float(np.sqrt(iv_logit.tau2[cell])))
            fit = binomial_normal_re(r[s], n[s], level, start)
            vals = (fit.estimate, fit.lo, fit.hi, fit.pi_lo, fit.pi_hi, fit.tau)
            weight[s] = fit.weight
        else:  # nobody (or everybody) responded anywhere: the ML proportion is 0 (1) with tau 0
            vals = (big_r[cell] / big_n[cell], lo_w[cell], hi_w[cell], np.nan, np.nan, 0.0)
            weight[s] = n[s] / n[s].sum()  # with tau 0 each site weighs by its patients
        for c, v in zip(cols, vals):
            cols[c][cell] = v
    for c, a in cols.items():
        out[c] = a
    per_site["resp_weight"] = weight
    est = cols["resp_re"][g]
    outside = (per_site["resp_lo"].to_numpy() > est) | (per_site["resp_hi"].to_numpy() < est)
    _weight_summary(out, "resp", g, m, weight, outside, k >= 2)


def _weight_summary(out: pd.DataFrame, prefix: str, g, m: int, weight, outside, fitted) -> None:
    """``<prefix>_max_weight`` and ``<prefix>_sites_outside``; NA where the cell has no RE fit."""
    max_w = pd.Series(weight).groupby(g).max().reindex(range(m)).to_numpy()
    count = np.bincount(g, weights=np.asarray(outside, dtype=float), minlength=m)
    out[f"{prefix}_max_weight"] = np.where(fitted, max_w, np.nan)
    sites_outside = pd.array(count.astype(np.int64), dtype="Int64")
    sites_outside[~np.asarray(fitted)] = pd.NA
    out[f"{prefix}_sites_outside"] = sites_outside


def pool_cells(site_rows: pd.DataFrame, level: float = 0.95) -> pd.DataFrame:
    """One row per cell (CELL_KEYS) with both views of the proportion and of the mean change."""
    return pool(site_rows, level)[0]


def site_estimates(site_rows: pd.DataFrame, level: float = 0.95) -> pd.DataFrame:
    """The site rows with each site's own intervals and its share of the between-hospital weight."""
    return pool(site_rows, level)[1]
