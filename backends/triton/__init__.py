"""Triton kernels for tokopt ops."""
