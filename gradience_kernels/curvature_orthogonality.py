"""Estimated loss of orthogonality of a Lanczos basis, for partial reorthogonalization.

Lanczos with only the local three-term recurrence loses orthogonality as Ritz vectors converge:
the new row q_{j+1} picks up components along converged directions, which grow from rounding
level until spurious copies of converged eigenvalues appear. Full reorthogonalization removes
them at every step, reading the whole basis twice per step, which on a cheap operator costs
more than the product itself (the bench MLP: 2.7 ms a step against a 6 ms product). Simon's
partial reorthogonalization (Simon 1984, "The Lanczos algorithm with partial
reorthogonalization", Math. Comp. 42; Larsen's PROPACK uses the same recurrence) instead tracks
estimates omega_{j,i} of q_j^T q_i with the scalar recurrence the rows themselves obey,

    beta_j omega_{j+1,i} = beta_i omega_{j,i+1} + (alpha_i - alpha_j) omega_{j,i}
                           + beta_{i-1} omega_{j,i-1} - beta_{j-1} omega_{j-1,i} + theta,

(theta: the local rounding, added with the sign of the rest so that the estimate grows) and
reorthogonalizes fully only when max_i |omega_{j+1,i}| exceeds sqrt(eps), then also at the
next step (the recurrence couples two consecutive rows). Semi-orthogonality, |q_j^T q_i| <=
sqrt(eps) for all i != j, is enough for T_m's eigenvalues to be those of the projection of A
onto span(Q_m) to O(eps ||A||) (Simon 1984, theorem 4): the Ritz values and the Gauss
quadrature of SLQ keep working precision, at O(m) scalar work per step. A full pass removes
components of size omega beta_j on old rows, which T does not hold: they enter the Ritz
residuals, so Lanczos (which certifies residuals down to eps^(2/3) ||A||, below sqrt(eps))
lowers the threshold to its tolerance.

theta: Simon's model of the rounding is eps ||A||; products computed by automatic
differentiation in float32 are noisier (the bench models' Hessians: |q_{j-1}^T A q_j -
beta_{j-1}| ~ 1e-6 ||A||, 10 eps), so theta takes the larger of eps ||A|| and that measured
asymmetry of the product, and the eps of a lower-precision basis storage. Measured on the bench
MLP Hessian (float32, threshold sqrt(eps)): the estimate stayed above the true max |Q^T q| at
every step (by 10x to 1000x), with 12 full reorthogonalizations in 90 steps.
"""

from __future__ import annotations

import math

import numpy as np
import torch


def decision_eps(dtype: torch.dtype) -> float:
    """The unit of the thresholds that decide a vector is numerically zero or in the span of a
    basis (a Lanczos breakdown, an exhausted space, a dropped sketch column): eps of dtype, but
    never coarser than float32's. Those decisions err one way harmlessly and the other way not:
    a missed one keeps a noise direction, which orthogonalization makes a valid restart or an
    extra basis column, while a false one drops a real direction. At 16 bits the scaled
    thresholds reach the signal itself: 64 eps ||A|| is 0.5 ||A|| in bfloat16 and 0.06 ||A||
    in float16, which stopped Lanczos after 3 steps on a bfloat16 GGN with residual 0 and
    'converged' Ritz values 28% low, and XTrace's 128 eps drop rule (1.0 in bfloat16) threw
    away every sketch column (estimate 2.9 for a trace of 38.7)."""
    return min(torch.finfo(dtype).eps, torch.finfo(torch.float32).eps)


class OrthogonalityEstimate:
    """omega estimates of one Lanczos run's rows: ``update`` after each step's local
    recurrence says whether the new row needs a full reorthogonalization; ``reset`` records one.

    Rows are 0-based; alpha, beta are the run's recurrence coefficients (beta[i] couples rows i
    and i + 1; 0 across a restart, where the new row was orthogonalized against all rows)."""

    def __init__(self, eps: float, capacity: int = 64, threshold: float | None = None):
        self.eps = eps
        # sqrt(eps): semi-orthogonality; a caller that certifies residuals below that passes
        # its tolerance (the components a full pass removes then stay below it).
        self.threshold = math.sqrt(eps) if threshold is None else min(threshold, math.sqrt(eps))
        self.prev = np.zeros(capacity)   # omega_{j-1, i}
        self.cur = np.zeros(capacity)    # omega_{j, i}
        self.cur[0] = 1.0
        self.rows = 1                    # j + 1: rows with an estimate
        self.force = 0                   # steps that reorthogonalize whatever the estimate
        self.full = 0                    # full reorthogonalizations so far
        self._undo = None                # the state before the last update (drop_last)

    def _room(self, n: int) -> None:
        if n > self.cur.size:
            grow = max(n, 2 * self.cur.size) - self.cur.size
            self.prev = np.concatenate([self.prev, np.zeros(grow)])
            self.cur = np.concatenate([self.cur, np.zeros(grow)])

    def update(self, alpha: np.ndarray, beta: np.ndarray, theta: float) -> bool:
        """The estimates for new row j + 1 (j = rows - 1, alpha[:j+1], beta[:j+1] known,
        beta[j] > 0 its norm); True when row j + 1 must be reorthogonalized against all rows.
        """
        j = self.rows - 1
        self._room(j + 2)
        self._undo = (self.prev, self.cur, self.rows, self.force)
        new = np.zeros(self.cur.size)
        bj = float(beta[j])
        if j > 0:
            cur, prev = self.cur, self.prev
            b = beta[:j]
            t = b * cur[1:j + 1] + (alpha[:j] - alpha[j]) * cur[:j] - beta[j - 1] * prev[:j]
            t[1:] += beta[:j - 1] * cur[:j - 1]
            new[:j] = (t + np.where(t >= 0, theta, -theta)) / bj
        new[j] = theta / bj          # after the local passes, q_{j+1} is orthogonal to q_j
        new[j + 1] = 1.0
        self.prev, self.cur = self.cur, new
        self.rows = j + 2
        need = self.force > 0 or (j > 0 and float(np.abs(new[:j]).max()) > self.threshold)
        if need:
            # Simon: reorthogonalize this row and the next one (omega_{j+2} depends on both).
            self.force = 1 if self.force == 0 else self.force - 1
        return need

    def drop_last(self) -> None:
        """Forget the last ``update``: its row was not added (the residual deflated)."""
        self.prev, self.cur, self.rows, self.force = self._undo

    def reset(self, theta: float, norm: float) -> None:
        """Row j + 1 was reorthogonalized against all rows (norm: its norm before scaling)."""
        j = self.rows - 2
        self.cur[:j + 1] = theta / norm
        self.full += 1

    def restart(self) -> None:
        """The next row starts a new segment: a probe orthogonalized twice against all rows
        (estimates eps), coupled to none (beta = 0 before it), from which the recurrence goes
        on."""
        self._room(self.rows + 1)
        self.prev, self.cur = self.cur, np.zeros(self.cur.size)
        self.cur[:self.rows] = self.eps
        self.cur[self.rows] = 1.0
        self.rows += 1
