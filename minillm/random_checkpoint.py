"""Random-weight checkpoints in Hugging Face layout (config.json, safetensors, tokenizer.json),
built with transformers from a fixed seed: the test suite's tiny models and `bench --random`'s
shapes come from here, so nothing is ever downloaded to test or measure."""
from __future__ import annotations

import json
from pathlib import Path

import torch

SPECIALS = ["<|endoftext|>", "<s>", "</s>"]   # ids 0, 1, 2 in every tokenizer built here


def build_tokenizer(folder: Path, text: str | list[str], vocab_size: int, add_bos: bool | None = None,
                    model_max_length: int | None = None) -> int:
    """A byte-level BPE trained on `text`, saved as transformers saves one; -> its vocab size."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIALS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([text] if isinstance(text, str) else text, trainer)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tok.save(str(folder / "tokenizer.json"))
    conf = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>", "eos_token": "</s>"}
    if model_max_length is not None:
        conf["model_max_length"] = model_max_length
    if add_bos is not None:
        conf["add_bos_token"] = add_bos
    (folder / "tokenizer_config.json").write_text(json.dumps(conf))
    return tok.get_vocab_size()


def save_random_model(folder: Path, config, seed: int, dtype: torch.dtype | None = None, **save_kwargs):
    """transformers' own random init of `config` (a PretrainedConfig) at `seed`, saved quietly
    (no "Writing model shards" bar) with a generation_config of the config's bos/eos."""
    from transformers import AutoModelForCausalLM, GenerationConfig
    from transformers.utils import logging
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    if dtype is not None:
        model = model.to(dtype)
    model.generation_config = GenerationConfig(bos_token_id=config.bos_token_id,
                                               eos_token_id=config.eos_token_id)
    bar = logging.is_progress_bar_enabled()
    logging.disable_progress_bar()
    try:
        model.save_pretrained(folder, **save_kwargs)
    finally:
        if bar:
            logging.enable_progress_bar()
