import os

import torch

# Triton kernels run compiled on CUDA, and on CPU-only machines under the interpreter, which
# triton.jit reads when a kernel module is first imported: set before any test imports one.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import hypothesis  # noqa: E402
import pytest  # noqa: E402

import gradience_kernels  # noqa: E402,F401

hypothesis.settings.register_profile(
    "ci", max_examples=150, deadline=None, derandomize=True,
    suppress_health_check=[hypothesis.HealthCheck.too_slow],
)
hypothesis.settings.register_profile(
    "dev", max_examples=40, deadline=None,
    suppress_health_check=[hypothesis.HealthCheck.too_slow],
)
hypothesis.settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


def devices() -> list[str]:
    out = ["cpu"]
    if torch.cuda.is_available():
        out.append("cuda")
    return out


@pytest.fixture(params=devices())
def device(request):
    return torch.device(request.param)


@pytest.fixture(scope="module")
def one_thread():
    """Torch and BLAS limited to one thread for a module of many tiny factorizations: on a shared,
    loaded 2-core machine every intra-op parallel region of them waits on busy threads (measured
    69 s for test_randomized_svd.py with 2 threads against 4 s with 1); no result depends on the
    thread count. threadpoolctl (optional) also limits the NumPy reference's BLAS."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        threadpool_limits = None
    try:
        if threadpool_limits is None:
            yield
        else:
            with threadpool_limits(1):
                yield
    finally:
        torch.set_num_threads(before)
