"""The errors minillm raises for bad input, importable without torch (the CLI catches them before
anything heavy is loaded)."""


class LoadError(Exception):
    """A model that cannot be found or loaded; the message says which file or tensor and why."""


class TokenizerError(Exception):
    """A tokenizer file that cannot be read."""


class UsageError(ValueError):
    """A bad argument: a value out of range, an unknown name, options that do not go together.
    The CLI exits 2 on it (as click's own usage errors do); on other failures it exits 1."""
