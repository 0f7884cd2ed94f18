"""`minillm bench` end to end on a tiny random shape (no timing asserted, only that every documented
measure is there, positive and consistent), and the CPU plans the loader picks from."""
import json

import pytest
import torch
from conftest import file_view_of, run_cli

import minillm
from minillm import archs, bench, cpu
from minillm.bench.table import higher_is_better
from minillm.errors import UsageError

RUN = ["bench", "--random", "tiny", "--prompt-len", "8,16", "--new-tokens", "4", "--batch", "1,2",
       "--repeat", "1", "--threads", "1", "--json"]
MEASURES = ["load_s", "load_again_s", "load_rss_anon_growth_bytes", "load_rss_anon_growth_x_weights", "cold_start_s",
            "prefill_p8_tok_s", "prefill_p16_tok_s", "ttft_p8_s", "ttft_p16_s", "decode_p8_b1_tok_s",
            "decode_p16_b1_tok_s", "decode_p8_b2_tok_s", "roof_fraction"]


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    return {"MINILLM_CACHE": str(tmp_path_factory.mktemp("minillm-cache"))}


@pytest.fixture(scope="module")
def ours_only(env):
    r = run_cli(*RUN, env=env)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def test_bench_reports_every_measure(ours_only, env):
    out = ours_only
    assert out["model"].startswith(env["MINILLM_CACHE"])         # built offline, in the cache
    assert (out["arch"], out["dtype"], out["device"], out["threads"]) == ("llama", "float32", "cpu", 1)
    assert out["cpu_plan"] in cpu.PLANS and "transformers" not in out and "ratios" not in out
    assert sorted(out["ours"]) == sorted(MEASURES)
    # memory growth of a 0.5 MB model is allocator noise (freed pages get reused): >= 0, tested below
    rss = {"load_rss_anon_growth_bytes", "load_rss_anon_growth_x_weights"}
    assert all(isinstance(v, float | int) and (v >= 0 if k in rss else v > 0)
               for k, v in out["ours"].items()), out["ours"]
    roof = out["roof"]
    assert roof["bytes_per_token"]["total"] == roof["bytes_per_token"]["weights"] + roof["bytes_per_token"]["kv_cache"]
    assert roof["tok_s"] == pytest.approx(max(roof["read_bandwidth_bytes_s"].values()) / roof["bytes_per_token"]["total"])
    assert out["ours"]["roof_fraction"] == pytest.approx(out["ours"]["decode_p8_b1_tok_s"] / roof["tok_s"])
    assert out["ours"]["load_rss_anon_growth_x_weights"] == pytest.approx(
        out["ours"]["load_rss_anon_growth_bytes"] / out["weights_bytes"])


def test_peak_rss_anon_sees_an_allocation():
    """The instrument behind the loading-memory figure: 64 MiB written inside the window show."""
    if not bench.rss_anon():
        pytest.skip("no /proc/self/status RssAnon on this OS")
    with bench.PeakRssAnon() as mem:
        t = torch.ones(64 << 20, dtype=torch.uint8)
    assert 60 << 20 <= mem.growth <= 80 << 20 and t[-1] == 1


def test_bench_compare_transformers_gives_ratios(env, ours_only):
    r = run_cli(*RUN, "--compare", "transformers", "--no-cold-start", env=env)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    ours, theirs = out["ours"], out["transformers"]
    assert sorted(theirs) == sorted(ours) == sorted(m for m in MEASURES if m != "cold_start_s")
    assert list(out["ratios"]) == ["ours / transformers"] and sorted(out["ratios"]["ours / transformers"]) == sorted(ours)
    for k, ratio in out["ratios"]["ours / transformers"].items():   # > 1 means ours wins: rates ours/theirs, else theirs/ours
        expected = ours[k] / theirs[k] if higher_is_better(k) else theirs[k] / ours[k]
        assert ratio == pytest.approx(expected) and ratio > 0


def test_bench_errors_are_one_line(env):
    r = run_cli("bench", "--random", "llama-7t", env=env)
    assert r.returncode == 2 and r.stderr.strip().splitlines() == [
        "minillm: error: unknown shape 'llama-7t' (choose from tiny, llama-125m, deepseek-moe)"]
    r = run_cli("bench", "--random", "tiny", "-m", "some/model", env=env)
    assert r.returncode == 2 and "not both" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    r = run_cli("bench", "--random", "tiny", "--prompt-len", "8,x", env=env)
    assert r.returncode == 2 and "positive integers" in r.stderr


@pytest.mark.parametrize("shape", list(bench.SHAPES))
def test_shapes_map_onto_the_core(shape):
    hf = {**bench.COMMON, **bench.SHAPES[shape]}
    cfg = archs.pick(hf).to_config(hf)
    assert (cfg.vocab_size, cfg.hidden_size, cfg.num_layers) == (hf["vocab_size"], hf["hidden_size"],
                                                                 hf["num_hidden_layers"])
    if shape == "llama-125m":
        assert (cfg.num_heads, cfg.num_kv_heads, cfg.intermediate_size) == (12, 4, 2048)
    if shape == "deepseek-moe":   # the small MoE/MLA shape really is MoE and MLA
        assert cfg.attention == "mla" and cfg.moe_layers == [1, 2, 3] and cfg.n_routed_experts == 16


def test_ratio_orientation():
    r = bench.ratios({"load_s": 1.0, "decode_p8_b1_tok_s": 30.0, "load_rss_anon_growth_bytes": 50},
                     {"load_s": 2.0, "decode_p8_b1_tok_s": 10.0, "load_rss_anon_growth_bytes": 100})
    assert r == {"load_s": 2.0, "decode_p8_b1_tok_s": 3.0, "load_rss_anon_growth_bytes": 2.0}


@pytest.mark.parametrize("plan", list(cpu.PLANS))
def test_every_cpu_plan_gives_the_same_logits(plan, checkpoints):
    """Layouts and libraries change speed only: logits within fp32 rounding of the default plan,
    tied heads stay tied, names and shapes stay put."""
    if cpu.PLANS[plan][1] and not cpu.onednn_works(torch.float32):
        pytest.skip("this torch has no oneDNN")
    if cpu.PLANS[plan][2] and not cpu.loops_work(torch.float32):
        pytest.skip(f"the CPU loops cannot be built here: {cpu.cpu_gemv.why_not()}")
    llm = minillm.load(checkpoints["llama-gqa-tied-llama3"], device="cpu")
    ids = torch.randint(3, 300, (2, 19), generator=torch.Generator().manual_seed(0))
    llm.model.set_cpu_plan("blas")
    ref = llm.logits(ids)
    layout, rows, loop_rows = cpu.PLANS[plan]
    llm.model.set_cpu_plan(plan, onednn_min_bytes=0)   # oneDNN even on tiny weights
    assert llm.model.run.cpu_plan == plan
    qkv = llm.model.layers[0].attn.qkv
    assert qkv.weight.shape == (128, 64) and qkv.onednn_rows == rows and qkv.loop_rows == loop_rows
    assert (qkv.weight.stride() == (1, 128)) == (layout == "in_out")
    assert llm.model.head.weight is llm.model.embed.weight
    assert (llm.logits(ids) - ref).abs().max() <= 1e-5 * max(1.0, ref.abs().max().item())
    got = llm.generate("def fibonacci(n):", max_new_tokens=8, temperature=0).token_ids
    llm.model.set_cpu_plan("blas")
    assert got == llm.generate("def fibonacci(n):", max_new_tokens=8, temperature=0).token_ids


def test_cpu_plan_override_and_weights_in_one_allocation(checkpoints, monkeypatch):
    monkeypatch.setenv("MINILLM_CPU_PLAN", "blas-t")
    cpu._plan.cache_clear()
    try:
        model = minillm.load(checkpoints["llama-mha"], device="cpu").model
    finally:
        cpu._plan.cache_clear()
    assert model.layers[1].mlp.down.weight.stride() == (1, 64)             # stored (in, out)
    mapped = lambda p: file_view_of(p, checkpoints["llama-mha"] / "model.safetensors")
    transposed = [p for p in model.parameters() if p.dim() == 2 and p.stride(0) == 1]
    assert transposed and not any(map(mapped, transposed))                 # not the file's layout: copied
    storages = {p.untyped_storage().data_ptr() for p in model.parameters() if not mapped(p)}
    assert len(storages) == 1                                               # into one arena
    monkeypatch.setenv("MINILLM_CPU_PLAN", "fastest")
    with pytest.raises(ValueError, match="MINILLM_CPU_PLAN"):
        cpu._plan(torch.float32, 1)
    cpu._plan.cache_clear()


def test_unknown_shape_is_a_usage_error():
    with pytest.raises(UsageError, match="unknown shape"):
        bench.random_checkpoint("gpt-5")


def test_bench_defaults_work_on_the_default_model(env):
    """The default prompt lengths (128, 512) + 64 new tokens do not all fit the default model's
    512-token context: what does not fit is skipped and said, the rest measured."""
    r = run_cli("bench", "--batch", "1", "--repeat", "1", "--threads", "1", "--no-cold-start", env=env)
    assert r.returncode == 0, r.stderr
    assert "skipped prompt length 512: + 64 new tokens exceeds the model's context of 512" in r.stderr
    assert "prefill tok/s, prompt 128" in r.stdout and "prompt 512" not in r.stdout


def test_cpu_plan_probe_verdicts(monkeypatch, tmp_path):
    """A clear winner in both probe runs is kept (in MINILLM_CACHE); a busy probe (over its time
    budget) gives the dtype's default and keeps nothing, so the next process measures again."""
    monkeypatch.delenv("MINILLM_CPU_PLAN", raising=False)
    monkeypatch.setenv("MINILLM_CACHE", str(tmp_path))
    file = tmp_path / "cpu-plans.json"
    runs = iter([{}, {}])
    monkeypatch.setattr(cpu, "measure", lambda dtype, deadline: next(runs))
    cpu._plan.cache_clear()
    assert cpu._plan(torch.bfloat16, 2) == cpu.default_plan(torch.bfloat16) and not file.exists()
    fast = {p: 1.0 for p in cpu.PLANS} | {"blas-t": 0.5}
    runs = iter([fast, fast])
    cpu._plan.cache_clear()
    assert cpu._plan(torch.float32, 2) == "blas-t"
    assert "blas-t" in file.read_text()
    cpu._plan.cache_clear()
