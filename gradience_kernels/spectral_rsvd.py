"""The Halko-Martinsson-Tropp (2011) randomized SVD with its a-posteriori error bound, for one
matrix, a batch or a list of mixed shapes (see the spectral module docstring for the
references), and HMT's expected-error bound."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from .spectral_checks import MatrixOrList, _check_finite, _check_int, _compute_dtype, _matrices
from .spectral_results import RandomizedSVDResult


# HMT Lemma 4.1 with alpha = 10: P{ ||(I-QQ^T)A|| > 10 sqrt(2/pi) max_i ||(I-QQ^T)A w_i|| }
# <= 10^-r for r standard Gaussian test vectors w_i.
_ERROR_FACTOR = 10.0 * math.sqrt(2.0 / math.pi)

# Floating-point allowance added to the error estimate, in units of eps(compute dtype) * ||A||_2
# per sqrt(max(m, n)): the probabilistic size of the rounding of the length-max(m, n) inner
# products that form the factors and of the orthogonality defect of Q (both O(eps) after
# CholeskyQR2 / Householder, Yamamoto et al. 2015 Thm 3.3), which the a-posteriori residual of
# HMT 4.3 (an exact-arithmetic bound) does not see. 4 covers the two orthogonalizations and the
# two products through which a rounding error reaches U S V^T.
_FP_ALLOWANCE = 4.0


# --------------------------------------------------------------------------- orthonormalization
def _householder(Y: torch.Tensor, final: bool, eye: torch.Tensor) -> torch.Tensor:
    return torch.linalg.qr(Y).Q


def _cholesky_pass(Y: torch.Tensor, eye: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One equilibrated CholeskyQR pass on Y (B, m, l): Q = Y D R^-1 with D = diag(G)^-1/2 and
    R^T R = D G D, G = Y^T Y. Equilibrating G is the column scaling Y D (same Q) without a pass
    over Y; it makes D G D well conditioned when Y's columns are near-orthogonal with unequal
    norms, the state the power iteration converges to (Y = A Z ~ U diag(sigma)). R^-1 comes from
    a triangular solve against I and enters through one GEMM (measured 1.4x faster on CPU than
    the right-sided triangular solve with Y). Returns (Q, bad) with bad: Cholesky failed (info);
    an overflowed G gives a non-finite Q, which the caller's defect test catches."""
    G = Y.mT @ Y
    d = torch.diagonal(G, dim1=-2, dim2=-1)
    d = torch.where(d > 0, d.rsqrt(), torch.ones_like(d))
    # lower factor L = R^T: the batched upper=True variant measured 5.6 ms against 5 us for a
    # batch of 3 4x4 matrices on 2 CPU threads (its triu pass), and R^-1 = (L^-1)^T
    L, info = torch.linalg.cholesky_ex(G * d.unsqueeze(-1) * d.unsqueeze(-2))
    Rinv = torch.linalg.solve_triangular(L, eye, upper=False).mT
    return Y @ (d.unsqueeze(-1) * Rinv), info != 0


def _cholesky_qr2(Y: torch.Tensor, final: bool, eye: torch.Tensor) -> torch.Tensor:
    """Q of Y (B, m, l), m >= l: CholeskyQR2 (Yamamoto et al. 2015), Householder where it fails.

    Pass 1 (``_cholesky_pass``) gives Q1; its Gram matrix G2 = Q1^T Q1 measures the orthogonality
    defect: if max|G2 - I| <= 1/(2l) then ||G2 - I||_2 <= 1/2, kappa(Q1)^2 <= 3, and pass 2 (a
    Cholesky of G2) returns Q with O(eps) orthogonality (ibid., Thm 3.3). A failed Cholesky
    (info != 0: Y numerically rank-deficient, e.g. an exactly low-rank or zero matrix; or G
    overflowed) or a larger defect sends that batch member to Householder QR (torch.linalg.qr,
    scale-safe; one host sync to look).

    ``final=False`` (the normalizations inside the power iteration, whose job is a
    well-conditioned basis of the same span, HMT section 4.5): Q1 itself once its defect passes
    the same test (kappa(Q1) <= sqrt(3)).
    """
    l = Y.shape[-1]
    Q1, bad = _cholesky_pass(Y, eye)
    G2 = Q1.mT @ Q1
    defect = (G2 - eye).abs().amax(dim=(-2, -1))
    bad = bad | ~(defect <= 0.5 / l)  # a NaN defect counts as bad
    if final:
        L2, info2 = torch.linalg.cholesky_ex(G2)
        Q = Q1 @ torch.linalg.solve_triangular(L2, eye, upper=False).mT
        bad = bad | (info2 != 0)
    else:
        Q = Q1
    if bool(bad.any()):
        idx = bad.nonzero().flatten()
        Q = Q.index_copy(0, idx, torch.linalg.qr(Y.index_select(0, idx)).Q)
    return Q


_ORTH = {"cholesky_qr2": _cholesky_qr2, "householder": _householder}


# --------------------------------------------------------------------------- core
def _gaussian(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device,
              generator: torch.Generator | None) -> torch.Tensor:
    """N(0, 1) draws from ``generator`` on the generator's device, moved to ``device``."""
    if generator is None:
        return torch.randn(shape, dtype=dtype, device=device)
    return torch.randn(shape, dtype=dtype, device=generator.device, generator=generator).to(device)


def _scaled_column_norms(R: torch.Tensor) -> torch.Tensor:
    """2-norms of the columns of R (B, m, r) without overflow or underflow of the squares."""
    s = R.abs().amax(dim=(-2, -1), keepdim=True)
    s = torch.where(s > 0, s, torch.ones_like(s))
    return torch.linalg.vector_norm(R / s, dim=-2) * s.squeeze(-1)


def _rsvd_group(A: torch.Tensor, rank: int, oversample: int, n_iter: int, n_test: int,
                generator: torch.Generator | None, orth, small_svd: str
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """HMT Algorithm 4.4 (subspace iteration) + 5.1 on A (B, m, n) in its compute dtype."""
    B, m, n = A.shape
    wide = m < n
    if wide:  # work on the tall A^T: the orthonormalized blocks then have min(m, n) rows or more
        A = A.mT
        m, n = n, m
    l = min(rank + oversample, n)
    omega = _gaussian((B, n, l), A.dtype, A.device, generator)
    eye = torch.eye(l, dtype=A.dtype, device=A.device)  # once: every orth needs it
    test = _gaussian((B, n, n_test), A.dtype, A.device, generator)

    # The error-test vectors ride along the last product with A (one GEMM of l + n_test columns
    # instead of a separate memory-bound one of n_test columns: measured 15 ms of 18 saved on
    # 16 x 768 x 768, one thread); they are drawn independently of Omega, so Q (from the first l
    # columns) is independent of them, as HMT Lemma 4.1 needs.
    Z = omega
    for j in range(n_iter + 1):            # re-orthonormalized after every product (HMT Alg 4.4)
        if j > 0:
            Z = orth(A.mT @ Q, False, eye)
        if j == n_iter:
            Y = A @ torch.cat([Z, test], dim=-1)
            Q, Yt = orth(Y[..., :l], True, eye), Y[..., l:]
        else:
            Q = orth(A @ Z, False, eye)    # (B, m, l)
    Bt = A.mT @ Q                          # (B, n, l) = (Q^T A)^T

    # The small SVD: "qr_svd" measured 1.5-3x faster than torch.linalg.svd of the l x n matrix on
    # CPU (64 x 74 x 768: 137 vs 422 ms, fp32). eigh of the l x l Gram matrix was faster still
    # (17 ms) but squares the condition number: top-64 relative errors 5e-2 (fp32) and 2e-10
    # (fp64) on sigma_i = i^-2 against 9e-6 and 2e-14 by SVD, so it is not used.
    if small_svd == "svd":
        Us, S, Vh = torch.linalg.svd(Bt.mT, full_matrices=False)   # (B,l,l) (B,l) (B,l,n)
        V = Vh.mT
    elif small_svd == "qr_svd":
        # Q^T A = R^T Q2^T with Bt = Q2 R: the SVD of the l x l factor R^T gives the same values.
        Q2 = orth(Bt, True, eye)                                   # (B, n, l)
        Rt = (Q2.mT @ Bt).mT                                       # (B, l, l)
        Us, S, Vrh = torch.linalg.svd(Rt)
        V = Q2 @ Vrh.mT
    else:
        raise ValueError(f"small_svd must be 'svd' or 'qr_svd', got small_svd={small_svd!r}")
    U = Q @ Us[..., :rank]
    V = V[..., :rank]

    # HMT 4.3: ||(I - QQ^T) A||_2 <= 10 sqrt(2/pi) max_i ||(I - QQ^T) A w_i|| with probability
    # >= 1 - 10^-n_test. A - U_k S_k V_k^T = (I - QQ^T)A + Q(B - B_k): the two terms have
    # orthogonal column spaces, so ||.||^2 <= ||(I-QQ^T)A||^2 + s_{k+1}(B)^2.
    resid = Yt - Q @ (Q.mT @ Yt)
    perp = _ERROR_FACTOR * _scaled_column_norms(resid).amax(dim=-1)
    tail = S[..., rank] if l > rank else torch.zeros_like(perp)
    fp = _FP_ALLOWANCE * math.sqrt(m) * torch.finfo(A.dtype).eps * S[..., 0]
    err = torch.hypot(perp, tail) + fp
    S = S[..., :rank]
    if wide:
        U, V = V, U
    return U, S, V, err


def randomized_svd(
    A: MatrixOrList,
    rank: int,
    *,
    oversample: int = 10,
    n_iter: int = 2,
    generator: torch.Generator | None = None,
    n_error_vectors: int = 10,
    compute_dtype: torch.dtype | None = None,
    orthogonalization: str = "cholesky_qr2",
    small_svd: str = "qr_svd",
    check_finite: bool = True,
) -> RandomizedSVDResult | list[RandomizedSVDResult]:
    """Rank-``rank`` randomized SVD (Halko-Martinsson-Tropp 2011) with an error bound.

    A: a matrix (m, n), a batch (..., m, n), or a list of such tensors of any shapes (one
    device, one compute dtype). Matrices of one shape are one batched computation; a list returns
    a list of results in input order. Wide matrices (m < n) are processed as A^T.

    Algorithm, with l = min(rank + oversample, min(m, n)) and Omega an n x l standard Gaussian:
    Q = orth(A Omega); n_iter times: Q = orth(A orth(A^T Q)) (HMT Alg. 4.4, subspace iteration,
    re-orthonormalized after every product so rounding does not wash out the small singular
    directions); then the l x n matrix Q^T A = Us S Vs^T (HMT Alg. 5.1) and U = Q Us, keeping the
    top ``rank`` triplets. ``orth`` is CholeskyQR2 (column-equilibrated) with Householder QR as
    fallback for any batch member where the Cholesky factorization fails or the first pass leaves
    too large an orthogonality defect (``orthogonalization="householder"``: torch.linalg.qr
    throughout). ``small_svd="qr_svd"``: the small SVD as the SVD of the l x l triangular factor of
    (Q^T A)^T; "svd": torch.linalg.svd of the l x n matrix directly.

    Error estimate (HMT section 4.3, Lemma 4.1): with r = n_error_vectors fresh Gaussian vectors
    w_i, ||(I - QQ^T) A||_2 <= 10 sqrt(2/pi) max_i ||(I - QQ^T) A w_i|| with probability at least
    1 - 10^-r. The returned estimate is sqrt(that^2 + s_{rank+1}(Q^T A)^2) (the truncation from l to
    rank adds an orthogonal term of norm s_{rank+1}) plus a floating-point allowance of
    4 sqrt(max(m, n)) eps(compute dtype) s_1, so ||A - U diag(S) V^T||_2 <= error_estimate with
    probability >= 1 - 10^-r. By Weyl's inequality it also bounds |S_i - sigma_i(A)| for i <= rank.

    Expected accuracy (HMT Cor. 10.10): see ``hmt_expected_error_bound``.

    Compute dtype: float64 for float64 input, float32 otherwise (bfloat16/float16 are upcast);
    ``compute_dtype`` overrides. Random draws (Omega, then the test vectors, group by group in
    order of first appearance) come from ``generator`` on the generator's device (then moved to
    A's device, so a CPU generator gives CUDA the same draws as CPU), or the default generator of
    A's device: the result is deterministic given the generator state. Inputs are never
    modified. Non-finite entries are an error (``check_finite=False`` skips the check and its
    host sync). Host syncs: the finiteness check and one per orthonormalization (the fallback
    test).

    Returns RandomizedSVDResult(U, S, V, error_estimate), or a list of them for a list input.
    """
    mats, is_list = _matrices(A, "A")
    _check_int(rank, "rank", 1)
    _check_int(oversample, "oversample", 0)
    _check_int(n_iter, "n_iter", 0)
    _check_int(n_error_vectors, "n_error_vectors", 1)
    if orthogonalization not in _ORTH:
        raise ValueError(f"orthogonalization must be one of {sorted(_ORTH)}, got "
                         f"orthogonalization={orthogonalization!r}")
    if small_svd not in ("svd", "qr_svd"):
        raise ValueError(f"small_svd must be 'svd' or 'qr_svd', got small_svd={small_svd!r}")
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator, got {type(generator).__name__}")
    cdtypes = {_compute_dtype(t.dtype, compute_dtype) for t in mats}
    if len(cdtypes) > 1:
        raise ValueError(f"A: list entries must share one compute dtype, got "
                         f"{sorted({str(t.dtype) for t in mats})}")
    cdtype = cdtypes.pop()
    for i, t in enumerate(mats):
        m, n = t.shape[-2:]
        if rank > min(m, n):
            label = f"A[{i}]" if is_list else "A"
            raise ValueError(f"rank must be in [1, min(m, n)] = [1, {min(m, n)}] for {label} of "
                             f"shape {tuple(t.shape)}, got rank={rank}")
    if check_finite:
        _check_finite(mats, "A", is_list)

    orth = _ORTH[orthogonalization]
    # group by matrix shape in order of first appearance; each group is one (B, m, n) batch
    groups: dict[tuple[int, int], list[int]] = {}
    for i, t in enumerate(mats):
        groups.setdefault(tuple(t.shape[-2:]), []).append(i)
    results: list[RandomizedSVDResult | None] = [None] * len(mats)
    with torch.no_grad():
        for (m, n), idx in groups.items():
            parts = [mats[i].reshape(-1, m, n) for i in idx]
            counts = [p.shape[0] for p in parts]
            stacked = parts[0] if len(parts) == 1 else torch.cat(parts)
            stacked = stacked.to(cdtype)
            U, S, V, err = _rsvd_group(stacked, rank, oversample, n_iter, n_error_vectors,
                                       generator, orth, small_svd)
            start = 0
            for i, c in zip(idx, counts):
                batch = tuple(mats[i].shape[:-2])
                sl = slice(start, start + c)
                results[i] = RandomizedSVDResult(
                    U[sl].reshape(*batch, m, rank), S[sl].reshape(*batch, rank),
                    V[sl].reshape(*batch, n, rank), err[sl].reshape(batch))
                start += c
    return results if is_list else results[0]


def hmt_expected_error_bound(sigma: Sequence[float] | torch.Tensor, rank: int, oversample: int,
                             n_iter: int) -> float:
    """HMT Corollary 10.10: the bound on E||(I - QQ^T) A||_2 of the power scheme.

    For a Gaussian test matrix of rank + p columns (p = oversample >= 2) and q = n_iter power
    iterations, with sigma the singular values of A (descending, all of them):

        E||(I - P)A|| <= [ (1 + sqrt(k/(p-1))) sigma_{k+1}^(2q+1)
                           + (e sqrt(k+p) / p) (sum_{j>k} sigma_j^(2(2q+1)))^(1/2) ]^(1/(2q+1))

    with k = rank (q = 0 is Theorem 10.6). Since the computed singular values are those of
    QQ^T A, Weyl's inequality gives 0 <= sigma_i(A) - S_i <= ||(I - QQ^T)A|| for every i, so the
    same number bounds the expected singular-value error. When rank + p exceeds min(m, n) the
    range is exact (the bound is 0). Returns a float.
    """
    s = torch.as_tensor(sigma, dtype=torch.float64).flatten()
    _check_int(rank, "rank", 1)
    _check_int(n_iter, "n_iter", 0)
    _check_int(oversample, "oversample", 2)
    if rank + oversample >= s.numel():
        return 0.0
    k, p, q = rank, oversample, n_iter
    e = 2 * q + 1
    tail = s[k:]
    # normalise by sigma_{k+1} before the high powers (sigma^(2(2q+1)) underflows otherwise)
    t0 = float(tail[0])
    if t0 == 0.0:
        return 0.0
    r = tail / t0
    inner = (1 + math.sqrt(k / (p - 1))) + (math.e * math.sqrt(k + p) / p) * float(
        torch.sqrt(torch.sum(r ** (2 * e))))
    return t0 * inner ** (1.0 / e)
