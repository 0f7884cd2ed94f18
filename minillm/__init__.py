"""minillm: a small, readable LLM inference runtime.

    import minillm
    llm = minillm.load("Qwen/Qwen3-0.6B")
    print(llm.generate("def fibonacci(n):", max_new_tokens=32).text)
"""
from .api import DEFAULT_MODEL, LLM, ChatSession, GenerationResult, load
from .chat import ChatTemplate, ChatTemplateError
from .config import Config
from .info import info
from .loader import LoadError
from .verify import VerifyReport, verify

__version__ = "0.1.0"
__all__ = ["load", "LLM", "GenerationResult", "Config", "LoadError", "DEFAULT_MODEL", "ChatSession", "ChatTemplate",
           "ChatTemplateError", "verify", "VerifyReport", "info"]
