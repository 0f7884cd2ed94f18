"""Reading a GGUF file: its header (metadata and tensor table) parsed here, its tensors left in a
memory map until one is read, dequantized with the `gguf` package (llama.cpp's own block formats
and dequantizers). Nothing here knows architectures: minillm/gguf.py loads, through the adapters.
"""
from __future__ import annotations

import math
import struct
import warnings
from collections import Counter
from pathlib import Path

import numpy as np
import torch

from .errors import LoadError

FLOATS = {"F32": "float32", "F16": "float16", "BF16": "bfloat16"}
# block formats gguf.quants dequantizes (the list first; the i-quants and ternary ones come free)
QUANTS = ("Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K",
          "IQ1_S", "IQ1_M", "IQ2_XXS", "IQ2_XS", "IQ2_S", "IQ3_XXS", "IQ3_S", "IQ4_NL", "IQ4_XS",
          "TQ1_0", "TQ2_0", "MXFP4")
SUPPORTED = (*FLOATS, *QUANTS)
# the block types that are minillm's own packed layouts (quant.py), split here into its parts: a
# block of 32 weights is (offset of d fp16, offset of the values, bytes)
BLOCKS = {"Q4_0": (0, 2, 18), "Q4_1": (0, 4, 20), "Q8_0": (0, 2, 34)}


# GGUF metadata value types (gguf.GGUFValueType): fixed-size ones by struct format; 8 string, 9 array
SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}


class GGUFFile:
    """The metadata as plain Python values, tensor shapes in torch order, and read(name) -> float tensor.

    The header is parsed here, not by gguf.GGUFReader: that one builds a numpy view per string, which
    takes 15 s for Qwen2's 152k tokens and merges on this machine (this: under a second). The tensor
    data stays in the memory map; the gguf package supplies the block sizes and dequantization."""

    def __init__(self, path):
        import mmap
        self.path = Path(path)
        try:
            with open(self.path, "rb") as f:
                self.mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
            self._parse()
        except Exception as e:   # bad magic, a short read, a header that runs past the end of the file
            raise LoadError(f"{self.path} is not a readable GGUF file (truncated, or not GGUF): "
                            f"{type(e).__name__}: {e}") from None

    def _take(self, fmt: str):
        values = struct.unpack_from(fmt, self.mm, self.pos)
        self.pos += struct.calcsize(fmt)
        return values[0] if len(values) == 1 else values

    def _string(self) -> str:
        n = self._take("<Q")
        self.pos += n
        return self.mm[self.pos - n:self.pos].decode("utf-8", errors="replace")

    def _value(self, kind: int):
        if kind in SCALARS:
            return self._take(SCALARS[kind])
        if kind == 8:
            return self._string()
        if kind != 9:
            raise ValueError(f"unknown metadata value type {kind}")
        item, n = self._take("<IQ")
        if item in SCALARS:   # numbers in one piece (token types, scores)
            dtype = np.dtype(SCALARS[item])
            values = np.frombuffer(self.mm, dtype, n, self.pos).tolist()
            self.pos += n * dtype.itemsize
            return values
        if item == 8:    # strings (a vocabulary, its merges: ~100k): one loop, no call per string
            out, mm, pos, unpack = [], self.mm, self.pos, struct.unpack_from
            for _ in range(n):
                (k,) = unpack("<Q", mm, pos)
                out.append(mm[pos + 8:pos + 8 + k].decode("utf-8", errors="replace"))
                pos += 8 + k
            if pos > len(mm):
                raise ValueError("a string array runs past the end of the file")
            self.pos = pos
            return out
        return [self._value(item) for _ in range(n)]

    def _parse(self):
        import gguf
        if self.mm[:4] != b"GGUF":
            raise ValueError(f"no GGUF magic (starts with {bytes(self.mm[:4])!r})")
        self.pos = 4
        version, n_tensors, n_kv = self._take("<IQQ")
        if version not in (2, 3):
            raise ValueError(f"GGUF version {version} (minillm reads 2 and 3)")
        self.meta = {}
        for _ in range(n_kv):
            key = self._string()
            self.meta[key] = self._value(self._take("<I"))
        infos = []
        for _ in range(n_tensors):
            name, n_dims = self._string(), self._take("<I")
            dims = self._take(f"<{n_dims}Q") if n_dims else ()
            dims = (dims,) if isinstance(dims, int) else dims
            infos.append((name, tuple(reversed(dims)), *self._take("<IQ")))   # torch order: slowest first
        align = self.meta.get("general.alignment", 32)
        start = -(-self.pos // align) * align
        self.shapes, self.types, self.tensors = {}, {}, {}
        for name, shape, kind, offset in infos:
            kind = gguf.GGMLQuantizationType(kind) if kind in gguf.GGMLQuantizationType._value2member_map_ else kind
            block, size = gguf.GGML_QUANT_SIZES.get(kind, (1, 0))
            nbytes = math.prod(shape) // block * size
            if start + offset + nbytes > len(self.mm):
                raise ValueError(f"tensor {name!r} runs past the end of the file")
            self.shapes[name], self.types[name], self.tensors[name] = shape, kind, (start + offset, nbytes)

    def type_name(self, name: str) -> str:
        kind = self.types[name]
        return kind.name if hasattr(kind, "name") else f"type id {kind}"

    def read(self, name: str) -> torch.Tensor:
        """The tensor as the converter had it: float, in torch order (float32 unless stored F16)."""
        import gguf
        kind, shape, (offset, nbytes) = self.type_name(name), self.shapes[name], self.tensors[name]
        if kind not in SUPPORTED:
            raise LoadError(f"tensor {name!r} in {self.path.name} has type {kind}, which minillm does not "
                            f"read (supported: {', '.join(SUPPORTED)})")
        if kind in BLOCKS:   # minillm's own formats: in torch, ~10x gguf's numpy, the same floats
            raw = self.read_raw(name)
            return dequantize(raw.reshape(-1, raw.shape[-1]), kind).reshape(shape)
        if kind in ("F32", "F16"):
            data = np.frombuffer(self.mm, np.dtype(kind.lower().replace("f", "float")), math.prod(shape), offset)
        else:   # blocks: one row of bytes per row of values
            data = np.frombuffer(self.mm, np.uint8, nbytes, offset).reshape(*shape[:-1], -1)
            data = gguf.quants.dequantize(data, self.types[name])
        with warnings.catch_warnings():   # the map is read-only, and the tensor only read from
            warnings.simplefilter("ignore")
            return torch.from_numpy(data).reshape(shape)

    def read_raw(self, name: str) -> torch.Tensor:
        """The tensor's bytes in the map, uint8 (*shape[:-1], bytes per row): a row of blocks per row
        of values, so row operations (slices, the adapters' un-permutes) apply to it unchanged."""
        shape, (offset, nbytes) = self.shapes[name], self.tensors[name]
        data = np.frombuffer(self.mm, np.uint8, nbytes, offset).reshape(*shape[:-1], -1)
        with warnings.catch_warnings():   # read-only map, only read from
            warnings.simplefilter("ignore")
            return torch.from_numpy(data)

    def checkpoint_summary(self) -> dict:
        """What info reports for a checkpoint: tensors, values, bytes by ggml type."""
        by_type = Counter()
        for name, (_, nbytes) in self.tensors.items():
            by_type[self.type_name(name)] += nbytes
        return {"tensors": len(self.tensors), "params": sum(math.prod(s) for s in self.shapes.values()),
                "bytes": sum(by_type.values()), "bytes_by_dtype": dict(by_type.most_common())}


def blocks(raw: torch.Tensor, kind: str) -> dict[str, torch.Tensor]:
    """Rows of Q4_0, Q4_1 or Q8_0 blocks, raw (N, K/32 * bytes) uint8 -> quant.Packed's parts as
    views of it (no loop over blocks, no copy; Packed.fill_raw copies them in):
        Q4_1  d fp16, m fp16, qs[16]  w = q d + m       -> qweight (N, K/32, 16) uint8 (its (N, K/2)),
                                                           scales, mins (N, K/32)
        Q4_0  d fp16, qs[16]          w = (q - 8) d     -> the same with m = -8 d (exact in fp16: a
                                                           power of two; |d| < 8188 does not overflow)
        Q8_0  d fp16, qs int8[32]     w = q d           -> qweight (N, K/32, 32) int8, scales (N, K/32)
    ggml's qs bytes are already the Q4 block order quant.py keeps (kernels/cpu_gemv.py)."""
    at_d, at_q, size = BLOCKS[kind]
    N = raw.shape[0]
    b = raw.reshape(N, -1, size)                                   # (N, K/32, bytes)
    half = lambda at: b[..., at:at + 2].view(torch.float16)[..., 0]  # noqa: E731  (N, K/32)
    q = b[..., at_q:]                                              # (N, K/32, 16 or 32): a view
    if kind == "Q8_0":
        return {"qweight": q.view(torch.int8), "scales": half(at_d)}
    d = half(at_d)
    return {"qweight": q, "scales": d, "mins": half(2) if kind == "Q4_1" else d * -8}



def dequantize(raw: torch.Tensor, kind: str) -> torch.Tensor:
    """Rows of Q4_0, Q4_1 or Q8_0 blocks (N, K/32 * bytes) -> float32 (N, K), with gguf.quants'
    arithmetic in its order (d * q, then + m; Q4_0's q - 8 first), so the same floats."""
    p = blocks(raw, kind)
    d = p["scales"].float()[..., None]                             # (N, K/32, 1)
    if kind == "Q8_0":
        return (d * p["qweight"].float()).reshape(raw.shape[0], -1)
    q = p["qweight"]
    q = torch.cat((q & 15, q >> 4), dim=-1).float()                # (N, K/32, 32): low nibbles first
    w = d * (q - 8) if kind == "Q4_0" else d * q + p["mins"].float()[..., None]
    return w.reshape(raw.shape[0], -1)
