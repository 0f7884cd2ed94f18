"""The serving engine (minillm.engine): continuous batching on a paged KV cache with prefix caching,
checked against the contiguous-cache loop (generate.run) and transformers' greedy search."""
import threading

import pytest
import torch
from test_deepseek import build as build_deepseek

import minillm
from minillm.engine import Engine, EngineSettings, SamplingParams
from minillm.engine.blocks import BlockPool
from minillm.generate import Sampling, run

ARCHS = ["llama-gqa-tied-llama3", "qwen3", "gpt2", "deepseek-v3"]


@pytest.fixture(scope="module")
def paths(checkpoints, tmp_path_factory):
    out = {n: checkpoints[n] for n in ARCHS if n in checkpoints}
    out["deepseek-v3"] = tmp_path_factory.mktemp("ds") / "v3"
    build_deepseek("v3", out["deepseek-v3"])
    return out


@pytest.fixture(scope="module")
def llms(paths):
    return {n: minillm.load(p, device="cpu") for n, p in paths.items()}


def prompts(n, lengths, seed=0, vocab=300):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, vocab, (lengths[i % len(lengths)],), generator=g).tolist() for i in range(n)]


def contiguous(llm, prompt, new, eos=None):
    """The pre-engine loop, one prompt, greedy: what every engine result must equal."""
    for (seq,) in run(llm.model, None, [prompt], new, Sampling(), set(llm.eos_token_ids) if eos is None else eos,
                      [], None):
        pass
    return seq.tokens


def engine(llm, **settings):
    return Engine(llm.model, None, set(llm.eos_token_ids), EngineSettings(**settings))


@pytest.mark.parametrize("name", ARCHS)
def test_many_concurrent_greedy_equal_one_by_one_and_transformers(name, llms, paths, reference):
    llm = llms[name]
    ps = prompts(10, [1, 5, 17, 3, 40, 16, 9, 33])
    eng = engine(llm, block_size=4, max_step_tokens=32)     # chunked prefill mixed with decodes
    out = eng.generate(ps, SamplingParams(max_tokens=10))
    for p, r in zip(ps, out):
        assert r.seq.tokens == contiguous(llm, p, 10), p
    hf = reference(paths[name])
    for p, r in zip(ps[:3], out[:3]):
        ref = hf.generate(torch.tensor([p]), attention_mask=torch.ones(1, len(p), dtype=torch.long),
                          max_new_tokens=10, do_sample=False)
        assert r.seq.tokens == ref[0, len(p):].tolist()
    m = eng.metrics()
    assert m["requests_running"] == m["requests_waiting"] == m["blocks_used"] == 0
    assert m["blocks_free"] == m["blocks_total"] and m["generated_tokens"] == sum(len(r.seq.tokens) for r in out)


def test_llm_generate_of_many_prompts_runs_on_the_engine(llms):
    llm = llms["qwen3"]
    ps = prompts(6, [4, 30, 11])
    before = llm.engine.metrics()["requests_finished"]
    batch = llm.generate(ps, max_new_tokens=8, temperature=0)
    assert llm.engine.metrics()["requests_finished"] == before + 6
    assert [r.token_ids for r in batch] == [llm.generate(p, max_new_tokens=8, temperature=0).token_ids for p in ps]


def test_chunked_prefill_equals_unchunked(llms):
    llm = llms["llama-gqa-tied-llama3"]
    ps = prompts(4, [70, 3, 45, 21], seed=1)
    params = SamplingParams(max_tokens=6, eos=set(), logprobs=0)
    whole = engine(llm, max_step_tokens=512).generate(ps, params)
    chunked = engine(llm, block_size=8, max_step_tokens=7).generate(ps, params)
    for a, b in zip(whole, chunked):
        assert a.seq.tokens == b.seq.tokens
        # chunks of <= 8 rows run the CPU plan's loops, whole prompts BLAS: fp32 sums in another order
        torch.testing.assert_close([lp for lp, _ in a.logprobs], [lp for lp, _ in b.logprobs], atol=1e-4, rtol=0)


@pytest.mark.parametrize("name", ["llama-gqa-tied-llama3", "deepseek-v3"])
def test_preemption_under_a_tiny_pool_gives_the_same_outputs(name, llms):
    llm = llms[name]
    ps = prompts(8, [30, 12, 25, 7], seed=2)
    roomy = engine(llm, block_size=4).generate(ps, SamplingParams(max_tokens=12, eos=set()))
    eng = engine(llm, block_size=4, num_blocks=12, max_step_tokens=16)   # 48 tokens for all eight
    tiny = eng.generate(ps, SamplingParams(max_tokens=12, eos=set()))
    assert [r.seq.tokens for r in tiny] == [r.seq.tokens for r in roomy]
    m = eng.metrics()
    assert m["preemptions"] > 0 and m["blocks_used"] == 0 and m["blocks_free"] == 12


def test_prefix_cache_hit_reuses_blocks_and_gives_the_same_logprobs(llms):
    llm = llms["llama-gqa-tied-llama3"]
    shared, (a_tail, b_tail) = prompts(1, [37], seed=3)[0], prompts(2, [5, 9], seed=4)
    params = SamplingParams(max_tokens=8, eos=set(), logprobs=3)
    eng = engine(llm, block_size=8)
    a = eng.generate([shared + a_tail], params)[0]
    assert a.cached_tokens == 0
    b = eng.generate([shared + b_tail], params)[0]
    assert b.cached_tokens == 32 and eng.metrics()["prefix_hit_tokens"] == 32   # 4 full blocks of 37
    fresh = engine(llm, block_size=8).generate([shared + b_tail], params)[0]
    assert b.seq.tokens == fresh.seq.tokens == contiguous(llm, shared + b_tail, 8, eos=set())
    torch.testing.assert_close([lp for lp, _ in b.logprobs], [lp for lp, _ in fresh.logprobs], atol=1e-5, rtol=0)
    assert [[i for i, _ in top] for _, top in b.logprobs] == [[i for i, _ in top] for _, top in fresh.logprobs]
    # a whole repeated prompt: all but the block holding its last token comes from the cache
    again = eng.generate([shared + b_tail], params)[0]
    assert again.cached_tokens == 40 and again.seq.tokens == b.seq.tokens


def test_logprobs_match_transformers(llms, paths, reference):
    llm = llms["qwen3"]
    p = prompts(1, [12], seed=5)[0]
    r = engine(llm, block_size=4).generate([p], SamplingParams(max_tokens=5, eos=set(), logprobs=2))[0]
    full = torch.tensor([p + r.seq.tokens[:-1]])
    ref = reference(paths["qwen3"])(full).logits[0, len(p) - 1:].log_softmax(-1)
    torch.testing.assert_close(torch.tensor([lp for lp, _ in r.logprobs]),
                               ref.gather(1, torch.tensor(r.seq.tokens)[:, None])[:, 0], atol=1e-4, rtol=0)


def test_evicted_prefix_is_recomputed_correctly(llms):
    llm = llms["gpt2"]
    eng = engine(llm, block_size=4, num_blocks=16)
    first, other = prompts(2, [20, 40], seed=6)
    a = eng.generate([first], SamplingParams(max_tokens=4, eos=set()))[0]
    eng.generate([other], SamplingParams(max_tokens=20, eos=set()))   # needs 15 of the 16 blocks
    again = eng.generate([first], SamplingParams(max_tokens=4, eos=set()))[0]
    assert again.cached_tokens < 16 and again.seq.tokens == a.seq.tokens


def test_seeded_sampling_does_not_depend_on_the_batch(llms):
    llm = llms["llama-gqa-tied-llama3"]
    p = prompts(1, [9], seed=7)[0]
    params = SamplingParams(temperature=1.0, top_p=0.9, max_tokens=12, seed=11, eos=set())
    alone = engine(llm).generate([p], params)[0].seq.tokens
    eng = engine(llm, block_size=4, num_blocks=14, max_step_tokens=8)
    others = [eng.add(q, SamplingParams(temperature=0.7, top_k=5, max_tokens=12, seed=i, eos=set()))
              for i, q in enumerate(prompts(4, [20, 3, 14], seed=8))]
    mine = eng.add(p, params)
    while eng.has_work:
        eng.step()
    assert mine.seq.tokens == alone and all(o.finished for o in others)
    assert eng.metrics()["preemptions"] > 0                       # recomputed too, same draws
    assert engine(llm).generate([p], SamplingParams(temperature=1.0, max_tokens=12, seed=12,
                                                    eos=set()))[0].seq.tokens != alone


def test_per_request_settings_in_one_batch(llms):
    llm = minillm.load(llms["llama-gqa-tied-llama3"].path, device="cpu")
    eng = llm.new_engine(block_size=4, max_step_tokens=16)
    full = llm.generate("def fibonacci(n):", max_new_tokens=16, temperature=0)
    stop = full.text[2:5]
    a = eng.add(llm.encode("def fibonacci(n):"), SamplingParams(max_tokens=16, stop=[stop]))
    b = eng.add(llm.encode("import os"), SamplingParams(max_tokens=3))
    c = eng.add(llm.encode("import os"), SamplingParams(max_tokens=5, eos={full.token_ids[0]}))
    d = eng.add(llm.encode("def fibonacci(n):"), SamplingParams(max_tokens=5, eos={full.token_ids[0]}))
    while eng.has_work:
        eng.step()
    assert (a.seq.finish_reason, a.seq.text) == ("stop", full.text[:full.text.index(stop)])
    assert b.seq.finish_reason == "length" and len(b.seq.tokens) == 3
    assert c.seq.tokens == contiguous(llm, llm.encode("import os"), 5, eos={full.token_ids[0]})
    assert d.seq.finish_reason == "eos" and d.seq.tokens == full.token_ids[:1]


def test_abort_and_a_server_thread(llms):
    llm = llms["qwen3"]
    eng = engine(llm, block_size=4)
    r = eng.add(prompts(1, [10])[0], SamplingParams(max_tokens=50, eos=set()))
    eng.step()
    eng.step()
    eng.abort(r.id)
    eng.step()
    assert r.seq.finish_reason == "abort" and len(r.seq.tokens) == 2 and eng.metrics()["blocks_used"] == 0
    # a loop on its own thread; requests added and streamed from this one
    stop, seen, done = threading.Event(), {}, threading.Event()
    loop = threading.Thread(target=eng.serve, args=(stop,))
    loop.start()
    try:
        ps = prompts(5, [3, 20, 8], seed=9)

        def listener(req):
            seen.setdefault(req.id, []).append(len(req.seq.tokens))
            if len(reqs) == len(ps) and all(x.finished for x in reqs):
                done.set()
        reqs = []
        reqs += [eng.add(p, SamplingParams(max_tokens=6, eos=set()), listener=listener) for p in ps]
        assert done.wait(120)
    finally:
        stop.set()
        loop.join()
    assert [x.seq.tokens for x in reqs] == [contiguous(llm, p, 6, eos=set()) for p in ps]
    assert all(seen[x.id][-1] == 6 and seen[x.id] == sorted(seen[x.id]) for x in reqs)


def test_bad_requests_are_clear_errors(llms):
    llm = llms["gpt2"]
    eng = engine(llm, block_size=4, num_blocks=8)
    with pytest.raises(ValueError, match="needs 9 KV blocks of 4 tokens; the pool has 8"):
        eng.add([5] * 30, SamplingParams(max_tokens=6))
    with pytest.raises(ValueError, match="outside the vocabulary"):
        eng.add([5, 10**6], SamplingParams())
    with pytest.raises(ValueError, match="empty prompt"):
        eng.add([], SamplingParams())
    with pytest.raises(ValueError, match="max_tokens must be >= 0"):
        SamplingParams(max_tokens=-1)
    with pytest.raises(ValueError, match="top_p must be in"):
        SamplingParams(top_p=0)
    assert eng.add([5], SamplingParams(max_tokens=0)).seq.finish_reason == "length"
    assert not eng.has_work


def test_block_pool_ref_counts_prefix_keys_and_eviction():
    pool = BlockPool(4, 2)
    a = pool.allocate(3)
    assert pool.register(a, [1, 2, 3, 4, 5], 0, None)[0] == 2        # two full blocks keyed
    pool.release(a)
    assert pool.num_free == 4 and pool.num_cached == 2
    hit = pool.match([1, 2, 3, 4, 9])
    assert hit == a[:2] and pool.refs[a[0]] == 1 and pool.num_free == 2
    assert pool.match([1, 2, 3, 4]) == a[:1]                         # the last token is never matched
    assert pool.match([7, 7, 3, 4, 5]) == []                         # a key names the whole prefix
    assert pool.allocate(3) is None                                  # two free: no partial allocation
    fresh = pool.allocate(2)                                         # evicts nothing held
    assert set(fresh).isdisjoint(a[:2]) and pool.refs[a[0]] == 2
    pool.release(hit)
    pool.release(a[:1])
    pool.release(fresh)
    pool.allocate(4)                                                 # now the keyed blocks are reused
    assert pool.num_cached == 0 and pool.match([1, 2, 3, 4, 5]) == []


def test_a_stream_left_early_aborts_its_request(llms):
    llm = llms["llama-gqa-tied-llama3"]
    it = llm.stream("def fibonacci(n):", max_new_tokens=40, temperature=0)
    next(it)
    it.close()
    m = llm.engine.metrics()
    assert not llm.engine.has_work and m["requests_running"] == 0 and m["blocks_used"] == 0
