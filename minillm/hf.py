"""transformers as the reference (verify, bench --compare): imported only when asked for, loaded
quietly, and the one version quirk both callers need."""
from __future__ import annotations

import inspect

import torch

from .locate import LoadError

INSTALL = 'pip install transformers (in a minillm checkout: pip install -e ".[test]")'


def require(what: str):
    """-> the transformers module, or a LoadError saying `what` needs it and how to get it."""
    try:
        import transformers
    except ImportError:
        raise LoadError(f"{what} needs the transformers package: {INSTALL}") from None
    return transformers


def load_reference(path, dtype=torch.float32, device="cpu", what: str = "the reference",
                   progress: bool = False, **kwargs):
    """AutoModelForCausalLM from the same folder, eval mode, its warnings and (unless `progress`)
    its loading bar silenced. kwargs go to from_pretrained (gguf_file=)."""
    transformers = require(what)
    from transformers.utils import logging
    logging.set_verbosity_error()
    bar = logging.is_progress_bar_enabled()
    if not progress:
        logging.disable_progress_bar()
    try:
        return transformers.AutoModelForCausalLM.from_pretrained(path, dtype=dtype, **kwargs).to(device).eval()
    finally:
        if bar:
            logging.enable_progress_bar()


def cache_kwarg(model) -> str:
    """transformers 5.24 renamed the KV cache argument and output field `past_key_values` -> `cache`
    (the old name still works, with a warning); use whichever this version's forward takes."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
