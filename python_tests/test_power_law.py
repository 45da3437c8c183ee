"""fit_power_law (Clauset-Shalizi-Newman with powerlaw's conventions) against the direct O(n^2)
scan of reference.power_law_scan and against the powerlaw package.

Tolerances are first-order rounding bounds (eps = 2^-52), per candidate:
- alpha = 1 + n/S, S = sum log(x_i/xmin). Each side's S errs by at most
  dS = eps (4 n + (4 + log2 n) S): every term log(x_i/xmin) by ~eps (1 + y_i) (the ratio's
  rounding plus the log's), the sum by log2(n) eps S (pairwise) or less (compensated). Then
  |d alpha| <= 2 n dS / S^2 (both sides), plus a few eps alpha for the final addition.
- with xmax the alpha solves g(t) = 1/t - L/(e^{tL}-1) = S/n: |dt| <= dg / |g'(t)| with dg the
  error of S/n plus the cancellation error of evaluating g (eps times its terms' sizes, both
  sides), and the root-finders' relative tolerance (4 eps).
- D: E is count/n correctly rounded on both sides; F moves by at most |dF/dt| |dt| from the
  alpha difference (|dF/dt| <= y_max, or <= L with xmax) and by ~eps t (1 + y) from y's
  rounding, plus a few eps from exp/pow: tol_D = y_max |dt| + 8 eps (1 + |t| (1 + y_max)).
- xmin: identical, or a near-tie: the kernel's xmin is accepted in place of the reference's only
  when the reference's own D at both candidates are equal within the sum of their tol_D.
"""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st

import reference as ref
from gradience_kernels.power_law import PowerLawFit, fit_power_law

EPS = float(np.finfo(np.float64).eps)

# --------------------------------------------------------------------------- strategies
SPECTRUM_KINDS = ["pareto", "mp_tail", "lognormal", "ties", "repeated", "tiny", "huge", "narrow"]


def _spectrum(kind: str, n: int, rng: np.random.Generator) -> np.ndarray:
    if kind == "pareto":
        return rng.pareto(rng.uniform(0.5, 4.0), n) + 1.0
    if kind == "mp_tail":  # Marchenko-Pastur-like bulk (Wishart eigenvalues) plus a power-law tail
        k = max(1, n // 10)
        if n - k <= 256:
            a = rng.standard_normal((n - k, 2 * (n - k)))
            bulk = np.linalg.eigvalsh(a @ a.T / a.shape[1])
        else:
            bulk = rng.gamma(4.0, 0.25, n - k)
        return np.concatenate([bulk, (rng.pareto(rng.uniform(1.0, 4.0), k) + 1.0) * bulk.max()])
    if kind == "lognormal":
        return rng.lognormal(0.0, rng.uniform(0.1, 3.0), n)
    if kind == "ties":  # heavy ties: a few decimals only
        return np.round(rng.pareto(1.5, n) + 1.0, int(rng.integers(0, 3)))
    if kind == "repeated":  # a small set of values, each repeated
        return rng.choice(rng.pareto(2.0, int(rng.integers(1, 12))) + 1.0, n)
    if kind == "tiny":
        return (rng.pareto(2.0, n) + 1.0) * 1e-30
    if kind == "huge":
        return (rng.pareto(2.0, n) + 1.0) * 1e30
    # narrow: a band of relative width ~1e-6 (near-tied tails, large alpha)
    return 1.0 + 1e-6 * rng.random(n)


@st.composite
def spectra(draw, min_n: int = 2, max_n: int = 3000, dtypes=(torch.float32, torch.float64)):
    """A 1-D positive float tensor: heavy-tailed spectra of many shapes, mostly small sizes."""
    kind = draw(st.sampled_from(SPECTRUM_KINDS))
    dtype = draw(st.sampled_from(dtypes))
    seed = draw(st.integers(0, 2**32 - 1))
    hi = draw(st.sampled_from([min(max_n, 40), min(max_n, 400), max_n]))
    n = draw(st.integers(min_n, max(min_n, hi)))
    values = _spectrum(kind, n, np.random.default_rng(seed))
    t = torch.from_numpy(values).to(dtype)
    # float32 rounding of 'tiny'/'huge' is fine; a value rounded to 0 or inf is not a spectrum
    return t.clamp(min=torch.finfo(dtype).tiny, max=torch.finfo(dtype).max)


# --------------------------------------------------------------------------- tolerances
def _alpha_tol(r: dict, values: np.ndarray, xmax: float | None) -> np.ndarray:
    """First-order bound on |alpha_kernel - alpha_reference| per candidate (module docstring)."""
    tol = np.empty(r["xmins"].size)
    for c, xmin in enumerate(r["xmins"]):
        tail = values[values >= xmin]
        n = tail.size
        s = float(np.sum(np.log(tail / xmin)))
        ds = EPS * (4 * n + (4 + math.log2(n)) * s)
        a = r["alphas"][c]
        if xmax is None:
            tol[c] = 2 * n * ds / (s * s) + 4 * EPS * abs(a)
            continue
        closed = 1.0 + n / s
        t = a - 1.0
        if t == closed - 1.0:  # powerlaw mode, closed form kept
            tol[c] = 2 * n * ds / (s * s) + 4 * EPS * abs(a)
            continue
        L = math.log(xmax / xmin)
        u = t * L
        if abs(u) < 1e-4:
            gprime = -L * L / 12
            terms = L
        else:
            gprime = -1.0 / (t * t) + L * L * math.exp(u) / math.expm1(u) ** 2 if abs(u) < 700 \
                else -1.0 / (t * t)
            terms = abs(1.0 / t) + abs(L / math.expm1(u)) if abs(u) < 700 else abs(1.0 / t) + L
        dg = 2 * ds / n + 16 * EPS * (terms + s / n)
        tol[c] = dg / abs(gprime) + 8 * EPS * (abs(t) + 1)
    return tol


def _d_tol(r: dict, values: np.ndarray, xmax: float | None, alpha_tol: np.ndarray) -> np.ndarray:
    tol = np.empty(r["xmins"].size)
    for c, xmin in enumerate(r["xmins"]):
        tail = values[values >= xmin]
        ymax = float(np.log(tail.max() / xmin))
        t = abs(r["alphas"][c] - 1.0)
        if xmax is None:
            sens, g = ymax, t
        else:
            L = math.log(xmax / xmin)
            sens, g = L, t + 1.0 / L
        tol[c] = sens * alpha_tol[c] + 8 * EPS * (1 + g * (1 + ymax))
    return tol


def _used_values(x: torch.Tensor, xmax, nonpositive) -> np.ndarray:
    v = ref.as_float64(x)
    if nonpositive == "drop":
        v = v[v > 0]
    if xmax is not None:
        v = v[v <= xmax]
    return np.sort(v)


def assert_matches_reference(fit: PowerLawFit, x: torch.Tensor, *, xmax=None, xmax_alpha="mle",
                             alpha_range=None, nonpositive="error") -> None:
    r = ref.power_law_scan(x, xmax=xmax, xmax_alpha=xmax_alpha, alpha_range=alpha_range,
                           nonpositive=nonpositive)
    values = _used_values(x, xmax, nonpositive)
    assert int(fit.n_used) == values.size
    np.testing.assert_array_equal(fit.xmins.numpy(), r["xmins"])
    np.testing.assert_array_equal(fit.n_tails.numpy(), r["n_tails"])
    if r["best"] < 0:
        assert math.isnan(float(fit.alpha)) and math.isnan(float(fit.xmin))
        assert math.isnan(float(fit.D)) and int(fit.n_tail) == 0
        return
    a_tol = _alpha_tol(r, values, xmax)
    d_tol = _d_tol(r, values, xmax, a_tol)
    da = np.abs(fit.alphas.numpy() - r["alphas"])
    dd = np.abs(fit.Ds.numpy() - r["Ds"])
    assert np.all(da <= a_tol), (da - a_tol).max()
    assert np.all(dd <= d_tol), (dd - d_tol).max()
    kb = int(np.searchsorted(r["xmins"], float(fit.xmin)))
    rb = r["best"]
    if kb != rb:
        # A near-tie: both D of the reference equal within rounding, both eligible (or a
        # candidate whose alpha is within its tolerance of an alpha_range bound).
        assert abs(r["Ds"][kb] - r["Ds"][rb]) <= d_tol[kb] + d_tol[rb], (kb, rb)
    else:
        assert int(fit.n_tail) == r["n_tail"]
        assert abs(float(fit.alpha) - r["alpha"]) <= a_tol[rb]
        assert abs(float(fit.D) - r["D"]) <= d_tol[rb]
        sigma = (float(fit.alpha) - 1) / math.sqrt(int(fit.n_tail))
        assert float(fit.sigma) == pytest.approx(sigma, rel=4 * EPS, abs=0)
    if alpha_range is not None:
        lo, hi = alpha_range
        near = (np.abs(r["alphas"] - lo) <= a_tol) | (np.abs(r["alphas"] - hi) <= a_tol)
        if not near.any():
            assert int(fit.n_eligible) == r["n_eligible"]


# --------------------------------------------------------------------------- property tests
@given(x=spectra())
def test_matches_reference(x):
    assert_matches_reference(fit_power_law(x), x)


@given(x=spectra(max_n=1500), q=st.sampled_from([0.5, 0.9, 0.99, 1.0, 2.0]),
       mode=st.sampled_from(["mle", "powerlaw"]))
def test_matches_reference_with_xmax(x, q, mode):
    v = x.double().numpy()
    xmax = float(np.quantile(v, q)) if q <= 1.0 else float(v.max()) * q
    if not xmax > v.min():
        return
    assert_matches_reference(fit_power_law(x, xmax=xmax, xmax_alpha=mode), x, xmax=xmax,
                             xmax_alpha=mode)


@given(x=spectra(max_n=1500), bounds=st.sampled_from([(0.0, 3.0), (1.5, 2.5), (2.0, 1e9)]))
def test_matches_reference_with_alpha_range(x, bounds):
    assert_matches_reference(fit_power_law(x, alpha_range=bounds), x, alpha_range=bounds)


@given(x=spectra(max_n=2000), xmax_q=st.sampled_from([None, 0.9]))
def test_pruned_equals_exhaustive_bitwise(x, xmax_q):
    """The block bounds skip only points that cannot reach the running max: same D, bitwise."""
    xmax = None if xmax_q is None else float(np.quantile(x.double().numpy(), xmax_q))
    if xmax is not None and not xmax > float(x.min()):
        return
    a = fit_power_law(x, xmax=xmax)
    b = fit_power_law(x, xmax=xmax, d_mode="exhaustive")
    assert torch.equal(a.Ds, b.Ds) and torch.equal(a.alphas, b.alphas)
    assert torch.equal(a.xmin, b.xmin) or (a.xmin.isnan() and b.xmin.isnan())


@settings(max_examples=20)
@given(layers=st.lists(spectra(max_n=600), min_size=1, max_size=6))
def test_batched_list_of_mixed_lengths(layers):
    fits = fit_power_law(layers)
    assert isinstance(fits, list) and len(fits) == len(layers)
    for f, x in zip(fits, layers):
        single = fit_power_law(x)
        for name in ("alphas", "Ds", "xmins", "n_tails"):
            assert torch.equal(getattr(f, name), getattr(single, name))
        assert_matches_reference(f, x)


@given(x=spectra(max_n=800), frac=st.sampled_from([0.01, 0.3]))
def test_drop_nonpositive(x, frac):
    v = x.clone()
    rng = np.random.default_rng(int(x.numel()))
    mask = torch.from_numpy(rng.random(v.numel()) < frac)
    v[mask] = torch.from_numpy(rng.choice([0.0, -1.0, -1e-7], int(mask.sum()))).to(v.dtype)
    if not (v > 0).any():
        return
    f = fit_power_law(v, nonpositive="drop")
    assert int(f.n_dropped) == int(mask.sum())
    assert_matches_reference(f, v, nonpositive="drop")


# --------------------------------------------------------------------------- fixed cases
def _mp_tail(seed: int, tail_alpha: float, m: int = 300, k: int = 60) -> np.ndarray:
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((m, 2 * m))
    ev = np.linalg.eigvalsh(w @ w.T / (2 * m))
    return np.concatenate([ev, (rng.pareto(tail_alpha, k) + 1.0) * ev.max()])


def test_two_d_rows_equal_list():
    rng = np.random.default_rng(3)
    x = torch.from_numpy(rng.pareto(2.0, (4, 500)) + 1.0)
    rows = fit_power_law(x)
    listed = fit_power_law(list(x))
    assert len(rows) == 4
    for a, b in zip(rows, listed):
        assert torch.equal(a.Ds, b.Ds) and torch.equal(a.alpha, b.alpha)


def test_float32_equals_float64_of_same_values():
    x32 = torch.from_numpy(_mp_tail(0, 2.5)).float()
    a, b = fit_power_law(x32), fit_power_law(x32.double())
    assert torch.equal(a.Ds, b.Ds) and torch.equal(a.alphas, b.alphas)


def _extreme(name: str) -> np.ndarray:
    rng = np.random.default_rng(11)
    if name == "subnormal":  # subnormals with a tail 300 decades up
        return np.concatenate([5e-324 * rng.integers(1, 1000, 200),
                               1e-300 * (rng.pareto(1.0, 100) + 1.0)])
    if name == "near_max":
        return 1.7e308 * rng.uniform(0.1, 1.0, 300)
    if name == "wide":  # 300 decades, each value repeated
        return np.repeat(10.0 ** rng.uniform(-150, 150, 60), 7)
    if name == "adjacent":  # consecutive doubles: a tail of spacing eps
        return 1.0 + np.arange(50) * EPS
    return 1.0 + 1e-12 * rng.random(300)  # narrow: alpha ~ 1e13


@pytest.mark.parametrize("name", ["subnormal", "near_max", "wide", "adjacent", "narrow"])
@pytest.mark.parametrize("xmax_q", [None, 0.9, 1.0])
def test_extreme_magnitudes_and_spans(name, xmax_q):
    """The reference's log(x/xmin) overflows only beyond 308 decades; these stay inside."""
    values = _extreme(name)
    x = torch.from_numpy(values)
    xmax = None if xmax_q is None else float(np.quantile(values, xmax_q))
    f = fit_power_law(x, xmax=xmax)
    assert torch.equal(f.Ds, fit_power_law(x, xmax=xmax, d_mode="exhaustive").Ds)
    assert_matches_reference(f, x, xmax=xmax)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_inputs(dtype):
    x = torch.from_numpy(_mp_tail(2, 2.0)).to(dtype)
    f = fit_power_law(x)
    assert torch.equal(f.Ds, fit_power_law(x.double()).Ds)
    assert_matches_reference(f, x)


def test_fewer_than_three_distinct_values_give_nan():
    for values in ([1.0], [2.0, 2.0, 2.0], [1.0, 3.0], [1.0, 3.0, 3.0, 1.0]):
        f = fit_power_law(torch.tensor(values, dtype=torch.float64))
        assert f.xmins.numel() == 0 and f.n_tail == 0
        assert f.alpha.isnan() and f.xmin.isnan() and f.D.isnan() and f.sigma.isnan()
        assert not bool(f.in_range)
    f = fit_power_law(torch.tensor([1.0, 2.0, 4.0]))  # one candidate: xmin = 1
    assert f.xmins.tolist() == [1.0] and int(f.n_tail) == 3
    assert float(f.alpha) == pytest.approx(1 + 3 / math.log(8), rel=1e-15)


def test_batch_with_degenerate_layers():
    rng = np.random.default_rng(8)
    layers = [torch.tensor([2.0, 2.0]), torch.from_numpy(rng.pareto(2.0, 2000) + 1.0),
              torch.tensor([1.0, 5.0]), torch.tensor([3.0]),
              torch.from_numpy(rng.pareto(1.0, 3000) + 1.0).float()]
    fits = fit_power_law(layers)
    for f, x in zip(fits, layers):
        assert_matches_reference(f, x)
    assert [f.xmins.numel() for f in fits] == [0, 1998, 0, 0, fits[4].xmins.numel()]


def test_alpha_range_fallback_when_none_eligible():
    x = torch.from_numpy(np.random.default_rng(5).pareto(1.0, 400) + 1.0)  # alpha ~ 2
    f = fit_power_law(x, alpha_range=(10.0, 20.0))
    g = fit_power_law(x)
    assert int(f.n_eligible) == 0 and not bool(f.in_range)
    assert torch.equal(f.xmin, g.xmin) and torch.equal(f.alpha, g.alpha)


def test_deterministic_across_thread_counts():
    xs = [torch.from_numpy(_mp_tail(s, 2.0 + s)) for s in range(3)]
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = fit_power_law(xs)
        torch.set_num_threads(max(2, before))
        many = fit_power_law(xs)
    finally:
        torch.set_num_threads(before)
    for a, b in zip(one, many):
        assert torch.equal(a.Ds, b.Ds) and torch.equal(a.alphas, b.alphas)


def test_input_not_mutated():
    base = torch.from_numpy(_mp_tail(1, 3.0)).float()
    x = base.flip(0)[::2]  # non-contiguous float32: the op converts and sorts its own copy
    before, stride = x.clone(), x.stride()
    fit_power_law(x)
    fit_power_law([x, base], xmax=float(base.max()) / 2)
    assert torch.equal(x, before) and x.stride() == stride == (2,)
    z = before.clone()
    z[0] = 0.0
    zc = z.clone()
    fit_power_law(z, nonpositive="drop")
    assert torch.equal(z, zc)


# --------------------------------------------------------------------------- powerlaw package
def _powerlaw_fit(values: np.ndarray, xmax=None):
    powerlaw = pytest.importorskip("powerlaw", reason="the powerlaw package is not installed")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return powerlaw.Fit(values, xmax=xmax, verbose=0)


@pytest.mark.parametrize("seed,tail_alpha", [(0, 3.5), (1, 2.0), (2, 0.8), (3, 1.5)])
def test_agrees_with_powerlaw_package(seed, tail_alpha):
    """No xmax: powerlaw takes the closed-form alpha for every candidate with alpha in (1, 3)
    (its Nelder-Mead refit returns the closed form unchanged below 1.5) and skips candidates
    with alpha >= 3 (its parameter range (0, 3)): alpha_range=(0, 3) is its selection.
    Its E is (i/N - j/N)/(1 - j/N) in floats against our count/n: D agrees to a few eps."""
    values = _mp_tail(seed, tail_alpha)
    pf = _powerlaw_fit(values)
    f = fit_power_law(torch.from_numpy(values), alpha_range=(0.0, 3.0))
    assert float(f.xmin) == pf.xmin
    assert float(f.alpha) == pytest.approx(pf.alpha, rel=1e-13, abs=0)
    assert float(f.D) == pytest.approx(pf.D, rel=0, abs=1e-13)
    assert float(f.sigma) == pytest.approx(pf.sigma, rel=1e-13, abs=0)
    np.testing.assert_array_equal(f.xmins.numpy(), pf.xmin_fitting_results["xmins"])
    closed = (f.alphas > 1.5) & (f.alphas < 3.0)
    np.testing.assert_allclose(f.Ds[closed].numpy(),
                               pf.xmin_fitting_results["distances"][closed.numpy()],
                               rtol=0, atol=1e-13)


@pytest.mark.parametrize("seed,tail_alpha", [(1, 2.0), (2, 0.8), (3, 1.5)])
def test_agrees_with_powerlaw_package_with_xmax(seed, tail_alpha):
    """With xmax powerlaw switches estimator (closed form in (1.5, 3], else a Nelder-Mead
    truncated MLE with tol=1e-4): xmax_alpha='powerlaw' reproduces the switch, so alpha agrees
    exactly on the closed-form branch and to the optimiser's tolerance (1e-4, checked at 2e-4;
    D then moves by at most L * 2e-4) elsewhere."""
    values = _mp_tail(seed, tail_alpha)
    xmax = 0.5 * float(values.max())
    pf = _powerlaw_fit(values, xmax=xmax)
    f = fit_power_law(torch.from_numpy(values), xmax=xmax, xmax_alpha="powerlaw",
                      alpha_range=(0.0, 3.0))
    assert float(f.xmin) == pf.xmin
    closed_form = 1.5 < float(f.alpha) <= 3.0 and pf.alpha == float(f.alpha)
    tol = 1e-13 if closed_form else 2e-4
    assert float(f.alpha) == pytest.approx(pf.alpha, rel=0, abs=tol)
    L = math.log(xmax / float(f.xmin))
    assert float(f.D) == pytest.approx(pf.D, rel=0, abs=1e-13 if closed_form else L * 2e-4)
    assert float(f.sigma) == pytest.approx(pf.sigma, rel=0, abs=tol)


# --------------------------------------------------------------------------- bad input
BAD_INPUTS = [
    (lambda: torch.empty(0), ValueError, r"x: expected at least one value"),
    (lambda: [], ValueError, r"x: expected at least one layer"),
    (lambda: torch.empty(0, 5), ValueError, r"x: expected at least one row"),
    (lambda: torch.ones(2, 2, 2), ValueError, r"x: expected a 1-D tensor"),
    (lambda: [torch.ones(3), torch.ones(2, 2)], ValueError, r"x\[1\]: expected a 1-D tensor"),
    (lambda: [torch.ones(3), [1.0, 2.0]], TypeError, r"x\[1\]: expected a tensor"),
    (lambda: np.ones(5), TypeError, r"x: expected a tensor"),
    (lambda: torch.arange(1, 10), TypeError, r"x: expected a floating-point tensor"),
    (lambda: torch.ones(5, dtype=torch.complex64), TypeError, r"x: expected a floating-point"),
    (lambda: torch.ones(5, dtype=torch.bool), TypeError, r"x: expected a floating-point"),
    (lambda: [torch.ones(4), torch.ones(0)], ValueError, r"x\[1\]: expected at least one value"),
    (lambda: torch.tensor([1.0, float("nan"), 2.0]), ValueError,
     r"xs\[0\]\[1\]: expected finite values, got nan"),
    (lambda: [torch.ones(3), torch.tensor([1.0, 2.0, float("inf")])], ValueError,
     r"xs\[1\]\[2\]: expected finite values, got inf"),
    (lambda: torch.tensor([1.0, -2.0, 3.0]), ValueError,
     r"xs\[0\]\[1\]: expected positive values .*got -2"),
    (lambda: torch.tensor([1.0, 0.0, 3.0]), ValueError, r"xs\[0\]\[1\]: expected positive"),
]


@pytest.mark.parametrize("make,exc,match", BAD_INPUTS)
def test_bad_input_raises(make, exc, match):
    with pytest.raises(exc, match=match):
        fit_power_law(make())


@pytest.mark.parametrize("kwargs,exc,match", [
    ({"xmax": 0.5}, ValueError, r"xmax: must exceed the smallest positive value of xs\[0\]"),
    ({"xmax": 1.0}, ValueError, r"xmax: must exceed"),
    ({"xmax": float("nan")}, ValueError, r"xmax: expected a finite value > 0"),
    ({"xmax": -3.0}, ValueError, r"xmax: expected a finite value > 0"),
    ({"xmax": True}, TypeError, r"xmax: expected a float"),
    ({"xmax_alpha": "numerical"}, ValueError, r"xmax_alpha: expected one of"),
    ({"nonpositive": "clip"}, ValueError, r"nonpositive: expected one of"),
    ({"d_mode": "fast"}, ValueError, r"d_mode: expected one of"),
    ({"alpha_range": (3.0, 1.0)}, ValueError, r"alpha_range: expected low < high"),
    ({"alpha_range": (1.0, float("nan"))}, ValueError, r"alpha_range: expected low < high"),
    ({"alpha_range": 3.0}, ValueError, r"alpha_range: expected \(low, high\)"),
])
def test_bad_arguments_raise(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        fit_power_law(torch.tensor([1.0, 2.0, 3.0, 5.0]), **kwargs)


def test_all_nonpositive_dropped_raises():
    with pytest.raises(ValueError, match=r"xs\[0\]: no positive values"):
        fit_power_law(torch.tensor([0.0, -1.0]), nonpositive="drop")


def test_op_checks_its_own_arguments():
    op = torch.ops.gradience.fit_power_law
    x = [torch.tensor([1.0, 2.0, 3.0, 5.0])]
    with pytest.raises(ValueError, match=r"alpha_range: expected \[\] or \[low, high\]"):
        op(x, None, "mle", [1.0], False, "pruned")
    with pytest.raises(TypeError, match=r"xs\[0\]: expected a floating-point tensor"):
        op([torch.arange(3)], None, "mle", [], False, "pruned")
    with pytest.raises(ValueError, match=r"d_mode: expected 'pruned' or 'exhaustive'"):
        op(x, None, "mle", [], False, "fast")


# --------------------------------------------------------------------------- compile
def _fit_op(xs: list[torch.Tensor], xmax: float):
    fits, counts, curves, n_tails = torch.ops.gradience.fit_power_law(
        xs, None, "mle", [], False, "pruned")
    trunc = torch.ops.gradience.fit_power_law(xs, xmax, "powerlaw", [0.0, 3.0], True, "pruned")
    return fits[:, 1] * 2, counts[:, 0], curves.nan_to_num(-1.0), n_tails, trunc[0]


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_compile_fullgraph(backend):
    torch._dynamo.reset()
    xs = [torch.from_numpy(_mp_tail(0, 2.5)), torch.from_numpy(_mp_tail(1, 3.0)[:200]).float()]
    xmax = float(xs[1].max()) / 2
    eager = _fit_op(xs, xmax)
    compiled = torch.compile(_fit_op, fullgraph=True, backend=backend)(xs, xmax)
    for a, b in zip(eager, compiled):
        torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True)
