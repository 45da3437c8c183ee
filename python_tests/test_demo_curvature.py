"""The demo's curvature section end to end on a small slice of its data (the full section runs
in `gradience demo`): every row present, budgets kept, and the numbers consistent with each
other and with exact quantities."""

import math

import torch

from gradience_kernels import demo, demo_curvature


def test_curvature_section_rows_and_text():
    rows = demo_curvature.curvature_rows(seed=0, samples=16, budget=48)
    assert [r["method"] for r in rows["traces"]] == ["hutchinson", "hutch++", "xtrace"]
    for r in rows["traces"]:
        est = r["estimate"]
        assert 0 < est.matvecs <= 48
        assert math.isfinite(est.trace) and est.stderr > 0
    # Three unbiased estimates of one trace: pairwise within 4 combined standard errors.
    ests = [r["estimate"] for r in rows["traces"]]
    for a in ests:
        for b in ests:
            assert abs(a.trace - b.trace) <= 4 * math.hypot(a.stderr, b.stderr)
    eig = rows["eigen"].eigenvalues
    assert len(eig) == 5 and bool((eig[:-1] >= eig[1:]).all())
    m = rows["margin"]
    assert m.threshold == 2 / demo.SGD_LR
    assert m.margin == m.threshold - float(eig[0])
    # The Fisher trace is exact: (1/N) sum_i ||g_i||^2 from an independent per-sample loop.
    _, model, _ = demo.train_small_model(0, 20)
    x, y = demo.synthetic_data(torch.Generator().manual_seed(0))
    total = 0.0
    for i in range(16):
        model.zero_grad()
        torch.nn.functional.cross_entropy(model(x[i:i + 1]), y[i:i + 1]).backward()
        total += sum(float(p.grad.double().pow(2).sum()) for p in model.parameters())
    assert math.isclose(rows["fisher_trace"], total / 16, rel_tol=1e-4)
    text = demo_curvature.format_curvature(rows)
    for word in ("hutchinson", "hutch++", "xtrace", "top-5 eigenvalues", "stability margin",
                 "Fisher trace"):
        assert word in text
