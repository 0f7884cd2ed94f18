"""OpenAI's shapes for `minillm serve`: what a request may say (checked before anything runs), and
the choices of a response.

Every field either changes the result and is supported, changes nothing (user, metadata, ...), or
is refused with a 400 that names it: a client never gets an answer that quietly ignored a setting.
Types are strict (no "1" for 1, no true for 1), ranges are the engine's (generate.Sampling).
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

MAX_LOGPROBS = 20

# known OpenAI fields that would change the answer and that minillm does not implement, with the
# values that mean "off" (the official client sends a field only when the caller sets it)
UNSUPPORTED = {"logit_bias": (None, {}), "suffix": (None, ""), "echo": (None, False), "tools": (None, []),
               "tool_choice": (None, "none"), "functions": (None, []), "function_call": (None, "none"),
               "parallel_tool_calls": (None,), "response_format": (None, {"type": "text"}), "audio": (None,),
               "modalities": (None, ["text"]), "prediction": (None,), "reasoning_effort": (None,),
               "web_search_options": (None,), "logprobs_offset": (None,)}


class ApiError(Exception):
    """-> OpenAI's error body {"error": {message, type, param, code}} with this HTTP status."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 type: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.type = type or ("invalid_request_error" if status < 500 else "server_error")

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    include_usage: bool = False


class Common(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    model: str
    stream: bool = False
    stream_options: StreamOptions | None = None
    max_tokens: int | None = Field(None, ge=0)
    temperature: float | None = Field(None, ge=0)
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=0)
    min_p: float | None = Field(None, ge=0, le=1)
    repetition_penalty: float | None = Field(None, gt=0)
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    seed: int | None = None
    stop: Any = None
    n: int = Field(1, ge=1, le=64)
    best_of: int | None = Field(None, ge=1)
    user: str | None = None                  # these three change nothing: accepted, unused
    metadata: dict | None = None
    store: bool | None = None

    @field_validator("presence_penalty", "frequency_penalty")
    @classmethod
    def _additive_penalty(cls, v):
        if v:   # OpenAI's additive penalties; the engine has transformers' multiplicative one
            raise ValueError("not supported (0 only); use repetition_penalty (transformers' multiplicative one)")
        return v

    @field_validator("stop")
    @classmethod
    def _stop(cls, v):
        if v is None:
            return []
        v = [v] if isinstance(v, str) else v
        if not isinstance(v, list) or not all(isinstance(s, str) for s in v):
            raise ValueError("must be a string or a list of strings")
        if "" in v:
            raise ValueError("an empty stop string would stop before the first token")
        return v

    @field_validator("best_of")
    @classmethod
    def _best_of(cls, v, info):
        if v is not None and v != info.data.get("n", 1):
            raise ValueError("not supported (only best_of equal to n)")
        return v


class CompletionRequest(Common):
    prompt: Any
    logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)

    @field_validator("prompt")
    @classmethod
    def _prompt(cls, v):
        """-> a list of prompts, each a str or a list of token ids."""
        is_ids = lambda x: isinstance(x, list) and all(type(t) is int for t in x)  # noqa: E731 (no bools)
        if isinstance(v, str):
            return [v]
        if isinstance(v, list) and v and (all(isinstance(p, str) for p in v) or is_ids(v)
                                          or all(is_ids(p) for p in v)):
            return v if not is_ids(v) else [v]
        raise ValueError("must be a string, a list of strings, a list of token ids or a list of lists of token ids "
                         "(none empty)")


class ChatRequest(Common):
    messages: Any
    max_completion_tokens: int | None = Field(None, ge=0)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)

    @field_validator("messages")
    @classmethod
    def _messages(cls, v):
        if not isinstance(v, list) or not v:
            raise ValueError("must be a non-empty list of messages")
        for i, m in enumerate(v):
            if not isinstance(m, dict) or not isinstance(m.get("role"), str):
                raise ValueError(f"message {i} must be an object with a string 'role'")
            c = m.get("content")
            parts_ok = isinstance(c, list) and all(isinstance(p, dict) and p.get("type") == "text"
                                                   and isinstance(p.get("text"), str) for p in c)
            if not (c is None or isinstance(c, str) or parts_ok):
                raise ValueError(f"message {i}: content must be a string or a list of text parts "
                                 "(other content types are not supported)")
        return v


def parse(cls: type[Common], body: Any) -> Common:
    """A JSON body -> the request, or an ApiError(400) naming the first bad parameter."""
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object")
    for name, off in UNSUPPORTED.items():
        if name in body and not any(body[name] == o and type(body[name]) is type(o) for o in off):
            raise ApiError(400, f"{name} is not supported by this server", name, "unsupported_parameter")
    try:
        req = cls.model_validate({k: v for k, v in body.items() if k not in UNSUPPORTED})
    except ValidationError as e:
        err = e.errors()[0]
        param = ".".join(str(x) for x in err["loc"]) or None
        if err["type"] == "extra_forbidden":
            raise ApiError(400, f"unknown parameter {param!r}", param, "unknown_parameter") from None
        if err["type"] == "missing":
            raise ApiError(400, f"{param} is required", param, "missing_parameter") from None
        msg = err["msg"].removeprefix("Value error, ")
        raise ApiError(400, f"{param}: {msg}", param, "invalid_value") from None
    if isinstance(req, ChatRequest) and req.top_logprobs and not req.logprobs:
        raise ApiError(400, "top_logprobs needs logprobs: true", "top_logprobs", "invalid_value")
    return req


# -- responses ------------------------------------------------------------------------------------

FINISH = {"eos": "stop", "stop": "stop", "length": "length"}   # the engine's reasons -> OpenAI's


@dataclass
class Choice:
    """One choice's answer so far."""
    text: str = ""
    tokens: list[int] = field(default_factory=list)
    logprobs: list = field(default_factory=list)
    finish_reason: str | None = None

    def add(self, d):    # a server.Delta
        self.text += d.text
        self.tokens += d.tokens
        self.logprobs += d.logprobs
        self.finish_reason = FINISH.get(d.finish_reason, d.finish_reason)


def _byte_decoder() -> dict[str, int]:
    """GPT-2's byte-level alphabet: each byte is shown as one printable character; -> its inverse."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    shown, extra = {b: chr(b) for b in keep}, 0
    for b in range(256):
        if b not in shown:
            shown[b], extra = chr(256 + extra), extra + 1
    return {c: b for b, c in shown.items()}


BYTE_DECODER = _byte_decoder()


class TokenNames:
    """A token id -> its bytes, and its name as OpenAI's logprobs give it."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.specials = set(tokenizer.special_tokens().values()) if tokenizer else set()

    def raw(self, t: int) -> bytes:
        """A token's own bytes: a byte-level BPE token may hold part of a UTF-8 character."""
        tok = self.tokenizer
        if tok is None:
            return str(t).encode()
        piece = tok.tok.id_to_token(t) or ""
        if t in self.specials:
            return piece.encode()
        if type(tok.tok.decoder).__name__ == "ByteLevel" and all(c in BYTE_DECODER for c in piece):
            return bytes(BYTE_DECODER[c] for c in piece)
        m = re.fullmatch(r"<0x([0-9A-Fa-f]{2})>", piece)     # sentencepiece's byte fallback
        return bytes([int(m[1], 16)]) if m else tok.decode([t]).encode()

    def text(self, t: int) -> str:
        """As OpenAI names a token: its text, or "bytes:\\xe6\\x97" when it is not whole UTF-8."""
        b = self.raw(t)
        try:
            return b.decode()
        except UnicodeDecodeError:
            return "bytes:" + "".join(f"\\x{x:02x}" for x in b)


def completion_choice(i: int, c: Choice, stream: bool, names: TokenNames) -> dict:
    lp = None
    if c.logprobs:
        toks = [names.text(t) for t in c.tokens]
        offsets = [sum(map(len, toks[:k])) for k in range(len(toks))]
        lp = dict(tokens=toks, token_logprobs=[x for x, _ in c.logprobs],
                  top_logprobs=[{names.text(t): v for t, v in top} for _, top in c.logprobs],
                  text_offset=offsets)
    return dict(index=i, text=c.text, logprobs=lp, finish_reason=c.finish_reason)


def chat_choice(i: int, c: Choice, stream: bool, names: TokenNames) -> dict:
    lp = None
    if c.logprobs:
        entry = lambda t, v: dict(token=names.text(t), logprob=v, bytes=list(names.raw(t)))  # noqa: E731
        lp = dict(content=[dict(entry(t, x), top_logprobs=[entry(u, v) for u, v in top])
                           for t, (x, top) in zip(c.tokens, c.logprobs)], refusal=None)
    msg = dict(content=c.text) if stream else dict(role="assistant", content=c.text)
    if stream and not c.text:
        msg = {}
    return dict(index=i, **{"delta" if stream else "message": msg}, logprobs=lp, finish_reason=c.finish_reason)
