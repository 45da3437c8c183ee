"""spectrum / esd (WeightWatcher conventions) and spectral_metrics / Marchenko-Pastur against the
NumPy references: layer kinds and orientations, conv slicing and pooling, batches and lists,
approximate mode within its bound, metrics by textbook formulas on hypothesis spectra, the MP
median, spike counts on synthetic noise + spikes, argument errors, devices.
"""

from __future__ import annotations

import logging
import math

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import reference as ref
from gradience_kernels.spectral import esd, spectrum
from gradience_kernels.spectrum_metrics import (
    TW1_QUANTILE_99,
    marchenko_pastur_cdf,
    marchenko_pastur_fit,
    marchenko_pastur_median,
    spectral_metrics,
)

EPS64 = torch.finfo(torch.float64).eps


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: one torch/BLAS thread


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def eig_tol(ev_ref: np.ndarray, shape) -> float:
    """eigvalsh of the Gram matrix S^T S / N has absolute error ~ max(m, n) eps lambda_max (the
    Gram product and the symmetric eigensolver, both backward stable); the SVD side is smaller."""
    return 16 * max(shape) * EPS64 * float(np.max(np.abs(ev_ref), initial=0.0))


# --------------------------------------------------------------------------- esd conventions
def test_linear_both_orientations_and_embedding():
    torch.manual_seed(0)
    for mod in (torch.nn.Linear(30, 50), torch.nn.Linear(50, 30), torch.nn.Embedding(40, 18)):
        w = mod.weight
        for normalize in (True, False):
            r = esd(mod, normalize=normalize)
            expected = ref.ww_esd(w, conv=False, normalize=normalize)
            assert r.eigenvalues.dtype == torch.float64
            assert r.N == max(w.shape) and r.M == min(w.shape) and r.rf == 1
            assert r.normalized is normalize and r.error_estimate is None
            assert r.eigenvalues.shape == (min(w.shape),)
            np.testing.assert_allclose(r.eigenvalues.numpy(), expected, rtol=0,
                                       atol=eig_tol(expected, w.shape))
            # the raw tensor gives the same
            assert torch.equal(esd(w.detach(), normalize=normalize).eigenvalues, r.eigenvalues)


@pytest.mark.parametrize("make", [
    lambda: torch.nn.Conv2d(12, 20, 3),
    lambda: torch.nn.Conv2d(20, 12, (2, 3)),
    lambda: torch.nn.Conv1d(16, 24, 5),
    lambda: torch.nn.Conv3d(4, 6, 2),
])
def test_conv_slices_pooled(make):
    torch.manual_seed(1)
    mod = make()
    w = mod.weight
    rf = int(np.prod(w.shape[2:]))
    r = esd(mod)
    expected = ref.ww_esd(w, conv=True)
    assert r.rf == rf and r.N == max(w.shape[:2]) and r.M == min(w.shape[:2])
    assert r.eigenvalues.shape == (rf * min(w.shape[:2]),)
    np.testing.assert_allclose(r.eigenvalues.numpy(), expected, rtol=0,
                               atol=eig_tol(expected, w.shape[:2]))
    assert torch.equal(esd(w.detach(), conv=True).eigenvalues, r.eigenvalues)
    sp = spectrum(mod)
    assert sp.singular_values.shape == (rf, min(w.shape[:2])) and sp.shape == tuple(w.shape[:2])


def test_batch_and_list():
    g = gen(2)
    batch = torch.randn(2, 3, 9, 5, generator=g)
    r = esd(batch, conv=False)
    assert r.eigenvalues.shape == (2, 3, 5)
    for i in range(2):
        for j in range(3):
            e = ref.ww_esd(batch[i, j], conv=False)
            np.testing.assert_allclose(r.eigenvalues[i, j].numpy(), e, rtol=0,
                                       atol=eig_tol(e, (9, 5)))
    items = [torch.randn(7, 4, generator=g), torch.nn.Conv2d(3, 5, 2),
             torch.randn(7, 4, generator=g), torch.randn(4, 7, generator=g).double()]
    res = esd(items)
    assert isinstance(res, list) and len(res) == 4
    for item, r in zip(items, res):
        w = item.weight if isinstance(item, torch.nn.Module) else item
        e = ref.ww_esd(w, conv=isinstance(item, torch.nn.Module))
        np.testing.assert_allclose(r.eigenvalues.numpy(), e, rtol=0, atol=eig_tol(e, w.shape[:2]))


def test_matches_weightwatcher_get_esd():
    """The installed WeightWatcher's own ESDs (get_ESD: unnormalized s_i^2) for Linear, Conv2d
    and Embedding layers equal esd(normalize=False)."""
    ww = pytest.importorskip("weightwatcher")
    logging.disable(logging.WARNING)
    try:
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(30, 50), torch.nn.Conv2d(12, 20, 3),
                                    torch.nn.Embedding(40, 18), torch.nn.Conv2d(20, 12, 2))
        watcher = ww.WeightWatcher(model=model)
        for layer_id, mod in enumerate(model, start=1):
            theirs = np.sort(np.asarray(watcher.get_ESD(layer=layer_id), dtype=np.float64))[::-1]
            ours = esd(mod, normalize=False).eigenvalues.numpy()
            # WeightWatcher computes in float32 (torch_T_to_np .float()) then squares
            np.testing.assert_allclose(ours, theirs, rtol=8 * torch.finfo(torch.float32).eps
                                       * math.sqrt(max(mod.weight.shape[:2])), atol=0)
    finally:
        logging.disable(logging.NOTSET)


@st.composite
def weights(draw):
    """A weight tensor and whether it is a conv weight: 2-D matrices of any orientation (including
    1 x n and n x 1), conv weights (out, in, *kernel) with 1-3 kernel dims, float32/64/bf16."""
    conv = draw(st.booleans())
    out_c = draw(st.integers(1, 12))
    in_c = draw(st.integers(1, 12))
    kernel = tuple(draw(st.lists(st.integers(1, 3), min_size=1, max_size=3))) if conv else ()
    dtype = draw(st.sampled_from([torch.float32, torch.float64, torch.bfloat16]))
    g = gen(draw(st.integers(0, 2**31 - 1)))
    w = torch.randn(out_c, in_c, *kernel, generator=g, dtype=torch.float64)
    w = (w * draw(st.sampled_from([1e-30, 1.0, 1e30] if dtype == torch.float64 else [1e-3, 1.0])))
    return w.to(dtype), conv


@given(weights(), st.booleans())
def test_hypothesis_esd_against_reference(case, normalize):
    w, conv = case
    before = w.clone()
    r = esd(w, conv=conv, normalize=normalize)
    assert torch.equal(w, before)
    e = ref.ww_esd(w, conv=conv, normalize=normalize)
    assert r.eigenvalues.shape == e.shape and r.rf == (int(np.prod(w.shape[2:])) if conv else 1)
    assert bool((r.eigenvalues[:-1] >= r.eigenvalues[1:]).all())
    np.testing.assert_allclose(r.eigenvalues.numpy(), e, rtol=0, atol=eig_tol(e, w.shape[:2]))


def test_approximate_mode_within_bound():
    g = gen(3)
    # noise + a few strong directions, like a trained layer's spikes
    w = torch.randn(120, 80, generator=g) + 5 * torch.randn(120, 3, generator=g) @ torch.randn(
        3, 80, generator=g) / 3
    exact = esd(w)
    approx = esd(w, rank=10, generator=gen(4))
    assert approx.eigenvalues.shape == (10,) and approx.error_estimate.shape == ()
    diff = (approx.eigenvalues - exact.eigenvalues[:10]).abs().max()
    assert float(diff) <= float(approx.error_estimate)
    sp = spectrum(w, rank=10, generator=gen(4))
    exact_s = spectrum(w).singular_values[:10]
    assert float((sp.singular_values - exact_s).abs().max()) <= float(sp.error_estimate)
    conv = torch.nn.Conv2d(16, 24, 3)
    a = esd(conv, rank=4, generator=gen(5))
    e = spectrum(conv).singular_values  # (9, 16)
    assert a.eigenvalues.shape == (36,) and a.error_estimate.shape == (9,)
    s = spectrum(conv, rank=4, generator=gen(5))
    assert bool(((s.singular_values - e[:, :4]).abs().amax(dim=-1) <= s.error_estimate).all())


def test_esd_errors():
    with pytest.raises(ValueError, match=r"W: a 3-D tensor of shape \(4, 3, 2\) is either a conv"):
        esd(torch.randn(4, 3, 2))
    with pytest.raises(TypeError, match="W: expected a float dtype"):
        esd(torch.ones(3, 3, dtype=torch.int32))
    with pytest.raises(ValueError, match=r"W: expected a matrix or a conv weight, got shape="):
        esd(torch.ones(3))
    with pytest.raises(ValueError, match=r"W: empty weight"):
        esd(torch.ones(0, 3))
    with pytest.raises(TypeError, match="W: unsupported module LayerNorm"):
        esd(torch.nn.LayerNorm(4))
    with pytest.raises(TypeError, match=r"W\[1\]: expected a tensor or an nn.Module, got str"):
        esd([torch.randn(3, 3), "x"])
    with pytest.raises(ValueError, match="non-empty list"):
        spectrum([])
    with pytest.raises(ValueError, match=r"rank must be in \[1, min\(m, n\)\] = \[1, 3\]"):
        spectrum(torch.randn(5, 3), rank=4)
    bad = torch.randn(4, 4)
    bad[0, 0] = math.nan
    with pytest.raises(ValueError, match="W: non-finite entries are not allowed, found 1 NaN"):
        esd(bad)
    bad[0, 0] = math.inf
    with pytest.raises(ValueError, match=r"W\[1\]: non-finite entries are not allowed, found 0 NaN "
                                         r"and 1 Inf"):
        esd([torch.randn(2, 2), bad])


def test_inputs_not_mutated_and_bf16():
    w = torch.randn(20, 12).bfloat16()
    before = w.clone()
    r = esd(w)
    assert torch.equal(w, before)
    e = ref.ww_esd(w, conv=False)
    np.testing.assert_allclose(r.eigenvalues.numpy(), e, rtol=0, atol=eig_tol(e, w.shape))


def test_device_agrees_with_cpu(device):
    g = gen(7)
    w = torch.randn(3, 4, 30, 20, generator=g)
    cpu = esd(w, conv=True)
    dev = esd(w.to(device), conv=True)
    assert dev.eigenvalues.device.type == device.type
    assert torch.allclose(dev.eigenvalues.cpu(), cpu.eigenvalues, rtol=0,
                          atol=eig_tol(cpu.eigenvalues.numpy(), (30, 20)))
    m_dev = spectral_metrics(spectrum(w.to(device), conv=False))
    m_cpu = spectral_metrics(spectrum(w, conv=False))
    assert torch.allclose(m_dev.stable_rank.cpu(), m_cpu.stable_rank, rtol=1e-12)
    assert torch.equal(m_dev.mp.num_spikes.cpu(), m_cpu.mp.num_spikes)
    approx = spectrum(w.to(device), conv=False, rank=5, generator=gen(1))
    assert approx.singular_values.device.type == device.type


# --------------------------------------------------------------------------- metrics
@st.composite
def spectra_cases(draw):
    """(singular values of a matrix, its shape): Gaussian, exactly rank-deficient, zero, with
    scales 1e-30..1e30 (the spectrum of a float64 matrix, computed by the NumPy reference)."""
    m = draw(st.integers(1, 20))
    n = draw(st.integers(1, 20))
    kind = draw(st.sampled_from(["gauss", "lowrank", "zero", "spiked"]))
    seed = draw(st.integers(0, 2**31 - 1))
    g = gen(seed)
    if kind == "zero":
        w = torch.zeros(m, n, dtype=torch.float64)
    elif kind == "lowrank":
        k = draw(st.integers(1, min(m, n)))
        w = torch.randn(m, k, generator=g, dtype=torch.float64) @ torch.randn(
            k, n, generator=g, dtype=torch.float64)
    else:
        w = torch.randn(m, n, generator=g, dtype=torch.float64)
        if kind == "spiked":
            w[0, 0] += 50.0
    w = w * draw(st.sampled_from([1e-30, 1e-5, 1.0, 1e5, 1e30]))
    return w, (m, n)


def assert_metrics_match(mt, expected, i=None):
    pick = (lambda t: t) if i is None else (lambda t: t[i])
    for key in ("spectral_norm", "frobenius_norm", "nuclear_norm", "stable_rank",
                "effective_rank", "condition_number", "log10_spectral_norm"):
        ours = float(pick(getattr(mt, key)))
        theirs = expected[key]
        if math.isinf(theirs):
            assert ours == theirs, key
        else:
            # a few roundings of sums of <= 20 terms, and exp/log of them
            assert ours == pytest.approx(theirs, rel=64 * EPS64, abs=0), key
    assert int(pick(mt.numerical_rank)) == expected["numerical_rank"]


@given(spectra_cases())
def test_metrics_against_textbook_formulas(case):
    w, shape = case
    sigma = ref.svd_values(w)
    values = torch.from_numpy(sigma.copy())
    mt = spectral_metrics(values, shape)
    assert mt.complete
    assert_metrics_match(mt, ref.matrix_metrics(sigma, shape, EPS64))
    # other value kinds and orders describe the same spectrum
    N = max(shape)
    for kind, vals in (("eigenvalues", values ** 2 / N), ("squared", values ** 2)):
        other = spectral_metrics(vals.flip(0), shape, values_are=kind)
        s1 = float(values[0])
        assert float(other.spectral_norm) == pytest.approx(s1, rel=4 * EPS64, abs=0)
        assert float(other.stable_rank) == pytest.approx(float(mt.stable_rank), rel=64 * EPS64)
    # MP against the reference (same estimator, independent median)
    mp = ref.mp_fit(sigma, shape)
    assert float(mt.mp.sigma2) == pytest.approx(mp["sigma2"], rel=1e-12, abs=0)
    assert float(mt.mp.bulk_edge) == pytest.approx(mp["bulk_edge"], rel=1e-12, abs=0)
    assert float(mt.mp.spike_threshold) == pytest.approx(mp["spike_threshold"], rel=1e-12, abs=0)
    lam = sigma ** 2 / N
    near = np.abs(lam - mp["spike_threshold"]) <= 1e-12 * mp["spike_threshold"]
    if not near.any():  # a value on the threshold may fall either way by rounding
        assert int(mt.mp.num_spikes) == mp["num_spikes"]


def test_metrics_batched_and_dtype_eps():
    g = gen(8)
    w = torch.randn(4, 12, 7, generator=g, dtype=torch.float64)
    w[1] = 0.0
    w[2, :, 3:] = 0.0  # rank 3
    w[3] *= 1e-3
    sp = spectrum(w, conv=False)
    mt = spectral_metrics(sp)
    assert mt.spectral_norm.shape == (4,) and mt.numerical_rank.dtype == torch.int64
    for i in range(4):
        expected = ref.matrix_metrics(ref.svd_values(w[i]), (12, 7), EPS64)
        assert_metrics_match(mt, expected, i)
    assert float(mt.stable_rank[1]) == 0.0 and float(mt.effective_rank[1]) == 0.0
    assert math.isinf(float(mt.condition_number[1])) and math.isinf(float(mt.condition_number[2]))
    assert int(mt.numerical_rank[2]) == 3 and int(mt.numerical_rank[1]) == 0
    # the weight's precision as the rank tolerance: a value at 1e-9 s_1 is noise for float32
    s = torch.tensor([1.0, 0.5, 1e-9], dtype=torch.float64)
    assert int(spectral_metrics(s, (3, 3)).numerical_rank) == 3
    assert int(spectral_metrics(s, (3, 3), dtype=torch.float32).numerical_rank) == 2


def test_truncated_spectrum_marked_incomplete():
    s = torch.tensor([3.0, 2.0], dtype=torch.float64)
    mt = spectral_metrics(s, (10, 5))
    assert not mt.complete
    assert math.isnan(float(mt.condition_number)) and math.isnan(float(mt.mp.sigma2))
    assert int(mt.mp.num_spikes) == -1
    assert float(mt.frobenius_norm) == pytest.approx(math.sqrt(13.0))


def test_metrics_errors():
    s = torch.tensor([2.0, 1.0])
    with pytest.raises(ValueError, match="shape: the matrix shape"):
        spectral_metrics(s)
    with pytest.raises(ValueError, match=r"shape must be \(m, n\)"):
        spectral_metrics(s, (3,))
    with pytest.raises(ValueError, match=r"shape must be \(m, n\)"):
        spectral_metrics(s, (0, 3))
    with pytest.raises(ValueError, match=r"K = 2 values for a 1 x 3 matrix"):
        spectral_metrics(s, (1, 3))
    with pytest.raises(ValueError, match="singular values must be >= 0"):
        spectral_metrics(torch.tensor([1.0, -0.5]), (2, 2))
    with pytest.raises(ValueError, match="eigenvalues values must be >= 0"):
        spectral_metrics(torch.tensor([1.0, -0.5]), (2, 2), values_are="eigenvalues")
    # a rounding-level negative eigenvalue is a zero
    ok = spectral_metrics(torch.tensor([1.0, -1e-18], dtype=torch.float64), (2, 2),
                          values_are="eigenvalues")
    assert math.isinf(float(ok.condition_number))
    with pytest.raises(ValueError, match="non-finite"):
        spectral_metrics(torch.tensor([1.0, math.nan]), (2, 2))
    with pytest.raises(ValueError, match="values_are must be one of"):
        spectral_metrics(s, (2, 2), values_are="sv")
    with pytest.raises(TypeError, match="values: expected a float dtype"):
        spectral_metrics(torch.tensor([2, 1]), (2, 2))
    with pytest.raises(ValueError, match=r"values: expected \(\.\.\., K\) with K >= 1"):
        spectral_metrics(torch.zeros(3, 0), (2, 2))
    with pytest.raises(ValueError, match="tw_margin must be a finite number"):
        spectral_metrics(s, (2, 2), tw_margin=math.inf)
    with pytest.raises(TypeError, match="dtype must be a float torch.dtype"):
        spectral_metrics(s, (2, 2), dtype=torch.int32)


# --------------------------------------------------------------------------- Marchenko-Pastur
@pytest.mark.parametrize("beta", [1.0, 0.75, 0.5, 0.25, 0.1, 1 / 768, 1e-6])
def test_mp_median_against_quadrature(beta):
    ours = marchenko_pastur_median(beta)
    assert ours == pytest.approx(ref.mp_median(beta), rel=1e-12, abs=0)
    # the closed form's absolute accuracy is O(eps / sqrt(beta)) (its docstring)
    assert marchenko_pastur_cdf(ours, beta) == pytest.approx(0.5, abs=64 * EPS64 / math.sqrt(beta))


def test_mp_cdf_edges_and_errors():
    for beta in (1.0, 0.3):
        a, b = (1 - math.sqrt(beta)) ** 2, (1 + math.sqrt(beta)) ** 2
        assert marchenko_pastur_cdf(a, beta) == 0.0 and marchenko_pastur_cdf(b, beta) == 1.0
        xs = np.linspace(a, b, 50)
        cdf = [marchenko_pastur_cdf(float(x), beta) for x in xs]
        assert all(c2 >= c1 for c1, c2 in zip(cdf, cdf[1:]))
    with pytest.raises(ValueError, match="beta must be in"):
        marchenko_pastur_median(1.5)
    with pytest.raises(ValueError, match="beta must be in"):
        marchenko_pastur_median(0.0)


def mp_density(x: float, beta: float) -> float:
    a, b = (1 - math.sqrt(beta)) ** 2, (1 + math.sqrt(beta)) ** 2
    return math.sqrt(max((b - x) * (x - a), 0.0)) / (2 * math.pi * beta * x)


@pytest.mark.parametrize("shape,r", [((600, 300), 5), ((400, 400), 3), ((300, 900), 8)])
def test_mp_spikes_on_noise_plus_low_rank(shape, r):
    """W = sigma Z + sum_i theta_i u_i v_i^T with theta_i 3..8 times the BBP detection threshold
    sigma sqrt(N) beta^(1/4): exactly r eigenvalues leave the bulk (far beyond the Tracy-Widom
    margin), none for sigma Z alone.

    sigma2 tolerance: a rank-r perturbation moves each singular value's rank by at most r
    (interlacing), so the median sits within r/M of the noise matrix's median in CDF units. The
    noise ESD's count below a fixed point fluctuates around M F_MP with variance ~ (2/pi^2) log M
    (the log-variance of eigenvalue counts of orthogonal-invariant ensembles), so 4 standard
    deviations, 4 sqrt(2 log M)/pi counts, bound it (a 400-seed run at 600 x 300 gave a standard
    deviation of sigma2 of 0.66%, max 2.1%, against 4.1% allowed here). Divided by the MP density
    at the median times the median, that CDF slack gives the relative error of sigma2.
    """
    N, M = max(shape), min(shape)
    beta = M / N
    mu = marchenko_pastur_median(beta)
    fluct = 4 * math.sqrt(2 * math.log(M)) / math.pi
    rel_tol = ((r + fluct) / M) / (mp_density(mu, beta) * mu)
    noise_tol = (fluct / M) / (mp_density(mu, beta) * mu)
    for seed in range(5):
        g = gen(seed)
        sig = 0.7
        Z = sig * torch.randn(*shape, generator=g, dtype=torch.float64)
        u = torch.linalg.qr(torch.randn(shape[0], r, generator=g, dtype=torch.float64)).Q
        v = torch.linalg.qr(torch.randn(shape[1], r, generator=g, dtype=torch.float64)).Q
        theta = sig * math.sqrt(N) * beta ** 0.25 * torch.linspace(3, 8, r, dtype=torch.float64)
        W = Z + (u * theta) @ v.T
        mt = spectral_metrics(spectrum(W))
        assert int(mt.mp.num_spikes) == r, seed
        assert abs(float(mt.mp.sigma2) / sig ** 2 - 1) <= rel_tol, (seed, float(mt.mp.sigma2))
        fit = marchenko_pastur_fit(esd(W).eigenvalues, shape)
        assert int(fit.num_spikes) == r
        assert float(fit.sigma2) == pytest.approx(float(mt.mp.sigma2), rel=8 * EPS64)
        noise = spectral_metrics(spectrum(Z))
        assert int(noise.mp.num_spikes) == 0, seed
        assert abs(float(noise.mp.sigma2) / sig ** 2 - 1) <= noise_tol, seed
        # the bare edge (tw_margin=0) also separates these spikes
        assert int(spectral_metrics(spectrum(W), tw_margin=0).mp.num_spikes) == r


def test_tw_constant():
    assert TW1_QUANTILE_99 == pytest.approx(2.0234, abs=1e-4)
