"""CPU products for decode (cpu_gemv.c), their launcher and the torch references they must equal.

The C file is compiled once per machine with the system's C compiler (`cc -O3 -march=native
-fopenmp`: whatever vector width this CPU has) into MINILLM_CACHE/kernels/, keyed by the source,
the CPU and the compiler, and called through ctypes. Its OpenMP runtime is the one torch already
loaded (libgomp.so.1: the loader reuses a library of the same soname), so torch's threads run it.
No compiler, or a failed build: `available()` is False with the reason in `why_not()`, and the
callers keep torch's own products. MINILLM_CPU_KERNELS=0 turns them off; MINILLM_CPU_MARCH picks
another -march (the tests build x86-64-v3, AVX2 without VNNI, and x86-64, the plain C path).

    gemv(x, w)                      x (M, K) fp32 @ w.T, w (N, K) bf16 or fp32   -> (M, N) fp32
    gemv_int8(x, q, d)              q (N, K) int8, d (N, K/G) fp16               -> (M, N) fp32
    gemv_int4(x, q, d, m)           q (N, K/2) uint8 (llama.cpp's Q4 block order), d, m (N, K/G) fp16
                                    (round_x=True: x rounded to int8 per 32 values, integer
                                    products, gemv_int*_ref; False: fp32 x, widened weights)
    dequant_int8(q, d, out) / dequant_int4(q, d, m, out)        into out (N, K), fp32 or bf16
M <= 8 rows (the C side takes more in passes of 8; a matmul on the dequantized weight reads it once), K % 32 == 0.
"""
from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import shutil
import subprocess
from pathlib import Path

import torch

SOURCES = [Path(__file__).with_name(n) for n in ("cpu_gemv.c", "cpu_decode.c", "cpu_step.c")]   # one library
HEADERS = [Path(__file__).with_name("cpu_common.h")]                             # in the cache key
MAX_ROWS = 8
_error: str | None = None


def _cache_dir() -> Path:
    root = os.environ.get("MINILLM_CACHE") or Path(os.environ.get("XDG_CACHE_HOME", "~/.cache")) / "minillm"
    return Path(root).expanduser() / "kernels"


def _cpu() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next((line for line in f if line.startswith("flags")), "")
    except OSError:
        return ""


@functools.cache
def _lib():
    global _error
    if os.environ.get("MINILLM_CPU_KERNELS", "1") == "0":
        _error = "MINILLM_CPU_KERNELS=0"
        return None
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if not cc:
        _error = "no C compiler (cc) on PATH"
        return None
    src = b"".join(f.read_bytes() for f in SOURCES + HEADERS)
    try:
        version = subprocess.run([cc, "--version"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError) as e:
        _error = f"{cc} --version failed: {e}"
        return None
    march = os.environ.get("MINILLM_CPU_MARCH", "native")   # e.g. x86-64-v3 (AVX2), x86-64 (plain C)
    key = hashlib.sha256(src + _cpu().encode() + version.encode() + march.encode()).hexdigest()[:16]
    so = _cache_dir() / f"cpu_gemv-{key}.so"
    if not so.exists():
        try:
            so.parent.mkdir(parents=True, exist_ok=True)
        except OSError:   # a read-only cache: build in a temporary folder, for this process
            import tempfile
            so = Path(tempfile.mkdtemp(prefix="minillm-kernels-")) / so.name
        tmp = so.with_suffix(f".{os.getpid()}.tmp")
        cmd = [cc, "-O3", f"-march={march}", "-fopenmp", "-shared", "-fPIC", "-o", str(tmp), *map(str, SOURCES)]
        try:
            r = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
        except (OSError, subprocess.SubprocessError) as e:
            _error = f"compiling the CPU kernels failed: {e}"
            return None
        if r.returncode:
            lines = (r.stderr or r.stdout).strip().splitlines() or ["no output"]
            _error = f"compiling the CPU kernels failed: {next((l for l in lines if 'error' in l), lines[-1])}"
            return None
        tmp.replace(so)
    lib = ctypes.CDLL(str(so))
    i, p = ctypes.c_int, ctypes.c_void_p
    L = ctypes.c_int64
    lib.gemv_f32.argtypes = [i, L, L, p, p, p, L, i]
    lib.gemv_bf16.argtypes = [i, L, L, p, p, p, L, i, i]
    lib.gemv_int8.argtypes = [i, L, L, L, p, p, p, p, L, i, i]
    lib.gemv_int4.argtypes = [i, L, L, L, p, p, p, p, p, L, i, i]
    lib.dequant_int8.argtypes = [L, L, L, p, p, p, i, i]
    lib.dequant_int4.argtypes = [L, L, L, p, p, p, p, i, i]
    f = ctypes.c_float
    lib.attend_decode.argtypes = [i, i, i, i, i, L, p, L, p, p, i, p, p, f, p, i]
    lib.rmsnorm.argtypes = [L, L, p, p, f, i, p]
    lib.qkv_store.argtypes = [i, i, i, i, p, p, p, f, p, p, p, p, i, p]
    lib.silu_mul.argtypes = [L, L, p, i, p]
    lib.decode_step.argtypes = [p, i, p, p, p, p, p, L, p, p, L, p, p, i]
    return lib


def available() -> bool:
    return _lib() is not None


def few_rows(x: torch.Tensor) -> bool:
    """x (..., K) is 1..MAX_ROWS rows on CPU and the loops are built: what the decode calls take."""
    return x.is_cpu and 0 < x.numel() <= MAX_ROWS * x.shape[-1] and available()


def why_not() -> str | None:
    _lib()
    return _error


def f32(x: torch.Tensor) -> torch.Tensor:
    """x as the loops take it: fp32, contiguous (no op when it already is)."""
    return x if x.dtype is torch.float32 and x.is_contiguous() else x.float().contiguous()


def _rows(x: torch.Tensor, K: int, dtype=torch.float32) -> int:
    """x (..., K) of `dtype`, contiguous, 1..8 rows in all -> the number of rows."""
    M = x.numel() // K if x.shape[-1] == K else 0
    assert x.dtype is dtype and x.is_contiguous() and 1 <= M <= MAX_ROWS and K % 32 == 0, (x.shape, K)
    return M   # the C side checks nothing


def gemv(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """x (..., K) @ w.T -> (..., N); w (N, K) bf16 or fp32, contiguous. x fp32 -> y fp32; with a
    bf16 w, x may be bf16 too -> y bf16 (rounded from the fp32 sums)."""
    N, K = w.shape
    io_bf16 = x.dtype is torch.bfloat16 and w.dtype is torch.bfloat16 and x.is_contiguous()
    M = _rows(x, K, x.dtype if io_bf16 else torch.float32)
    assert w.is_contiguous() and w.dtype in (torch.bfloat16, torch.float32)
    y = x.new_empty(*x.shape[:-1], N)
    if w.dtype is torch.bfloat16:
        _lib().gemv_bf16(M, N, K, x.data_ptr(), w.data_ptr(), y.data_ptr(), N, int(io_bf16), torch.get_num_threads())
    else:
        _lib().gemv_f32(M, N, K, x.data_ptr(), w.data_ptr(), y.data_ptr(), N, torch.get_num_threads())
    return y


def gemv_int8(x, q, d, round_x: bool = True) -> torch.Tensor:
    """round_x: x rounded to int8 per 32 values, integer products (gemv_int8_ref); else fp32 x
    times the dequantized weight."""
    N, K = q.shape
    M = _rows(x, K)
    y = x.new_empty(*x.shape[:-1], N)
    _lib().gemv_int8(M, N, K, K // d.shape[1], x.data_ptr(), q.data_ptr(), d.data_ptr(), y.data_ptr(), N,
                     int(round_x), torch.get_num_threads())
    return y


def gemv_int4(x, q, d, m, round_x: bool = True) -> torch.Tensor:
    N, K = q.shape[0], 2 * q.shape[1]
    M = _rows(x, K)
    y = x.new_empty(*x.shape[:-1], N)
    _lib().gemv_int4(M, N, K, K // d.shape[1], x.data_ptr(), q.data_ptr(), d.data_ptr(), m.data_ptr(),
                     y.data_ptr(), N, int(round_x), torch.get_num_threads())
    return y


def _out(out, N, K):
    assert out.shape == (N, K) and out.is_contiguous() and out.dtype in (torch.float32, torch.bfloat16)
    return out.data_ptr(), int(out.dtype == torch.float32)


def dequant_int8(q, d, out: torch.Tensor) -> torch.Tensor:
    N, K = q.shape
    _lib().dequant_int8(N, K, K // d.shape[1], q.data_ptr(), d.data_ptr(), *_out(out, N, K), torch.get_num_threads())
    return out


def dequant_int4(q, d, m, out: torch.Tensor) -> torch.Tensor:
    N, K = q.shape[0], 2 * q.shape[1]
    _lib().dequant_int4(N, K, K // d.shape[1], q.data_ptr(), d.data_ptr(), m.data_ptr(), *_out(out, N, K),
                        torch.get_num_threads())
    return out


# -- the torch references ---------------------------------------------------------------------

def unpack_int4(q: torch.Tensor) -> torch.Tensor:
    """(N, K/2) uint8 in Q4 block order -> (N, K) values 0..15: block b's byte j holds value
    32b + j in its low nibble and 32b + j + 16 in its high one."""
    N = q.shape[0]
    b = q.view(N, -1, 16)
    return torch.cat((b & 15, b >> 4), dim=-1).view(N, -1)


def pack_int4(v: torch.Tensor) -> torch.Tensor:
    """The inverse of unpack_int4: (N, K) values 0..15 -> (N, K/2) uint8."""
    N = v.shape[0]
    b = v.to(torch.uint8).view(N, -1, 2, 16)
    return (b[:, :, 0] | (b[:, :, 1] << 4)).view(N, -1)


def dequant_int8_ref(q, d, dtype=torch.float32) -> torch.Tensor:
    G = q.shape[1] // d.shape[1]
    return (q.float() * d.float().repeat_interleave(G, dim=1)).to(dtype)


def dequant_int4_ref(q, d, m, dtype=torch.float32) -> torch.Tensor:
    v = unpack_int4(q).float()
    G = v.shape[1] // d.shape[1]
    return (v * d.float().repeat_interleave(G, 1) + m.float().repeat_interleave(G, 1)).to(dtype)


def gemv_ref(x, w) -> torch.Tensor:
    return x.float() @ w.float().t()


def quantize_x_ref(x: torch.Tensor):
    """x (M, K) -> xq (M, K) int8 values (as fp32), dx (M, K/32): the activations as the integer
    products see them (llama.cpp's Q8_0 rounding of activations)."""
    b = x.float().view(x.shape[0], -1, 32)
    amax = b.abs().amax(-1)
    inv = torch.where(amax > 0, 127 / amax, torch.zeros_like(amax))
    return (b * inv[..., None]).round().view(x.shape), amax / 127


def round_x(x: torch.Tensor) -> torch.Tensor:
    """x (M, K) rounded as the integer products round it, back in fp32: xq dx. A prefill multiplies
    this with the dequantized weight, so that it computes what the decode kernels compute."""
    xq, dx = quantize_x_ref(x)
    return (xq.view(x.shape[0], -1, 32) * dx[..., None]).view(x.shape)


def _blocks_ref(x, v, d) -> torch.Tensor:
    """sum over blocks of 32 of d dx (v . xq), v (N, K) the stored integers, summed in fp64 (the
    kernels' integer dot products are exact; only their fp32 accumulation of scaled blocks differs)."""
    xq, dx = quantize_x_ref(x)
    M, K = x.shape
    G = K // d.shape[1]
    dots = torch.einsum("mbj,nbj->mnb", xq.view(M, -1, 32).double(), v.double().view(v.shape[0], -1, 32))
    scale = d.double().repeat_interleave(G // 32, 1)[None] * dx.double()[:, None]     # (M, N, K/32)
    return (dots * scale).sum(-1)


def gemv_int8_ref(x, q, d) -> torch.Tensor:
    return _blocks_ref(x, q, d).float()


def gemv_int4_ref(x, q, d, m) -> torch.Tensor:
    """+ sum over groups of m times the group's sum of the rounded x."""
    xq, dx = quantize_x_ref(x)
    M, K = x.shape
    G = K // d.shape[1]
    xsum = (xq.view(M, -1, 32).sum(-1) * dx).double().view(M, -1, G // 32).sum(-1)     # (M, K/G)
    return (_blocks_ref(x, unpack_int4(q), d) + xsum @ m.double().t()).float()
