"""Hub ids resolved offline from a huggingface_hub cache layout, and the CLI end to end. Each runs
in a subprocess: huggingface_hub reads HF_HUB_OFFLINE and the cache location at import."""
import subprocess
import sys

import pytest
from conftest import hub_cache_layout, run_cli

import minillm


@pytest.fixture(scope="module")
def hub(checkpoints, tmp_path_factory):
    cache = tmp_path_factory.mktemp("hf") / "hub"
    hub_cache_layout(checkpoints["qwen3"], cache, "tiny-org/tiny-qwen3")
    hub_cache_layout(checkpoints["llama-linear-sharded"], cache, "tiny-org/tiny-llama-sharded")
    return {"HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(cache), "HF_HOME": str(cache.parent)}


@pytest.mark.parametrize("repo,name", [("tiny-org/tiny-qwen3", "qwen3"),
                                       ("tiny-org/tiny-llama-sharded", "llama-linear-sharded")])
def test_hub_id_offline_from_cache(hub, checkpoints, repo, name):
    code = (f"import minillm; llm = minillm.load({repo!r}, device='cpu'); "
            "print(llm.generate('def fibonacci(n):', max_new_tokens=10, temperature=0).token_ids); "
            "print(llm.path)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env={**__import__("os").environ, **hub})
    assert r.returncode == 0, r.stderr
    ids_line, path_line = r.stdout.strip().splitlines()[-2:]
    expected = minillm.load(checkpoints[name], device="cpu").generate(
        "def fibonacci(n):", max_new_tokens=10, temperature=0).token_ids
    assert ids_line == str(expected)
    assert "models--tiny-org" in path_line


def test_uncached_id_offline_is_a_clear_error(hub):
    r = run_cli("generate", "-m", "tiny-org/not-downloaded", "hi", env=hub)
    assert r.returncode != 0 and "Traceback" not in r.stderr
    assert "'tiny-org/not-downloaded' is not a local folder and not in the Hugging Face cache" in r.stderr
    assert "HF_HUB_OFFLINE is set" in r.stderr


def test_cli_generate_streams_the_greedy_completion(checkpoints):
    path = checkpoints["llama-gqa-tied-llama3"]
    expected = minillm.load(path, device="cpu").generate("def fibonacci(n):", max_new_tokens=16, temperature=0)
    r = run_cli("generate", "-m", str(path), "def fibonacci(n):", "--max-new-tokens", "16", "--temperature", "0")
    assert r.returncode == 0, r.stderr
    assert r.stdout == "def fibonacci(n):" + expected.text + "\n"


def test_console_script_installed(checkpoints):
    r = subprocess.run(["minillm", "generate", "--help"], capture_output=True, text=True)
    assert r.returncode == 0 and "--max-new-tokens" in r.stdout and "-m, --model" in r.stdout
