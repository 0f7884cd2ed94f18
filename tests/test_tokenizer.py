"""Special tokens as transformers adds them for the same files; streaming never splits a character."""
import json

import pytest
from conftest import build_tokenizer

from minillm.tokenizer import StreamDecoder, Tokenizer

TEXTS = ["def fibonacci(n):", "Naïve café — 日本語のテキスト 🙂", " leading space", "a"]


@pytest.mark.parametrize("add_bos", [None, True, False])
def test_encode_matches_transformers(tmp_path, add_bos):
    from transformers import AutoTokenizer
    build_tokenizer(tmp_path, add_bos)
    ours, ref = Tokenizer(tmp_path), AutoTokenizer.from_pretrained(tmp_path)
    for text in TEXTS:
        assert ours.encode(text) == ref(text)["input_ids"]
        assert ours.decode(ours.encode(text)) == ref.decode(ref(text)["input_ids"], skip_special_tokens=True)
    # transformers 5 ignores tokenizer_config's add_bos_token when tokenizer.json exists
    assert ours.encode("a")[0] != ours.tok.token_to_id("<s>")


def test_post_processor_from_tokenizer_json_is_kept(tmp_path):
    """Llama 3 style: tokenizer.json's own TemplateProcessing adds BOS; no flag in the config."""
    from tokenizers import Tokenizer as Raw
    from tokenizers import processors
    from transformers import AutoTokenizer
    build_tokenizer(tmp_path, None)
    raw = Raw.from_file(str(tmp_path / "tokenizer.json"))
    raw.post_processor = processors.TemplateProcessing(single="<|endoftext|>:0 $A:0",
                                                       special_tokens=[("<|endoftext|>", 0)])
    raw.save(str(tmp_path / "tokenizer.json"))
    ours, ref = Tokenizer(tmp_path), AutoTokenizer.from_pretrained(tmp_path)
    assert ours.encode("hello")[0] == 0 and ours.encode("hello") == ref("hello")["input_ids"]


def test_stream_decoder_never_emits_half_a_character(tmp_path):
    build_tokenizer(tmp_path, None)
    tok = Tokenizer(tmp_path)
    text = "日本語のテキスト 🙂 café"
    ids = tok.encode(text)
    assert len(ids) > len(text) / 2          # multi-byte characters span several tokens here
    sd = StreamDecoder(tok)
    pieces = [sd.push(i) for i in ids] + [sd.flush()]
    assert "".join(pieces) == text
    assert not any("\ufffd" in p for p in pieces)
    json.dumps(pieces)                        # each piece is valid text on its own
