"""Text <-> token ids through a Hugging Face tokenizer.json (the `tokenizers` library).

Special tokens are added exactly as transformers (5.x) adds them for the same files: by
tokenizer.json's post-processor alone (Llama 2/3 add BOS there; GPT-2 and Qwen add nothing).
transformers drops `add_bos_token` / `add_eos_token` from tokenizer_config.json whenever a
tokenizer.json is present, so they change nothing here either; a tokenizer.json without a
post-processor adds no special tokens.
"""
from __future__ import annotations

import json
from pathlib import Path

from tokenizers import Tokenizer as _Tok

from .errors import TokenizerError


def _token_text(tok) -> str | None:
    return tok.get("content") if isinstance(tok, dict) else tok


class Tokenizer:
    chat_template: str | None = None   # a GGUF file's tokenizer.chat_template (Jinja), for chat rendering

    def __init__(self, path: Path):
        file = Path(path) / "tokenizer.json"
        try:
            self.tok = _Tok.from_file(str(file))
        except Exception as e:   # the tokenizers library raises bare Exceptions for a bad file
            raise TokenizerError(f"{file} cannot be read by the tokenizers library: {e}") from None
        conf_file = Path(path) / "tokenizer_config.json"
        conf = json.loads(conf_file.read_text()) if conf_file.exists() else {}
        self.bos_token, self.eos_token = _token_text(conf.get("bos_token")), _token_text(conf.get("eos_token"))

    @classmethod
    def wrap(cls, tok: _Tok, bos_token: str | None = None, eos_token: str | None = None) -> "Tokenizer":
        """A Tokenizer around a `tokenizers` object built elsewhere (a GGUF file's metadata)."""
        out = cls.__new__(cls)
        out.tok, out.bos_token, out.eos_token = tok, bos_token, eos_token
        return out

    @classmethod
    def from_gguf(cls, path) -> "Tokenizer":
        """The tokenizer in a GGUF file's metadata (a vocabulary-only file is enough)."""
        from .gguf_file import GGUFFile
        from .gguf_tokenizer import from_metadata
        return from_metadata(GGUFFile(path).meta, str(path), cls)

    @classmethod
    def from_dir(cls, path: Path) -> "Tokenizer | None":
        path = Path(path)
        if (path / "tokenizer.json").exists():
            return cls(path)
        if (path / "tokenizer.model").exists():
            raise TokenizerError(
                f"{path} has only a sentencepiece tokenizer.model; minillm reads tokenizer.json "
                "(write one with transformers: AutoTokenizer.from_pretrained(p).save_pretrained(p))")
        return None

    @property
    def vocab_size(self) -> int:
        return self.tok.get_vocab_size()

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Special tokens written in the text (<|im_end|>) are always parsed as such;
        add_special_tokens=False skips the post-processor (a chat render writes its own BOS)."""
        return self.tok.encode(text, add_special_tokens=add_special_tokens).ids

    def special_tokens(self) -> dict[str, int]:
        """text -> id of the tokens tokenizer.json marks special."""
        return {t.content: i for i, t in self.tok.get_added_tokens_decoder().items() if t.special}

    def decode(self, ids: list[int]) -> str:
        return self.tok.decode(ids, skip_special_tokens=True)


class StreamDecoder:
    """Turns a growing list of token ids into text pieces, never half a character.

    Decoding token by token is wrong twice over: a UTF-8 character can span tokens (the byte-level
    BPE shows U+FFFD until its last byte arrives), and some decoders change a token's text by what
    precedes it (sentencepiece strips the leading space of the first token). So decode a window
    that starts a few tokens back and emit what it adds beyond the text already emitted.
    """

    def __init__(self, tokenizer: Tokenizer, context: list[int] = ()):
        self.tokenizer = tokenizer
        self.ids: list[int] = list(context)   # context: tokens before the new ones, never emitted
        self.prefix = 0                        # window start
        self.read = len(self.ids)              # tokens whose text has been emitted

    def push(self, token: int) -> str:
        self.ids.append(token)
        done = self.tokenizer.decode(self.ids[self.prefix:self.read])
        text = self.tokenizer.decode(self.ids[self.prefix:])
        if len(text) > len(done) and not text.endswith("\ufffd"):
            self.prefix, self.read = self.read, len(self.ids)
            return text[len(done):]
        return ""

    def flush(self) -> str:
        done = self.tokenizer.decode(self.ids[self.prefix:self.read])
        text = self.tokenizer.decode(self.ids[self.prefix:])
        self.prefix = self.read = len(self.ids)
        return text[len(done):]
