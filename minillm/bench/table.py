"""Ratios (> 1 means ours wins) and the Markdown report."""
from __future__ import annotations

import re


def higher_is_better(key: str) -> bool:
    return key.endswith("_tok_s") or key == "roof_fraction"   # rates; times and memory: lower


def ratios(ours: dict, theirs: dict) -> dict:
    """How many times better ours is, per measure: ours/theirs for rates, theirs/ours for times
    and memory; > 1 means ours wins."""
    out = {}
    for k, a in ours.items():
        b = theirs.get(k)
        if a is None or b is None or a <= 0 or b <= 0:
            continue
        out[k] = a / b if higher_is_better(k) else b / a
    return out


def _fmt(key: str, v) -> str:
    if v is None:
        return "-"
    if key.endswith("_bytes"):
        return f"{v / 2**20:.0f} MiB"
    if key.endswith("_x_weights"):
        return f"{v:.2f}x weights"
    if key.endswith("_s") and not key.endswith("_tok_s"):
        return f"{v * 1e3:.0f} ms" if v < 1 else f"{v:.2f} s"
    if key == "roof_fraction":
        return f"{v:.0%}"
    return f"{v:.1f}"


def label(key: str) -> str:
    if m := re.fullmatch(r"prefill_p(\d+)_tok_s", key):
        return f"prefill tok/s, prompt {m[1]}"
    if m := re.fullmatch(r"ttft_p(\d+)_s", key):
        return f"time to first token, prompt {m[1]}"
    if m := re.fullmatch(r"decode_p(\d+)_b(\d+)_tok_s", key):
        return f"decode tok/s, batch {m[2]}, prompt {m[1]}" if m[2] == "1" else \
            f"decode throughput tok/s, batch {m[2]}, prompt {m[1]}"
    return {"load_s": "load time, model and tokenizer (warm page cache)", "load_again_s": "load again in the same process", "load_rss_anon_growth_bytes": "RssAnon growth while loading",
            "load_rss_anon_growth_x_weights": "RssAnon growth / weights' bytes",
            "load_cuda_allocated_bytes": "CUDA peak allocated while loading",
            "cold_start_s": "cold start to first token (process)", "roof_fraction": "share of the bandwidth roof",
            "cuda_generate_peak_growth_bytes": "CUDA peak growth while generating"}.get(key, key)


def report(out: dict) -> str:
    """One table: a row per measure, a column per system, then a column per ratio pair
    ("ours int4 / llama.cpp Q4_1": > 1 means that configuration of ours wins); the header below
    says what each system ran (dtype, quantization scheme, file), the threads, the roof, the CPU."""
    systems = out["systems"]
    names = [s["key"] for s in systems]
    pairs = list(out.get("ratios", {}))
    order = ["load_s", "load_again_s", "load_rss_anon_growth_bytes", "load_rss_anon_growth_x_weights", "cold_start_s",
             "prefill", "ttft", "decode_p", "roof_fraction"]
    keys = list(dict.fromkeys(k for n in names for k in out[n]))
    keys.sort(key=lambda k: next(i for i, o in enumerate(order + [""]) if k.startswith(o)))
    lines = ["| measure | " + " | ".join(names + pairs) + " |", "|---" * (1 + len(names) + len(pairs)) + "|"]
    for k in keys:
        row = [label(k)] + [_fmt(k, out[n].get(k)) for n in names]
        for p in pairs:
            r = out["ratios"][p].get(k)
            row.append("-" if r is None else f"{r:.2f}x")
        lines.append("| " + " | ".join(row) + " |")
    roof = out["roof"]
    bw = ", ".join(f"{k} {v / 1e9:.1f} GB/s" for k, v in roof["read_bandwidth_bytes_s"].items())
    from . import mib
    reads = "; ".join(f"{n} {mib(r['bytes_per_token']['total'])} -> at most {r['tok_s']:.1f} tok/s"
                      for n, r in roof["by_system"].items())
    lines += ["", f"model {out['model']} ({out['arch']}) on {out['device']}, {out['threads']} threads, "
                  f"{out['new_tokens']} new tokens, median of {out['repeat']}, repeats interleaved"]
    for s in systems:
        what = {"ours": "minillm", "transformers": "transformers", "llama.cpp": "llama.cpp"}[s["kind"]]
        act = f", {s['dtype']} activations" if s["kind"] == "ours" else ""
        lines.append(f"- {s['key']}: {what}{act}, {s.get('scheme', '')}")
    if "llama_cpp" in out:
        lc = out["llama_cpp"]
        lines.append(f"llama.cpp: llama-cpp-python {lc['version']}, n_threads = n_threads_batch = {lc['n_threads']}, "
                     f"n_ctx = n_batch = {lc['n_ctx']}, batch 1 only; extra buffer types off (use_extra_bufts = "
                     "False: its AMX buffers crash on quantized types in these VMs), so its weight repacking is off too")
    lines += [
        f"roof: read bandwidth {bw}; a decode step at batch 1 and {roof['context']} tokens reads: {reads}",
        f"machine: {out['machine']['cpu']}, {out['machine']['cores']} cores, 1-min load average "
        + " -> ".join(f"{x:.1f}" for x in out["machine"]["load_avg_1min"]),
        "ratios: > 1 means ours is better (theirs/ours for times and memory, ours/theirs for rates)"
        if pairs else "",
    ]
    return "\n".join(lines).rstrip() + "\n"
