"""llama.cpp as a bench system, through llama-cpp-python (`--compare llama.cpp`), on GGUF files.

It gets what the others get: the same token ids, `--threads` for both its decode and batch
(prefill) threads, greedy, exactly N new tokens (its low-level `generate` never stops at eos),
the clock split at the first new token's arrival. Batch 1 only: the high-level Llama runs one
sequence.

Extra buffer types are turned off (`use_extra_bufts = False`): llama.cpp's AMX buffers segfault
on quantized types in these VMs, and a GGML_NATIVE build compiles them in wherever the CPU flags
say AMX. This also turns its weight repacking (the CPU_REPACK buffers) off. llama-cpp-python
0.3.36 has no constructor argument for it, so the model params its constructor asks for come
from a wrapped `llama_model_default_params`.
"""
from __future__ import annotations

import re
import time
from collections import Counter
from pathlib import Path

import torch

from ..errors import UsageError

INSTALL = ('--compare llama.cpp needs llama-cpp-python: CMAKE_ARGS="-DGGML_NATIVE=ON" pip install '
           'llama-cpp-python (builds llama.cpp, a few minutes); the bench runs it with use_extra_bufts = False '
           '(its AMX buffers crash on quantized types in some VMs)')
NOTE = ("llama.cpp runs with extra buffer types off (use_extra_bufts = False: its AMX buffers crash on "
        "quantized types in these VMs), so its weight repacking is off too")


def require():
    """-> the llama_cpp module with extra buffer types off, or a one-line UsageError."""
    try:
        import llama_cpp
        import llama_cpp.llama_cpp as C
    except ImportError:
        raise UsageError(INSTALL) from None
    if not getattr(C.llama_model_default_params, "no_extra_bufts", False):
        default = C.llama_model_default_params

        def params():
            p = default()
            p.use_extra_bufts = False
            return p
        params.no_extra_bufts = True
        C.llama_model_default_params = params   # Llama.__init__ looks the name up in C at call time
    return llama_cpp


def file_type(path) -> str:
    """The GGUF's file type as llama.cpp names it (general.file_type: F32, F16, Q8_0, Q4_K_M ...);
    without that key, the type holding most bytes of the 2-D tensors."""
    import gguf

    from ..gguf_file import GGUFFile
    f = GGUFFile(path)
    ft = f.meta.get("general.file_type")
    if ft in gguf.LlamaFileType._value2member_map_:
        return re.sub(r"^(ALL|MOSTLY)_", "", gguf.LlamaFileType(ft).name)
    by = Counter()
    for name, shape in f.shapes.items():
        if len(shape) >= 2:
            by[f.type_name(name)] += f.tensors[name][1]
    if not by:
        raise UsageError(f"{path}: no 2-D tensors, so no file type to label it by")
    return by.most_common(1)[0][0]


def describe(path) -> dict:
    """What the report header says of a GGUF: its file type and the tensor types in it."""
    from ..gguf_file import GGUFFile
    f = GGUFFile(path)
    types = Counter(f.type_name(n) for n in f.types)
    return {"file": str(path), "file_type": file_type(path), "tensor_types": dict(types.most_common()),
            "bytes": sum(n for _, n in f.tensors.values())}


def bytes_per_token(path, kv_elements: int) -> dict:
    """What one decode step reads: every tensor but token_embd (one row of it) unless it is also
    the head (no output.weight), and an F16 KV cache (llama.cpp's default type_k / type_v)."""
    from ..gguf_file import GGUFFile
    f = GGUFFile(path)
    weights = 0
    for name, (_, nbytes) in f.tensors.items():
        if name == "token_embd.weight" and "output.weight" in f.tensors:
            nbytes //= f.shapes[name][0]
        weights += nbytes
    return {"weights": weights, "kv_cache": 2 * kv_elements, "total": weights + 2 * kv_elements}


class LlamaCpp:
    name = "llama.cpp"
    batched = False                         # one sequence per Llama: batch-1 rows only

    def __init__(self, path, device, dtype=None, backend=None, quantize=None, n_ctx: int = 1024):
        if torch.device(device).type != "cpu":
            raise UsageError("--compare llama.cpp runs on CPU here: use --device cpu")
        llama_cpp = require()
        path = Path(path)
        if path.suffix != ".gguf" or not path.is_file():
            raise UsageError(f"{path}: llama.cpp needs a .gguf file")
        self.device, self.path, self.threads = torch.device("cpu"), path, torch.get_num_threads()
        n_ctx = max(int(n_ctx), 64)
        # n_batch = n_ubatch = the context: a prompt's prefill is one decode call, as ours is one forward
        self.llm = llama_cpp.Llama(model_path=str(path), n_ctx=n_ctx, n_batch=n_ctx, n_ubatch=n_ctx,
                                   n_threads=self.threads, n_threads_batch=self.threads, n_gpu_layers=0,
                                   logits_all=False, verbose=False)
        assert self.llm.model_params.use_extra_bufts is False, "the extra buffer types are still on"

    def _one(self, ids: torch.Tensor) -> list[int]:
        if ids.shape[0] != 1:
            raise ValueError("llama.cpp runs batch 1 only here")
        self.llm.reset()                    # n_tokens = 0: no KV prefix reused from the last run
        return ids[0].tolist()

    def prefill(self, ids: torch.Tensor, new: int):
        """The prompt in one decode call, logits for its last position only."""
        self.llm.eval(self._one(ids))

    def generate(self, ids: torch.Tensor, new: int, clock: list):
        """Greedy (top_k 1, temperature 0), exactly `new` tokens: its generator does not stop at eos."""
        n = 0
        for _ in self.llm.generate(self._one(ids), top_k=1, top_p=1.0, min_p=0.0, temp=0.0,
                                   repeat_penalty=1.0, reset=True):
            clock.append(time.perf_counter())
            n += 1
            if n == new:
                break


COLD_SCRIPT = """
import sys
from minillm.bench.llamacpp import require
path, threads, prompt = sys.argv[1], int(sys.argv[2]), sys.argv[3]
llama_cpp = require()
llm = llama_cpp.Llama(model_path=path, n_ctx=256, n_threads=threads, n_threads_batch=threads, verbose=False)
ids = llm.tokenize(prompt.encode())
tok = next(iter(llm.generate(ids, top_k=1, temp=0.0)))
print(llm.detokenize(ids + [tok]).decode(errors="replace"))
"""
