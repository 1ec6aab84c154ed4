"""Triton kernels of sami_fast (installed as ``sami_fast.kernels``).

One file per kernel: ``_name_kernel`` is the ``@triton.jit`` function and
``name_kernel`` its launcher. No autograd and no model code live here.
"""
