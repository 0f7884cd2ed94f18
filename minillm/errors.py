"""The errors minillm raises for bad input, importable without torch (the CLI catches them before
anything heavy is loaded)."""


class LoadError(Exception):
    """A model that cannot be found or loaded; the message says which file or tensor and why."""


class TokenizerError(Exception):
    """A tokenizer file that cannot be read."""
