"""Bad input: one clear line naming the problem, in Python (LoadError) and from the CLI (stderr,
non-zero exit, no traceback)."""
import json
import shutil
import subprocess
import sys

import pytest
import torch
from conftest import run_cli
from safetensors.torch import load_file, save_file

import minillm
from minillm import LoadError
from minillm.errors import UsageError


@pytest.fixture
def llama(checkpoints, tmp_path):
    dst = tmp_path / "llama"
    shutil.copytree(checkpoints["llama-mha"], dst)
    return dst


def rewrite(folder, edit):
    sd = load_file(folder / "model.safetensors")
    edit(sd)
    save_file(sd, folder / "model.safetensors", metadata={"format": "pt"})


def cases(tmp_path, llama):
    """name -> (folder or id, expected message fragment)."""
    out = {"missing folder": (str(tmp_path / "nope" / "x" / "y"), "no such folder")}
    unknown = tmp_path / "unknown"
    shutil.copytree(llama, unknown)
    (unknown / "config.json").write_text(json.dumps({"model_type": "mamba", "architectures": ["MambaForCausalLM"]}))
    out["unknown arch"] = (unknown, "unknown architecture 'mamba'; supported model types: deepseek_v2, deepseek_v3, gpt2, llama")
    corrupt = tmp_path / "corrupt"
    shutil.copytree(llama, corrupt)
    (corrupt / "model.safetensors").write_bytes(b"\x00garbage" * 100)
    out["corrupt"] = (corrupt, "corrupt or truncated safetensors file")
    truncated = tmp_path / "truncated"
    shutil.copytree(llama, truncated)
    data = (truncated / "model.safetensors").read_bytes()
    (truncated / "model.safetensors").write_bytes(data[: len(data) // 2])
    out["truncated"] = (truncated, "corrupt or truncated safetensors file")
    binonly = tmp_path / "binonly"
    shutil.copytree(llama, binonly)
    torch.save(load_file(binonly / "model.safetensors"), binonly / "pytorch_model.bin")
    (binonly / "model.safetensors").unlink()
    out["bin only"] = (binonly, "has only PyTorch pickle weights")
    spm = tmp_path / "spm"
    shutil.copytree(llama, spm)
    (spm / "tokenizer.json").unlink()
    (spm / "tokenizer.model").write_bytes(b"sentencepiece")
    out["sentencepiece only"] = (spm, "only a sentencepiece tokenizer.model")
    noconf = tmp_path / "noconf"
    shutil.copytree(llama, noconf)
    (noconf / "config.json").unlink()
    out["no config"] = (noconf, "no config.json in")
    missing = tmp_path / "missing"
    shutil.copytree(llama, missing)
    rewrite(missing, lambda sd: sd.pop("model.layers.1.self_attn.k_proj.weight"))
    out["missing tensor"] = (missing, "missing tensor 'model.layers.1.self_attn.k_proj.weight': not in model.safetensors")
    missing2 = tmp_path / "missing2"
    shutil.copytree(llama, missing2)
    rewrite(missing2, lambda sd: sd.pop("model.norm.weight"))
    out["missing whole"] = (missing2, "missing tensor 'model.norm.weight': not in model.safetensors")
    extra = tmp_path / "extra"
    shutil.copytree(llama, extra)
    rewrite(extra, lambda sd: sd.update({"model.layers.0.self_attn.extra.weight": torch.zeros(2)}))
    out["unexpected tensor"] = (extra, "unexpected tensor 'model.layers.0.self_attn.extra.weight'")
    shape = tmp_path / "shape"
    shutil.copytree(llama, shape)
    rewrite(shape, lambda sd: sd.update({"model.layers.0.mlp.down_proj.weight": torch.zeros(64, 100)}))
    out["misshaped"] = (shape, "tensor 'model.layers.0.mlp.down_proj.weight' has shape (64, 100), expected (64, 128)")
    return out


def test_each_bad_input_has_a_clear_error(tmp_path, llama):
    for name, (src, fragment) in cases(tmp_path, llama).items():
        with pytest.raises(LoadError) as e:
            minillm.load(src, device="cpu")
        assert fragment in str(e.value), name
        assert "\n" not in str(e.value), name


def test_cli_bad_inputs_exit_nonzero_with_one_line(tmp_path, llama):
    picked = cases(tmp_path, llama)
    for name in ["missing folder", "unknown arch", "truncated", "bin only", "sentencepiece only", "misshaped"]:
        src, fragment = picked[name]
        r = run_cli("generate", "-m", str(src), "hi", "-n", "2")
        assert r.returncode == 1, name   # a file that cannot be loaded: a runtime failure
        assert "Traceback" not in r.stderr and fragment in r.stderr, (name, r.stderr)
        assert len(r.stderr.strip().splitlines()) == 1, (name, r.stderr)


def test_cli_prompt_too_long_is_a_clear_error(llama):
    r = run_cli("generate", "-m", str(llama), "import os " * 200, "-n", "2")
    assert r.returncode == 2 and "exceeds the model's context of 256" in r.stderr
    assert "Traceback" not in r.stderr


def test_bad_dtype_and_backend(llama):
    with pytest.raises(UsageError, match="unknown dtype 'float8'"):
        minillm.load(llama, device="cpu", dtype="float8")
    with pytest.raises(UsageError, match="unknown backend 'cuda'"):
        minillm.load(llama, device="cpu", backend="cuda")


def test_device_this_machine_cannot_use_is_one_line(llama):
    """A device that does not exist here fails before any allocation, in one line (not torch's
    AssertionError from deep inside the first CUDA call)."""
    absent = f"cuda:{torch.cuda.device_count()}" if torch.cuda.is_available() else "cuda"
    for device, msg, code in ((absent, f"device '{absent}' is not available", 1),
                              ("gpu", "unknown device 'gpu'", 2), ("mps", "device 'mps' is not supported", 2)):
        with pytest.raises((LoadError, UsageError), match=msg):
            minillm.load(llama, device=device)
        r = run_cli("generate", "-m", str(llama), "x", "-n", "1", "--device", device)
        lines = r.stderr.strip().splitlines()
        assert r.returncode == code and len(lines) == 1 and lines[0].startswith(f"minillm: error: {msg}")
    # info only reads costs: a GPU's figures can be read on a CPU-only machine
    assert minillm.info(llama, device="cuda")["device"] == "cuda"


def test_out_of_range_sampling_settings_are_errors_not_other_distributions(llama):
    """temperature -1 would invert the distribution and top_p 2 keep everything: refused, in one
    line and before the CLI prints anything. 0 / None switch a processor off, as in transformers."""
    llm = minillm.load(llama, device="cpu")
    bad = {"temperature": -1.0, "top_p": 2.0, "top_k": -5, "min_p": 1.5, "repetition_penalty": 0.0}
    for name, value in bad.items():
        with pytest.raises(ValueError, match=f"{name} must be"):
            llm.generate("def", max_new_tokens=2, **{name: value})
    with pytest.raises(ValueError, match="max_new_tokens must be >= 0"):
        llm.generate("def", max_new_tokens=-1)
    assert llm.generate("def", max_new_tokens=3, temperature=1.0, top_k=0, seed=0).token_ids   # 0: off
    r = run_cli("generate", "-m", str(llama), "def", "--top-p", "2")
    assert r.returncode == 2 and r.stdout == "" and r.stderr.strip() == "minillm: error: top_p must be in (0, 1], got 2.0"


def test_unreadable_tokenizer_json_is_one_line(llama):
    (llama / "tokenizer.json").write_text("{}")
    r = run_cli("generate", "-m", str(llama), "x")
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 1 and len(lines) == 1 and "tokenizer.json cannot be read" in lines[0]


def test_token_ids_outside_the_vocabulary(llama):
    llm = minillm.load(llama, device="cpu")
    V = llm.config.vocab_size
    with pytest.raises(ValueError, match=f"token id {V} is outside the vocabulary"):
        llm.generate([1, V], max_new_tokens=1)
    with pytest.raises(ValueError, match="token id -1 is outside the vocabulary"):
        llm.logits([[3, -1]])
    assert llm.logits([[0, V - 1]]).shape == (1, 2, V)


def test_missing_tensor_names_the_shard_that_should_hold_it(checkpoints, tmp_path):
    """A sharded checkpoint: the index says which shard should have held the missing tensor."""
    src = tmp_path / "sharded"
    shutil.copytree(checkpoints["llama-linear-sharded"], src)
    index = json.loads((src / "model.safetensors.index.json").read_text())["weight_map"]
    name = "model.layers.1.mlp.up_proj.weight"
    rewrite_file = src / index[name]
    sd = load_file(rewrite_file)
    sd.pop(name)
    save_file(sd, rewrite_file, metadata={"format": "pt"})
    with pytest.raises(LoadError) as e:
        minillm.load(src, device="cpu")
    assert str(e.value) == (f"missing tensor {name!r}: model.safetensors.index.json puts it in {index[name]}")


def test_transposed_gpt2_tensor_of_the_wrong_shape(checkpoints, tmp_path):
    """GPT-2's Conv1D weights are transposed on the way in: the error gives the file's shape."""
    src = tmp_path / "gpt2"
    shutil.copytree(checkpoints["gpt2"], src)
    rewrite(src, lambda sd: sd.update({"transformer.h.0.mlp.c_fc.weight": torch.zeros(64, 100)}))
    with pytest.raises(LoadError, match=r"tensor 'transformer\.h\.0\.mlp\.c_fc\.weight' has shape \(64, 100\), "
                                        r"expected one that the adapter turns into \(256, 64\)"):
        minillm.load(src, device="cpu")


def test_exit_codes_one_rule(llama):
    """README's rule: 2 for a bad argument (ours and click's alike), 1 when something fails."""
    for args in (["--temperature", "-1"], ["--top-p", "2"], ["--dtype", "foo"], ["--stop", ""],
                 ["--backend", "cuda"], ["-n", "x"]):
        r = run_cli("generate", "-m", str(llama), "def", *args)
        assert r.returncode == 2 and r.stdout == "", (args, r.stderr)
    r = run_cli("generate", "-m", str(llama) + "-missing", "def")
    assert r.returncode == 1 and r.stderr.startswith("minillm: error: no such folder")


def test_empty_stop_string_is_refused(llama):
    llm = minillm.load(llama, device="cpu")
    with pytest.raises(UsageError, match="empty stop string"):
        llm.generate("def", max_new_tokens=4, stop=["\n", ""])
    r = run_cli("generate", "-m", str(llama), "def", "--stop", "")
    assert r.stderr.strip() == "minillm: error: an empty stop string would stop before the first token"


def test_help_and_version_import_no_torch():
    """Commands import what they need when they run: --help never pays for torch."""
    code = ("import sys\nfrom click.testing import CliRunner\nfrom minillm.cli import main\n"
            "for a in (['--help'], ['--version'], ['generate', '--help']):\n"
            "    assert CliRunner().invoke(main, a).exit_code == 0\n"
            "print('torch' in sys.modules)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0 and r.stdout.strip() == "False", r.stderr


def test_triton_backend_without_triton_says_how_to_get_it(llama):
    """triton is an extra (minillm[gpu]): asking for its backend without it is one line saying so."""
    code = (f"import sys; sys.modules['triton'] = None\nimport minillm\n"
            f"try:\n    minillm.load({str(llama)!r}, device='cpu', backend='triton')\n"
            f"except minillm.LoadError as e:\n    print(e)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.stdout.startswith("backend 'triton' is not available here: triton is not installed"), r.stdout + r.stderr
    assert '.[gpu]' in r.stdout
