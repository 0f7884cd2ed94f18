"""Benchmark minillm's Triton attention kernels against torch SDPA and flash-attn (if installed).

    python examples/bench_kernels.py                       # everything, bf16
    python examples/bench_kernels.py --kernels decode --batches 1,8 --contexts 4096,32768

For every (batch, context) it prints the time of each implementation, the speedup of the
Triton kernel over it (>1: Triton is faster), and the achieved bandwidth: bytes of K/V (or
latent cache) read once / time, the figure of merit of decode; prefill also gets TFLOP/s.
Needs a CUDA GPU.

Baselines:
  prefill  SDPA flash / memory-efficient backends (GQA via enable_gqa), flash_attn_func;
           full causal prefill (start 0) and a chunk of --chunk tokens on top of a cache
           (bottom-right aligned causal mask)
  decode   SDPA flash / efficient with one query token, flash_attn_with_kvcache
  mla      SDPA on the equivalent MQA (key [c_kv, k_pe], value c_kv; the concatenated key
           is built outside the timing); flash-attn does not support its 576-wide heads
"""

from __future__ import annotations

import argparse
import math
import sys

import torch
import torch.nn.functional as F


def _ints(s: str) -> list[int]:
    return [int(x) for x in s.split(",") if x]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--kernels", default="prefill,decode,mla", help="comma list of prefill,decode,mla")
    p.add_argument("--batches", type=_ints, default=[1, 4, 16, 64])
    p.add_argument("--contexts", type=_ints, default=[1024, 4096, 16384, 32768])
    p.add_argument("--dtype", choices=["bf16", "fp16"], default="bf16")
    p.add_argument("--heads", type=int, default=32)
    p.add_argument("--kv-heads", type=int, default=8)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--mla-heads", type=int, default=128, help="query heads of MLA decode (V3: 128, /TP)")
    p.add_argument("--mla-rank", type=int, default=512)
    p.add_argument("--mla-rope-dim", type=int, default=64)
    p.add_argument("--chunk", type=int, default=512, help="new tokens of the chunked-prefill rows")
    p.add_argument("--max-prefill-tokens", type=int, default=65536, help="skip prefill rows with B*T above this")
    p.add_argument("--max-gb", type=float, default=24.0, help="skip rows whose caches need more memory")
    return p.parse_args(argv)


class Bench:
    def __init__(self, args):
        import triton.testing  # imported here so that --help and the no-CUDA message need no triton

        self.do_bench = triton.testing.do_bench
        self.args = args
        self.dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float16
        self.dev = torch.device("cuda")
        try:
            from flash_attn import flash_attn_func, flash_attn_with_kvcache

            self.fa_func, self.fa_kvcache = flash_attn_func, flash_attn_with_kvcache
        except Exception:
            self.fa_func = self.fa_kvcache = None
        from torch.nn.attention import SDPBackend, sdpa_kernel

        self.sdpa_kernel = sdpa_kernel
        self.backends = {"sdpa-flash": SDPBackend.FLASH_ATTENTION, "sdpa-efficient": SDPBackend.EFFICIENT_ATTENTION}

    def time_ms(self, fn, backend=None) -> float | None:
        """Median ms of fn(), or None when the implementation refuses these inputs."""
        try:
            if backend is None:
                return self.do_bench(fn, warmup=25, rep=100, return_mode="median")
            with self.sdpa_kernel(self.backends[backend]):
                return self.do_bench(fn, warmup=25, rep=100, return_mode="median")
        except Exception as e:  # unsupported head dim / GQA / dtype on this backend, OOM
            self.last_error = f"{type(e).__name__}: {str(e).splitlines()[0][:80] if str(e) else ''}"
            torch.cuda.empty_cache()
            return None

    def report(self, label: str, ours_ms: float, baselines: dict[str, float | None], nbytes: float, flops: float = 0.0):
        gbs = nbytes / (ours_ms * 1e-3) / 1e9
        line = f"{label:<34} triton {ours_ms * 1e3:9.1f} us {gbs:7.0f} GB/s"
        if flops:
            line += f" {flops / (ours_ms * 1e-3) / 1e12:6.1f} TFLOP/s"
        for name, ms in baselines.items():
            line += f" | {name} " + (f"{ms * 1e3:9.1f} us x{ms / ours_ms:5.2f}" if ms else "      n/a        ")
        print(line, flush=True)

    def fits(self, nbytes: float) -> bool:
        return nbytes <= self.args.max_gb * 2**30

    # ------------------------------------------------------------------ prefill

    def prefill(self):
        from minillm.kernels import prefill_attention

        a, dt, dev = self.args, self.dtype, self.dev
        H, HKV, D = a.heads, a.kv_heads, a.head_dim
        scale = D**-0.5
        print(f"\n== prefill  H={H} Hkv={HKV} D={D} {a.dtype}  (speedup xN = baseline time / triton time)")
        for B in a.batches:
            for ctx in a.contexts:
                for T, start in ((ctx, 0), (min(a.chunk, ctx), ctx - min(a.chunk, ctx))):
                    if B * T > a.max_prefill_tokens or not self.fits(2 * B * ctx * HKV * D * dt.itemsize * 2):
                        continue
                    q = torch.randn(B, T, H, D, device=dev, dtype=dt)
                    k = torch.randn(B, ctx, HKV, D, device=dev, dtype=dt)
                    v = torch.randn(B, ctx, HKV, D, device=dev, dtype=dt)
                    st = torch.full((B,), start, device=dev, dtype=torch.int32)
                    ours = self.time_ms(lambda: prefill_attention(q, k, v, st, scale))
                    if ours is None:
                        print(f"B={B} ctx={ctx} T={T}: triton failed: {self.last_error}")
                        continue
                    qt, kt, vt = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
                    # Bottom-right aligned causal mask = keys <= start + t (what the kernel does).
                    if T == ctx:
                        mask_kw = dict(is_causal=True)
                    else:
                        from torch.nn.attention.bias import causal_lower_right

                        mask_kw = dict(attn_mask=causal_lower_right(T, ctx))
                    base = {}
                    for name in self.backends:
                        base[name] = self.time_ms(
                            lambda: F.scaled_dot_product_attention(qt, kt, vt, scale=scale, enable_gqa=True, **mask_kw),
                            backend=name,
                        )
                    if self.fa_func is not None:  # FA2 aligns the causal mask bottom-right when T < ctx
                        base["flash-attn"] = self.time_ms(
                            lambda: self.fa_func(q, k, v, softmax_scale=scale, causal=True)
                        )
                    visible = T * start + T * (T + 1) / 2  # (query, key) pairs under the mask
                    flops = 4 * B * H * D * visible
                    kv_bytes = 2 * B * (start + T) * HKV * D * dt.itemsize
                    self.report(f"B={B:<3} ctx={ctx:<6} T={T:<6}", ours, base, kv_bytes, flops)
                    del q, k, v
                    torch.cuda.empty_cache()

    # ------------------------------------------------------------------ decode

    def decode(self):
        from minillm.kernels import decode_attention
        from minillm.kernels.decode import pick_num_splits

        a, dt, dev = self.args, self.dtype, self.dev
        H, HKV, D = a.heads, a.kv_heads, a.head_dim
        scale = D**-0.5
        print(f"\n== decode  H={H} Hkv={HKV} D={D} {a.dtype}  (GB/s = K+V bytes / time)")
        for B in a.batches:
            for ctx in a.contexts:
                kv_bytes = 2 * B * ctx * HKV * D * dt.itemsize
                if not self.fits(kv_bytes):
                    continue
                q = torch.randn(B, H, D, device=dev, dtype=dt)
                k = torch.randn(B, ctx, HKV, D, device=dev, dtype=dt)
                v = torch.randn(B, ctx, HKV, D, device=dev, dtype=dt)
                kv_len = torch.full((B,), ctx, device=dev, dtype=torch.int32)
                ns = pick_num_splits(ctx, B * HKV, dev)  # chosen outside the timing: no host sync inside
                ours = self.time_ms(lambda: decode_attention(q, k, v, kv_len, scale, ns))
                if ours is None:
                    print(f"B={B} ctx={ctx}: triton failed: {self.last_error}")
                    continue
                q4, kt, vt = q[:, :, None], k.transpose(1, 2), v.transpose(1, 2)
                base = {
                    name: self.time_ms(
                        lambda: F.scaled_dot_product_attention(q4, kt, vt, scale=scale, enable_gqa=True), backend=name
                    )
                    for name in self.backends
                }
                if self.fa_kvcache is not None:
                    base["flash-attn"] = self.time_ms(
                        lambda: self.fa_kvcache(q[:, None], k, v, cache_seqlens=kv_len, softmax_scale=scale)
                    )
                self.report(f"B={B:<3} ctx={ctx:<6} splits={ns:<3}", ours, base, kv_bytes)
                del q, k, v
                torch.cuda.empty_cache()

    # ------------------------------------------------------------------ MLA decode

    def mla(self):
        from minillm.kernels import mla_decode
        from minillm.kernels.decode import pick_num_splits

        a, dt, dev = self.args, self.dtype, self.dev
        H, R, DR = a.mla_heads, a.mla_rank, a.mla_rope_dim
        scale = 192**-0.5  # DeepSeek-V3: 1/sqrt(qk_nope 128 + rope 64); not 1/sqrt(R + Dr)
        print(f"\n== mla decode  H={H} R={R} Dr={DR} {a.dtype}  (GB/s = latent cache bytes / time)")
        for B in a.batches:
            for ctx in a.contexts:
                lat_bytes = B * ctx * (R + DR) * dt.itemsize
                if not self.fits(3 * lat_bytes):  # + the baseline's concatenated key and value copies
                    continue
                ql = torch.randn(B, H, R, device=dev, dtype=dt)
                qp = torch.randn(B, H, DR, device=dev, dtype=dt)
                c = torch.randn(B, ctx, R, device=dev, dtype=dt)
                kp = torch.randn(B, ctx, DR, device=dev, dtype=dt)
                kv_len = torch.full((B,), ctx, device=dev, dtype=torch.int32)
                ns = pick_num_splits(ctx, B * math.ceil(H / 16), dev)
                ours = self.time_ms(lambda: mla_decode(ql, qp, c, kp, kv_len, scale, ns))
                if ours is None:
                    print(f"B={B} ctx={ctx}: triton failed: {self.last_error}")
                    continue
                q = torch.cat([ql, qp], -1)[:, :, None]  # (B, H, 1, R+Dr)
                k = torch.cat([c, kp], -1)[:, None]  # (B, 1, ctx, R+Dr): one kv head
                v = c[:, None]
                base = {
                    name: self.time_ms(
                        lambda: F.scaled_dot_product_attention(q, k, v, scale=scale, enable_gqa=True), backend=name
                    )
                    for name in self.backends
                }
                self.report(f"B={B:<3} ctx={ctx:<6} splits={ns:<3}", ours, base, lat_bytes)
                del ql, qp, c, kp, q, k, v
                torch.cuda.empty_cache()


def main(argv=None) -> int:
    args = parse_args(argv)
    if not torch.cuda.is_available():
        print(
            "bench_kernels.py: no CUDA device found; the kernel benchmarks need a GPU "
            "(on CPU the kernels only run, slowly, through the Triton interpreter: see tests/test_kernels.py).",
            file=sys.stderr,
        )
        return 1
    from minillm.kernels import triton_available

    ok, why = triton_available()
    if not ok:
        print(f"bench_kernels.py: Triton kernels unavailable: {why}", file=sys.stderr)
        return 1
    print(f"device: {torch.cuda.get_device_name()}  torch {torch.__version__}  {why}")
    bench = Bench(args)
    if bench.fa_func is None:
        print("flash-attn not installed: its columns are omitted")
    for name in args.kernels.split(","):
        getattr(bench, name.strip())()
    return 0


if __name__ == "__main__":
    sys.exit(main())
