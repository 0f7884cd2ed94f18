"""Sampling semantics (against transformers' own processors), seeds, stop strings, eos, limits."""
import json

import pytest
import torch

import minillm
from minillm.generate import Sampling, next_tokens


@pytest.fixture(scope="module")
def llm(checkpoints):
    return minillm.load(checkpoints["llama-gqa-tied-llama3"], device="cpu")


def test_processors_match_transformers():
    from transformers.generation.logits_process import (MinPLogitsWarper, RepetitionPenaltyLogitsProcessor,
                                                        TemperatureLogitsWarper, TopKLogitsWarper,
                                                        TopPLogitsWarper)
    torch.manual_seed(0)
    logits, seen = torch.randn(3, 50) * 3, torch.randint(0, 50, (3, 7))
    s = Sampling(temperature=0.7, top_k=20, top_p=0.8, min_p=0.05, repetition_penalty=1.3)
    ref = RepetitionPenaltyLogitsProcessor(1.3)(seen, logits.clone())
    for warp in (TemperatureLogitsWarper(0.7), TopKLogitsWarper(20), TopPLogitsWarper(0.8), MinPLogitsWarper(0.05)):
        ref = warp(seen, ref)
    # the same distribution: sample many times with one seed each and compare the token sets
    ours = {next_tokens(logits, s, seen, torch.Generator().manual_seed(i))[0].item() for i in range(400)}
    allowed = set(torch.nonzero(ref[0] > float("-inf")).flatten().tolist())
    assert ours <= allowed and len(ours) >= min(len(allowed), 2)
    greedy = next_tokens(logits, Sampling(repetition_penalty=1.3), seen, None)
    assert torch.equal(greedy, RepetitionPenaltyLogitsProcessor(1.3)(seen, logits.clone()).argmax(-1))


def test_seed_reproducible_and_seeds_differ(llm):
    a = llm.generate("def ", max_new_tokens=20, temperature=1.0, seed=7)
    b = llm.generate("def ", max_new_tokens=20, temperature=1.0, seed=7)
    others = {tuple(llm.generate("def ", max_new_tokens=20, temperature=1.0, seed=s).token_ids) for s in range(5)}
    assert a.token_ids == b.token_ids and len(others) > 1


def test_top_k_one_is_greedy(llm):
    assert (llm.generate("import os", max_new_tokens=10, temperature=1.5, top_k=1, seed=3).token_ids
            == llm.generate("import os", max_new_tokens=10, temperature=0).token_ids)


def test_stop_string_and_stream(llm):
    full = llm.generate("def fibonacci(n):", max_new_tokens=24, temperature=0)
    assert full.finish_reason == "length" and len(full.text) > 6
    stop = full.text[3:6]
    cut = llm.generate("def fibonacci(n):", max_new_tokens=24, temperature=0, stop=[stop, "@@@"])
    assert cut.finish_reason == "stop" and cut.text == full.text[:full.text.index(stop)]
    pieces = list(llm.stream("def fibonacci(n):", max_new_tokens=24, temperature=0, stop=stop))
    assert "".join(pieces) == cut.text
    assert "".join(llm.stream("def fibonacci(n):", max_new_tokens=24, temperature=0)) == full.text
    assert len(list(llm.stream("def fibonacci(n):", max_new_tokens=24, temperature=0))) > 3


def test_eos_stops_generation(llm):
    # make the eos the greedy choice at the first step by treating that token as eos
    first = llm.generate("import os", max_new_tokens=5, temperature=0).token_ids[0]
    llm.eos_token_ids, saved = [first], llm.eos_token_ids
    try:
        r = llm.generate("import os", max_new_tokens=5, temperature=0)
    finally:
        llm.eos_token_ids = saved
    assert r.finish_reason == "eos" and r.token_ids == [first] and r.text == ""


def test_prompt_forms(llm):
    ids = llm.tokenizer.encode("import os")
    one = llm.generate(ids, max_new_tokens=4, temperature=0)       # list[int]: one prompt
    assert isinstance(one, minillm.GenerationResult)
    two = llm.generate(["import os", ids], max_new_tokens=4, temperature=0)
    assert [r.token_ids for r in two] == [one.token_ids] * 2


def test_context_limits(llm):
    n = llm.config.max_position
    with pytest.raises(ValueError, match="exceeds the model's context"):
        llm.generate([5] * (n + 1), max_new_tokens=2)
    r = llm.generate([5] * (n - 3), max_new_tokens=10, temperature=0)
    assert r.finish_reason == "length" and len(r.token_ids) == 3


def test_generation_config_defaults(checkpoints, tmp_path):
    import shutil
    shutil.copytree(checkpoints["llama-mha"], tmp_path / "m")
    (tmp_path / "m" / "generation_config.json").write_text(json.dumps(
        {"do_sample": True, "temperature": 0.9, "top_k": 5, "eos_token_id": [2, 3]}))
    llm = minillm.load(tmp_path / "m", device="cpu")
    assert llm._settings(None, None, None, None, None) == Sampling(0.9, 5, None, None, None)
    assert llm._settings(0, None, None, None, None).temperature == 0.0
    assert llm.eos_token_ids == [2, 3]
    a = llm.generate("def ", max_new_tokens=12, seed=1)
    b = llm.generate("def ", max_new_tokens=12, seed=1)
    assert a.token_ids == b.token_ids


def test_token_healing_extends_the_prompts_last_token(llm, checkpoints, reference):
    """"def " ends in a lone space token: healed, the prompt loses it and the first new token must
    start with it; the text returned leaves the space out (it is the prompt's), and the tokens are
    transformers' greedy under the same first-token constraint."""
    from transformers import LogitsProcessor, LogitsProcessorList
    tok = llm.tokenizer
    ids = tok.encode("def ")
    assert tok.decode(ids[-1:]) == " "
    healed = llm.generate("def ", max_new_tokens=8, temperature=0)             # default: heals
    first = tok.decode(ids[-2:-1] + healed.token_ids[:1])[len(tok.decode(ids[-2:-1])):]
    assert first.startswith(" ") and len(first) > 1                             # extends the space
    assert "def " + healed.text == tok.decode(ids[:-1] + healed.token_ids)      # no doubled space
    plain = llm.generate("def ", max_new_tokens=8, temperature=0, token_healing=False)
    assert plain.token_ids == llm.generate(ids, max_new_tokens=8, temperature=0).token_ids
    assert healed.token_ids != plain.token_ids

    allowed = [i for i in range(tok.tok.get_vocab_size()) if tok.decode(ids[-2:-1] + [i]).startswith("def ")]

    class FirstToken(LogitsProcessor):
        def __call__(self, input_ids, scores):
            if input_ids.shape[1] == len(ids) - 1:
                mask = torch.full_like(scores, float("-inf"))
                mask[:, allowed] = 0
                scores = scores + mask
            return scores
    ref = reference(checkpoints["llama-gqa-tied-llama3"]).generate(
        torch.tensor([ids[:-1]]), max_new_tokens=8, do_sample=False, logits_processor=LogitsProcessorList([FirstToken()]),
        pad_token_id=2, eos_token_id=None)
    assert healed.token_ids == ref[0, len(ids) - 1:].tolist()
    # a prompt ending in a whole token is not healed unless asked; token-id prompts never
    assert llm.generate("def fibonacci(n):", max_new_tokens=4, temperature=0).token_ids == \
        llm.generate(tok.encode("def fibonacci(n):"), max_new_tokens=4, temperature=0).token_ids
    streamed = "".join(llm.stream("def ", max_new_tokens=8, temperature=0))
    assert streamed == healed.text


@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32"])
def test_cpu_decode_in_each_dtype_equals_the_full_forward(checkpoints, dtype):
    """fp32 and bf16 caches decode through kernels/cpu_decode.c on CPU, fp16 ones through torch
    (the C side reads fp32/bf16 only): each greedy step is the full forward's argmax."""
    llm = minillm.load(checkpoints["qwen3"], device="cpu", dtype=dtype)
    ids = list(range(5, 25))
    out = llm.generate(ids, max_new_tokens=5, temperature=0).token_ids
    assert llm.logits([ids + out[:-1]])[0, -5:].argmax(-1).tolist() == out


def test_argmax_is_torchs():
    """generate.argmax (numpy on CPU) picks what torch.argmax picks: the first of equal maxima, NaN first."""
    from minillm.generate import argmax
    x = torch.randn(5, 1000, generator=torch.Generator().manual_seed(0))
    x[1, 7] = x[1, 900] = 50.0                   # a tie: the first one
    x[2, 30] = float("nan")                      # NaN wins, as in torch
    x[3] = 0.0                                   # all equal: index 0
    assert argmax(x).tolist() == x.argmax(-1).tolist() == argmax(x.bfloat16()).tolist()
    assert argmax(x).dtype == torch.int64
