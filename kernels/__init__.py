"""Triton kernels of sami_fast (installed as ``sami_fast.kernels``).

One file per kernel: ``_name_kernel`` is the ``@triton.jit`` function and
``name_kernel`` its launcher; ``common.py`` holds the helpers they share. Only
torch and triton are imported here (nothing of sami_fast), and no autograd or
model code lives here. Launch choices (tile configs, vocabulary splits and
chunks, warps) are launcher arguments whose defaults suit a GPU; sami_fast's
dispatch passes the interpreter's choices on CPU tensors.
"""
