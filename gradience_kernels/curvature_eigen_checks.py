"""Argument checks shared by the eigenvalue estimators: each names the argument and its value,
and runs before any product."""

from __future__ import annotations

import math

import numpy as np
import torch

from .curvature_operators import CurvatureOperator


def _check_int(name: str, value, lo: int, hi: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name} must be an int, got {name}={value!r}")
    value = int(value)
    if value < lo:
        raise ValueError(f"{name} must be >= {lo}, got {name}={value}")
    if hi is not None and value > hi:
        raise ValueError(f"{name} must be <= {hi}, got {name}={value}")
    return value


def _check_positive(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, np.floating, np.integer)):
        raise TypeError(f"{name} must be a real number, got {name}={value!r}")
    value = float(value)
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be a finite number > 0, got {name}={value}")
    return value


def _check_op(op) -> None:
    if not isinstance(op, CurvatureOperator):
        raise TypeError(f"op must be a CurvatureOperator, got {type(op).__name__}")


def _check_basis_dtype(basis_dtype, op: CurvatureOperator) -> torch.dtype:
    if basis_dtype is None:
        return op.dtype
    if basis_dtype not in (torch.float64, torch.float32, torch.float16, torch.bfloat16):
        raise TypeError(f"basis_dtype must be torch.float64, float32, float16 or bfloat16, got "
                        f"basis_dtype={basis_dtype!r}")
    return basis_dtype


def _check_which(which) -> str:
    if which not in ("largest", "smallest"):
        raise ValueError(f"which must be 'largest' or 'smallest', got which={which!r}")
    return which


#: Reorthogonalization schemes of lanczos and slq_density.
REORTH_METHODS = ("full", "partial")


def _check_reorth(reorth) -> str:
    if reorth not in REORTH_METHODS:
        raise ValueError(f"reorth must be one of {REORTH_METHODS}, got reorth={reorth!r}")
    return reorth


def _default_tol(dtype: torch.dtype, basis_dtype: torch.dtype) -> float:
    # eps^(2/3) of the operator's dtype (ARPACK's eps23): well above the residual's rounding
    # floor (a few eps ||A||), and a guaranteed eigenvalue accuracy |theta - lambda| <= tol ||A||
    # of 3.7e-11 (float64) / 2.4e-5 (float32) without any gap assumption. A basis stored in a
    # lower precision puts a floor of about 0.1 eps_basis ||A|| under the residual (measured:
    # 0.2 u = 0.1 eps for float32, float16 and bfloat16 storage), hence eps_basis there.
    return max(torch.finfo(dtype).eps ** (2.0 / 3.0), torch.finfo(basis_dtype).eps)
