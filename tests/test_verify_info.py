"""`minillm verify` (our logits against transformers or saved logits, with a verdict) and
`minillm info` (parameters and KV cache bytes, checked against hand computation and against the
cache the runtime allocates)."""
import json
import shutil
import sys
from types import SimpleNamespace

import pytest
import torch
from click.testing import CliRunner
from conftest import run_cli
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import minillm
from minillm.cli import main
from minillm.info import count_params, parse_size
from minillm.loader import build, to_config
from minillm.verify import DEFAULT_PROMPTS, HALF_THRESHOLDS, VerifyError, read_reference

REPORT_KEYS = {"passed", "max_abs_diff", "kl", "top1_agreement", "greedy_agreement", "prompts",
               "thresholds", "dtype", "reference", "model", "max_abs_ref"}
ROW_KEYS = {"prompt", "tokens", "prompt_tokens", "max_abs_diff", "kl", "top1_agreement", "greedy_match",
            "greedy_divergence", "greedy_near_tie", "ref_top2_gap"}
INFO_KEYS = {"kv_cache_bytes_per_token", "kv_cache_bytes_per_token_expanded", "params", "active_params",
             "path", "dtype", "arch", "weight_bytes", "layers", "heads", "kv_heads", "head_dim",
             "context_length", "rope", "memory"}


def perturb(llm, scale=1.01):
    """One loaded weight scaled: layer 0's fused q/k/v projection."""
    with torch.no_grad():
        llm.model.layers[0].attn.qkv.weight.mul_(scale)
    return llm


# ---------------------------------------------------------------- verify

@pytest.mark.parametrize("name", ["gpt2", "llama-gqa-tied-llama3", "qwen3-yarn-untied"])
def test_verify_passes_in_fp32(name, checkpoints):
    rep = minillm.verify(checkpoints[name], device="cpu")
    assert rep.passed and rep.dtype == "float32" and rep.reference == "transformers"
    assert rep.max_abs_diff <= rep.thresholds["max_abs_diff"] == 1e-4 * max(1.0, rep.max_abs_ref)
    assert rep.top1_agreement == 1.0 and rep.kl < 1e-8 and rep.greedy_agreement == 1.0
    assert len(rep.prompts) == len(DEFAULT_PROMPTS)
    for row in rep.prompts:   # each prompt was continued by the reference for 16 greedy tokens
        assert row["tokens"] - row["prompt_tokens"] == 16 and row["greedy_divergence"] is None


@pytest.fixture(scope="module")
def llama(checkpoints):
    return checkpoints["llama-mha"]


def test_verify_fails_when_one_weight_is_scaled_by_1_01(llama):
    llm = perturb(minillm.load(llama, device="cpu"))
    rep = minillm.verify(llm, prompts=["def fibonacci(n):", "The quick brown fox"], new_tokens=4)
    assert not rep.passed
    assert rep.max_abs_diff > rep.thresholds["max_abs_diff"]
    json.dumps(rep.to_dict())   # the report of a failure is still plain JSON


def test_bf16_thresholds_pass_a_correct_run_and_fail_a_broken_one(checkpoints):
    """Calibrated in minillm/verify.py: a correct bf16 run clears them, layer 0's q/k/v x1.1 does not."""
    path = checkpoints["llama-bf16"]
    rep = minillm.verify(path, device="cpu", dtype="bfloat16")
    assert rep.dtype == "bfloat16" and rep.thresholds == HALF_THRESHOLDS[torch.bfloat16]
    assert rep.passed, rep.to_dict()
    assert rep.kl > 0 and rep.max_abs_diff > 1e-3     # really bf16 against an fp32 reference
    broken = minillm.verify(perturb(minillm.load(path, device="cpu", dtype="bfloat16"), 1.1))
    assert not broken.passed
    assert broken.kl > rep.thresholds["kl"] or broken.top1_agreement < rep.thresholds["top1_agreement"]


def test_saved_reference_round_trips(llama, tmp_path):
    file = tmp_path / "ref.safetensors"
    prompts = ["def fibonacci(n):", "Naïve café 🙂"]
    first = minillm.verify(llama, prompts=prompts, new_tokens=6, device="cpu", save=file)
    with safe_open(file, "pt") as f:
        assert sorted(f.keys()) == ["input_ids.0", "input_ids.1", "logits.0", "logits.1"]
        assert f.metadata()["prompt.1"] == prompts[1]
    refs = read_reference(file)
    llm = minillm.load(llama, device="cpu")
    for ref, row, prompt in zip(refs, first.prompts, prompts):
        assert ref.ids[:ref.prompt_len] == llm.encode(prompt) and len(ref.ids) == row["tokens"]
        assert ref.logits.shape == (len(ref.ids), llm.config.vocab_size)
    again = minillm.verify(llm, reference=file)
    assert again.passed and again.reference == str(file)
    for key in ["max_abs_diff", "kl", "top1_agreement", "greedy_agreement", "max_abs_ref"]:
        assert getattr(again, key) == getattr(first, key)
    assert not minillm.verify(perturb(llm), reference=file).passed


def test_reference_file_without_metadata_checks_logits_only(llama, tmp_path):
    """Logits produced elsewhere: just the tensor pairs, (1, T) / (1, T, V) shapes accepted."""
    from transformers import AutoModelForCausalLM
    ids = torch.tensor([[5, 17, 42, 99, 7, 250]])
    with torch.no_grad():
        logits = AutoModelForCausalLM.from_pretrained(llama, dtype=torch.float32)(ids).logits
    save_file({"input_ids.0": ids, "logits.0": logits}, tmp_path / "ext.safetensors")
    rep = minillm.verify(llama, device="cpu", reference=tmp_path / "ext.safetensors")
    assert rep.passed and rep.greedy_agreement is None and rep.prompts[0]["tokens"] == 6
    save_file({"input_ids.0": ids, "logits.0": logits * 1.01}, tmp_path / "off.safetensors")
    assert not minillm.verify(llama, device="cpu", reference=tmp_path / "off.safetensors").passed


def test_greedy_divergence_at_a_near_tie_counts_as_agreement(llama, tmp_path):
    """The reference picks the runner-up at continuation token 2; a near-tie there is agreement,
    a clear margin is not."""
    llm = minillm.load(llama, device="cpu")
    file = tmp_path / "ref.safetensors"
    minillm.verify(llm, prompts=["def fibonacci(n):"], new_tokens=5, save=file)
    (ref,) = read_reference(file)
    row = ref.prompt_len - 1 + 2                       # the logits that chose continuation token 2
    first, second = ref.logits[row].topk(2).indices.tolist()
    for gap, agrees in [(5e-4, True), (0.5, False)]:
        logits = ref.logits.clone()
        logits[row, second] = logits[row, first] + gap  # the reference now prefers `second`
        ids = torch.tensor(ref.ids[:ref.prompt_len + 2] + [second])
        save_file({"input_ids.0": ids, "logits.0": logits[:len(ids)].contiguous()}, tmp_path / "tie.safetensors",
                  metadata={"prompt_len.0": str(ref.prompt_len)})
        rep = minillm.verify(llm, reference=tmp_path / "tie.safetensors")
        r = rep.prompts[0]
        assert r["greedy_divergence"] == 2 and r["ref_top2_gap"] == pytest.approx(gap, rel=1e-3, abs=1e-6)
        assert r["greedy_near_tie"] is agrees and r["greedy_match"] is agrees
        assert rep.greedy_agreement == (1.0 if agrees else 0.0)


def test_verify_without_transformers_says_how_to_install(llama, monkeypatch):
    monkeypatch.setitem(sys.modules, "transformers", None)   # import transformers -> ImportError
    with pytest.raises(VerifyError, match=r'pip install -e "\.\[test\]"'):
        minillm.verify(llama, device="cpu")


def test_cli_verify_json_and_exit_codes(llama, tmp_path):
    ref = tmp_path / "ref.safetensors"
    r = run_cli("verify", "-m", str(llama), "--device", "cpu", "--prompt", "def f(x):", "--prompt", "import os",
                "--new-tokens", "5", "--save", str(ref), "--json")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert REPORT_KEYS <= set(out) and out["passed"] is True and len(out["prompts"]) == 2
    assert ROW_KEYS <= set(out["prompts"][0]) and isinstance(out["top1_agreement"], float)
    # the model under test perturbed on disk, checked against the saved reference: FAIL, exit 3
    bad = tmp_path / "bad"
    shutil.copytree(llama, bad)
    sd = load_file(bad / "model.safetensors")
    sd["model.layers.0.self_attn.q_proj.weight"] *= 1.01
    save_file(sd, bad / "model.safetensors", metadata={"format": "pt"})
    r = run_cli("verify", "-m", str(bad), "--device", "cpu", "--reference", str(ref), "--json")
    assert r.returncode == 3, r.stderr
    out = json.loads(r.stdout)
    assert out["passed"] is False and out["max_abs_diff"] > out["thresholds"]["max_abs_diff"]


def test_cli_verify_errors_in_one_line(llama, tmp_path):
    """Exit 1 when verify cannot run, 2 for a bad argument: neither reads as the FAIL verdict (3)."""
    runner = CliRunner()
    missing = str(tmp_path / "x.safetensors")
    for args, msg, code in [(["-m", str(tmp_path / "nope")], "no such folder", 1),
                            (["-m", str(llama), "--reference", missing], "no such reference file", 1),
                            (["-m", str(llama), "--prompts", missing], "No such file", 1),
                            (["-m", str(llama), "--tol", "-1"], "tol must be > 0", 2),
                            (["-m", str(llama), "--new-tokens", "-2"], "new_tokens must be >= 0", 2)]:
        r = runner.invoke(main, ["verify", "--device", "cpu", *args])
        assert r.exit_code == code and msg in r.output and "Traceback" not in r.output, (args, r.output)


# ---------------------------------------------------------------- info

def llama_params(V, C, L, H, Hkv, D, inter, tied, qk_norm=False):
    attn = C * (H + 2 * Hkv) * D + H * D * C + (2 * D if qk_norm else 0)
    mlp = 3 * C * inter
    return V * C * (1 if tied else 2) + L * (attn + mlp + 2 * C) + C


@pytest.mark.parametrize("name,dtype,size", [("llama-mha", None, 4), ("qwen3", "bfloat16", 2),
                                             ("llama-linear-sharded", "float16", 2)])
def test_info_matches_hand_computation_and_the_allocated_cache(name, dtype, size, checkpoints):
    d = minillm.info(checkpoints[name], dtype=dtype, device="cpu")
    hf = json.loads((checkpoints[name] / "config.json").read_text())
    L, H, Hkv = hf["num_hidden_layers"], hf["num_attention_heads"], hf["num_key_value_heads"]
    D = hf.get("head_dim") or hf["hidden_size"] // H
    tied = hf["tie_word_embeddings"]
    params = llama_params(hf["vocab_size"], hf["hidden_size"], L, H, Hkv, D, hf["intermediate_size"], tied,
                          qk_norm=name == "qwen3")
    assert d["params"] == d["active_params"] == params
    assert d["weight_bytes"] == params * size and d["dtype"] == (dtype or "float32")
    assert d["kv_cache_bytes_per_token"] == 2 * L * Hkv * D * size       # K and V, per layer and kv head
    assert (d["kv_heads"], d["head_dim"], d["path"]) == (Hkv, D, str(checkpoints[name]))
    assert d["kv_cache_bytes_per_token_expanded"] is None
    # the same figure from the cache generation really allocates
    llm = minillm.load(checkpoints[name], device="cpu", dtype=dtype)
    assert llm.model.new_cache(1, 13).nbytes == 13 * d["kv_cache_bytes_per_token"]
    assert d["checkpoint"]["bytes"] == sum(f.stat().st_size for f in checkpoints[name].glob("*.safetensors")) \
        - sum(_header_len(f) for f in checkpoints[name].glob("*.safetensors"))


def _header_len(file):
    with open(file, "rb") as f:
        return 8 + int.from_bytes(f.read(8), "little")


def test_info_gpt2_and_rope_details(checkpoints):
    g = minillm.info(checkpoints["gpt2"], device="cpu")
    C, V, L, P, inter = 64, 320, 2, 256, 256          # GPT-2's MLP is 4 x n_embd
    block = 4 * C + (3 * C * C + 3 * C) + (C * C + C) + (C * inter + inter) + (inter * C + C)
    assert g["params"] == V * C + P * C + L * block + 2 * C and g["rope"] is None
    q = minillm.info(checkpoints["qwen3-yarn-untied"], device="cpu")
    assert q["rope"]["kind"] == "yarn" and q["rope"]["scaling"]["factor"] == 4.0 and q["rope"]["theta"] == 1e6


def test_info_mla_and_moe_deepseek(tmp_path):
    """Config only (no weights): the latent cache measured, the expanded per-head figure, and MoE
    active parameters, against hand computation and a real allocation."""
    from transformers import DeepseekV2Config
    C, L, H, R, Dn, Dr, Dv, E, k, I = 64, 3, 4, 16, 16, 8, 12, 8, 2, 32
    DeepseekV2Config(vocab_size=320, hidden_size=C, intermediate_size=96, moe_intermediate_size=I,
                     num_hidden_layers=L, num_attention_heads=H, num_key_value_heads=H, kv_lora_rank=R,
                     q_lora_rank=None, qk_nope_head_dim=Dn, qk_rope_head_dim=Dr, v_head_dim=Dv,
                     n_routed_experts=E, num_experts_per_tok=k, n_shared_experts=2, first_k_dense_replace=1,
                     max_position_embeddings=256).save_pretrained(tmp_path)
    d = minillm.info(tmp_path, device="cpu", memory="1MiB")
    assert d["kv_cache_bytes_per_token"] == L * (R + Dr) * 4                # one latent + one rope key
    assert d["kv_cache_bytes_per_token_expanded"] == L * H * (Dn + Dr + Dv) * 4
    assert d["kv_cache_ratio"] == pytest.approx((H * (Dn + Dr + Dv)) / (R + Dr))
    cfg, _ = to_config(json.loads((tmp_path / "config.json").read_text()))
    real = build(cfg, torch.device("cpu"), torch.float32).new_cache(1, 9)   # allocated for real
    assert real.nbytes == 9 * d["kv_cache_bytes_per_token"]
    routed = (L - 1) * E * 3 * C * I                                       # 2 MoE layers, E experts each
    assert d["params"] - d["active_params"] == routed // E * (E - k)
    from transformers import AutoModelForCausalLM
    hf_model = AutoModelForCausalLM.from_config(DeepseekV2Config.from_pretrained(tmp_path))
    assert d["params"] == hf_model.num_parameters()
    assert d["checkpoint"] is None and d["moe"]["routed_experts"] == E
    assert d["memory"]["cache_tokens"] == (2**20 - d["weight_bytes"]) // d["kv_cache_bytes_per_token"]


def test_active_params_generic_over_expert_layouts():
    """Routed experts as one module per expert (`mlp.experts.3.w`) count the same as stacked ones;
    shared experts and the router always run."""
    class M(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.experts = torch.nn.ModuleList(torch.nn.Linear(4, 4, bias=False) for _ in range(8))
            self.shared_experts = torch.nn.Linear(4, 4, bias=False)
            self.router = torch.nn.Linear(4, 8, bias=False)
    cfg = SimpleNamespace(n_routed_experts=8, num_experts_per_tok=2)
    assert count_params(M(), cfg) == (8 * 16 + 16 + 32, 2 * 16 + 16 + 32)


def test_info_memory_fit(llama):
    d = minillm.info(llama, device="cpu")
    w, kv = d["weight_bytes"], d["kv_cache_bytes_per_token"]
    m = minillm.info(llama, device="cpu", memory=w + 100 * kv + 5)["memory"]
    assert (m["cache_tokens"], m["max_context"], m["max_batch_at_full_context"]) == (100, 100, 0)
    m = minillm.info(llama, device="cpu", memory=w + 3 * 256 * kv)["memory"]
    assert (m["max_context"], m["max_batch_at_full_context"]) == (256, 3)
    assert {"batch": 4, "context": 192} in m["batch_x_context"] and m["activations_counted"] is False
    assert not minillm.info(llama, device="cpu", memory=w - 1)["memory"]["fits_weights"]
    assert parse_size("24GiB") == 24 * 2**30 and parse_size("1.5GB") == 1.5e9 and parse_size("2G") == 2**31
    with pytest.raises(ValueError, match="cannot read memory size"):
        parse_size("lots")


def test_info_hub_id_reads_headers_without_downloading_weights(checkpoints, tmp_path, monkeypatch):
    import huggingface_hub
    from huggingface_hub.utils._safetensors import SafetensorsFileMetadata, SafetensorsRepoMetadata, TensorInfo
    src = checkpoints["llama-linear-sharded"]
    snap = tmp_path / "snapshot"
    snap.mkdir()
    shutil.copy(src / "config.json", snap / "config.json")
    files = {}
    for f in sorted(src.glob("*.safetensors")):                       # the headers the hub would serve
        with open(f, "rb") as fh:
            header = json.loads(fh.read(int.from_bytes(fh.read(8), "little")))
        meta = header.pop("__metadata__", {})
        files[f.name] = SafetensorsFileMetadata(metadata=meta, tensors={
            n: TensorInfo(dtype=h["dtype"], shape=h["shape"], data_offsets=tuple(h["data_offsets"]))
            for n, h in header.items()})
    calls = []

    def download(repo_id, filename, **kw):
        calls.append((repo_id, filename))
        return str(snap / filename)

    def metadata(repo_id, **kw):
        calls.append((repo_id, "headers"))
        return SafetensorsRepoMetadata(metadata=None, sharded=True, files_metadata=files,
                                       weight_map={t: n for n, fm in files.items() for t in fm.tensors})
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", download)
    monkeypatch.setattr(huggingface_hub, "get_safetensors_metadata", metadata)
    remote = minillm.info("tiny-org/remote-llama", device="cpu")
    local = minillm.info(src, device="cpu")
    assert calls == [("tiny-org/remote-llama", "config.json"), ("tiny-org/remote-llama", "headers")]
    assert remote["path"] == str(snap) and "headers" in remote["source"]
    assert remote["checkpoint"] == local["checkpoint"] and remote["checkpoint"]["tensors"] > 0
    for key in ["params", "kv_cache_bytes_per_token", "weight_bytes"]:
        assert remote[key] == local[key]
    # weights already in the hub cache: their own headers, no network call for them
    calls.clear()
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", lambda repo_id, filename, **kw: str(src / filename))
    cached = minillm.info("tiny-org/remote-llama", device="cpu")
    assert calls == [] and cached["source"] == "hub cache" and cached["checkpoint"] == local["checkpoint"]
    # neither a folder nor in the cache, offline: one clear error
    from huggingface_hub.errors import LocalEntryNotFoundError

    def offline(repo_id, filename, **kw):
        raise LocalEntryNotFoundError("offline")
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", offline)
    with pytest.raises(minillm.LoadError, match="'tiny-org/remote-llama' is not a local folder and not in the"):
        minillm.info("tiny-org/remote-llama", device="cpu")


def test_cli_info_json_and_text(checkpoints):
    path = checkpoints["qwen3"]
    r = run_cli("info", "-m", str(path), "--device", "cpu", "--json")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert INFO_KEYS <= set(out) and out == minillm.info(path, device="cpu")
    text = CliRunner().invoke(main, ["info", "-m", str(path), "--device", "cpu", "--memory", "1MiB"])
    assert text.exit_code == 0 and "activations not counted" in text.output
    assert "tied embeddings counted once" in text.output
    bad = CliRunner().invoke(main, ["info", "-m", str(path), "--memory", "lots"])
    assert bad.exit_code == 2 and "cannot read memory size 'lots'" in bad.output
