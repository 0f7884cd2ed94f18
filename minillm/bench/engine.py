"""The engine's must-show numbers (issue 15), on a model of real width with random weights:
`python -m minillm.bench.engine [--shape llama-125m] [--new 32] [--hf]`.

1. 32 prompts of mixed lengths (5..300 tokens) through llm.generate([...]), greedy: each result
   equals llm.generate of that prompt alone; tokens/s of the batch vs the 32 one after another.
2. Prefix caching: a 512-token prefix shared by two prompts: time to first token of each (llm.stream).
3. Preemption: a KV pool too small for the batch: every prompt finishes, the same greedy results.
4. --hf: transformers' own continuous batching (generate_batch) on the same model and prompts.
"""
from __future__ import annotations

import argparse
import time

import torch

import minillm

from . import random_checkpoint


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m minillm.bench.engine")
    ap.add_argument("--shape", default="llama-125m")
    ap.add_argument("--new", type=int, default=32, help="new tokens per prompt")
    ap.add_argument("--hf", action="store_true", help="also time transformers' generate_batch")
    ap.add_argument("--parts", default="1,2,3", help="which of 1 (batch), 2 (prefix), 3 (preemption) to run")
    a = ap.parse_args(argv)
    torch.manual_seed(0)
    path = random_checkpoint(a.shape)
    llm = minillm.load(path, device="cpu")
    V = llm.config.vocab_size
    lengths = torch.randint(5, 301, (32,)).tolist()
    prompts = [torch.randint(3, V, (n,)).tolist() for n in lengths]
    llm.generate(prompts[0][:8], max_new_tokens=2, temperature=0)          # warm up

    parts = {int(x) for x in a.parts.split(",")}
    t = time.perf_counter()
    alone = [llm.generate(p, max_new_tokens=a.new, temperature=0).token_ids for p in prompts]
    t_alone = time.perf_counter() - t
    llm.new_engine()                                                        # an empty prefix cache
    t = time.perf_counter()
    batch = [r.token_ids for r in llm.generate(prompts, max_new_tokens=a.new, temperature=0)]
    t_batch = time.perf_counter() - t
    n_tok = sum(map(len, batch))
    same = sum(x == y for x, y in zip(batch, alone))
    print(f"1. {len(prompts)} prompts of {min(lengths)}..{max(lengths)} tokens, {a.new} new each: "
          f"{same}/{len(prompts)} equal alone; one by one {sum(map(len, alone)) / t_alone:.1f} tok/s, "
          f"batch {n_tok / t_batch:.1f} tok/s ({t_alone / t_batch:.1f}x)", flush=True)

    prefix = torch.randint(3, V, (512,)).tolist()
    if 2 in parts:
        _prefix(llm, prefix)
    if 3 in parts:
        _preemption(llm, prompts, alone, lengths, a.new)
    if a.hf:
        _transformers(path, prompts, a.new, n_tok / t_batch)


def _prefix(llm, prefix):
    llm.new_engine()
    ttft = []
    for tail in ([11, 12, 13], [21, 22, 23]):
        t = time.perf_counter()
        next(iter(_stream_ids(llm, prefix + tail)))
        ttft.append(time.perf_counter() - t)
    print(f"2. 512-token shared prefix: time to first token {ttft[0] * 1e3:.0f} ms, then "
          f"{ttft[1] * 1e3:.0f} ms ({ttft[0] / ttft[1]:.1f}x lower); hit tokens {llm.engine.metrics()['prefix_hit_tokens']}", flush=True)


def _preemption(llm, prompts, alone, lengths, new):
    need = sum(-(-(n + new) // 16) for n in lengths)
    eng = llm.new_engine(num_blocks=need // 4)              # a quarter of what the 32 need at once
    small = [r.token_ids for r in llm.generate(prompts, max_new_tokens=new, temperature=0)]
    m = eng.metrics()
    print(f"3. pool of {m['blocks_total']} blocks (the 32 need {need}): {sum(x == y for x, y in zip(small, alone))}/32 equal, "
          f"{m['preemptions']} preemptions, {m['blocks_used']} blocks left in use", flush=True)


def _transformers(path, prompts, new, ours):
    from transformers import AutoModelForCausalLM, GenerationConfig
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    gc = GenerationConfig(max_new_tokens=new, do_sample=False, eos_token_id=-1, pad_token_id=0)
    t = time.perf_counter()
    out = hf.generate_batch(prompts, generation_config=gc)
    t_hf = time.perf_counter() - t
    hf_tok = sum(len(o.generated_tokens) for o in out.values())
    print(f"4. transformers generate_batch: {hf_tok / t_hf:.1f} tok/s (minillm's batch: {ours:.1f})", flush=True)


def _stream_ids(llm, ids):
    for seqs in llm._run([ids], 1, temperature=0):
        yield seqs


if __name__ == "__main__":
    main()
