"""gradience_kernels: compiled-kernel estimators for studying neural-network training.

Importing the package loads the compiled extension ``_C`` (which registers every
``torch.ops.gradience.*`` op) before any Python-side ``torch.library`` registration.
"""

import torch  # noqa: F401  (loads libtorch/libc10, which _C links against)

from . import _C  # noqa: F401  (must come before any torch.library call: registers the ops)
from . import (analysis, curvature, curvature_kernels, power_law, spectral,  # noqa: F401
               spectrum_metrics, tail, tail_fits, tail_inference, tail_selection, tail_triton)
from .analysis import *  # noqa: F401,F403
from .curvature import *  # noqa: F401,F403
from .power_law import *  # noqa: F401,F403
from .spectral import *  # noqa: F401,F403
from .spectrum_metrics import *  # noqa: F401,F403
from .tail import *  # noqa: F401,F403  (the public API, listed once in each module's __all__)
from .tail_fits import *  # noqa: F401,F403
from .tail_inference import *  # noqa: F401,F403
from .tail_selection import *  # noqa: F401,F403

__version__ = "0.1.0"

__all__ = (list(tail.__all__) + list(tail_fits.__all__) + list(tail_inference.__all__)
           + list(tail_selection.__all__) + list(power_law.__all__) + list(spectral.__all__)
           + list(spectrum_metrics.__all__) + list(analysis.__all__) + list(curvature.__all__))
