"""The embedded default model: minillm.load() with no argument equals transformers on the same
folder, every CLI command runs on it with no -m, and the examples run on it offline."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import run_cli

import minillm

transformers = pytest.importorskip("transformers")
REPO = Path(__file__).resolve().parent.parent
OFFLINE = {"HF_HUB_OFFLINE": "1"}


@pytest.fixture(scope="module")
def llm():
    return minillm.load(device="cpu")


def test_load_with_no_argument_is_the_shipped_folder(llm):
    assert llm.path == minillm.DEFAULT_MODEL and llm.config.arch == "llama"
    assert llm.dtype == torch.float32   # bf16 on disk, float32 on CPU by default


def test_default_model_equals_transformers_fp32(llm):
    ref = transformers.AutoModelForCausalLM.from_pretrained(minillm.DEFAULT_MODEL, dtype=torch.float32).eval()
    text = "def fibonacci(n):\n    if n < 2:\n        return n\n"
    ids = torch.tensor([llm.tokenizer.encode(text)])
    with torch.no_grad():
        want = ref(ids).logits
    got = llm.logits(ids)
    assert (got - want).abs().max() <= 1e-4 * max(1.0, want.abs().max().item())
    greedy = ref.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=24, do_sample=False,
                          pad_token_id=0)[0, ids.shape[1]:].tolist()
    ours = llm.generate(ids[0].tolist(), max_new_tokens=24, temperature=0).token_ids
    assert ours == greedy[:len(ours)] and len(ours) >= 1


def test_cli_generate_without_model_streams_the_default():
    r = run_cli("generate", "def fibonacci(n):", "-n", "12", "--temperature", "0", env=OFFLINE)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("def fibonacci(n):") and len(r.stdout) > len("def fibonacci(n):")
    assert r.stderr == ""   # nothing but the completion: no warnings, no progress bar for 11 MB
    again = run_cli("generate", "def fibonacci(n):", "-n", "12", "--temperature", "0", env=OFFLINE)
    assert again.stdout == r.stdout   # greedy: the same text twice


def test_cli_info_without_model_reports_its_path():
    r = run_cli("info", "--json", env=OFFLINE)
    assert r.returncode == 0, r.stderr
    d = json.loads(r.stdout)
    assert Path(d["path"]) == minillm.DEFAULT_MODEL and d["params"] == 5_475_584


@pytest.mark.parametrize("script", ["api.py", "verify.py"])
def test_examples_run_offline(script):
    env = {**os.environ, **OFFLINE}
    r = subprocess.run([sys.executable, str(REPO / "examples" / script)], capture_output=True, text=True,
                       env=env, timeout=300)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    if script == "verify.py":
        assert "vs transformers: passed=True" in r.stdout and "bf16 vs saved fp32 reference: passed=True" in r.stdout
    else:
        assert "--- greedy" in r.stdout and "--- streamed" in r.stdout
