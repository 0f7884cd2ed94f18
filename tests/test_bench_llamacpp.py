"""`minillm bench --compare llama.cpp` without llama-cpp-python (CI never builds it): the usage
errors, the file-type labels read from GGUF headers, the pairing of systems for ratios, the whole
run and its report with a stand-in llama.cpp system; and bench's minillm side on the engine path."""
import json
import time
import types

import gguf
import numpy as np
import pytest
import torch
from conftest import run_cli
from gguf import GGMLQuantizationType as Q
from test_gguf import convert, converted_tensors, tiny

import minillm.bench as bench
from minillm.bench import llamacpp
from minillm.bench.systems import Ours, time_generate, time_prefill
from minillm.errors import UsageError


@pytest.fixture(scope="module")
def ggufs(tmp_path_factory):
    """A tiny llama as F32 and as Q8_0 GGUF files (written by test_gguf's converter)."""
    import json
    root = tmp_path_factory.mktemp("bench-gguf")
    src = tiny("llama-gqa-tied-llama3", root / "ckpt")
    hf = json.loads((src / "config.json").read_text())
    q8 = {n: Q.Q8_0 for n, t in converted_tensors(src, "llama", hf) if t.ndim == 2}
    return {"src": src, "F32": convert(src, root / "tiny.F32.gguf", "llama"),
            "Q8_0": convert(src, root / "tiny.Q8_0.gguf", "llama", qtypes=q8)}


def header_only(path, tensors: dict, file_type=None):
    """A GGUF of a few tensors (name -> (ggml type, shape)) and, optionally, general.file_type."""
    w = gguf.GGUFWriter(str(path), "llama")
    if file_type is not None:
        w.add_file_type(file_type)
    for name, (kind, shape) in tensors.items():
        a = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
        if kind == Q.F32:
            w.add_tensor(name, a)
        elif kind == Q.F16:
            w.add_tensor(name, a.astype(np.float16))
        else:
            w.add_tensor(name, gguf.quants.quantize(a, kind), raw_dtype=kind)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def test_file_type_labels(tmp_path, ggufs):
    mixed = {"token_embd.weight": (Q.Q8_0, (64, 64)), "blk.0.attn_q.weight": (Q.Q4_0, (64, 64)),
             "blk.0.attn_k.weight": (Q.Q4_0, (64, 64)), "blk.0.attn_norm.weight": (Q.F32, (64,))}
    # no general.file_type: the type holding most bytes of the 2-D tensors (Q4_0 2 x 2304 > Q8_0 4352)
    assert llamacpp.file_type(header_only(tmp_path / "a.gguf", mixed)) == "Q4_0"
    # general.file_type wins, named as llama.cpp names it (LlamaFileType without MOSTLY_ / ALL_)
    assert llamacpp.file_type(header_only(tmp_path / "b.gguf", mixed, file_type=7)) == "Q8_0"
    assert llamacpp.file_type(header_only(tmp_path / "c.gguf", mixed, file_type=15)) == "Q4_K_M"
    f16 = {"blk.0.attn_q.weight": (Q.F16, (64, 64)), "blk.0.attn_norm.weight": (Q.F32, (64,))}
    assert llamacpp.file_type(header_only(tmp_path / "d.gguf", f16)) == "F16"
    assert llamacpp.file_type(ggufs["F32"]) == "F32" and llamacpp.file_type(ggufs["Q8_0"]) == "Q8_0"
    d = llamacpp.describe(header_only(tmp_path / "e.gguf", mixed))
    assert d["tensor_types"] == {"Q4_0": 2, "Q8_0": 1, "F32": 1} and d["bytes"] == 2 * 2304 + 4352 + 256
    # token_embd is also the head (no output.weight): read whole per token; with a head, by one row
    assert llamacpp.bytes_per_token(tmp_path / "e.gguf", 100) == {"weights": 2 * 2304 + 4352 + 256,
                                                                 "kv_cache": 200, "total": 2 * 2304 + 4352 + 456}
    head = header_only(tmp_path / "f.gguf", {**mixed, "output.weight": (Q.Q8_0, (64, 64))})
    assert llamacpp.bytes_per_token(head, 0)["weights"] == 2 * 2304 + 4352 // 64 + 256 + 4352


def test_systems_pair_by_bits_per_weight(tmp_path):
    S = bench.Spec
    ours = [S("ours fp32", "ours", tmp_path, bits=32), S("ours bf16", "ours", tmp_path, bits=16),
            S("ours int8", "ours", tmp_path, bits=8), S("ours int4", "ours", tmp_path, bits=4)]
    theirs = [S(f"llama.cpp {t}", "llama.cpp", tmp_path, bits=bench._bits_of_file_type(t))
              for t in ("F32", "F16", "Q8_0", "Q4_0", "Q4_1", "Q6_K")]
    assert bench.pairs(ours + theirs) == [
        ("ours fp32", "llama.cpp F32"), ("ours bf16", "llama.cpp F16"), ("ours int8", "llama.cpp Q8_0"),
        ("ours int4", "llama.cpp Q4_0"), ("ours int4", "llama.cpp Q4_1"),
        *[(o.key, "llama.cpp Q6_K") for o in ours]]             # no 6-bit ours: against every one


def test_usage_errors(ggufs, monkeypatch, tmp_path):
    # a checkpoint folder has no GGUF for llama.cpp: --llama-gguf is needed (checked before the import)
    r = run_cli("bench", "-m", str(ggufs["src"]), "--compare", "llama.cpp", "--repeat", "1")
    assert r.returncode == 2 and r.stderr.strip().splitlines() == [
        f"minillm: error: --compare llama.cpp runs GGUF files and {ggufs['src']} is a checkpoint folder: give "
        "--llama-gguf FILE (the same model as GGUF; repeat it for several variants)"]
    r = run_cli("bench", "-m", str(ggufs["src"]), "--llama-gguf", str(tmp_path / "missing.gguf"))
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1 and "missing.gguf: not a .gguf file" in r.stderr
    # llama-cpp-python missing (an import that fails, as where it is not installed): how to get it
    fake = tmp_path / "site" / "llama_cpp"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("raise ImportError('No module named llama_cpp')\n")
    import os
    env = {"PYTHONPATH": f"{fake.parent}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    r = run_cli("bench", "-m", str(ggufs["F32"]), "--compare", "llama.cpp", env=env)
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(lines) == 1, r.stderr
    assert 'CMAKE_ARGS="-DGGML_NATIVE=ON" pip install llama-cpp-python' in lines[0] and "use_extra_bufts" in lines[0]
    monkeypatch.setitem(__import__("sys").modules, "llama_cpp", None)   # in process: the same error
    with pytest.raises(UsageError, match="pip install llama-cpp-python"):
        bench.bench(ggufs["F32"], compare="llama.cpp", repeat=1)
    with pytest.raises(UsageError, match="choose from transformers, llama.cpp"):
        bench.bench(ggufs["F32"], compare="vllm")


class FakeLlamaCpp:
    """Stands in for llamacpp.LlamaCpp: the interface, batch 1 only, a clock of fixed steps."""
    name, batched = "llama.cpp", False
    made = []

    def __init__(self, path, device, n_ctx=None):
        self.path, self.device, self.n_ctx = path, torch.device(device), n_ctx
        FakeLlamaCpp.made.append(self)

    def prefill(self, ids, new):
        assert ids.shape[0] == 1
        time.sleep(0.001)

    def generate(self, ids, new, clock):
        assert ids.shape[0] == 1
        for _ in range(new):
            time.sleep(0.001)
            clock.append(time.perf_counter())


def test_run_and_report_with_llama_cpp_rows(ggufs, monkeypatch):
    monkeypatch.setattr(llamacpp, "require", lambda: types.SimpleNamespace(__version__="0.0-fake"))
    monkeypatch.setitem(bench.SYSTEMS, "llama.cpp", FakeLlamaCpp)
    monkeypatch.setattr(bench, "measure_load", lambda *a, **k: {"load_s": 0.1, "load_again_s": 0.05, "rss_anon_growth": 1 << 20})
    FakeLlamaCpp.made.clear()
    out = bench.bench(ggufs["F32"], device="cpu", prompt_lens=(8, 16), new_tokens=4, batches=(1, 2), repeat=1,
                      threads=1, cold_start=False, quantize="none,int8", llama_gguf=[ggufs["F32"], ggufs["Q8_0"]])
    keys = [s["key"] for s in out["systems"]]
    assert keys == ["ours fp32", "ours int8", "llama.cpp F32", "llama.cpp Q8_0"]
    assert [m.n_ctx for m in FakeLlamaCpp.made] == [16 + 4] * 2
    assert list(out["ratios"]) == ["ours fp32 / llama.cpp F32", "ours int8 / llama.cpp Q8_0"]
    assert "decode_p8_b2_tok_s" in out["ours int8"] and "decode_p8_b2_tok_s" not in out["llama.cpp Q8_0"]
    ours, theirs = out["ours int8"], out["llama.cpp Q8_0"]
    assert out["ratios"]["ours int8 / llama.cpp Q8_0"]["decode_p8_b1_tok_s"] == pytest.approx(
        ours["decode_p8_b1_tok_s"] / theirs["decode_p8_b1_tok_s"])
    assert out["llama_cpp"]["use_extra_bufts"] is False and out["llama_cpp"]["n_threads_batch"] == 1
    json.dumps(out)                                             # --json prints it
    text = bench.report(out)
    head = text.splitlines()[0]
    assert head == ("| measure | ours fp32 | ours int8 | llama.cpp F32 | llama.cpp Q8_0 | "
                    "ours fp32 / llama.cpp F32 | ours int8 / llama.cpp Q8_0 |")
    batch2 = next(line for line in text.splitlines() if line.startswith("| decode throughput tok/s, batch 2"))
    assert batch2.split(" | ")[3:5] == ["-", "-"]               # llama.cpp runs batch 1 only
    assert "1 threads" in text and "use_extra_bufts = False" in text and "repacking is off" in text
    assert "- ours int8: minillm, float32 activations, weights int8 symmetric per output channel" in text
    assert "- ours fp32: minillm, float32 activations, weights float32 (unquantized)" in text
    assert "- llama.cpp Q8_0: llama.cpp, file tiny.Q8_0.gguf, tensors Q8_0 x" in text
    assert "machine: " in text and "n_threads = n_threads_batch = 1" in text


def test_ours_is_timed_on_the_engine(ggufs, monkeypatch):
    """Bench's minillm side runs llm.engine (not the plain loop), one clock reading per step, every
    sequence one token per step, and no prefix-cache hit from one repeat to the next."""
    import minillm.generate
    monkeypatch.setattr(minillm.generate, "run", lambda *a, **k: pytest.fail("the plain loop ran"))
    ours = Ours(ggufs["src"], torch.device("cpu"), torch.float32, "torch")
    ids = torch.randint(3, ours.model.cfg.vocab_size, (3, 200), generator=torch.Generator().manual_seed(0))
    steps = []
    real_step = type(ours.llm.engine).step
    monkeypatch.setattr(type(ours.llm.engine), "step", lambda self: steps.append(1) or real_step(self))
    for _ in range(2):
        steps.clear()
        ttft, decode = time_generate(ours, ids, 5)
        assert ttft > 0 and decode > 0 and len(steps) == 5     # the whole prefill in the first step
        m = ours.llm.engine.metrics()
        assert m["prefix_hit_tokens"] == 0 and m["generated_tokens"] == 15 and m["computed_tokens"] == 3 * 200 + 3 * 4
    assert time_prefill(ours, ids[:1], 5) > 0 and ours.llm.engine.metrics()["prefix_hit_tokens"] == 0
    # the tokens it times are the API's greedy ones (which stop at eos: compare up to there)
    timed = list(ours._run(ids[:1], 5))[-1][0].seq.tokens
    api = ours.llm.generate(ids[0].tolist(), max_new_tokens=5, temperature=0).token_ids
    assert len(timed) == 5 and api and timed[:len(api)] == api


def test_configurations_from_comma_lists(ggufs):
    cpu = torch.device("cpu")
    specs = bench.plan(ggufs["F32"], cpu, ["float32", "bfloat16"], [None, "int8", "int4:g32"], [], (), None)
    assert [(s.key, s.dtype, s.quantize, s.bits) for s in specs] == [
        ("ours fp32", torch.float32, None, 32), ("ours bf16", torch.bfloat16, None, 16),
        ("ours int8", torch.float32, "int8", 8), ("ours int4:g32", torch.float32, "int4:g32", 4)]
    assert [s.key for s in bench.plan(ggufs["F32"], cpu, [None], [None], [], (), None)] == ["ours"]
    with pytest.raises(UsageError, match="add none to --quantize"):
        bench.plan(ggufs["F32"], cpu, ["float32", "bfloat16"], ["int8"], [], (), None)
    r = run_cli("bench", "-m", str(ggufs["F32"]), "--quantize", "none,int9")
    assert r.returncode == 2 and "unknown quantization 'int9'" in r.stderr and len(r.stderr.strip().splitlines()) == 1
