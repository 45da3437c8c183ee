"""Triton kernels (``@triton.jit`` only). Their launch wrappers live beside the API that uses
them (``gradience_kernels/tail_triton.py``)."""
