"""Chat templates rendered and tokenized exactly as transformers does it, for templates in the shapes
real checkpoints ship; chat generation, the per-turn prefill of a kept KV cache, and `minillm chat`."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import CORPUS, SPECIALS, _llama
from templates import CHATML, DEEPSEEK, LLAMA3, NAMED_DEFAULT, NAMED_TOOLS, QWEN3

import minillm
from minillm.chat import ChatTemplate, ChatTemplateError

CHAT_SPECIALS = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>",
                 "<|im_start|>", "<|im_end|>", "<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>", "<｜User｜>",
                 "<｜Assistant｜>"]
PLAIN_ADDED = ["<think>", "</think>", "<tool_call>", "</tool_call>"]   # Qwen3: added, not special
VOCAB = 352
DS_BOS = {"__type": "AddedToken", "content": "<｜begin▁of▁sentence｜>", "lstrip": False, "normalized": True,
          "rstrip": False, "single_word": False}

# name -> (tokenizer_config.json extras, where the template goes, template, special_tokens_map.json)
FAMILIES = {
    "llama3": ({"bos_token": "<|begin_of_text|>", "eos_token": "<|end_of_text|>"}, "jinja", LLAMA3, None),
    "qwen3": ({"bos_token": None, "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>"}, "config", QWEN3, None),
    "smollm2": ({"eos_token": "<|im_end|>"}, "config", CHATML, {"bos_token": "<|im_start|>"}),
    "deepseek": ({"bos_token": DS_BOS, "eos_token": {**DS_BOS, "content": "<｜end▁of▁sentence｜>"}}, "config",
                 DEEPSEEK, None),
    "named": ({"bos_token": "<s>", "eos_token": "</s>"}, "config",
              [{"name": "default", "template": NAMED_DEFAULT}, {"name": "tool_use", "template": NAMED_TOOLS}], None),
}

TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Météo <now> & 日本 'quoted'",
          "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}},
         {"type": "function", "function": {"name": "b", "description": "x"}},
         {"type": "function", "function": {"name": "c", "description": "cut by {% break %}"}}]
CONVERSATIONS = [
    [{"role": "user", "content": "Hello, who are you?"}],
    [{"role": "system", "content": "  You are terse. Naïve café — 日本語 🙂 "}, {"role": "user", "content": "hi <b>&</b>"},
     {"role": "assistant", "content": "Hello!", "tool_calls": None}, {"role": "user", "content": "  2+2?  "}],
    [{"role": "user", "content": [{"type": "text", "text": "part one"}, {"type": "text", "text": " part two"}]}],
    [{"role": "user", "content": "q"}, {"role": "assistant", "content": "<think>\nmull\n</think>\n\nanswer"},
     {"role": "user", "content": "q2"}],
    [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a", "reasoning": "because"}],
]
KWARGS = [{}, {"enable_thinking": False}, {"thinking": True}, {"date_string": "01 Jan 2025"}]


def build_chat_tokenizer(folder: Path, bos_post_processor: bool):
    """The test BPE with the chat families' special tokens (and Qwen3's plain added ones)."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator([CORPUS], trainers.BpeTrainer(vocab_size=320, special_tokens=SPECIALS + CHAT_SPECIALS,
                                                          initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in PLAIN_ADDED])
    if bos_post_processor:   # Llama 3: tokenizer.json's own post-processor adds BOS to every encode
        bos = tok.token_to_id("<|begin_of_text|>")
        tok.post_processor = processors.TemplateProcessing(single="<|begin_of_text|>:0 $A:0",
                                                           special_tokens=[("<|begin_of_text|>", bos)])
    folder.mkdir(parents=True, exist_ok=True)
    tok.save(str(folder / "tokenizer.json"))
    assert tok.get_vocab_size() <= VOCAB


@pytest.fixture(scope="session")
def families(tmp_path_factory) -> dict[str, Path]:
    """One tiny Llama checkpoint, its tokenizer files and template laid out per family."""
    from transformers import AutoModelForCausalLM
    root = tmp_path_factory.mktemp("chat")
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(_llama(vocab_size=VOCAB))
    model.save_pretrained(root / "model")
    out = {}
    for name, (conf, where, template, stmap) in FAMILIES.items():
        d = out[name] = root / name
        shutil.copytree(root / "model", d)
        build_chat_tokenizer(d, bos_post_processor=name == "llama3")
        conf = {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": 256, **conf}
        if where == "jinja":
            (d / "chat_template.jinja").write_text(template)
        else:
            conf["chat_template"] = template
        (d / "tokenizer_config.json").write_text(json.dumps(conf, ensure_ascii=False))
        if stmap:
            (d / "special_tokens_map.json").write_text(json.dumps(stmap))
    return out


@pytest.fixture(scope="session")
def llms(families):
    return {name: minillm.load(path, device="cpu") for name, path in families.items()}


def _both(ref_fn, ours_fn):
    """(ours, reference), or None when both raise (ours with one ChatTemplateError)."""
    try:
        ref = ref_fn()
    except Exception:
        with pytest.raises(ChatTemplateError):
            ours_fn()
        return None
    return ours_fn(), ref


@pytest.mark.parametrize("name", list(FAMILIES))
def test_render_and_ids_match_transformers(families, llms, name):
    from transformers import AutoTokenizer
    ref, llm = AutoTokenizer.from_pretrained(families[name]), llms[name]
    rendered = 0
    for conv in CONVERSATIONS:
        for gen in (True, False):
            for tools in (None, TOOLS):
                for kw in KWARGS:
                    args = dict(add_generation_prompt=gen, tools=tools, **kw)
                    got = _both(lambda: ref.apply_chat_template(conv, tokenize=False, **args),
                                lambda: llm.apply_chat_template(conv, **args))
                    if got is None:
                        continue
                    assert got[0] == got[1], (conv, args)
                    ids = llm.apply_chat_template(conv, tokenize=True, **args)
                    assert ids == ref.apply_chat_template(conv, tokenize=True, return_dict=False, **args)
                    rendered += 1
    assert rendered >= 40                      # the comparisons ran, not only matching failures
    bos = FAMILIES[name][0].get("bos_token")
    text = llm.apply_chat_template(CONVERSATIONS[0])
    if isinstance(bos, str) and text.startswith(bos):   # BOS written by the template, not added again
        ids = llm.apply_chat_template(CONVERSATIONS[0], tokenize=True)
        assert ids.count(llm.tokenizer.tok.token_to_id(bos)) == 1
        assert llm.tokenizer.encode(text).count(ids[0]) == (2 if name == "llama3" else 1)


def test_named_templates_and_overrides(families, llms, tmp_path):
    from transformers import AutoTokenizer
    ref, llm, conv = AutoTokenizer.from_pretrained(families["named"]), llms["named"], CONVERSATIONS[1]
    assert "Today is" in llm.apply_chat_template(conv, tools=TOOLS)            # tools pick "tool_use"
    assert "Today is" not in llm.apply_chat_template(conv)
    for pick in ("tool_use", "default", NAMED_DEFAULT + "{{ '!' }}"):        # a name, or template text
        assert llm.apply_chat_template(conv, tools=TOOLS, chat_template=pick) == ref.apply_chat_template(
            conv, tools=TOOLS, chat_template=pick, tokenize=False, add_generation_prompt=True)
    f = tmp_path / "t.jinja"
    f.write_text("{% for m in messages %}[{{ m.role }}]{% endfor %}")
    assert llm.apply_chat_template(conv, chat_template=str(f)) == "[system][user][assistant][user]"
    with pytest.raises(ChatTemplateError, match="neither a template name"):
        llm.apply_chat_template(conv, chat_template=str(tmp_path / "missing.jinja"))


def test_where_the_template_is_found(families, tmp_path):
    """chat_template.jinja beats chat_template.json beats tokenizer_config.json."""
    d = tmp_path / "m"
    shutil.copytree(families["smollm2"], d)
    assert ChatTemplate.from_dir(d).templates == {"default": CHATML}
    (d / "chat_template.json").write_text(json.dumps({"chat_template": QWEN3}))
    assert ChatTemplate.from_dir(d).templates == {"default": QWEN3}
    (d / "chat_template.jinja").write_text(LLAMA3)
    t = ChatTemplate.from_dir(d)
    assert t.templates == {"default": LLAMA3}
    assert t.special_tokens["bos_token"] == "<|im_start|>" and t.special_tokens["eos_token"] == "<|im_end|>"
    (d / "tokenizer_config.json").write_text("{}")
    (d / "chat_template.jinja").unlink()
    (d / "chat_template.json").unlink()
    assert ChatTemplate.from_dir(d) is None


def test_end_of_turn_token(llms):
    """The special token written right after an assistant message's text ends a chat reply."""
    tok = lambda llm, t: llm.tokenizer.tok.token_to_id(t)  # noqa: E731
    for name, eot in [("llama3", "<|eot_id|>"), ("qwen3", "<|im_end|>"), ("smollm2", "<|im_end|>"),
                      ("deepseek", "<｜end▁of▁sentence｜>"), ("named", "<|im_end|>")]:
        llm = llms[name]
        assert llm.chat_eos() == set(llm.eos_token_ids) | {tok(llm, eot)}, name


def test_template_errors_are_one_line(llms):
    llm = llms["llama3"]
    with pytest.raises(ChatTemplateError, match="single tool-calls"):   # raise_exception(...) in the template
        llm.apply_chat_template([{"role": "assistant", "content": "x", "tool_calls": [1, 2]}])
    with pytest.raises(ChatTemplateError, match=r"given chat template does not parse: .*line 1"):
        llm.apply_chat_template(CONVERSATIONS[0], chat_template="{% if %}")
    with pytest.raises(ValueError, match="empty conversation"):
        llm.apply_chat_template([])


def test_chat_stops_at_end_of_turn_and_matches_generate(llms):
    llm = llms["qwen3"]
    ids = llm.apply_chat_template(CONVERSATIONS[0], tokenize=True)
    r = llm.chat(CONVERSATIONS[0], max_new_tokens=12)
    assert r.token_ids == llm.generate(ids, max_new_tokens=12).token_ids[:len(r.token_ids)]
    assert "".join(llm.stream_chat(CONVERSATIONS[0], max_new_tokens=12)) == r.text
    # make <|im_end|> the greedy choice after the prompt: the reply ends there, finish_reason "eos"
    im_end = llm.tokenizer.tok.token_to_id("<|im_end|>")
    assert im_end not in llm.eos_token_ids
    head = llm.model.head.weight
    saved = head.data.clone()
    try:
        with torch.no_grad():
            head[im_end] = head[r.token_ids[0]] * 2 + 1
        r2 = llm.chat(CONVERSATIONS[0], max_new_tokens=12)
        assert r2.token_ids[-1] == im_end and r2.finish_reason == "eos" and len(r2.token_ids) < 12
    finally:
        head.data.copy_(saved)


def _prefill_sizes(llm):
    sizes = []
    handle = llm.model.register_forward_pre_hook(lambda m, args: sizes.append(args[0].shape[1]))
    return sizes, handle


@pytest.mark.parametrize("name", ["smollm2", "llama3"])
def test_session_prefills_only_new_tokens(llms, name):
    llm = llms[name]
    s = minillm.ChatSession(llm, system="Be brief.")
    sizes, handle = _prefill_sizes(llm)
    try:
        prompts, replies = [], []
        for i, text in enumerate(["hello there", "and then?", "thanks"]):
            cached = list(s.cached)
            sizes.clear()
            replies.append("".join(s.send(text, max_new_tokens=6)))
            prompts.append(llm.apply_chat_template(s.messages[:-1], tokenize=True))
            p = prompts[-1]
            if i == 0:
                assert sizes[0] == s.prefilled == len(p)
            else:   # the new render extends the previous one: only what it adds is computed
                assert p[:len(prompts[-2])] == prompts[-2]
                keep = next(k for k in range(len(p)) if k == len(cached) or cached[k] != p[k])
                assert keep >= len(prompts[-2])
                assert sizes[0] == s.prefilled == len(p) - keep
                assert s.prefilled < len(p) - len(prompts[-2]) + 8
            # the cached continuation answers exactly as a fresh full prefill of the whole history
            assert replies[-1] == llm.chat(s.messages[:-1], max_new_tokens=6).text
    finally:
        handle.remove()
    s.reset()
    assert s.messages == [{"role": "system", "content": "Be brief."}] and s.cached == []


def test_session_falls_back_when_earlier_turns_render_differently(llms):
    """A template whose start changes each turn (as Qwen3 drops old <think> blocks): a full prefill."""
    llm = llms["smollm2"]
    counter = "{{ 'turns: ' ~ (messages | length) ~ '\\n' }}" + CHATML
    s = minillm.ChatSession(llm, chat_template=counter)
    shared = len(llm.tokenizer.encode("turns: ", add_special_tokens=False))   # all the renders share
    for text in ["hello there", "and then?"]:
        "".join(s.send(text, max_new_tokens=4))
        p = llm.apply_chat_template(s.messages[:-1], tokenize=True, chat_template=counter)
        assert len(p) - shared <= s.prefilled <= len(p)
        assert s.messages[-1]["content"] == llm.chat(s.messages[:-1], 4, chat_template=counter).text


def _cli(*args, stdin="", env=None):
    return subprocess.run([sys.executable, "-m", "minillm.cli", *args], input=stdin, capture_output=True,
                          text=True, timeout=300, env={**os.environ, **(env or {})})


def test_cli_chat_piped(families, llms):
    llm, path = llms["smollm2"], str(families["smollm2"])
    r = _cli("chat", "-m", path, "-n", "5", "--temperature", "0", "--system", "sys",
             stdin="hello there\n\nand then?\n/reset\nhello there\n/help\n")
    assert r.returncode == 0, r.stderr
    history, expected = [{"role": "system", "content": "sys"}], ""
    for text in ["hello there", "and then?"]:
        history.append({"role": "user", "content": text})
        reply = llm.chat(history, max_new_tokens=5).text
        history.append({"role": "assistant", "content": reply})
        expected += reply + "\n\n"
    assert r.stdout == expected + expected.split("\n\n")[0] + "\n\n"
    assert "/reset" in r.stderr       # /help lists the commands (on stderr: stdout stays the replies)
    g = _cli("generate", "--chat", "-m", path, "-n", "5", "--temperature", "0", "--system", "sys", "hello there")
    assert g.returncode == 0 and g.stdout == expected.split("\n\n")[0] + "\n"


def test_cli_chat_errors(tmp_path):
    """The embedded model has no template: one line saying how to give one; bad templates: one line."""
    for args in (["chat"], ["generate", "--chat", "hi"]):
        r = _cli(*args, stdin="hi\n")
        assert r.returncode == 1 and r.stderr.count("\n") == 1, r.stderr
        assert "has no chat template" in r.stderr and "--chat-template FILE" in r.stderr
    raising, broken = tmp_path / "raising.jinja", tmp_path / "broken.jinja"
    raising.write_text("{{ raise_exception('Only user and assistant roles are supported!') }}")
    broken.write_text("{% for m in messages %}{{ m.content }}")
    for f, why in ((raising, "failed: Only user and assistant roles are supported!"), (broken, "does not parse")):
        for args in (["chat", "--chat-template", str(f)], ["generate", "--chat", "--chat-template", str(f), "hi"]):
            r = _cli(*args, stdin="hi\n")
            assert r.returncode == 1 and r.stderr.count("\n") == 1 and str(f) in r.stderr and why in r.stderr, r.stderr
    ok = tmp_path / "ok.jinja"
    ok.write_text("{% for m in messages %}{{ m.content }}\n{% endfor %}")
    r = _cli("generate", "--chat", "--chat-template", str(ok), "-n", "3", "--temperature", "0", "def f")
    assert r.returncode == 0 and r.stdout.strip(), r.stderr


def test_environment_matches_transformers(families, llms):
    """What the template sees: tools/documents passed as None, tojson as transformers' (indent, keys in
    order, no HTML escaping, non-ASCII kept), the generation tag, dict(), and the sandbox's refusals."""
    from transformers import AutoTokenizer
    ref, llm = AutoTokenizer.from_pretrained(families["smollm2"]), llms["smollm2"]
    probe = ("{{ tools is defined }} {{ tools is none }} {{ documents is none }} {{ bos_token }}|{{ eos_token }}|"
             "{{ 'é<&>' | tojson }} {{ {'b': 1, 'a': [1, 'ü']} | tojson(indent=2) }} {{ dict(x=1) | tojson }}"
             "{% generation %}g{% endgeneration %}{% for m in messages %}{{ m | tojson }}{% endfor %}")
    for tools in (None, TOOLS):
        args = dict(chat_template=probe, tools=tools, add_generation_prompt=True)
        assert llm.apply_chat_template(CONVERSATIONS[4], **args) == ref.apply_chat_template(
            CONVERSATIONS[4], tokenize=False, **args)
    for bad in ("{% set ns = namespace(_x=1) %}", "{{ messages.__class__.__mro__ }}", "{{ ''.__class__ }}"):
        got = _both(lambda: ref.apply_chat_template(CONVERSATIONS[0], chat_template=bad, tokenize=False),
                    lambda: llm.apply_chat_template(CONVERSATIONS[0], chat_template=bad))
        assert got is None or got[0] == got[1]




@pytest.fixture(scope="session")
def smollm2(smollm2_gguf) -> tuple[Path, Path]:
    """SmolLM2-135M-Instruct (conftest.smollm2_gguf) saved once by transformers as an ordinary
    checkpoint in the minillm cache: (folder, the template text of the GGUF's
    tokenizer.chat_template metadata)."""
    gguf, cache = smollm2_gguf, smollm2_gguf.parent
    out = cache / "SmolLM2-135M-Instruct"
    if not (out / "model.safetensors").exists():
        from safetensors.torch import save_file
        from transformers import AutoModelForCausalLM, AutoTokenizer
        model = AutoModelForCausalLM.from_pretrained(cache, gguf_file=gguf.name, dtype=torch.float32)
        tmp = cache / "tmp-convert"
        cfg = model.config
        if hasattr(cfg, "quantization_config"):   # dequantised at load: an ordinary fp32 checkpoint now
            del cfg.quantization_config
        cfg.save_pretrained(tmp)
        model.generation_config.save_pretrained(tmp)
        AutoTokenizer.from_pretrained(cache, gguf_file=gguf.name).save_pretrained(tmp)
        tied = cfg.tie_word_embeddings
        save_file({k: v.contiguous() for k, v in model.state_dict().items() if not (tied and k == "lm_head.weight")},
                  tmp / "model.safetensors", metadata={"format": "pt"})
        tmp.rename(out)
    published = cache / "gguf-tokenizer.chat_template.jinja"
    if not published.exists():   # reading the GGUF's metadata takes seconds: once
        from gguf import GGUFReader
        field = GGUFReader(gguf).fields["tokenizer.chat_template"]
        published.write_bytes(bytes(field.parts[field.data[0]]))
    return out, published


def test_real_instruct_model_smollm2(smollm2):
    """The published template (GGUF metadata) renders as transformers renders it, and the model
    answers a simple question sensibly, token for token as transformers' greedy decode."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    folder, published = smollm2
    published = published.read_text(encoding="utf-8")
    ref_tok, llm = AutoTokenizer.from_pretrained(folder), minillm.load(folder, device="cpu")
    from_gguf = ChatTemplate({"default": published}, llm.chat_template.special_tokens, "GGUF metadata")
    for conv in CONVERSATIONS[:2] + CONVERSATIONS[3:]:
        want = ref_tok.apply_chat_template(conv, tokenize=False, add_generation_prompt=True)
        assert from_gguf.render(conv, add_generation_prompt=True) == want == llm.apply_chat_template(conv)
    question = [{"role": "user", "content": "What is the capital of France?"}]
    r = llm.chat(question, max_new_tokens=24, temperature=0)
    assert "Paris" in r.text and r.finish_reason == "eos"
    ids = torch.tensor([llm.apply_chat_template(question, tokenize=True)])
    ref = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    out = ref.generate(ids, max_new_tokens=24, do_sample=False, eos_token_id=sorted(llm.chat_eos()))
    assert out[0, ids.shape[1]:].tolist() == r.token_ids
    s = minillm.ChatSession(llm)
    assert "Paris" in "".join(s.send("What is the capital of France?", 24, temperature=0))
    assert "Berlin" in "".join(s.send("And of Germany?", 24, temperature=0))
    assert s.prefilled < 20   # the second turn computed its own few tokens, not the history


@pytest.mark.parametrize("conf, stmap", [
    ({"bos_token": {"__type": "AddedToken", "content": "<|im_start|>"}, "image_token": "<s>",
      "extra_special_tokens": {"audio_token": "</s>"}, "add_bos_token": True}, None),
    ({"bos_token": "<|im_start|>", "eos_token": "<|im_end|>"}, {"bos_token": {"content": "<s>"}, "pad_token": "</s>"}),
    ({"bos_token": "<|im_start|>", "added_tokens_decoder": {}}, {"bos_token": "<s>"}),   # the map is then ignored
])
def test_special_tokens_as_transformers_passes_them(families, tmp_path, conf, stmap):
    from transformers import AutoTokenizer

    from minillm.chat import special_tokens
    shutil.copy(families["smollm2"] / "tokenizer.json", tmp_path)
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "PreTrainedTokenizerFast", **conf}))
    if stmap:
        (tmp_path / "special_tokens_map.json").write_text(json.dumps(stmap))
    assert special_tokens(tmp_path) == AutoTokenizer.from_pretrained(tmp_path).special_tokens_map
