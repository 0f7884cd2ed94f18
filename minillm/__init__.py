"""minillm: a small, readable LLM inference runtime.

    import minillm
    llm = minillm.load("Qwen/Qwen3-0.6B")
    print(llm.generate("def fibonacci(n):", max_new_tokens=32).text)

Names are imported when first used, so `import minillm` (and `minillm --help`) costs no torch.
"""
import importlib
import sys
import types

__version__ = "0.1.0"
_WHERE = {"load": "api", "LLM": "api", "GenerationResult": "api", "ChatSession": "api",
          "ChatTemplate": "chat", "ChatTemplateError": "chat", "Config": "config",
          "RunSettings": "config", "DEFAULT_MODEL": "locate", "LoadError": "errors",
          "verify": "verify", "VerifyReport": "verify", "info": "info"}
__all__ = list(_WHERE)


def __getattr__(name):
    if name in _WHERE:
        value = getattr(importlib.import_module(f".{_WHERE[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'minillm' has no attribute {name!r}")


class _Package(types.ModuleType):
    def __setattr__(self, name, value):
        # importing the submodule minillm.verify (or .info) sets the package's attribute of that
        # name to the module; keep the function `minillm.verify` once it has been looked up
        if isinstance(value, types.ModuleType) and name in ("verify", "info"):
            value = getattr(value, name)
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package
