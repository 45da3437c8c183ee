"""gradience_kernels: compiled-kernel estimators for studying neural-network training.

Importing the package loads the compiled extension ``_C`` (which registers every
``torch.ops.gradience.*`` op) before any Python-side ``torch.library`` registration.
"""

import torch  # noqa: F401  (loads libtorch/libc10, which _C links against)

from . import _C  # noqa: F401  (must come before any torch.library call: registers the ops)
from . import tail
from .tail import *  # noqa: F401,F403  (the public API, listed once in tail.__all__)

__version__ = "0.1.0"

__all__ = list(tail.__all__)
