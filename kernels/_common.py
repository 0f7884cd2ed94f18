"""Shared plumbing for the Triton kernels: a guarded triton import and small helpers.

The kernel modules must stay importable without triton (the package is imported on every
machine; the torch references beside the kernels are what the tests compare them with), so
triton is imported here inside try/except and, when it is missing, replaced by a stub whose
``jit`` is the identity and whose ``constexpr`` only exists to be used as an annotation. Launching a kernel then raises a
clear error from ``require_triton``.
"""

from __future__ import annotations

import os

import torch

try:
    import triton
    import triton.language as tl

    TRITON_IMPORT_ERROR: Exception | None = None
except Exception as e:  # ImportError, or a broken install raising something else
    TRITON_IMPORT_ERROR = e

    class _TritonStub:
        """Just enough of `triton` / `triton.language` for the kernel modules to be defined."""

        constexpr = None  # only ever used as an annotation

        @staticmethod
        def jit(fn=None, **_kwargs):
            return fn if fn is not None else (lambda f: f)

    triton = _TritonStub()
    tl = _TritonStub()


def triton_available() -> tuple[bool, str]:
    """Whether the Triton kernels can run here, and why (not).

    They run on CUDA devices, or on CPU tensors through the Triton interpreter, which needs
    TRITON_INTERPRET=1 in the environment *before* triton was first imported.
    """
    if isinstance(TRITON_IMPORT_ERROR, ImportError):
        return False, ("triton is not installed (pip install triton; in a minillm checkout: pip install -e "
                       "\".[gpu]\"; a CUDA build of torch brings its own)")
    if TRITON_IMPORT_ERROR is not None:
        return False, f"triton is not importable: {TRITON_IMPORT_ERROR!r}"
    if torch.cuda.is_available():
        return True, f"triton {triton.__version__} on CUDA"
    if os.environ.get("TRITON_INTERPRET") == "1":
        return True, f"triton {triton.__version__} interpreter (TRITON_INTERPRET=1, CPU tensors)"
    return False, "no CUDA device and TRITON_INTERPRET is not set to 1 (set it before importing triton)"


def require_triton() -> None:
    if TRITON_IMPORT_ERROR is not None:
        raise RuntimeError(f"minillm.kernels needs triton, which failed to import: {TRITON_IMPORT_ERROR!r}")


def block_dim(n: int) -> int:
    """Tile width for a head dimension: the next power of two, at least 16 (tl.dot's minimum)."""
    return max(16, triton.next_power_of_2(int(n)))


def is_interpreted(t: torch.Tensor) -> bool:
    """CPU tensors can only be run by the Triton interpreter; block sizes are then picked for tests, not speed."""
    return t.device.type != "cuda"


def dot_ieee(t: torch.Tensor) -> bool:
    """fp32 inputs need IEEE dots: Triton's fp32 default is TF32 on GPU (~1e-3 relative error)."""
    return t.dtype == torch.float32


def dot_upcast(t: torch.Tensor) -> bool:
    """The interpreter (triton 3.x) stores bf16 as uint16 and its tl.dot multiplies those raw
    integers, so on CPU bf16 dots run on fp32 copies: bf16 products are exact in fp32, which
    is what the tensor cores compute too (fp32 accumulation), so nothing is lost."""
    return is_interpreted(t) and t.dtype == torch.bfloat16


def check_same_device(*tensors: torch.Tensor) -> None:
    dev = tensors[0].device
    for t in tensors[1:]:
        if t.device != dev:
            raise ValueError(f"all tensors must be on one device, got {dev} and {t.device}")


@triton.jit
def _dot(a, b, IEEE: tl.constexpr, UPCAST: tl.constexpr):
    # Constexpr branches rather than passing the precision string through, so that 16-bit
    # inputs keep Triton's default (the precision flag only matters for fp32 inputs).
    if UPCAST:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    elif IEEE:
        return tl.dot(a, b, input_precision="ieee")
    else:
        return tl.dot(a, b)
