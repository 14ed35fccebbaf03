"""Triton kernels of fastres, one op per file (installed as ``fastres.kernels``).

Each module holds the ``@triton.jit`` kernels of one op followed by its host
launchers (grid, block size, launch). Launchers receive tensors that the caller
has already validated and allocated; nothing here imports from ``fastres``.
"""
