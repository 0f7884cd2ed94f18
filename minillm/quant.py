"""Weight-only quantization: int8 per output channel, int4 group-wise, quantized at load.

At batch 1 decode reads every weight once per token, so bytes per weight set the speed. The
activations keep the model's dtype; only the stored weights shrink:

    int8      w[n, k] = q[n, k] * s[n]                   q in -127..127, s = max|w[n]| / 127
    int4:gG   w[n, k] = (q[n, k] - 8) * s[n, j] + z[n, j] for k in group j (G columns, default 32);
              q in 0..15, s = (max - min) / 15, z = min + 8 s: asymmetric, as llama.cpp's Q4_1
              (`z` is tinygemm's "zero in the float domain": the group minimum sits at q = 0)

Both are row-local (a row's values never depend on another row), so the loader quantizes each
checkpoint tensor into its rows as it arrives: a fused qkv or gate_up needs no staging copy and
the full-precision weights are never in memory at once. The products run on PyTorch's weight-only
kernels: `_weight_int8pack_mm` (any shape) and `_weight_int4pack_mm_for_cpu`, which needs N % 16 == 0
and K % G == 0 (G in 32, 64, 128, 256) and its own packed layout (`_convert_weight_to_int4pack_for_cpu`,
local to blocks of 64 rows). A layer a kernel cannot take (kernel_takes) keeps a dequantized weight
(the same rounding, in the model dtype) and is counted by `minillm info`. On CUDA: `_weight_int4pack_mm`
(bf16 activations, tensor-core tiles) and int8 as a cast + matmul + per-channel scale, as gpt-fast.

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

GROUPS = (32, 64, 128)      # int4 group sizes offered (the CPU kernel also takes 256)
INT4_PACK_ROWS = 64         # _convert_weight_to_int4pack_for_cpu packs blocks of 64 rows independently


@dataclass(frozen=True)
class Scheme:
    bits: int               # 8 or 4
    group: int = 0          # int4: columns sharing one scale and zero; int8: 0 (per output channel)

    @property
    def name(self) -> str:
        return "int8" if self.bits == 8 else f"int4:g{self.group}"


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

def quantize_int8(w: torch.Tensor, scale_dtype=torch.float32):
    """(N, K) float -> q (N, K) int8, s (N,) scale_dtype; q is rounded against s as it is stored."""
    w = w.float()
    s = (w.abs().amax(-1) / 127).clamp(min=1e-10).to(scale_dtype)
    q = (w / s.float()[..., None]).round().clamp(-127, 127).to(torch.int8)
    return q, s


def dequantize_int8(q, s, dtype=torch.float32):
    return (q.float() * s.float()[..., None]).to(dtype)


def quantize_int4(w: torch.Tensor, group: int, scale_dtype=torch.float32):
    """(N, K) float -> q (N, K) uint8 in 0..15, s and z (N, ceil(K / group)) scale_dtype. A last,
    partial group (K % group, only for dequantized layers) is padded with its last value."""
    N, K = w.shape
    w = w.float()
    if K % group:
        w = torch.cat((w, w[:, -1:].expand(N, group - K % group)), 1)
    g = w.view(N, -1, group)
    lo, hi = g.amin(-1), g.amax(-1)
    s = ((hi - lo) / 15).clamp(min=1e-10).to(scale_dtype)
    z = (lo + 8 * s.float()).to(scale_dtype)
    q = ((g - z.float()[..., None]) / s.float()[..., None] + 8).round().clamp(0, 15)
    return q.view(N, -1)[:, :K].to(torch.uint8), s, z


def dequantize_int4(q, s, z, group: int, dtype=torch.float32):
    N, K = q.shape
    q = F.pad(q.float(), (0, -K % group)).view(N, -1, group)
    w = (q - 8) * s.float()[..., None] + z.float()[..., None]
    return w.view(N, -1)[:, :K].to(dtype)


def nibbles(q: torch.Tensor) -> torch.Tensor:
    """(N, K) values 0..15 -> (N, K/2) uint8, column 2i in the low nibble: how rows wait to be packed."""
    return (q[:, ::2] | (q[:, 1::2] << 4)).to(torch.uint8)


def unnibble(p: torch.Tensor) -> torch.Tensor:
    return torch.stack((p & 15, p >> 4), -1).flatten(-2)       # (N, K/2) -> (N, K)


def kernel_takes(scheme: Scheme, N: int, K: int) -> bool:
    """Whether the weight-only kernels take an (N, K) weight. int4 (CPU): N % 16 and K % G, checked
    by the op; CUDA's tinygemm needs N % 8 and K % 32, implied. int8 (CPU) checks nothing but returns
    garbage or crashes for K % 16 != 0 or odd N (measured on torch 2.13), so those are refused here."""
    if scheme.bits == 8:
        return N % 4 == 0 and K % 16 == 0
    return N % 16 == 0 and K % scheme.group == 0


# -- the modules: what the loader fills and the decoder runs -------------------------------------

KERNEL_DTYPE = torch.bfloat16   # the CPU kernels are fast for bf16 activations only (fp32 ones
                                # take a scalar path, ~50x slower at 512 rows) and want scales of
                                # the activations' dtype: scales are bf16, inputs are cast to it


class Packed(nn.Module):
    """Quantized weights of logical shape (*lead, N, K) (lead: () for a Linear, (E,) for stacked
    experts) and their product with activations. The loader fills them by rows from full-precision
    tensors (fill), then finish() packs int4 into the kernel's layout.

    int8:         qweight (*lead, N, K) int8, scales (*lead, N) bf16
    int4 kernel:  qweight (*lead, N, K/2) uint8, scales_zeros (*lead, K/G, N, 2) bf16
    other shapes: weight (*lead, N, K) in the model dtype, dequantized (kernel_takes says no)
    """
    kept_dtypes = {"scales": KERNEL_DTYPE, "scales_zeros": KERNEL_DTYPE}   # loader.build keeps these

    def __init__(self, lead: tuple[int, ...], N: int, K: int, scheme: Scheme):
        super().__init__()
        self.shape, self.scheme, self.N, self.K = (*lead, N, K), scheme, N, K
        self.kernel = kernel_takes(scheme, N, K)
        empty = lambda *s, dtype=KERNEL_DTYPE: nn.Parameter(torch.empty(*s, dtype=dtype), requires_grad=False)
        if not self.kernel:
            self.weight = nn.Parameter(torch.empty(*lead, N, K), requires_grad=False)
        elif scheme.bits == 8:
            self.qweight, self.scales = empty(*lead, N, K, dtype=torch.int8), empty(*lead, N)
        else:
            self.qweight = empty(*lead, N, K // 2, dtype=torch.uint8)
            self.scales_zeros = empty(*lead, K // scheme.group, N, 2)
        self.packed = False

    def numel(self) -> int:                       # the loader counts values filled against this
        return self.N * self.K * (self.shape[0] if len(self.shape) == 3 else 1)

    def extra_repr(self) -> str:
        kind = "kernel" if self.kernel else "dequantized"
        return f"shape={self.shape}, {self.scheme.name}, {kind}"

    @torch.no_grad()
    def fill(self, index: int | None, rows: tuple[int, int] | None, t: torch.Tensor):
        """Quantize t, (rows, K) full precision, into rows [r0, r1) (of expert `index`)."""
        pick = (lambda p: p) if index is None else (lambda p: p[index])
        r0, r1 = rows or (0, self.N)
        g = self.scheme.group
        if self.scheme.bits == 8:
            q, s = quantize_int8(t, KERNEL_DTYPE)
            if not self.kernel:
                pick(self.weight)[r0:r1] = dequantize_int8(q, s, self.weight.dtype)
                return
            pick(self.qweight)[r0:r1] = q
            pick(self.scales)[r0:r1] = s
            return
        q, s, z = quantize_int4(t, g, KERNEL_DTYPE)
        if not self.kernel:
            pick(self.weight)[r0:r1] = dequantize_int4(q, s, z, g, self.weight.dtype)
            return
        pick(self.qweight)[r0:r1] = nibbles(q.to(torch.int32))
        sz = pick(self.scales_zeros)
        sz[:, r0:r1, 0], sz[:, r0:r1, 1] = s.t(), z.t()

    @torch.no_grad()
    def finish(self):
        """After every row is filled: int4 rows into the kernel's packed layout, in place."""
        if self.scheme.bits != 4 or not self.kernel or self.packed:
            return
        self.packed = True
        for qw in (self.qweight.view(-1, self.N, self.K // 2)):
            if qw.is_cuda:   # tinygemm wants column 2i in the high nibble, and its own int32 tiles
                q = unnibble(qw).to(torch.int32)
                hi = ((q[:, ::2] << 4) | q[:, 1::2]).to(torch.uint8)
                qw.view(-1).copy_(torch.ops.aten._convert_weight_to_int4pack(hi, _inner_k_tiles(self.K))
                                  .view(torch.uint8).view(-1))
                continue
            for r in range(0, self.N, INT4_PACK_ROWS):   # blocks of 64 rows pack independently
                block = qw[r:r + INT4_PACK_ROWS]
                block.copy_(torch.ops.aten._convert_weight_to_int4pack_for_cpu(
                    unnibble(block).to(torch.int32), 1))

    def mm(self, x: torch.Tensor, e: int | None = None) -> torch.Tensor:
        """x (M, K) -> x @ W.T (M, N) in x's dtype; e: which expert."""
        pick = (lambda p: p) if e is None else (lambda p: p[e])
        if not self.kernel:
            return F.linear(x, pick(self.weight))
        g = self.scheme.group
        if self.scheme.bits == 8:
            q, s = pick(self.qweight), pick(self.scales)
            if x.is_cuda:   # gpt-fast's int8: the cast fuses into the matmul's load under compile
                return F.linear(x, q.to(x.dtype)) * s.to(x.dtype)
            return torch.ops.aten._weight_int8pack_mm(x.to(KERNEL_DTYPE).contiguous(), q, s).to(x.dtype)
        q, sz = pick(self.qweight), pick(self.scales_zeros)
        if x.is_cuda:
            kt = _inner_k_tiles(self.K)
            q = q.view(torch.int32).view(self.N // 8, self.K // (kt * 16), 32, kt // 2)
            return torch.ops.aten._weight_int4pack_mm(x.to(torch.bfloat16).contiguous(), q, g, sz).to(x.dtype)
        return torch.ops.aten._weight_int4pack_mm_for_cpu(x.to(KERNEL_DTYPE).contiguous(), q, g, sz).to(x.dtype)

    def dense(self, e: int | None = None) -> torch.Tensor:
        """The dequantized weight (N, K) in the scales' dtype (for MLA's absorbed decode, which
        multiplies by W's transpose): int8 exactly; packed int4 as the kernel's product with the
        identity, which is W.T exactly up to the bf16 output's rounding."""
        pick = (lambda p: p) if e is None else (lambda p: p[e])
        if not self.kernel:
            return pick(self.weight)
        if self.scheme.bits == 8:
            return dequantize_int8(pick(self.qweight), pick(self.scales), KERNEL_DTYPE)
        eye = torch.eye(self.K, dtype=KERNEL_DTYPE, device=self.qweight.device)
        return self.mm(eye, e).t()


def _inner_k_tiles(K: int) -> int:
    return 8 if K % 128 == 0 else 4 if K % 64 == 0 else 2


class QLinear(Packed):
    """layers.Linear with a quantized weight: same forward contract, (..., K) -> (..., N)."""

    def __init__(self, linear: nn.Linear, scheme: Scheme):
        super().__init__((), linear.out_features, linear.in_features, scheme)
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.bias = linear.bias

    def forward(self, x):
        y = self.mm(x.reshape(-1, self.K)).view(*x.shape[:-1], self.N)   # the kernels take 2-D
        return y + self.bias if self.bias is not None else y


class QExperts(Packed):
    """A stacked (E, N, K) expert parameter (minillm.moe), quantized; called as w(x, e)."""

    def forward(self, x, e: int):
        return self.mm(x, e)


class QEmbedding(nn.Module):
    """A tied embedding whose table is the int8 head's: row v = q[v] * s[v] (the head is
    quantized per output channel, i.e. per vocabulary row, so a row dequantizes alone)."""

    def __init__(self, head: QLinear, dtype_ref: torch.Tensor):
        super().__init__()
        self.__dict__["head"] = head            # not a submodule: the head owns the tensors
        self.ref = nn.Parameter(dtype_ref.new_empty(0), requires_grad=False)   # carries dtype/device

    def forward(self, ids):
        h = self.head
        return h.qweight[ids].to(self.ref.dtype) * h.scales[ids, None].to(self.ref.dtype)


HEAD = Scheme(8)   # the head is int8 whatever the scheme (README "Quantization": measured)


def quantize_modules(model: nn.Module, scheme: Scheme, Linear: type):
    """Replace a Decoder's projections by quantized ones (on the meta device, before allocation):
    every `Linear` (layers.Linear, passed in: layers -> config -> quant would be an import circle),
    the MoE experts' stacked weights, a tied embedding (see QEmbedding)."""
    for name, m in list(model.named_modules()):
        for child_name, child in list(m.named_children()):
            if isinstance(child, Linear):
                setattr(m, child_name, QLinear(child, HEAD if child is model.head else scheme))
        for p in ("experts_gate_up", "experts_down"):
            if isinstance(getattr(m, p, None), nn.Parameter):
                E, N, K = getattr(m, p).shape
                delattr(m, p)
                setattr(m, p, QExperts((E,), N, K, scheme))
    if model.cfg.tie_embeddings:
        model.embed = QEmbedding(model.head, model.embed.weight)


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


def finish(model: nn.Module):
    for m in model.modules():
        if isinstance(m, Packed):
            m.finish()


def summary(model: nn.Module) -> dict:
    """What the quantized modules hold: bytes per tensor type as loaded, and the layers whose shape
    the int4 kernel could not take (dequantized)."""
    by_type: dict[str, int] = {}
    kernel = fallback = 0
    for name, p in model.named_parameters():
        kind = {torch.int8: "int8", torch.uint8: "int4 (packed)"}.get(p.dtype, str(p.dtype).removeprefix("torch."))
        if name.endswith(("scales", "scales_zeros")):
            kind += " scales"
        by_type[kind] = by_type.get(kind, 0) + p.numel() * p.element_size()
    for m in model.modules():
        if isinstance(m, Packed):
            n = m.shape[0] if len(m.shape) == 3 else 1
            kernel, fallback = (kernel + n, fallback) if m.kernel else (kernel, fallback + n)
    return {"bytes_by_type": by_type, "kernel_layers": kernel, "dequantized_layers": fallback}
