"""The tiny float64 problems of the operator and sample-space tests (<= 400 parameters: an
explicit Hessian costs P backward passes), built once per session."""

import functools

import torch

from gradience_kernels import toy_models as tm

CONFIGS = {
    "mlp": dict(hidden=8, batch=10),
    "cnn": dict(channels=(3, 4), image_size=6, classes=3, batch=6),
    "transformer": dict(d_model=4, heads=2, layers=2, seq_len=3, mlp=8, classes=3, in_dim=3,
                        batch=5),
}


@functools.lru_cache(maxsize=None)
def problem(name: str, dtype=torch.float64):
    return tm.make_problem(name, "tiny", dtype=dtype, **CONFIGS[name])
