"""gradience_kernels: compiled-kernel estimators for studying neural-network training.

Importing the package loads the compiled extension ``_C`` (which registers every
``torch.ops.gradience.*`` op) before any Python-side ``torch.library`` registration.
"""

import torch  # noqa: F401  (loads libtorch/libc10, which _C links against)

from . import _C  # noqa: F401  (must come before any torch.library call: registers the ops)
from .tail import (
    HillResult,
    MomentResult,
    PickandsResult,
    hill,
    hill_plot,
    moment_estimator,
    order_statistics,
    pickands,
    quantile,
    tail_stats,
)

__version__ = "0.1.0"

__all__ = [
    "HillResult",
    "MomentResult",
    "PickandsResult",
    "hill",
    "hill_plot",
    "moment_estimator",
    "order_statistics",
    "pickands",
    "quantile",
    "tail_stats",
]
