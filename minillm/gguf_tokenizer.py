"""The tokenizer a GGUF file describes in its metadata, built as a `tokenizers` object.

llama.cpp stores the vocabulary (`tokenizer.ggml.tokens`, `token_type`, `scores`, `merges`), names the
algorithm (`tokenizer.ggml.model`: `gpt2` byte-level BPE, `llama` SentencePiece BPE) and, for BPE, the
pre-tokenizer (`tokenizer.ggml.pre`): which regexes split the text before the merges, the ones
llama-vocab.cpp lists per name (llm_tokenizer_bpe). Where llama.cpp had to rewrite a tokenizer.json
regex for its own engine (`(?i:'s|...)`), the original is used here: the `tokenizers` library runs
it, and it is what the model's own tokenizer (and llama.cpp's test vectors, made with it) does.
"""
from __future__ import annotations

from tokenizers import AddedToken, Regex, decoders, models, normalizers, pre_tokenizers, processors
from tokenizers import Tokenizer as _Tok

from .errors import TokenizerError

GPT2 = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)"
LLAMA3 = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
          r"|\s*[\r\n]+|\s+(?!\S)|\s+")
QWEN2 = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
         r"|\s*[\r\n]+|\s+(?!\S)|\s+")
QWEN35 = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]+|\p{N}| ?[^\s\p{L}\p{M}\p{N}]+[\r\n]*"
          r"|\s*[\r\n]+|\s+(?!\S)|\s+")
TEKKEN = (r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+"
          r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*"
          r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+")
GPT4O = (r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
         r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
         r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+")
BLOOM = r" ?[^(\s|.,!?…。，、।۔،)]+"
# llama-vocab.cpp, as written there (DeepSeek's tokenizer.json splits, one after the other)
DEEPSEEK_LLM = ['[\r\n]', '\\s?[A-Za-zµÀ-ÖØ-öø-ƺƼ-ƿǄ-ʓʕ-ʯͰ-ͳͶͷͻ-ͽͿΆΈ-ΊΌΎ-ΡΣ-ϵϷ-ҁҊ-ԯԱ-ՖႠ-ჅᎠ-Ᏽᏸ-ᏽᲐ-ᲺᲽ-Ჿᴀ-ᴫᵫ-ᵷᵹ-ᶚḀ-ἕἘ-Ἕἠ-ὅὈ-Ὅὐ-ὗὙὛὝὟ-ώᾀ-ᾴᾶ-ᾼιῂ-ῄῆ-ῌῐ-ΐῖ-Ίῠ-Ῥῲ-ῴῶ-ῼℂℇℊ-ℓℕℙ-ℝℤΩℨK-ℭℯ-ℴℹℼ-ℿⅅ-ⅉⅎↃↄⰀ-ⱻⱾ-ⳤⳫ-ⳮⳲⳳꙀ-ꙭꚀ-ꚛꜢ-ꝯꝱ-ꞇꞋ-ꞎꭰ-ꮿﬀ-ﬆﬓ-ﬗＡ-Ｚａ-ｚ𐐀-𐑏𐒰-𐓓𐓘-𐓻𐲀-𐲲𐳀-𐳲𑢠-𑣟𞤀-𞥃]+', '\\s?[!-/:-~！-／：-～‘-‟\u3000-。]+', '\\s+$', '[一-龥ࠀ-一가-\ud7ff]+', '\\p{N}+']
DEEPSEEK_V3 = ['\\p{N}{1,3}', '[一-龥\u3040-ゟ゠-ヿ]+', '[!"#$%&\'()*+,\\-./:;<=>?@\\[\\\\\\]^_`{|}~][A-Za-z]+|[^\r\n\\p{L}\\p{P}\\p{S}]?[\\p{L}\\p{M}]+| ?[\\p{P}\\p{S}]+[\r\n]*|\\s*[\r\n]+|\\s+(?!\\S)|\\s+']
DEEPSEEK_CODER = ['[\r\n]', '\\s?\\p{L}+', '\\s?\\p{P}+', '[一-龥ࠀ-一가-\ud7ff]+', '\\p{N}']
DEFAULT = [r"[\p{P}\$\+<=>\^~\|]+", GPT2, r"\p{N}+", r"[0-9][0-9][0-9]"]

# tokenizer.ggml.pre -> (regexes applied in turn, ignore_merges, add_bos when the file does not say)
_PRE = [
    (("llama3", "llama-v3", "llama-bpe", "falcon3", "falcon-h1", "pixtral", "midm-2.0", "lfm2", "dbrx",
      "smaug-bpe", "jina-v5-nano"), [LLAMA3], True, True),
    (("chatglm-bpe",), [LLAMA3], False, False),
    (("glm4", "glm5"), [LLAMA3], True, False),
    (("qwen2", "deepseek-r1-qwen", "megrez", "kormo", "f2llmv2", "stablelm2", "hunyuan", "solar-open"),
     [QWEN2], False, False),
    (("qwen35",), [QWEN35], False, False),
    (("deepseek-llm",), DEEPSEEK_LLM, False, False),
    (("deepseek-v3",), DEEPSEEK_V3, False, False),
    (("deepseek-coder",), DEEPSEEK_CODER, False, False),
    (("default",), DEFAULT, False, False),
    (("falcon",), [DEFAULT[0], GPT2, DEFAULT[3]], False, False),
    (("gpt-2", "phi-2", "mpt", "olmo", "jais", "jina-es", "jina-de", "jina-v2-es", "jina-v2-de", "gigachat",
      "a.x-4.0", "mellum", "exaone4", "trillion", "granite-docling", "roberta-bpe", "jina-v1-en",
      "jina-v2-code"), [GPT2], False, False),
    (("starcoder", "refact", "command-r", "smollm", "codeshell", "exaone", "minerva-7b", "mellum2"),
     [r"\p{N}", GPT2], False, False),
    (("tekken",), [TEKKEN], True, True),
    (("gpt-4o", "llama4", "kanana2", "minimax-m2", "talkie"), [GPT4O], False, False),
    (("poro-chat", "bloom", "gpt3-finnish"), [BLOOM], False, False),
    (("viking",), [BLOOM, r"\p{N}"], False, False),
]
PRE = {name: (regexes, ignore, bos) for names, regexes, ignore, bos in _PRE for name in names}
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6   # tokenizer.ggml.token_type


def from_metadata(meta: dict, where: str, cls):
    """-> a `cls` (minillm.tokenizer.Tokenizer; passed in, so this module need not import it)."""
    kind = meta.get("tokenizer.ggml.model")
    tokens = meta.get("tokenizer.ggml.tokens")
    if kind is None or tokens is None:
        raise TokenizerError(f"{where} has no tokenizer in its metadata (tokenizer.ggml.model / tokens)")
    types = meta.get("tokenizer.ggml.token_type") or [NORMAL] * len(tokens)
    vocab = {t: i for i, t in enumerate(tokens)}     # a duplicate spelling: the last id, as llama.cpp
    if kind not in ("gpt2", "llama"):
        raise TokenizerError(f"{where}: tokenizer.ggml.model {kind!r} is not supported (supported: gpt2, llama)")
    try:
        if kind == "gpt2":
            tok, add_bos = byte_level_bpe(meta, vocab, where)
        else:
            tok, add_bos = sentencepiece_bpe(meta, vocab, tokens, types)
    except TokenizerError:
        raise
    except Exception as e:   # the tokenizers library raises bare Exceptions (a merge of unknown tokens)
        raise TokenizerError(f"{where}: its tokenizer metadata cannot be built: {e}") from None
    # control and unknown tokens are special (matched whole in the text, skipped when decoding);
    # user-defined ones are matched whole too (llama.cpp's tokenizer_st_partition) but decoded as text
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False)
                            for t, ty in zip(tokens, types) if ty in (CONTROL, UNKNOWN)])
    tok.add_tokens([AddedToken(t, special=False, normalized=False)
                    for t, ty in zip(tokens, types) if ty == USER_DEFINED])
    ids = {k: meta.get(f"tokenizer.ggml.{k}_token_id") for k in ("bos", "eos")}
    add_bos = meta.get("tokenizer.ggml.add_bos_token", add_bos)
    add_eos = meta.get("tokenizer.ggml.add_eos_token", False)
    ends = [(ids["bos"], add_bos), (ids["eos"], add_eos)]
    if any(i is not None and add for i, add in ends):   # llama.cpp adds them around the text
        pre = [tokens[ids["bos"]]] if add_bos and ids["bos"] is not None else []
        post = [tokens[ids["eos"]]] if add_eos and ids["eos"] is not None else []
        tok.post_processor = processors.TemplateProcessing(
            single=" ".join(pre + ["$A"] + post), pair=" ".join(pre + ["$A"] + post + pre + ["$B"] + post),
            special_tokens=[(tokens[i], i) for i, add in ends if i is not None and add])
    out = cls.wrap(tok, *(tokens[i] if i is not None and i < len(tokens) else None for i in ids.values()))
    out.chat_template = meta.get("tokenizer.chat_template")
    return out


def byte_level_bpe(meta: dict, vocab: dict, where: str):
    """GPT-2's byte-level BPE: the tokens are already spelled in its byte alphabet (Ġ for a space)."""
    pre = meta.get("tokenizer.ggml.pre", "default")
    if pre not in PRE:
        raise TokenizerError(f"{where}: unknown pre-tokenizer {pre!r} (tokenizer.ggml.pre; known: "
                             f"{', '.join(sorted(PRE))})")
    regexes, ignore_merges, add_bos = PRE[pre]
    merges = [tuple(m.split(" ", 1)) for m in meta.get("tokenizer.ggml.merges") or []]
    tok = _Tok(models.BPE(vocab, merges, ignore_merges=ignore_merges))
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Split(Regex(r), behavior="isolated") for r in regexes]
        + [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    return tok, add_bos


def sentencepiece_bpe(meta: dict, vocab: dict, tokens: list, types: list):
    """SentencePiece BPE as llama.cpp runs it (llm_tokenizer_spm): spaces become ▁, one is put before
    the text and after each special token (add_space_prefix), adjacent pieces merge best score
    first, and what is not in the vocabulary falls back to <0xXX> byte tokens."""
    scores = meta.get("tokenizer.ggml.scores") or [0.0] * len(tokens)
    # merges ranked by the merged piece's score: the pair llama.cpp's priority queue merges first
    merges = []
    for t, s, ty in zip(tokens, scores, types):
        if ty in (NORMAL, USER_DEFINED):
            merges += [(-s, vocab[t[:k]], vocab[t[k:]], t[:k], t[k:])
                       for k in range(1, len(t)) if t[:k] in vocab and t[k:] in vocab]
    merges = [(a, b) for *_, a, b in sorted(merges)]
    unk = meta.get("tokenizer.ggml.unknown_token_id")
    tok = _Tok(models.BPE(vocab, merges, byte_fallback=True, fuse_unk=True,
                          unk_token=tokens[unk] if unk is not None else None))
    space = meta.get("tokenizer.ggml.add_space_prefix", True)
    steps = [normalizers.Prepend("▁")] if space else []
    tok.normalizer = normalizers.Sequence(steps + [normalizers.Replace(" ", "▁")])
    steps = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
    tok.decoder = decoders.Sequence(steps + ([decoders.Strip(" ", 1, 0)] if space else []))
    return tok, True   # llama.cpp adds BOS to a SentencePiece vocabulary unless the file says not to
