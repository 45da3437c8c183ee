"""Tail estimators over a sample sharded across 2 and 4 gloo processes equal the
single-process results on the concatenated data (order statistics exactly, log sums within the
derived bounds). Each test spawns its processes."""

import math
import os
import tempfile

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import gradience_kernels as gk
import reference as ref

DTYPES = [torch.float32, torch.float64, torch.bfloat16]


def _global_sample(dtype):
    g = torch.Generator().manual_seed(77)
    x = torch.empty(60_000, dtype=torch.float64).cauchy_(generator=g)
    x[::97] = 0.0
    x[5::1001] = float("inf")
    x[7::1003] = float("nan")
    x[11::50] = x[10::50][: x[11::50].numel()]  # ties
    return x.to(dtype)


def _shard(x, rank, world):
    # Uneven contiguous pieces; odd ranks pass two tensors, one of them strided.
    bounds = [0] + [int(len(x) * (i + 1) ** 2 / world**2) for i in range(world)]
    piece = x[bounds[rank]:bounds[rank + 1]]
    if rank % 2 == 1 and piece.numel() >= 20:
        head = piece[:20].reshape(4, 5).t()
        return [head, piece[20:]]
    return [piece]


def _check_rows(rows, counts, want_rows, want_counts, x, ks):
    assert counts.tolist() == want_counts.tolist()
    desc = ref.tail_sorted(x)
    for got, want, k in zip(rows.tolist(), want_rows.tolist(), ks):
        assert got[:3] == want[:3], (k, got[:3], want[:3])
        tol1, tol2 = ref.log_sum_tolerances(x, k, desc)
        for j, tol in ((3, tol1), (4, tol2), (5, tol1), (6, tol2)):
            assert abs(got[j] - want[j]) <= 2 * tol, (k, j, got[j], want[j], tol)


def _worker(rank, world, init_file):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                            world_size=world)
    try:
        group = dist.group.WORLD
        for dtype in DTYPES:
            x = _global_sample(dtype)
            xs = _shard(x, rank, world)
            n_eff = ref.counts(x)["n_eff"]
            ks = [1, 10, 500, n_eff // 3, n_eff - 1]
            rows, counts = gk.tail_stats(xs, ks, [0.05], process_group=group)
            want_rows, want_counts = gk.tail_stats(x, ks, [0.05])
            _check_rows(rows, counts, want_rows, want_counts, x, ks + [int(0.05 * n_eff)])
            h = gk.hill(xs, k_ratio=0.01, process_group=group)
            assert math.isclose(float(h.alpha), float(gk.hill(x, k_ratio=0.01).alpha),
                                rel_tol=1e-9)
            m = gk.moment_estimator(xs, 700, process_group=group)
            assert math.isclose(float(m.gamma), float(gk.moment_estimator(x, 700).gamma),
                                rel_tol=1e-9)
            p = gk.pickands(xs, k_ratio=0.01, process_group=group)
            assert float(p.gamma) == float(gk.pickands(x, k_ratio=0.01).gamma)
            ranks = [1, 2, 1000, n_eff]
            assert torch.equal(gk.order_statistics(xs, ranks, process_group=group),
                               gk.order_statistics(x, ranks))
            finite = [t[torch.isfinite(t)] for t in xs]
            x_finite = x[torch.isfinite(x)]
            n_all = x_finite.numel()
            signed_ranks = [1, 17, n_all // 2, n_all]
            assert torch.equal(
                gk.order_statistics(finite, signed_ranks, absolute=False, process_group=group),
                gk.order_statistics(x_finite, signed_ranks, absolute=False))
            for method in ("linear", "nearest", "midpoint"):
                got = gk.quantile(finite, [0.0, 0.1, 0.5, 0.999, 1.0], method, process_group=group)
                want = gk.quantile(x_finite, [0.0, 0.1, 0.5, 0.999, 1.0], method)
                assert torch.equal(got, want), (method, got, want)
            assert torch.isnan(gk.quantile(xs, 0.5, process_group=group))  # NaN somewhere
            if dtype != torch.bfloat16:
                assert gk.fit_stable(finite, process_group=group) == gk.fit_stable(x_finite)
            fit = gk.fit_gpd(xs, 800, process_group=group)
            want_fit = gk.fit_gpd(x, 800)
            assert (fit.threshold, fit.n_exceedances) == (want_fit.threshold, want_fit.n_exceedances)
            assert math.isclose(fit.xi, want_fit.xi, rel_tol=1e-9, abs_tol=1e-12)
            plot = gk.hill_plot(xs, [5, 50, 5000], process_group=group)
            want = gk.hill_plot(x, [5, 50, 5000])
            assert torch.allclose(plot.alpha, want.alpha, rtol=1e-9, atol=0)
            per = gk.hill([xs[0], xs[0]], k=3, per_tensor=True, process_group=group)
            assert per.alpha.shape == (2,) and float(per.alpha[0]) == float(per.alpha[1])
        with pytest.raises(ValueError, match="n_eff"):
            gk.hill(xs, k=10**9, process_group=group)
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("world", [2, 4])
def test_sharded_equals_concatenated(world):
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(_worker, args=(world, os.path.join(tmp, "init")), nprocs=world, join=True)
