"""Weight-only quantization: int8 per output channel, int4 group-wise, quantized at load.

At batch 1 decode reads every weight once per token, so bytes per weight set the speed. The
activations keep the model's dtype; only the stored weights shrink:

    int8      w[n, k] = q[n, k] * d[n]                   q in -127..127, d = max|w[n]| / 127
    int4:gG   w[n, k] = q[n, k] * d[n, j] + m[n, j]      for k in group j (G columns, default 32);
              q in 0..15, d = (max - min) / 15, m = min: asymmetric, llama.cpp's Q4_1

d and m are stored fp16 (rounded first; q is rounded against the stored values), and int4 values
sit in llama.cpp's Q4 block order (kernels/cpu_gemv.py), so GGUF's Q4_0, Q4_1 and Q8_0 tensors load
as their own bytes (gguf.py): Q4_0 is Q4_1 with m = -8 d, Q8_0 is int8 with one d per 32 columns.
Both are row-local (a row's values never depend on another row), so the loader quantizes each
checkpoint tensor into its rows as it arrives: a fused qkv or gate_up needs no staging copy and
the full-precision weights are never in memory at once.

Products (Packed.mm): on CPU, up to 8 rows (decode, small batches) run minillm's own loops
(kernels/cpu_gemv.c). With `--quantize` (round_x), as llama.cpp, the activations are rounded to
int8 in blocks of 32 and each block's product is an integer dot product (VNNI or AVX2), scaled in
fp32: ~1.4x faster than widening int4 weights to fp32, and the error it adds is measured with the
weights' (README "Quantization"). A GGUF file's blocks as stored, unasked, keep fp32 activations
(the file's weights exactly: transformers' numbers). More rows (prefill) multiply the same
(rounded or not) activations, as floats, with the weight dequantized into a scratch buffer in the
activations' dtype (torch's matmul: oneDNN/AMX for bf16, compute-bound there), so cached decoding
computes what a full forward does. PyTorch's own weight-only CPU kernels
(_weight_int8pack_mm, _weight_int4pack_mm_for_cpu) were the first version: at one row they ran
~2x slower than the loops here, and want bf16 activations. Without a C compiler, and on CUDA,
the product dequantizes in torch (correct, not fast; int8 on CUDA: gpt-fast's cast + matmul). A
layer whose K is not a multiple of 32 and of G keeps a dequantized weight (kernel_takes), counted
by `minillm info`.

Which tensors: every projection (attention, MLP, MLA, shared and routed experts). The head is int8
in every mode (llama.cpp also keeps its output layer at 6-8 bits; README "Quantization" has the
measurement); a tied embedding is that int8 head read by rows; an untied one keeps the model dtype
(decode reads one row of it per token: memory, not speed). Routers and norms stay as they are.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .errors import UsageError
from . import cpu
from .kernels import cpu_gemv

GROUPS = (32, 64, 128)      # int4 group sizes offered
SCALE_DTYPE = torch.float16


@dataclass(frozen=True)
class Scheme:
    bits: int               # 8 or 4
    group: int = 0          # columns sharing one scale (and min); 0: the whole row (int8 per channel)

    @property
    def name(self) -> str:
        if self.bits == 8:
            return "int8" if not self.group else f"int8:g{self.group}"
        return f"int4:g{self.group}"


def parse(spec: str | None) -> Scheme | None:
    """'int8' | 'int4' | 'int4:g32' | 'int4:g64' | 'int4:g128' (None, '', 'none': no quantization)."""
    if spec is None or str(spec).lower() in ("", "none"):
        return None
    m = re.fullmatch(r"int(8|4)(?::g(\d+))?", str(spec).strip().lower())
    if not m or (m[1] == "8" and m[2]) or (m[2] and int(m[2]) not in GROUPS):
        raise UsageError(f"unknown quantization {spec!r} (choose from int8, int4, "
                         f"{', '.join(f'int4:g{g}' for g in GROUPS)})")
    return Scheme(8) if m[1] == "8" else Scheme(4, int(m[2] or 32))


# -- the arithmetic, in plain torch (the reference the tests hold the kernels to) ---------------

def _groups(w: torch.Tensor, group: int) -> torch.Tensor:
    """(N, K) -> (N, K/G, G) in fp32; a last, partial group (dequantized layers only) is padded
    with its row's last value, which changes neither its max, its min nor its scale."""
    N, K = w.shape
    group = group or K
    w = w.float()
    if K % group:
        w = torch.cat((w, w[:, -1:].expand(N, group - K % group)), 1)
    return w.view(N, -1, group)


def quantize_int8(w: torch.Tensor, group: int = 0):
    """(N, K) float -> q (N, K) int8, d (N, K/G) fp16 (G = K: one scale per row)."""
    g = _groups(w, group)
    d = (g.abs().amax(-1) / 127).clamp(min=1e-7).to(SCALE_DTYPE)
    q = (g / d.float()[..., None]).round().clamp(-127, 127).to(torch.int8)
    return q.view(w.shape[0], -1)[:, :w.shape[1]], d


def quantize_int4(w: torch.Tensor, group: int):
    """(N, K) float -> q (N, K) uint8 in 0..15, d and m (N, K/G) fp16."""
    g = _groups(w, group)
    lo, hi = g.amin(-1), g.amax(-1)
    d = ((hi - lo) / 15).clamp(min=1e-7).to(SCALE_DTYPE)
    m = lo.to(SCALE_DTYPE)
    q = ((g - m.float()[..., None]) / d.float()[..., None]).round().clamp(0, 15).to(torch.uint8)
    return q.view(w.shape[0], -1)[:, :w.shape[1]], d, m


def dequantize_int8(q, d, dtype=torch.float32, group: int = 0):
    """q (N, K), d (N, K/G) -> (N, K); group as quantize_int8 was given (0: per row)."""
    N, K = q.shape
    return (_groups(q, group) * d.float()[..., None]).view(N, -1)[:, :K].to(dtype)


def dequantize_int4(q, d, m, group: int, dtype=torch.float32):
    """q (N, K) values 0..15 (unpacked), d and m (N, ceil(K/G)) -> (N, K)."""
    N, K = q.shape
    w = _groups(q, group) * d.float()[..., None] + m.float()[..., None]
    return w.view(N, -1)[:, :K].to(dtype)


def kernel_takes(scheme: Scheme, N: int, K: int) -> bool:
    """Whether a weight stays quantized: the loops read blocks of 32 columns, a scale's group
    whole ones."""
    return K % 32 == 0 and K % (scheme.group or K) == 0


# -- the modules: what the loader fills and the decoder runs -------------------------------------

class Packed(nn.Module):
    """Quantized weights of logical shape (*lead, N, K) (lead: () for a Linear, (E,) for stacked
    experts) and their product with activations. The loader fills them by rows, from
    full-precision tensors (fill) or from GGUF blocks (fill_raw).

    int8:         qweight (*lead, N, K) int8, scales (*lead, N, K/G) fp16
    int4:         qweight (*lead, N, K/2) uint8 (Q4 block order), scales, mins (*lead, N, K/G) fp16
    other shapes: weight (*lead, N, K) in the model dtype, dequantized (kernel_takes says no)
    """
    kept_dtypes = {"scales": SCALE_DTYPE, "mins": SCALE_DTYPE}   # loader.build keeps these
    round_x = True   # decode products round x to int8 per 32 (integer dot products); False: fp32 x

    def __init__(self, lead: tuple[int, ...], N: int, K: int, scheme: Scheme):
        super().__init__()
        self.shape, self.scheme, self.N, self.K = (*lead, N, K), scheme, N, K
        self.kernel = kernel_takes(scheme, N, K)
        empty = lambda *s, dtype=SCALE_DTYPE: nn.Parameter(torch.empty(*s, dtype=dtype), requires_grad=False)
        groups = K // (scheme.group or K)
        if not self.kernel:
            self.weight = nn.Parameter(torch.empty(*lead, N, K), requires_grad=False)
        elif scheme.bits == 8:
            self.qweight, self.scales = empty(*lead, N, K, dtype=torch.int8), empty(*lead, N, groups)
        else:
            self.qweight = empty(*lead, N, K // 2, dtype=torch.uint8)
            self.scales, self.mins = empty(*lead, N, groups), empty(*lead, N, groups)

    def numel(self) -> int:                       # the loader counts values filled against this
        return self.N * self.K * (self.shape[0] if len(self.shape) == 3 else 1)

    def extra_repr(self) -> str:
        kind = "kernel" if self.kernel else "dequantized"
        return f"shape={self.shape}, {self.scheme.name}, {kind}"

    def _pick(self, e):
        return (lambda p: p) if e is None else (lambda p: p[e])

    @torch.no_grad()
    def fill(self, index: int | None, rows: tuple[int, int] | None, t: torch.Tensor):
        """Quantize t, (rows, K) full precision, into rows [r0, r1) (of expert `index`); t (E, rows,
        K) with no index: a whole expert stack (a GGUF file's float `ffn_*_exps`), expert by expert."""
        if index is None and t.dim() == 3:
            for e in range(t.shape[0]):
                self.fill(e, rows, t[e])
            return
        pick = self._pick(index)
        r0, r1 = rows or (0, self.N)
        g = self.scheme.group
        if self.scheme.bits == 8:
            q, d = quantize_int8(t, g)
            parts = {"qweight": q, "scales": d}
            dense = lambda: dequantize_int8(q, d, group=g)
        else:
            q, d, m = quantize_int4(t, g)
            parts = {"qweight": cpu_gemv.pack_int4(q) if self.kernel else None, "scales": d, "mins": m}
            dense = lambda: dequantize_int4(q, d, m, g)
        if not self.kernel:
            pick(self.weight)[r0:r1] = dense()
            return
        for name, v in parts.items():
            pick(getattr(self, name))[r0:r1] = v

    @torch.no_grad()
    def fill_raw(self, index: int | None, rows: tuple[int, int] | None, parts: dict[str, torch.Tensor]):
        """Rows already in this layout (GGUF's Q4_0, Q4_1, Q8_0 blocks, split by gguf_file.blocks),
        each part (rows, ...) of the same values in order: a strided view of the file's blocks
        is copied straight in, with no contiguous copy on the way."""
        pick = self._pick(index)
        r0, r1 = rows or (0, self.N)
        for name, v in parts.items():
            pick(getattr(self, name))[r0:r1].view(v.shape).copy_(v)

    def dense(self, e: int | None = None, dtype=torch.float32) -> torch.Tensor:
        """The dequantized weight (N, K)."""
        pick = self._pick(e)
        if not self.kernel:
            return pick(self.weight).to(dtype)
        return self.dequantize_rows(pick(self.qweight), pick(self.scales),
                                    pick(self.mins) if self.scheme.bits == 4 else None, dtype)

    def dequantize_rows(self, q, d, m, dtype) -> torch.Tensor:
        """Stored rows (n, K) or (n, K/2), their scales and mins (n, K/G) -> (n, K) in dtype."""
        G = self.K // d.shape[-1]                               # kernel layers: whole groups
        if m is None:
            return dequantize_int8(q, d, dtype, G)
        return dequantize_int4(cpu_gemv.unpack_int4(q), d, m, G, dtype)

    def mm(self, x: torch.Tensor, e: int | None = None) -> torch.Tensor:
        """x (..., K) -> x @ W.T (..., N) in x's dtype; e: which expert."""
        pick = self._pick(e)
        if not self.kernel:
            return F.linear(x, pick(self.weight).to(x.dtype))
        q, d = pick(self.qweight), pick(self.scales)
        m = pick(self.mins) if self.scheme.bits == 4 else None
        if cpu_gemv.few_rows(x):                                # decode: integer dot products
            return self._gemv(x, q, d, m)
        if x.is_cpu and cpu_gemv.available():
            # prefill: a matmul, in fp32 where the CPU's bf16 GEMMs are slower (cpu.upcast_bf16)
            dtype = torch.float32 if x.dtype is torch.bfloat16 and cpu.upcast_bf16() else x.dtype
            out = cpu.scratch(self.N * self.K, dtype).view(self.N, self.K)
            cpu_gemv.dequant_int8(q, d, out) if m is None else cpu_gemv.dequant_int4(q, d, m, out)
            xr = x
            if self.round_x:                            # x as the decode rows round it
                xr = cpu_gemv.round_x(x.reshape(-1, self.K)).to(x.dtype).view(x.shape)
            return F.linear(xr.to(dtype), out).to(x.dtype)
        if x.is_cuda and 0 < x.numel() <= cpu_gemv.MAX_ROWS * self.K and _gpu_kernels():
            # decode on GPU: kernels/weight_only.py dequantizes in registers (1 or 0.5 bytes a weight)
            from .kernels.weight_only import quant_gemv
            return quant_gemv(x.reshape(-1, self.K), q, d, m).view(*x.shape[:-1], self.N)
        if x.is_cuda and m is None and self.scheme.group == 0:   # gpt-fast's int8: the cast fuses under compile
            return F.linear(x, q.to(x.dtype)) * d[:, 0].to(x.dtype)
        return F.linear(x, self.dense(e, x.dtype))

    def _gemv(self, x, q, d, m):
        """x (..., K), 1..8 rows -> (..., N) in x's dtype, on kernels/cpu_gemv.c."""
        xf, r = cpu_gemv.f32(x), self.round_x
        y = cpu_gemv.gemv_int8(xf, q, d, r) if m is None else cpu_gemv.gemv_int4(xf, q, d, m, r)
        return y if x.dtype is torch.float32 else y.to(x.dtype)


def _gpu_kernels() -> bool:
    from .kernels import triton_available   # imports triton: only when a CUDA tensor gets here
    return triton_available()[0]


class QLinear(Packed):
    """layers.Linear with a quantized weight: same forward contract, (..., K) -> (..., N)."""

    def __init__(self, linear: nn.Linear, scheme: Scheme):
        super().__init__((), linear.out_features, linear.in_features, scheme)
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.bias = linear.bias

    def forward(self, x):
        y = self.mm(x)
        return y + self.bias if self.bias is not None else y


class QExperts(Packed):
    """A stacked (E, N, K) expert parameter (minillm.moe), quantized; called as w(x, e)."""

    def forward(self, x, e: int):
        return self.mm(x, e)


class QEmbedding(nn.Module):
    """A tied embedding whose table is the quantized head's: row v dequantized alone (the head is
    quantized along its input, per vocabulary row). int8 (q[v] * d[v]), or a GGUF file's int4 rows."""

    def __init__(self, head: QLinear, dtype_ref: torch.Tensor):
        super().__init__()
        self.__dict__["head"] = head            # not a submodule: the head owns the tensors
        self.ref = nn.Parameter(dtype_ref.new_empty(0), requires_grad=False)   # carries dtype/device

    def forward(self, ids):
        h, dtype = self.head, self.ref.dtype
        if not h.kernel:
            return h.weight[ids].to(dtype)
        flat = ids.reshape(-1)
        m = h.mins[flat] if h.scheme.bits == 4 else None
        return h.dequantize_rows(h.qweight[flat], h.scales[flat], m, dtype).view(*ids.shape, h.K)


HEAD = Scheme(8)   # the head is int8 whatever the scheme (README "Quantization": measured)


def quantize_modules(model: nn.Module, scheme: Scheme | None, Linear: type, schemes: dict | None = None):
    """Replace a Decoder's projections by quantized ones (on the meta device, before allocation):
    every `Linear` (layers.Linear, passed in: layers -> config -> quant would be an import circle),
    the MoE experts' stacked weights, a tied embedding (see QEmbedding). `schemes`: per module
    (core names: 'layers.0.attn.qkv', 'layers.1.mlp.experts_down', 'head'), what a GGUF file's
    blocks are (gguf.py); the others take `scheme` (the head HEAD), or stay as they are (None)."""
    schemes = schemes or {}
    pick = lambda name, default: schemes.get(name, default)  # noqa: E731
    for name, m in list(model.named_modules()):
        prefix = f"{name}." if name else ""
        for child_name, child in list(m.named_children()):
            if isinstance(child, Linear):
                s = pick(prefix + child_name, (HEAD if child is model.head else scheme) if scheme else None)
                if s is not None:
                    setattr(m, child_name, QLinear(child, s))
        for p in ("experts_gate_up", "experts_down"):
            if isinstance(getattr(m, p, None), nn.Parameter) and (s := pick(prefix + p, scheme)) is not None:
                E, N, K = getattr(m, p).shape
                delattr(m, p)
                setattr(m, p, QExperts((E,), N, K, s))
    if model.cfg.tie_embeddings and isinstance(model.head, QLinear):
        model.embed = QEmbedding(model.head, model.embed.weight)
    # asked for (scheme): llama.cpp's arithmetic, x rounded to int8 in the decode products (fast);
    # a GGUF file's blocks as stored, unasked: the file's weights exactly, fp32 x (transformers' numbers)
    for m in model.modules():
        if isinstance(m, Packed):
            m.round_x = scheme is not None


def sinks(model: nn.Module) -> dict[str, Packed]:
    """Loader target name -> the quantized module that takes it ('layers.0.attn.qkv.weight',
    'layers.1.mlp.experts_down', 'embed.weight' for a tied head)."""
    out, seen = {}, set()
    for name, m in model.named_modules():
        target = (m.head if isinstance(m, QEmbedding) else m) if isinstance(m, (Packed, QEmbedding)) else None
        if target is None or id(target) in seen:
            continue
        seen.add(id(target))
        out[name if isinstance(m, QExperts) else f"{name}.weight"] = target
    return out


def owned(model: nn.Module) -> set[str]:
    """Parameter names the sinks fill (not by the loader's copy)."""
    out = set()
    for name, m in model.named_modules():
        if isinstance(m, Packed):
            out |= {f"{name}.{p}" for p, _ in m.named_parameters(recurse=False) if p != "bias"}
        elif isinstance(m, QEmbedding):
            out.add(f"{name}.ref")
    return out


def summary(model: nn.Module) -> dict:
    """What the quantized modules hold: bytes per tensor type as loaded, and the layers whose shape
    the int4 kernel could not take (dequantized)."""
    by_type: dict[str, int] = {}
    kernel = fallback = 0
    for name, p in model.named_parameters():
        kind = {torch.int8: "int8", torch.uint8: "int4 (packed)"}.get(p.dtype, str(p.dtype).removeprefix("torch."))
        if name.endswith(("scales", "mins")):
            kind += " scales"
        by_type[kind] = by_type.get(kind, 0) + p.numel() * p.element_size()
    for m in model.modules():
        if isinstance(m, Packed):
            n = m.shape[0] if len(m.shape) == 3 else 1
            kernel, fallback = (kernel + n, fallback) if m.kernel else (kernel, fallback + n)
    return {"bytes_by_type": by_type, "kernel_layers": kernel, "dequantized_layers": fallback}
