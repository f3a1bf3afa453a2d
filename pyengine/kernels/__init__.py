"""Triton kernels: the GPU path of every op family."""
