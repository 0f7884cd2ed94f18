"""Triton kernels (landing separately)."""


def triton_available():
    return False, "the Triton kernels are not part of this build yet"
