"""Triton kernels of xclip-fast (installed as ``xclip_fast.kernels``).

Only ``@triton.jit`` functions and their launchers live here; autograd bindings, input checks and
backend dispatch are in ``xclip_fast.ops``.
"""
