"""The multi-tensor curvature kernels (gradience_kernels/curvature_kernels.py): the torch path
and the Triton ops (compiled on CUDA, under TRITON_INTERPRET=1 on CPU) against float64
explicit references with derived rounding bounds, and the probes against an integer
specification of the hash and against their distribution.

Rounding bounds (Higham, "Accuracy and Stability of Numerical Algorithms", 2nd ed., sec. 3.1):
a sum of n products computed in precision u, in any order, with or without FMA, is within
gamma_n = n u / (1 - n u) times the sum of the absolute products of the exact value.
"""

import math

import pytest
import scipy.stats
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import gradience_kernels.curvature_kernels as ck

GPU = torch.cuda.is_available()
# Triton runs where the tests can run it: compiled on a GPU, interpreted on CPU (conftest).
TDEV = torch.device("cuda" if GPU else "cpu")
CPU = torch.device("cpu")
M32 = 0xFFFFFFFF
UNIT = {torch.float32: 2.0**-24, torch.float64: 2.0**-53}  # unit roundoff of the accumulators
FLOATS = [torch.float32, torch.float64, torch.bfloat16, torch.float16]


# ----------------------------------------------------------------------------- references
def spec_fmix(x: int) -> int:
    x ^= x >> 16
    x = (x * 0x85EBCA6B) & M32
    x ^= x >> 13
    x = (x * 0xC2B2AE35) & M32
    return x ^ (x >> 16)


def spec_bits(seed: int, probe: int, index: int) -> int:
    """The hash of (seed, probe, global entry index) in Python integers (the specification)."""
    s = spec_fmix((seed * 0x9E3779B9) & M32)
    key = spec_fmix((probe * 0x9E3779B9 + s) & M32)
    x = spec_fmix((key + (index & M32) * 0x7FEB352D) & M32)
    return spec_fmix(x ^ (((index >> 32) * 0x846CA68B) & M32))


def spec_gaussian(seed: int, probe: int, index: int) -> float:
    """Box-Muller on the pair (2k, 2k+1) holding the entry: cos for the even, sin for the odd."""
    pair = index - index % 2
    u1 = (spec_bits(seed, probe, pair) + 0.5) * 2.0**-32
    u2 = (spec_bits(seed, probe, pair + 1) + 0.5) * 2.0**-32
    trig = math.sin if index % 2 else math.cos
    return math.sqrt(-2 * math.log(u1)) * trig(2 * math.pi * u2)


def gamma(n: int, dtype: torch.dtype) -> float:
    u = UNIT[dtype]
    return n * u / (1 - n * u)


def flat(V) -> torch.Tensor:
    """[b, P] float64 of a batch list (test reference only)."""
    return torch.cat([t.reshape(t.shape[0], -1).double().cpu() for t in V], 1)


def unflat(M: torch.Tensor, shapes, dtype, device=torch.device("cpu")):
    out, start = [], 0
    for s in shapes:
        n = math.prod(s)
        out.append(M[:, start:start + n].reshape(M.shape[0], *s).to(dtype=dtype, device=device)
                   .clone(memory_format=torch.contiguous_format))  # never a view of M
        start += n
    return out


def randn_batch(rows, shapes, dtype, seed, device=torch.device("cpu")):
    g = torch.Generator().manual_seed(seed)
    P = sum(math.prod(s) for s in shapes)
    return unflat(torch.randn(rows, P, generator=g, dtype=torch.float64), shapes, dtype, device)


def acc_of(*dtypes):
    return torch.float64 if torch.float64 in dtypes else torch.float32


def backends(fn, *args, **kw):
    """fn on the torch path (CPU), the C++ ops (CPU) and the Triton path (TDEV): three
    results, the Triton one on TDEV."""
    def move(a):
        if isinstance(a, torch.Tensor):
            return a.to(TDEV)
        if isinstance(a, list) and a and isinstance(a[0], torch.Tensor):
            return [t.to(TDEV) for t in a]
        return a
    out_t = fn(*args, backend="torch", **kw)
    out_c = fn(*args, backend="cpp", **kw)
    out_g = fn(*[move(a) for a in args], backend="triton", **kw)
    return out_t, out_c, out_g


shapes_st = st.lists(st.lists(st.integers(1, 6), min_size=0, max_size=3).map(tuple),
                     min_size=1, max_size=4)


@st.composite
def blocks_st(draw, n):
    """A partition of the tensor indices into blocks (in a random order), plus maybe an empty
    block."""
    perm = draw(st.permutations(list(range(n))))
    cuts = sorted(draw(st.sets(st.integers(1, max(1, n - 1)), max_size=n - 1))) if n > 1 else []
    bounds = [0, *cuts, n]
    blocks = [list(perm[a:b]) for a, b in zip(bounds, bounds[1:])]
    if draw(st.booleans()):
        blocks.insert(draw(st.integers(0, len(blocks))), [])
    return blocks


# ----------------------------------------------------------------------------- probes
@pytest.mark.parametrize("backend", ["torch", "cpp", "triton"])
def test_probes_follow_the_integer_specification(backend):
    """Entry indices on both sides of 2^32 and far above it (the hash's hi word), seeds
    negative and beyond 2^32, probe indices beyond 2^32."""
    dev = TDEV if backend == "triton" else CPU
    for seed, first, offset in [(0, 0, 0), (-3, 5, 2**32 - 4), (2**40 + 7, 2**40, 7 * 2**32 + 11)]:
        n = 9
        z = ck.rademacher([(n,)], 3, seed, first, dtype=torch.float64, device=dev, backend=backend,
                          offset=offset)[0].cpu()
        want = torch.tensor([[1.0 - 2.0 * (spec_bits(seed, first + r, offset + i) >> 31)
                              for i in range(n)] for r in range(3)], dtype=torch.float64)
        assert torch.equal(z, want), (seed, first, offset)
        g = ck.gaussian([(n,)], 3, seed, first, dtype=torch.float64, device=dev, backend=backend,
                        offset=offset)[0].cpu()
        want = torch.tensor([[spec_gaussian(seed, first + r, offset + i) for i in range(n)]
                             for r in range(3)], dtype=torch.float64)
        # libm (math) against torch/NumPy/libdevice log and cos: see gaussian_tolerance.
        assert ((g - want).abs() <= gaussian_tolerance(want, torch.float64)).all()


def gaussian_tolerance(z: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Two Box-Muller evaluations of the same (u1, u2) in float64: sqrt is correctly rounded,
    log within 1 ulp and cos and sin within 2 ulps on every backend used (glibc, SLEEF, NumPy, CUDA
    libdevice, the C++ kernels' polynomials), and the products -2 log u1 and 2 pi u2 round once
    each; so each result is within ~6 ulps relative of the exact z, two results within
    16 eps64 |z|, except for the rounding of the argument x = 2 pi u2 near a zero of cos or sin: it
    moves x by <= |x| eps64 / 2 <= pi eps64, so z by <= R pi eps64 in absolute terms with
    R = sqrt(-2 log u1) <= sqrt(64 ln 2) < 6.7 (u1 >= 2^-33); the C++ path reduces u2 exactly
    before its product, so two results differ by at most 2 x 6.7 pi eps64 from this term. A cast
    to `dtype` (float32 first, as torch) then rounds each once more: at most one ulp of dtype
    apart, eps |z|, plus the smallest subnormal near 0."""
    z = z.double().abs()
    fi = torch.finfo(dtype)
    argument = 2 * 6.7 * math.pi * 2.0**-52
    return 16 * 2.0**-52 * z + argument + (fi.eps * z + fi.smallest_normal * fi.eps
                                           if dtype != torch.float64 else 0.0)


@settings(max_examples=30)
@given(shapes=shapes_st, batch=st.integers(1, 5), first=st.integers(0, 2**40),
       seed=st.integers(-2**40, 2**40), dtype=st.sampled_from(FLOATS),
       offset=st.sampled_from([0, 2**32 - 7]))
def test_probes_equal_across_backends(shapes, batch, first, seed, dtype, offset):
    z_t = ck.rademacher(shapes, batch, seed, first, dtype, "cpu", "torch", offset)
    z_g = ck.rademacher(shapes, batch, seed, first, dtype, TDEV, "triton", offset)
    for a, b, s in zip(z_t, z_g, shapes):
        assert a.shape == (batch, *s) and a.dtype == dtype
        assert torch.equal(a, b.cpu())  # bitwise: Rademacher entries are exact
    z_c = ck.rademacher(shapes, batch, seed, first, dtype, "cpu", "cpp", offset)
    assert all(torch.equal(a, c) for a, c in zip(z_t, z_c))
    g_t = ck.gaussian(shapes, batch, seed, first, dtype, "cpu", "torch", offset)
    g_g = ck.gaussian(shapes, batch, seed, first, dtype, TDEV, "triton", offset)
    g_c = ck.gaussian(shapes, batch, seed, first, dtype, "cpu", "cpp", offset)
    for a, b, c in zip(g_t, g_g, g_c):
        assert ((a.double() - b.cpu().double()).abs() <= gaussian_tolerance(a, dtype)).all()
        assert ((a.double() - c.double()).abs() <= gaussian_tolerance(a, dtype)).all()


@pytest.mark.parametrize("backend", ["torch", "cpp", "triton"])
@pytest.mark.parametrize("kind", ["rademacher", "gaussian"])
def test_probe_j_is_the_same_whatever_the_split(backend, kind):
    dev = TDEV if backend == "triton" else CPU
    gen = getattr(ck, kind)
    shapes = [(4, 5), (3,), (2, 2, 3)]
    P = sum(math.prod(s) for s in shapes)
    whole = gen(shapes, 7, 99, 0, torch.float64, dev, backend)
    part = gen(shapes, 4, 99, 3, torch.float64, dev, backend)  # probes 3..6
    for a, b in zip(whole, part):
        assert torch.equal(a[3:], b)
    # The list numbers entries in order: one flat tensor gives the same probes...
    single = gen([(P,)], 7, 99, 0, torch.float64, dev, backend)[0]
    assert torch.equal(flat(whole), single.cpu())
    # ... and a shard [a, b) of it is the same with offset=a.
    shard = gen([(11,)], 7, 99, 0, torch.float64, dev, backend, offset=20)[0]
    assert torch.equal(shard, single[:, 20:31])
    # Another seed or another probe index gives other probes.
    assert not torch.equal(gen([(P,)], 1, 98, 0, torch.float64, dev, backend)[0], single[:1])
    assert not torch.equal(single[0], single[1])


@pytest.mark.parametrize("backend", ["torch", "cpp", "triton"])
@pytest.mark.parametrize("kind", ["rademacher", "gaussian"])
def test_empty_batches_and_the_stream_period(backend, kind):
    """A batch of 0 probes (and probe dots of 0 products) is empty on every path (the torch
    path's Gaussian failed to reshape it); probe j + 2^32 is probe j (the documented period of a
    stream: the probe index enters the hash mod 2^32)."""
    dev = TDEV if backend == "triton" else CPU
    gen = getattr(ck, kind)
    empty = gen([(3,), (2, 2)], 0, 1, 0, torch.float64, dev, backend)
    assert [tuple(t.shape) for t in empty] == [(0, 3), (0, 2, 2)]
    dots = getattr(ck, f"{kind}_dots")([torch.zeros(0, 3, dtype=torch.float64, device=dev)],
                                       [[0]], 1, backend=backend)
    assert tuple(dots.shape) == (1, 0)
    a = gen([(9,)], 2, 5, 7, torch.float64, dev, backend)[0]
    b = gen([(9,)], 2, 5, 7 + 2**32, torch.float64, dev, backend)[0]
    assert torch.equal(a, b)


def test_rademacher_distribution():
    """Entries are exactly +-1; mean and covariances within Hoeffding + union bounds at
    delta = 1e-6 (the seeds are fixed: a correct hash passes always, a hash with structure --
    repeated probes, correlated entries, a biased bit -- fails)."""
    delta = 1e-6
    z = ck.rademacher([(64, 32), (2048,)], 64, seed=2024)  # 64 probes x 4096 entries
    Z = flat(z)
    assert set(Z.unique().tolist()) == {-1.0, 1.0}
    N = Z.numel()
    assert abs(float(Z.mean())) <= math.sqrt(2 * math.log(2 / delta) / N)
    # Across probes: C[r, s] = mean_i z_ri z_si over 4096 entries, 2016 pairs.
    C = Z @ Z.T / Z.shape[1]
    K = 64 * 63 / 2
    off = C - torch.diag(torch.diag(C))
    assert float(off.abs().max()) <= math.sqrt(2 * math.log(2 * K / delta) / Z.shape[1])
    assert torch.equal(torch.diag(C), torch.ones(64, dtype=torch.float64))
    # Across entries: 512 probes of 48 entries, 1128 pairs of entries.
    W = flat(ck.rademacher([(48,)], 512, seed=7, first=10**9))
    Ce = W.T @ W / 512
    K = 48 * 47 / 2
    off = Ce - torch.diag(torch.diag(Ce))
    assert float(off.abs().max()) <= math.sqrt(2 * math.log(2 * K / delta) / 512)


def _product_rate(t: float) -> float:
    # Chernoff rate of the mean of products XY of independent N(0, 1): E exp(l XY) =
    # (1 - l^2)^(-1/2), sup_l l t + log(1 - l^2) / 2 at l = (sqrt(1 + 4 t^2) - 1) / (2 t).
    lam = (math.sqrt(1 + 4 * t * t) - 1) / (2 * t)
    return lam * t + 0.5 * math.log(1 - lam * lam)


def test_gaussian_distribution():
    """Mean, variance and fourth moment within 6 standard errors (two-sided normal tail 2e-9),
    Kolmogorov-Smirnov against N(0, 1), and cross-probe correlations within a Chernoff + union
    bound at delta = 1e-6."""
    Z = flat(ck.gaussian([(40, 50), (2096,)], 64, seed=31, first=5))  # 64 x 4096
    x = Z.reshape(-1)
    N = x.numel()
    assert abs(float(x.mean())) <= 6 / math.sqrt(N)
    assert abs(float((x * x).mean()) - 1) <= 6 * math.sqrt(2 / N)
    assert abs(float((x**4).mean()) - 3) <= 6 * math.sqrt(96 / N)  # Var z^4 = 105 - 9
    assert scipy.stats.kstest(x.numpy(), "norm").pvalue > 1e-6
    C = Z @ Z.T / Z.shape[1]
    off = (C - torch.diag(torch.diag(C))).abs().max()
    K, n, delta = 64 * 63 / 2, Z.shape[1], 1e-6
    t = 0.01
    while 2 * K * math.exp(-n * _product_rate(t)) > delta:
        t += 0.001
    assert float(off) <= t


def test_gaussian_pair_entries_are_independent():
    """Entries 2k and 2k+1 are the cosine and sine outputs of one Box-Muller pair (one radius):
    independent N(0, 1) when the pairing is right. Over N = 64 x 2048 pairs, the sample
    correlations of (z_2k, z_2k+1), of their squares and of their absolute values each lie
    within 6 / sqrt(N) (each has SD 1 / sqrt(N) under independence, up to O(1/N)); a wrong
    pairing (a shared angle, the same output twice) moves them to O(1). The pair's r^2 =
    z_2k^2 + z_2k+1^2 is exponential with mean 2: its mean and its variance 4 lie within 6
    standard errors (Var r^2 = 4; Var (r^2 - 2)^2 = mu_4 - 4^2 = 144 - 16 = 128)."""
    Z = flat(ck.gaussian([(4096,)], 64, seed=7, first=3))  # 64 x 4096: pairs (2k, 2k+1)
    a, b = Z[:, 0::2].reshape(-1), Z[:, 1::2].reshape(-1)
    N = a.numel()

    def corr(x, y):
        x, y = x - x.mean(), y - y.mean()
        return float((x * y).sum() / (x.norm() * y.norm()))

    for x, y in ((a, b), (a * a, b * b), (a.abs(), b.abs())):
        assert abs(corr(x, y)) <= 6 / math.sqrt(N)
    r2 = a * a + b * b
    assert abs(float(r2.mean()) - 2) <= 6 * math.sqrt(4 / N)
    assert abs(float(((r2 - 2) ** 2).mean()) - 4) <= 6 * math.sqrt(128 / N)


@pytest.mark.parametrize("kind", ["rademacher", "gaussian"])
def test_probe_dots_equal_dots_with_the_probes(kind):
    shapes = [(5, 6), (7,), (2, 3, 2)]
    blocks = [[2, 0], [], [1]]
    Y = randn_batch(4, shapes, torch.float64, seed=3)
    gen, dots = getattr(ck, kind), getattr(ck, f"{kind}_dots")
    Z = gen(shapes, 4, 17, 9, dtype=torch.float64, offset=2**32 - 20)
    want = torch.stack([(flat([Z[i] for i in m]) * flat([Y[i] for i in m])).sum(1) if m else
                        torch.zeros(4, dtype=torch.float64) for m in blocks])
    tol = gamma(50, torch.float64) * torch.stack([
        (flat([Z[i] for i in m]) * flat([Y[i] for i in m])).abs().sum(1) if m else
        torch.zeros(4, dtype=torch.float64) for m in blocks])
    d_t, d_c, d_g = backends(dots, Y, blocks, 17, 9, offset=2**32 - 20)
    for d in (d_t, d_c, d_g.cpu()):
        assert d.shape == (3, 4) and d.dtype == torch.float64
        assert ((d - want).abs() <= tol + 1e-300).all()
    assert torch.equal(d_g[1], torch.zeros(4, dtype=torch.float64))
    assert torch.equal(d_c[1], torch.zeros(4, dtype=torch.float64))


# ----------------------------------------------------------------------------- block products
@settings(max_examples=25)
@given(data=st.data(), shapes=shapes_st, a=st.integers(1, 5), c=st.integers(1, 4),
       xdt=st.sampled_from(FLOATS), ydt=st.sampled_from(FLOATS))
def test_block_gram_and_dots_match_float64(data, shapes, a, c, xdt, ydt):
    blocks = data.draw(blocks_st(len(shapes)))
    X = randn_batch(a, shapes, xdt, seed=1)
    acc = acc_of(xdt, ydt)
    for name, Y in [("gram", randn_batch(c, shapes, ydt, seed=2)),
                    ("dots", randn_batch(a, shapes, ydt, seed=3))]:
        fn = ck.block_gram if name == "gram" else ck.block_dots
        want, bound = [], []
        for m in blocks:
            # float64 of the stored values: exact products, sums of few terms
            Xf = flat([X[i] for i in m]) if m else torch.zeros(a, 0, dtype=torch.float64)
            Yf = flat([Y[i] for i in m]) if m else torch.zeros(Y[0].shape[0], 0,
                                                               dtype=torch.float64)
            g_n = gamma(Xf.shape[1] + 1, acc)  # n products, n - 1 additions in any order
            if name == "gram":
                want.append(Xf @ Yf.T)
                bound.append(g_n * (Xf.abs() @ Yf.abs().T))
            else:
                want.append((Xf * Yf).sum(1))
                bound.append(g_n * (Xf * Yf).abs().sum(1))
        want, bound = torch.stack(want), torch.stack(bound)
        for got in backends(fn, X, Y, blocks):
            assert got.dtype == acc and got.shape == want.shape
            assert ((got.cpu().double() - want).abs() <= bound + 1e-300).all(), (name, got, want)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_cpp_16_bit_loads_are_exact_for_every_finite_value(dtype):
    """Every finite float16 / bfloat16 bit pattern (subnormals, signed zeros, extremes) read by
    the C++ kernels' vectorized loops equals torch's conversion: block_dots of the values,
    laid out as rows of 64, with one-hot rows picks each value exactly (one product by 1)."""
    bits = torch.arange(65536, dtype=torch.int32).to(torch.int16).view(dtype)
    vals = bits[torch.isfinite(bits.float())]
    L = 64
    rows = vals[: vals.numel() // L * L].reshape(-1, L)
    for col in range(L):
        onehot = torch.zeros(rows.shape, dtype=torch.float32)
        onehot[:, col] = 1
        got = ck.block_dots([rows], [onehot], [[0]], backend="cpp")[0]
        assert torch.equal(got.double(), rows[:, col].double()), col


def test_cpp_float16_row_writes_round_as_torch_casts():
    """reorthogonalize_'s new row in a float16 basis, rounded in the kernel, equals torch's
    float32 -> float16 cast of the same scaled values bit for bit: random values over the
    half range (subnormal to overflow) and the midpoints between consecutive halves."""
    gen = torch.Generator().manual_seed(0)
    x = torch.cat([torch.randn(20_000, generator=gen) * s for s in (1e-7, 1e-5, 1.0, 1e3, 7e4)])
    halves = torch.arange(31744, dtype=torch.int32).to(torch.int16).view(torch.float16)
    x = torch.cat([x, ((halves[:-1].double() + halves[1:].double()) / 2).float()])
    basis = [torch.zeros(2, x.numel(), dtype=torch.float16)]
    _, after = ck.reorthogonalize_([x.clone()], basis, 1, 1, out_row=1, backend="cpp")
    want = (x * torch.tensor(1 / math.sqrt(after), dtype=torch.float32)).to(torch.float16)
    assert torch.equal(basis[0][1].view(torch.int16), want.view(torch.int16))


def test_block_products_accept_strided_and_empty_tensors():
    X = [torch.randn(6, 3, dtype=torch.float64).T, torch.zeros(3, 0, dtype=torch.float64)]
    Y = [torch.randn(3, 6, dtype=torch.float64), torch.zeros(3, 0, dtype=torch.float64)]
    for fn in (ck.block_gram, ck.block_dots):
        want = X[0] @ Y[0].T if fn is ck.block_gram else (X[0] * Y[0]).sum(1)
        for got in backends(fn, X, Y, [[0, 1], [1]]):
            torch.testing.assert_close(got[0].cpu(), want, rtol=0, atol=1e-14)
            assert not got[1].any()


# ----------------------------------------------------------------------------- CGS2
def orthonormal_basis(shapes, m, dtype, seed, device=torch.device("cpu")):
    """Rows of a float64 QR factor stored in `dtype`, and the float64 rows."""
    g = torch.Generator().manual_seed(seed)
    P = sum(math.prod(s) for s in shapes)
    Q = torch.linalg.qr(torch.randn(P, m, generator=g, dtype=torch.float64))[0].T.contiguous()
    return unflat(Q, shapes, dtype, device), Q


def cgs_reference(Q: torch.Tensor, w: torch.Tensor, passes: int, wdt: torch.dtype):
    """Float64 CGS on the stored basis Q [m, P], and an elementwise first-order bound on the
    difference of any implementation that accumulates in precision u (acc of wdt) and rounds w
    to wdt after each pass. Per pass, with input v (error e so far):
      c = Q v         : |dc| <= gamma_{P+1} |Q| |v| + |Q| e
      u = Q^T c       : |du| <= gamma_{m+1} |Q|^T |c| + |Q|^T |dc|
      v' = fl(v - u)  : |dv'| <= e + |du| + u_w (|v| + |u|) (one subtraction, one cast)."""
    acc = acc_of(wdt)
    P, m = Q.shape[1], Q.shape[0]
    uw = UNIT[torch.float64 if wdt == torch.float64 else torch.float32]
    A = Q.abs()
    v, e = w.clone(), torch.zeros_like(w)
    total, total_err = torch.zeros(m, dtype=torch.float64), torch.zeros(m, dtype=torch.float64)
    for _ in range(passes):
        c = Q @ v
        dc = gamma(P + 1, acc) * (A @ v.abs()) + A @ e
        u = Q.T @ c
        du = gamma(m + 1, acc) * (A.T @ c.abs()) + A.T @ dc
        e = e + du + uw * (v.abs() + u.abs())
        v = v - u
        total += c
        total_err += dc
    return v, e, total, total_err


@settings(max_examples=25)
@given(shapes=shapes_st, m_max=st.integers(1, 6), data=st.data(),
       wdt=st.sampled_from([torch.float32, torch.float64]),
       qdt=st.sampled_from([torch.float64, torch.float32, torch.bfloat16]),
       passes=st.integers(1, 2))
def test_orthogonalize_matches_float64_cgs(shapes, m_max, data, wdt, qdt, passes):
    P = sum(math.prod(s) for s in shapes)
    m_max = min(m_max, P)
    count = data.draw(st.integers(0, m_max))
    basis, _ = orthonormal_basis(shapes, m_max, qdt, seed=5)
    w0 = randn_batch(1, shapes, wdt, seed=6)
    Qs = flat(basis)[:count]  # the stored values, exactly, in float64
    want, err, coeffs_want, coeffs_err = cgs_reference(Qs, flat(w0)[0], passes, wdt)
    for backend, dev in [("torch", CPU), ("cpp", CPU), ("triton", TDEV)]:
        w = [t[0].to(dev, copy=True) for t in w0]
        before = [t.clone() for t in basis]
        coeffs = ck.orthogonalize_(w, [q.to(dev) for q in basis], count, passes=passes,
                                   backend=backend)
        assert all(torch.equal(a, b) for a, b in zip(basis, before))  # the basis is read only
        assert coeffs.dtype == acc_of(wdt) and coeffs.shape == (count,)
        got = flat([t[None] for t in w])[0]
        assert ((got - want).abs() <= err + 1e-300).all(), backend
        assert ((coeffs.cpu().double() - coeffs_want).abs() <= coeffs_err + 1e-300).all()
        # Orthogonal to the stored basis: |Q w| <= |Q want| + |Q| |w - want|.
        assert ((Qs @ got).abs() <= (Qs @ want).abs() + Qs.abs() @ err + 1e-300).all()


@pytest.mark.parametrize("wdt,qdt", [(torch.float32, torch.float32),
                                     (torch.float32, torch.bfloat16),
                                     (torch.float64, torch.float64)])
@pytest.mark.parametrize("count,passes", [(9, 1), (5, 2), (4, 1)])
def test_cpp_orthogonalize_long_tensors_within_cgs_bounds(wdt, qdt, count, passes):
    """Tensors longer than the C++ op's 32K-entry chunks (several items per tensor, split
    across threads by entries) and counts off the 4-row groups (9 = 2 groups + 1 row)."""
    shapes = [(70000,), (3, 50), (2, 20000)]
    basis, _ = orthonormal_basis(shapes, 9, qdt, seed=11)
    w0 = randn_batch(1, shapes, wdt, seed=12)
    Qs = flat(basis)[:count]
    want, err, coeffs_want, coeffs_err = cgs_reference(Qs, flat(w0)[0], passes, wdt)
    w = [t[0].clone() for t in w0]
    coeffs = ck.orthogonalize_(w, basis, count, passes=passes, backend="cpp")
    got = flat([t[None] for t in w])[0]
    assert ((got - want).abs() <= err + 1e-300).all()
    assert ((coeffs.double() - coeffs_want).abs() <= coeffs_err + 1e-300).all()


@pytest.mark.parametrize("xdt,ydt", [(torch.float32, torch.float32),
                                     (torch.bfloat16, torch.float32),
                                     (torch.float64, torch.float32)])
def test_cpp_block_gram_long_tensors_within_bound(xdt, ydt):
    """Tensors longer than the C++ op's 2048-entry pieces and 16K-entry items, 9 x 7 rows
    (two 4-row tiles and one row left, three 2-row tiles and one left)."""
    shapes = [(50000,), (3, 50), (2, 9000)]
    blocks = [[0, 2], [1]]
    X, Y = randn_batch(9, shapes, xdt, seed=31), randn_batch(7, shapes, ydt, seed=32)
    acc = acc_of(xdt, ydt)
    got = ck.block_gram(X, Y, blocks, backend="cpp")
    assert got.dtype == acc and got.shape == (2, 9, 7)
    for j, m in enumerate(blocks):
        Xf, Yf = flat([X[i] for i in m]), flat([Y[i] for i in m])
        bound = gamma(Xf.shape[1] + 1, acc) * (Xf.abs() @ Yf.abs().T)
        assert ((got[j].double() - Xf @ Yf.T).abs() <= bound).all()


def _propagated(Q: torch.Tensor, e: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Bounds of what an input error e becomes through one CGS pass v -> v - Q^T Q v: in the
    output e + |Q|^T |Q| e, in the coefficients |Q| e."""
    return e + Q.abs().T @ (Q.abs() @ e), Q.abs() @ e


def reorth_reference(Q, w, lo, ratio, wdt):
    """Float64 reference of reorthogonalize_ (local pass on rows lo.., full pass, a second full
    pass by Kahan's test) with elementwise bounds composed from cgs_reference's: returns
    (w after, bound, coefficients [count], bound, passes taken)."""
    total = torch.zeros(Q.shape[0], dtype=torch.float64)
    total_err = torch.zeros_like(total)
    if lo < Q.shape[0]:
        v, e, cl, dcl = cgs_reference(Q[lo:], w, 1, wdt)
        total[lo:] += cl
        total_err[lo:] += dcl
    else:  # no local rows: the input as it is, exact
        v, e = w.clone(), torch.zeros_like(w)
    for p in range(2):
        v2, e2, c, dc = cgs_reference(Q, v, 1, wdt)
        pe, pc = _propagated(Q, e)
        v, e = v2, e2 + pe
        total += c
        total_err += dc + pc
        after = float(v @ v)
        if p == 1 or after >= ratio * ratio * (after + float(c @ c)):
            return v, e, total, total_err, p + 1


@pytest.mark.parametrize("wdt", [torch.float32, torch.float64])
@pytest.mark.parametrize("case", ["one full pass", "kahan second pass", "no local rows",
                                  "no local rows, kahan second pass"])
def test_reorthogonalize_matches_float64_reference(wdt, case):
    """One call: local pass on rows lo.., full pass, Kahan's second pass (when w lies almost in
    the span of the old rows), the norm after and the next row w / ||w||, on every backend and
    tensors longer than the C++ op's chunks; lo = count skips the local pass (then the C++
    op takes the second pass's dots in the first pass's update sweep)."""
    shapes = [(40000,), (3, 50), (2, 9000)]
    m_max, count = 10, 7
    lo = count if case.startswith("no local rows") else 5
    basis, Q = orthonormal_basis(shapes, m_max, wdt, seed=21)
    Qs = flat(basis)[:count]
    g = torch.Generator().manual_seed(22)
    w64 = torch.randn(Qs.shape[1], generator=g, dtype=torch.float64)
    if case.endswith("kahan second pass"):  # mostly along rows 0..lo-1: the full pass removes it
        w64 = 1e-5 * w64 + Qs[:lo].T @ torch.randn(lo, generator=g, dtype=torch.float64)
    w0 = unflat(w64[None], shapes, wdt, CPU)
    want, err, c_want, c_err, passes = reorth_reference(Qs, flat(w0)[0], lo, 0.5, wdt)
    assert passes == (2 if case.endswith("kahan second pass") else 1)
    n2 = float(want @ want)
    u = UNIT[acc_of(wdt)]
    for backend, dev in [("torch", CPU), ("cpp", CPU), ("triton", TDEV)]:
        w = [t[0].to(dev, copy=True) for t in w0]
        B = [q.to(dev, copy=True) for q in basis]
        coeffs, norm2 = ck.reorthogonalize_(w, B, count, lo, out_row=count, backend=backend)
        got = flat([t[None] for t in w])[0]
        assert ((got - want).abs() <= err + 1e-300).all(), backend
        assert ((coeffs.double() - c_want).abs() <= c_err + 1e-300).all(), backend
        # "Twice is enough": orthogonal to the basis to O(u) of what is left (one full pass
        # leaves ~500 u ||w|| in float32, ~2300 u in float64 on the second case: measured).
        assert float((Qs @ got).abs().max()) <= 8 * u * float(got.norm()), backend
        en = float(err.norm())
        assert abs(norm2 - n2) <= 2 * math.sqrt(n2) * en + en ** 2 + gamma(got.numel(), acc_of(
            wdt)) * n2, backend
        row = flat([q[count:count + 1] for q in B])[0]
        rel = (2 * en + gamma(got.numel(), acc_of(wdt)) * math.sqrt(n2)) / math.sqrt(n2)
        bound = err / math.sqrt(n2) + want.abs() / math.sqrt(n2) * rel + 2 * u * row.abs()
        assert ((row - want / math.sqrt(n2)).abs() <= bound + 1e-300).all(), backend
        # Rows other than out_row are read only.
        assert torch.equal(flat([torch.cat([q[:count], q[count + 1:]]) for q in B]),
                           flat([torch.cat([q[:count], q[count + 1:]]) for q in basis]))


def test_reorthogonalize_writes_no_row_below_min_norm():
    shapes = [(30,), (4, 5)]
    basis, _ = orthonormal_basis(shapes, 4, torch.float64, seed=3)
    for backend, dev in [("torch", CPU), ("cpp", CPU), ("triton", TDEV)]:
        B = [q.to(dev, copy=True) for q in basis]
        w = [t[0].to(dev) for t in randn_batch(1, shapes, torch.float64, seed=4)]
        _, norm2 = ck.reorthogonalize_(w, B, 2, 1, out_row=3, min_norm=1e6, backend=backend)
        assert 0 < norm2 < 1e12
        assert all(torch.equal(q.cpu(), b) for q, b in zip(B, basis)), backend


def test_orthogonalize_strided_vector_in_place():
    shapes = [(5, 4), (6,)]
    basis, Q = orthonormal_basis(shapes, 3, torch.float64, seed=1)
    for backend, dev in [("torch", CPU), ("cpp", CPU), ("triton", TDEV)]:
        g = torch.Generator().manual_seed(2)
        w = [torch.randn(4, 5, generator=g, dtype=torch.float64).to(dev).T,
             torch.randn(6, generator=g, dtype=torch.float64).to(dev)]
        w0 = flat([t[None] for t in w])[0]
        ck.orthogonalize_(w, [q.to(dev) for q in basis], 3, backend=backend)
        assert not w[0].is_contiguous()
        got = flat([t[None] for t in w])[0]
        torch.testing.assert_close(got, w0 - Q.T @ (Q @ w0), rtol=0, atol=1e-13)


@pytest.mark.parametrize("backend", ["torch", "cpp", "triton"])
def test_basis_precision_and_orthogonality_loss(backend, capsys):
    """CGS2 of w = g + 10 sum_i q_i (large components along the basis, as A q_j in Lanczos)
    against m = 30 rows stored in float64 / float32 / bfloat16, P = 3000 in four tensors.

    Against the STORED rows Q_s: in exact arithmetic CGS2 leaves Q_s w_2 = E^2 Q_s w,
    E = I - Q_s Q_s^T (second order in the storage error), and rounding adds at most
    ||Q_s||_2 ||e||_2 with e the elementwise bound of cgs_reference: the test asserts
    ||Q_s v|| <= ||Q_s v_ref|| + ||Q_s||_2 ||e||_2. Against the exact float64 rows Q the loss is
    then ||Q v|| <= ||Q - Q_s||_2 ||v|| + ||Q_s v||: the storage error, first order, which
    the figures printed with -s show (see the report)."""
    dev = TDEV if backend == "triton" else CPU
    shapes = [(40, 50), (50,), (30, 30), (50,)]
    m = 30
    _, Q = orthonormal_basis(shapes, m, torch.float64, seed=11)
    for wdt in (torch.float32, torch.float64):
        for qdt in (torch.float64, torch.float32, torch.bfloat16):
            basis = unflat(Q, shapes, qdt, dev)
            Qs = flat(basis)
            g = flat(randn_batch(1, shapes, torch.float64, seed=12))[0]
            w_in = (g + 10 * Qs.sum(0)).to(wdt)
            w = [t[0] for t in unflat(w_in[None].double(), shapes, wdt, dev)]
            ck.orthogonalize_(w, basis, m, backend=backend)
            v = flat([t[None] for t in w])[0]
            v_ref, err, _, _ = cgs_reference(Qs, w_in.double(), 2, wdt)
            bound = float((Qs @ v_ref).norm() + torch.linalg.matrix_norm(Qs, 2) * err.norm())
            stored = float((Qs @ v).norm())
            assert stored <= bound, (wdt, qdt, stored, bound)
            nv = float(v.norm())
            exact = float((Q @ v).norm()) / nv
            storage = float(torch.linalg.matrix_norm(Q - Qs, 2))
            gram = float(torch.linalg.matrix_norm(Qs @ Qs.T - torch.eye(m, dtype=torch.float64),
                                                  2))
            with capsys.disabled():
                print(f"\n[{backend}] w {str(wdt)[6:]:7s} basis {str(qdt)[6:]:8s}: "
                      f"||Q_s w||/||w|| {stored / nv:.1e} (bound {bound / nv:.1e}), "
                      f"||Q w||/||w|| {exact:.1e}, ||Q - Q_s||_2 {storage:.1e}, "
                      f"||Q_s Q_s^T - I||_2 {gram:.1e}", end="")


# ----------------------------------------------------------------------------- combine
@settings(max_examples=20)
@given(shapes=shapes_st, m_max=st.integers(1, 5), r=st.integers(1, 3), data=st.data(),
       qdt=st.sampled_from([torch.float64, torch.float32, torch.bfloat16]),
       odt=st.sampled_from([None, torch.float32, torch.float64, torch.bfloat16]))
def test_combine_matches_float64(shapes, m_max, r, data, qdt, odt):
    count = data.draw(st.integers(0, m_max))
    basis = randn_batch(m_max, shapes, qdt, seed=8)
    C = torch.randn(count, r, dtype=torch.float64, generator=torch.Generator().manual_seed(9))
    out_dt = odt or qdt
    acc = acc_of(out_dt)
    Qf = flat(basis)[:count]
    Cr = C.to(acc).double()  # the coefficients the kernel sees
    want = Cr.T @ Qf
    # Sum of count products in acc, then one rounding to the output dtype.
    fi = torch.finfo(out_dt)
    bound = gamma(count + 1, acc) * (Cr.abs().T @ Qf.abs())
    bound = bound + fi.eps * (want.abs() + bound) + fi.smallest_normal * fi.eps
    for got in backends(ck.combine, basis, count, C, dtype=odt):
        assert [tuple(t.shape) for t in got] == [(r, *s) for s in shapes]
        assert all(t.dtype == out_dt for t in got)
        assert ((flat(got) - want).abs() <= bound).all()


# ----------------------------------------------------------------------------- determinism
def test_triton_ops_are_deterministic():
    """Same input -> bitwise the same output (per-program partial rows, fixed-order sums)."""
    shapes = [(33, 17), (5,), (200,)]
    X = randn_batch(3, shapes, torch.float32, seed=1, device=TDEV)
    Y = randn_batch(3, shapes, torch.float32, seed=2, device=TDEV)
    basis, _ = orthonormal_basis(shapes, 6, torch.float32, seed=3, device=TDEV)
    blocks = [[0, 2], [1]]
    runs = []
    for _ in range(2):
        w = [t[0].clone() for t in X]
        runs.append([ck.block_gram(X, Y, blocks, backend="triton"),
                     ck.block_dots(X, Y, blocks, backend="triton"),
                     ck.rademacher_dots(Y, blocks, 4, backend="triton"),
                     ck.gaussian_dots(Y, blocks, 4, backend="triton"),
                     ck.orthogonalize_(w, basis, 5, backend="triton"), *w,
                     *ck.combine(basis, 5, torch.ones(5, 2, device=TDEV), backend="triton")])
    for a, b in zip(*runs):
        assert torch.equal(a, b)


def test_cpp_ops_are_deterministic_whatever_the_thread_count():
    """Work items are fixed by the sizes, partial sums added in item order: bitwise the same
    output for the same input on 1 and 2 threads (and across runs). Sizes span several items
    (16384 entries for the probe kernels, 4096 for orthogonalize) and an entry range across
    2^32."""
    shapes = [(40, 1000), (5,), (20000,)]
    X = randn_batch(3, shapes, torch.float32, seed=1)
    Y = randn_batch(3, shapes, torch.float32, seed=2)
    basis, _ = orthonormal_basis(shapes, 6, torch.float32, seed=3)
    blocks = [[0, 2], [1]]
    threads = torch.get_num_threads()
    runs = []
    try:
        for n in (1, 2, 2):
            torch.set_num_threads(n)
            w = [t[0].clone() for t in X]
            runs.append([ck.block_dots(X, Y, blocks, backend="cpp"),
                         ck.block_gram(X, Y, blocks, backend="cpp"),
                         ck.rademacher_dots(Y, blocks, 4, offset=2**32 - 5000, backend="cpp"),
                         ck.gaussian_dots(Y, blocks, 4, backend="cpp"),
                         *ck.gaussian(shapes, 2, 3, backend="cpp"),
                         ck.orthogonalize_(w, basis, 5, backend="cpp"), *w])
    finally:
        torch.set_num_threads(threads)
    for other in runs[1:]:
        for a, b in zip(runs[0], other):
            assert torch.equal(a, b)


def _cpp_steps(Y, w, basis, v, rows):
    d = ck.rademacher_dots(Y, [[0], [1]], 5, 2, backend="cpp")
    e = ck.block_dots(Y, Y, [[0, 1]], backend="cpp")
    c = ck.orthogonalize_(w, basis, 3, backend="cpp")  # in place, under functionalization
    z = ck.gaussian([(3, 5), (7,)], 2, 1, backend="cpp")
    # The op itself (reorthogonalize_ returns ||w||^2 as a host float): v and row 3 written.
    r, n2 = torch.ops.gradience.reorthogonalize(v, rows, 3, 1, 0.5, 3, 0.0)
    return d * 2, e, c, w[0] + 1, z[0], r, n2 * 2


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_compile_fullgraph_cpp_ops(backend):
    torch._dynamo.reset()
    shapes = [(3, 5), (7,)]
    Y = randn_batch(4, shapes, torch.float32, seed=1)
    basis = randn_batch(5, shapes, torch.float32, seed=2)
    w = [t[0] for t in randn_batch(1, shapes, torch.float32, seed=3)]
    w_e, w_c = [t.clone() for t in w], [t.clone() for t in w]
    v_e, v_c = [t.clone() for t in w], [t.clone() for t in w]
    rows_e, rows_c = [t.clone() for t in basis], [t.clone() for t in basis]
    eager = _cpp_steps(Y, w_e, basis, v_e, rows_e)
    compiled = torch.compile(_cpp_steps, fullgraph=True, backend=backend)(Y, w_c, basis, v_c,
                                                                          rows_c)
    for a, b in zip(eager, compiled):
        assert torch.equal(a, b)
    # The in-place updates happened, the same in both.
    assert all(torch.equal(a, b) for a, b in zip(w_e + v_e + rows_e, w_c + v_c + rows_c))
    assert not torch.equal(rows_c[0][3], basis[0][3])


# ----------------------------------------------------------------------------- compile
def _steps(Y, w, basis):
    d = ck.rademacher_dots(Y, [[0], [1]], 5, 2, backend="triton")
    g = ck.block_gram(Y, Y, [[0, 1]], backend="triton")
    c = ck.orthogonalize_(w, basis, 3, backend="triton")  # in place, under functionalization
    z = ck.rademacher([(3, 5), (7,)], 2, 1, device=Y[0].device, backend="triton")
    return d * 2, g, c, w[0] + 1, z[0]


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_compile_fullgraph_triton_ops(backend):
    torch._dynamo.reset()
    shapes = [(3, 5), (7,)]
    Y = randn_batch(4, shapes, torch.float32, seed=1, device=TDEV)
    basis = randn_batch(5, shapes, torch.float32, seed=2, device=TDEV)
    w = [t[0] for t in randn_batch(1, shapes, torch.float32, seed=3, device=TDEV)]
    w_c = [t.clone() for t in w]
    eager = _steps(Y, w, basis)
    compiled = torch.compile(_steps, fullgraph=True, backend=backend)(Y, w_c, basis)
    for a, b in zip(eager, compiled):
        assert torch.equal(a, b)
    assert all(torch.equal(a, b) for a, b in zip(w, w_c))  # the mutation is kept


# ----------------------------------------------------------------------------- errors
def _cpp_op_errors():
    """The C++ ops called directly (not through the checked Python API) still name the
    argument and the value."""
    ops = torch.ops.gradience
    t = [torch.randn(2, 3)]
    return [
        (lambda: ops.block_dots([torch.ones(2, 3, dtype=torch.int32)], t, [0], [1]), TypeError,
         r"x\[0\]: expected a float dtype .* got Int"),
        (lambda: ops.block_dots(t, [torch.randn(3, 3)], [0], [1]), ValueError,
         r"y\[0\]: expected shape \[2, 3\]"),
        (lambda: ops.block_dots(t, t, [1], [1]), ValueError,
         r"members\[0\]: tensor index 1 out of range for 1 tensors"),
        (lambda: ops.block_dots(t, t, [0], [2]), ValueError, r"sizes: block sizes \[2\]"),
        (lambda: ops.probe_dots(t, [0], [1], 0, -1, False, 0), ValueError,
         r"first: expected an int >= 0, got -1"),
        (lambda: ops.fill_probes([torch.empty(2, 3), torch.empty(3, 3)], 0, 0, False, 0),
         ValueError, r"probes\[1\]: batch size 3 differs from probes\[0\]'s 2"),
        (lambda: ops.fill_probes(t, 0, 0, False, 2**62), ValueError, r"offset: entry indices"),
        (lambda: ops.orthogonalize([torch.randn(3)], [torch.randn(2, 3)], 3, 1), ValueError,
         r"count: 3 exceeds the basis' m_max = 2 rows"),
        (lambda: ops.orthogonalize([torch.randn(3)], [torch.randn(2, 4)], 1, 1), ValueError,
         r"basis\[0\]: expected shape \[m_max, \[3\]\]"),
        (lambda: ops.orthogonalize([torch.randn(3)], [torch.randn(2, 3)], 1, 0), ValueError,
         r"passes: expected an int >= 1, got 0"),
        (lambda: ops.orthogonalize([torch.randn(3)], [torch.ones(2, 3, dtype=torch.int64)], 1,
                                   1), TypeError, r"basis\[0\]: expected a float dtype"),
        (lambda: ops.orthogonalize([torch.randn(3), torch.randn(2, dtype=torch.float64)],
                                   [torch.randn(2, 3), torch.randn(2, 2)], 1, 1), TypeError,
         r"w\[1\]: dtype Double differs from w\[0\]'s Float"),
    ]


@pytest.mark.parametrize("case", range(len(_cpp_op_errors())))
def test_cpp_ops_reject_bad_input_by_name(case):
    fn, exc, pattern = _cpp_op_errors()[case]
    with pytest.raises(exc, match=pattern):
        fn()


def _errors():
    t = torch.randn(2, 3)
    b = [torch.randn(4, 3)]
    return [
        (lambda: ck.rademacher([], 2, 0), ValueError, r"shapes: .*non-empty.*\[\]"),
        (lambda: ck.rademacher([(3,)], -1, 0), ValueError, r"batch: .*>= 0, got -1"),
        (lambda: ck.rademacher([(3,)], 2, 0, first=-5), ValueError, r"first: .*got -5"),
        (lambda: ck.rademacher([(3,)], 2, 1.5), TypeError, r"seed: expected an int, got 1.5"),
        (lambda: ck.rademacher([(3,)], 2, 0, dtype=torch.int32), TypeError,
         r"dtype: .*float.*int32"),
        (lambda: ck.gaussian([(3,)], 2, 0, offset=2**62), ValueError, r"offset: .*2\^62"),
        (lambda: ck.rademacher([(3,)], 2, 0, backend="gpu"), ValueError, r"backend: .*'gpu'"),
        (lambda: ck.block_dots([], [], [[0]]), ValueError, r"X: .*empty list"),
        (lambda: ck.block_dots([t], [torch.randn(2, 4)], [[0]]), ValueError,
         r"Y\[0\]: expected shape \[2, 3\].*got \[2, 4\]"),
        (lambda: ck.block_dots([t, t.double()], [t, t], [[0]]), TypeError,
         r"X\[1\]: dtype torch.float64 differs"),
        (lambda: ck.block_gram([t], [t], [[1]]), ValueError, r"blocks\[0\]: tensor index 1 out"),
        (lambda: ck.block_dots([t, t.to("meta")], [t, t], [[0]]), ValueError,
         r"X\[1\]: device meta differs from X\[0\]'s cpu"),
        (lambda: ck.block_gram([t], [t.to("meta")], [[0]]), ValueError,
         r"Y: device meta differs from X's cpu"),
        (lambda: ck.orthogonalize_([torch.randn(3)], [b[0].to("meta")], 2), ValueError,
         r"basis: device meta differs from w's cpu"),
        (lambda: ck.block_gram([t], [t], []), ValueError, r"blocks: .*non-empty"),
        (lambda: ck.block_gram([t], [t, t], [[0]]), ValueError, r"Y: expected 1 tensors.*got 2"),
        (lambda: ck.block_gram([t.long()], [t], [[0]]), TypeError, r"X\[0\]: .*float.*int64"),
        (lambda: ck.block_gram([t, torch.randn(3, 3)], [t, t], [[0]]), ValueError,
         r"X\[1\]: batch size 3 differs"),
        (lambda: ck.orthogonalize_([torch.randn(3)], b, 5), ValueError,
         r"count: 5 exceeds the basis' m_max = 4"),
        (lambda: ck.orthogonalize_([torch.randn(4)], b, 2), ValueError,
         r"basis\[0\]: expected shape \[m_max, 4\].*got \[4, 3\]"),
        (lambda: ck.orthogonalize_([torch.randn(3)], b, 2, passes=0), ValueError,
         r"passes: .*>= 1, got 0"),
        (lambda: ck.orthogonalize_([torch.randn(3), torch.randn(2)], b, 2), ValueError,
         r"basis: expected 2 tensors"),
        (lambda: ck.orthogonalize_([torch.randn(3)], [torch.randn(4, 3).half()], -1), ValueError,
         r"count: .*got -1"),
        (lambda: ck.reorthogonalize_([torch.randn(3)], b, 2, 3), ValueError,
         r"lo: expected 0 <= lo <= count = 2, got 3"),
        (lambda: ck.reorthogonalize_([torch.randn(3)], b, 2, 1, ratio=1.5), ValueError,
         r"ratio: .*\[0, 1\], got 1.5"),
        (lambda: ck.reorthogonalize_([torch.randn(3)], b, 2, 1, out_row=1), ValueError,
         r"out_row: expected a row in \[count, m_max\) = \[2, 4\), got 1"),
        (lambda: ck.reorthogonalize_([torch.randn(3)], b, 2, 1, min_norm=-1.0), ValueError,
         r"min_norm: expected a value >= 0, got -1.0"),
        (lambda: ck.reorthogonalize_([torch.randn(3)], b, 2, 1, ratio="abc"), TypeError,
         r"ratio: expected a real number, got 'abc'"),
        (lambda: ck.reorthogonalize_([torch.randn(3)], b, 2, 1, min_norm=None), TypeError,
         r"min_norm: expected a real number, got None"),
        (lambda: ck.reorthogonalize_([torch.randn(3)], b, 5, 1), ValueError,
         r"count: 5 exceeds the basis' m_max = 4"),
        (lambda: ck.combine(b, 3, torch.randn(2, 2)), ValueError,
         r"coeffs: expected 3 rows \(count\), got shape \[2, 2\]"),
        (lambda: ck.combine(b, 2, torch.randn(2)), ValueError, r"coeffs: expected a 2-D"),
        (lambda: ck.combine(b, 2, torch.randn(2, 2), dtype=torch.int64), TypeError,
         r"dtype: .*int64"),
        (lambda: ck.rademacher_dots([t], [[0]], 0, first=-1), ValueError, r"first: .*got -1"),
        (lambda: ck.use_backend("cuda").__enter__(), ValueError, r"backend: .*'cuda'"),
    ]


@pytest.mark.parametrize("case", range(len(_errors())))
def test_bad_input_raises_clear_errors(case):
    fn, exc, pattern = _errors()[case]
    with pytest.raises(exc, match=pattern):
        fn()


def test_inputs_are_checked_before_any_work():
    w = [torch.randn(3)]
    before = w[0].clone()
    with pytest.raises(ValueError):
        ck.orthogonalize_(w, [torch.randn(2, 3)], 3)
    assert torch.equal(w[0], before)


def test_triton_on_cpu_needs_the_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        ck.block_dots([torch.randn(2, 3)], [torch.randn(2, 3)], [[0]], backend="triton")


def test_use_backend_switches_the_default(monkeypatch):
    calls = []
    real = ck._torch_block_dots
    monkeypatch.setattr(ck, "_torch_block_dots", lambda *a: calls.append(1) or real(*a))
    X = [torch.randn(2, 3, dtype=torch.float64, device=TDEV)]
    with ck.use_backend("triton"):
        ck.block_dots(X, X, [[0]])
    assert not calls
    ck.block_dots(X, X, [[0]], backend="torch")
    assert calls == [1]
    assert ck._default_backend == "auto"


# ----------------------------------------------------------------------------- CUDA
@pytest.mark.skipif(not GPU, reason="compiled Triton kernels need a CUDA GPU")
def test_cuda_auto_backend_matches_cpu_torch_path():
    """On CUDA 'auto' is the compiled Triton path: probes bitwise as on CPU, products within
    the bounds of the CPU tests (here checked against float64 at sizes with many chunks)."""
    shapes = [(300, 200), (77,), (64, 3, 3, 3)]
    z_c = ck.rademacher(shapes, 3, 5, 11)
    z_g = ck.rademacher(shapes, 3, 5, 11, device="cuda")
    assert all(torch.equal(a, b.cpu()) for a, b in zip(z_c, z_g))
    X = randn_batch(3, shapes, torch.float32, seed=1)
    Xg = [t.cuda() for t in X]
    Xf = flat(X)
    G = ck.block_gram(Xg, Xg, [[0, 1, 2]])
    bound = gamma(Xf.shape[1] + 1, torch.float32) * (Xf.abs() @ Xf.abs().T)
    assert ((G[0].cpu().double() - Xf @ Xf.T).abs() <= bound).all()
    basis, Q = orthonormal_basis(shapes, 20, torch.float32, seed=2, device=torch.device("cuda"))
    w = [t[0].cuda() for t in randn_batch(1, shapes, torch.float32, seed=3)]
    ck.orthogonalize_(w, basis, 20)
    v = flat([t[None] for t in w])[0]
    assert float((flat(basis) @ v).norm()) <= 1e-5 * float(v.norm())
