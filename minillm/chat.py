"""Chat templates: the checkpoint's own Jinja template, found and rendered exactly as transformers
(5.x) does it (`PreTrainedTokenizerBase.apply_chat_template` -> `render_jinja_template`), and the
token that ends an assistant turn.

Where a template comes from is split from how it renders: `ChatTemplate(templates, special_tokens)`
takes the text itself (a GGUF file's `tokenizer.chat_template` goes in there), `from_dir` reads a
checkpoint folder in transformers' order.
"""
from __future__ import annotations

import json
from datetime import datetime
from functools import lru_cache
from pathlib import Path

import jinja2
from jinja2.ext import Extension, loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment

# transformers' SPECIAL_TOKENS_ATTRIBUTES: the names templates read (`{{ bos_token }}`)
SPECIAL_NAMES = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")
REASONING = ("reasoning_content", "thinking", "reasoning")   # transformers' _REASONING_FIELDS
PROBE = "minillm-probe-reply"


class ChatTemplateError(ValueError):
    pass


def _text(tok):
    """A special token as tokenizer_config.json writes it: "<s>" or {"content": "<s>", ...}."""
    return tok.get("content") if isinstance(tok, dict) else tok


def special_tokens(folder: Path) -> dict[str, str]:
    """The `{name: text}` transformers passes to the template (its `special_tokens_map`): the named
    tokens of tokenizer_config.json, its custom `*_token` strings and `extra_special_tokens` dict;
    special_tokens_map.json only where the config has no `added_tokens_decoder` (the legacy path
    of `_from_pretrained`, which then lets that file win)."""
    conf_file, map_file = folder / "tokenizer_config.json", folder / "special_tokens_map.json"
    conf = json.loads(conf_file.read_text()) if conf_file.exists() else {}
    out = {k: _text(conf.get(k)) for k in SPECIAL_NAMES}
    out.update({k: v for k, v in conf.items() if k.endswith("_token") and isinstance(v, str)})
    if isinstance(conf.get("extra_special_tokens"), dict):
        out.update({k: _text(v) for k, v in conf["extra_special_tokens"].items()})
    if "added_tokens_decoder" not in conf and map_file.exists():
        out.update({k: _text(v) for k, v in json.loads(map_file.read_text()).items()
                    if k != "extra_special_tokens" and k != "additional_special_tokens"})
    return {k: str(v) for k, v in out.items() if isinstance(v, str)}


def _named(value) -> dict[str, str]:
    """tokenizer_config's chat_template: a string, or a list of {"name": ..., "template": ...}."""
    if isinstance(value, list):
        return {t["name"]: t["template"] for t in value}
    return {"default": value}


class _Generation(Extension):
    """`{% generation %}...{% endgeneration %}` marks assistant text for transformers' assistant
    mask; rendering just keeps the body."""
    tags = {"generation"}

    def parse(self, parser):
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

    def _body(self, caller):
        return caller()


def _raise(message):
    raise jinja2.exceptions.TemplateError(message)


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    # transformers' filter, not Jinja's: no HTML escaping, non-ASCII kept, keys in order
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


class _Dict:   # transformers' TemplateDict: `dict(...)` without the type's attributes
    def __call__(self, *args, **kwargs):
        return dict(*args, **kwargs)

    def fromkeys(self, *args, **kwargs):
        return dict.fromkeys(*args, **kwargs)


class _Namespace(jinja2.utils.Namespace):   # transformers' TemplateNamespace: no "_" attributes
    def __init__(*args, **kwargs):
        self, attrs = args[0], dict(*args[1:], **kwargs)
        for name in attrs:
            _Namespace._check(name)
        jinja2.utils.Namespace.__init__(self, attrs)

    def __setitem__(self, name, value):
        _Namespace._check(name)
        jinja2.utils.Namespace.__setitem__(self, name, value)

    @staticmethod
    def _check(name):
        if isinstance(name, str) and name.startswith("_"):
            raise jinja2.exceptions.SecurityError(f"namespace attribute {name!r} starts with an underscore")


@lru_cache(maxsize=16)
def compile_template(text: str) -> jinja2.Template:
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[_Generation, loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals.update(raise_exception=_raise, strftime_now=lambda fmt: datetime.now().strftime(fmt),
                       dict=_Dict(), namespace=_Namespace)
    return env.from_string(text)


def checked(text: str, source: str = "chat template") -> jinja2.Template:
    try:
        return compile_template(text)
    except jinja2.TemplateSyntaxError as e:
        raise ChatTemplateError(f"{source} does not parse: {e.message} (line {e.lineno})") from None


def _plain(x):
    """transformers' _plain_template_data: a fresh copy of JSON types; anything else a "<Type>"."""
    if x is None or type(x) in (str, int, float, bool):
        return x
    for t in (str, int, float):
        if isinstance(x, t) and not isinstance(x, bool):
            return t(x)
    if isinstance(x, dict):
        return {_plain(k): _plain(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_plain(v) for v in x] if isinstance(x, list) else tuple(_plain(v) for v in x)
    return f"<{type(x).__name__}>"


class ChatTemplate:
    """templates: {name: Jinja text} ("default", "tool_use", ...); special_tokens: {"bos_token": ...}."""

    def __init__(self, templates: dict[str, str], special_tokens: dict[str, str] | None = None,
                 source: str = "chat template"):
        self.templates, self.special_tokens, self.source = templates, dict(special_tokens or {}), source

    @classmethod
    def from_dir(cls, folder) -> "ChatTemplate | None":
        """transformers' order: chat_template.jinja (plus additional_chat_templates/*.jinja, named by
        file), the processor's chat_template.json, tokenizer_config.json's chat_template."""
        folder = Path(folder)
        found = {}
        if (folder / "chat_template.jinja").exists():
            found["default"] = (folder / "chat_template.jinja").read_text(encoding="utf-8")
        for f in sorted((folder / "additional_chat_templates").glob("*.jinja")):
            found[f.name.removesuffix(".jinja")] = f.read_text(encoding="utf-8")
        if found:
            return cls(found, special_tokens(folder), str(folder / "chat_template.jinja"))
        for name in ("chat_template.json", "tokenizer_config.json"):
            if (folder / name).exists():
                value = json.loads((folder / name).read_text(encoding="utf-8")).get("chat_template")
                if value:
                    return cls(_named(value), special_tokens(folder), str(folder / name))
        return None

    def pick(self, chat_template: str | None = None, tools=None) -> tuple[str, str]:
        """(text, source) as transformers' get_chat_template picks it; `chat_template` may also be a
        template name, the template text or a path to a file holding it."""
        if chat_template in self.templates:
            return self.templates[chat_template], f"{self.source} ({chat_template})"
        if chat_template is not None:
            return from_override(chat_template)
        if tools is not None and "tool_use" in self.templates:
            return self.templates["tool_use"], f"{self.source} (tool_use)"
        if "default" not in self.templates:
            raise ChatTemplateError(f"{self.source} has several chat templates and no default: pass "
                                    f"chat_template= one of {sorted(self.templates)}")
        return self.templates["default"], self.source

    def render(self, messages, add_generation_prompt: bool = False, tools=None, documents=None,
               chat_template: str | None = None, **kwargs) -> str:
        text, source = self.pick(chat_template, tools)
        return render(text, messages, add_generation_prompt, tools, documents, source,
                      **{**self.special_tokens, **kwargs})

    def check(self, chat_template: str | None = None):
        """Raise ChatTemplateError now if the template that would be used does not parse."""
        checked(*self.pick(chat_template))

    def end_of_turn(self, special: dict[str, int], chat_template: str | None = None) -> int | None:
        """The id of the special token the template writes right after an assistant message's text
        (ChatML's <|im_end|>, Llama-3's <|eot_id|>, Gemma's <end_of_turn>), found by rendering one
        exchange; None where the template writes none or cannot render it. `special`: text -> id."""
        try:
            text = self.render([{"role": "user", "content": "Hi"}, {"role": "assistant", "content": PROBE}],
                               chat_template=chat_template)
        except ChatTemplateError:
            return None
        if PROBE not in text:
            return None
        after = text[text.rindex(PROBE) + len(PROBE):].lstrip()
        hits = [t for t in special if after.startswith(t)]
        return special[max(hits, key=len)] if hits else None


def from_override(value: str) -> tuple[str, str]:
    """chat_template= / --chat-template: the template text itself, or a file (.jinja, or a .json
    with a "chat_template" key as chat_template.json / tokenizer_config.json hold it)."""
    if "{" in value:   # every template has {{ or {%; a path rarely has a brace
        return value, "the given chat template"
    path = Path(value)
    if not path.is_file():
        raise ChatTemplateError(f"chat template {value!r} is neither a template name, template text nor a file")
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".json":
        try:
            text = _named(json.loads(text)["chat_template"])["default"]
        except (ValueError, KeyError, TypeError):
            raise ChatTemplateError(f"{path}: expected a JSON object with a chat_template string") from None
    return text, str(path)


def render(text: str, messages, add_generation_prompt=False, tools=None, documents=None,
           source: str = "chat template", **kwargs) -> str:
    """One conversation through one template, with the inputs transformers prepares: message keys
    whose value is None dropped, everything copied to plain JSON types, reasoning aliased under
    `reasoning_content` and `thinking`, tools and documents None when absent."""
    if not messages:
        raise ValueError("cannot apply a chat template to an empty conversation")
    if any(not isinstance(m, dict) for m in messages):
        raise ValueError("chat messages must be dicts such as {'role': 'user', 'content': 'Hi'}")
    if tools is not None and any(not isinstance(t, dict) for t in tools):
        raise ValueError("tools must be JSON-schema dicts")
    chat = []
    for m in _plain([{k: v for k, v in m.items() if v is not None} for m in messages]):
        reasoning = next((m[k] for k in REASONING if m.get(k) is not None), None)
        chat.append(m if reasoning is None else {"thinking": reasoning, **m, "reasoning_content": reasoning})
    template = checked(text, source)
    try:
        return template.render(messages=chat, tools=_plain(tools), documents=_plain(documents),
                               add_generation_prompt=add_generation_prompt, **_plain(kwargs))
    except Exception as e:   # raise_exception(...), an undefined name, a type error inside the template
        raise ChatTemplateError(f"{source} failed: {e}") from None
