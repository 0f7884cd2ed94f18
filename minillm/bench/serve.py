"""The server's must-show numbers (issue 16), on a model of real width with random weights, through
`minillm serve` in a process of its own and the official openai client:
`python -m minillm.bench.serve [--shape llama-125m] [--clients 32] [--per-client 4] [--new 32] [--hf]`.

1. Load: `clients` concurrent streaming clients, `per-client` requests each, prompts of mixed
   lengths (5..300 tokens): every response whole (a finish_reason, the usage), each equal to
   llm.generate of that prompt alone (greedy); then /metrics: nothing running, no block in use;
   the server's RSS sampled throughout.
2. Throughput: the same prompts, `--tp-new` new tokens each, sent at once vs one after another.
3. --hf: transformers' own continuous batching (generate_batch) on the same model and prompts.
4. Prefix caching: two requests sharing a 512-token prefix: time to first token of each.
"""
from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import torch

import minillm

from . import random_checkpoint


def _rss(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS:"))


def _metrics(url: str) -> dict[str, float]:
    import httpx
    text = httpx.get(url + "/metrics", timeout=60).text
    return {ln.split()[0]: float(ln.split()[1]) for ln in text.splitlines() if ln and not ln.startswith("#")}


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m minillm.bench.serve")
    ap.add_argument("--shape", default="llama-125m")
    ap.add_argument("--clients", type=int, default=32)
    ap.add_argument("--per-client", type=int, default=4)
    ap.add_argument("--prompts", type=int, default=32, help="distinct prompts the clients draw from")
    ap.add_argument("--new", type=int, default=32, help="new tokens per load-test request")
    ap.add_argument("--tp-new", type=int, default=64, help="new tokens per throughput request (0: skip)")
    ap.add_argument("--rounds", type=int, default=2, help="load-test rounds (RSS after each: does it grow?)")
    ap.add_argument("--hf", action="store_true", help="also time transformers' generate_batch")
    ap.add_argument("--kv-memory", default="2GiB")
    a = ap.parse_args(argv)
    import openai
    path = random_checkpoint(a.shape)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url, log = f"http://127.0.0.1:{port}", tempfile.NamedTemporaryFile("w+", suffix=".log", delete=False)
    proc = subprocess.Popen([sys.executable, "-m", "minillm.cli", "serve", "-m", str(path), "--port", str(port),
                             "--served-model-name", "m", "--max-running", "32", "--kv-memory", a.kv_memory],
                            stdout=log, stderr=log)
    client = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=3600)
    try:
        llm = minillm.load(path, device="cpu")
        torch.manual_seed(0)
        V = llm.config.vocab_size
        lengths = torch.randint(5, 301, (a.prompts,)).tolist()
        prompts = [torch.randint(3, V, (n,)).tolist() for n in lengths]
        while True:
            try:
                _metrics(url)
                break
            except Exception:
                if proc.poll() is not None:
                    raise SystemExit(f"the server exited: see {log.name}")
                time.sleep(0.5)
        t = time.perf_counter()
        alone = [llm.generate(p, max_new_tokens=a.new, temperature=0) for p in prompts]
        print(f"# references (llm.generate alone): {time.perf_counter() - t:.0f} s", flush=True)

        rss, done = [_rss(proc.pid)], threading.Event()

        def sample():
            while not done.wait(0.5):
                rss.append(_rss(proc.pid))
        threading.Thread(target=sample, daemon=True).start()

        def one(k: int):
            stream = client.completions.create(model="m", prompt=prompts[k % len(prompts)], max_tokens=a.new,
                                               temperature=0, stream=True, stream_options={"include_usage": True})
            text, finish, usage = "", None, None
            for ch in stream:
                if ch.choices:
                    text += ch.choices[0].text
                    finish = ch.choices[0].finish_reason or finish
                usage = ch.usage or usage
            return k, text, finish, usage

        def client_run(c: int):
            return [one(c * a.per_client + j) for j in range(a.per_client)]
        for round in range(1, a.rounds + 1):
            t = time.perf_counter()
            with ThreadPoolExecutor(a.clients) as pool:
                results = [r for rs in pool.map(client_run, range(a.clients)) for r in rs]
            t_load = time.perf_counter() - t
            whole = sum(f is not None and u is not None for _, _, f, u in results)
            same = sum(text == alone[k % len(prompts)].text and
                       u.completion_tokens == len(alone[k % len(prompts)].token_ids) for k, text, _, u in results)
            toks = sum(u.completion_tokens for *_, u in results if u)
            m = _metrics(url)
            print(f"1.{round} load: {a.clients} streaming clients x {a.per_client} requests ({len(results)}), prompts "
                  f"{min(lengths)}..{max(lengths)} tokens, {a.new} new: {whole}/{len(results)} whole, "
                  f"{same}/{len(results)} equal llm.generate alone; {toks / t_load:.1f} tok/s over {t_load:.0f} s; "
                  f"after: running {m['minillm_requests_running']:.0f}, waiting {m['minillm_requests_waiting']:.0f}, "
                  f"blocks used {m['minillm_kv_blocks_used']:.0f} / free {m['minillm_kv_blocks_free']:.0f} "
                  f"(cached {m['minillm_kv_blocks_cached']:.0f}) of {m['minillm_kv_blocks_total']:.0f}; server RSS "
                  f"{rss[0] / 2**20:.0f} MiB at start, max {max(rss) / 2**20:.0f} MiB, now {rss[-1] / 2**20:.0f} MiB",
                  flush=True)
        done.set()

        if a.tp_new:
            tail = [[7, 8, 9, k] for k in range(len(prompts))]     # new to the prefix cache: no hits from 1.
            ps = [tl + p for tl, p in zip(tail, prompts)]
            req = lambda p: client.completions.create(model="m", prompt=p, max_tokens=a.tp_new,  # noqa: E731
                                                      temperature=0).usage.completion_tokens
            t = time.perf_counter()
            with ThreadPoolExecutor(len(ps)) as pool:
                n_at_once = sum(pool.map(req, ps))
            t_at_once = time.perf_counter() - t
            ps = [[7, 8, 10, k] + p for k, p in enumerate(prompts)]
            t = time.perf_counter()
            n_seq = sum(req(p) for p in ps)
            t_seq = time.perf_counter() - t
            tps, tps_seq = n_at_once / t_at_once, n_seq / t_seq
            print(f"2. throughput, {len(ps)} requests of {a.tp_new} new tokens: at once {tps:.1f} tok/s, one after "
                  f"another {tps_seq:.1f} tok/s ({tps / tps_seq:.1f}x)", flush=True)
            if a.hf:
                from transformers import AutoModelForCausalLM, GenerationConfig
                hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
                gc = GenerationConfig(max_new_tokens=a.tp_new, do_sample=False, eos_token_id=-1, pad_token_id=0)
                t = time.perf_counter()
                out = hf.generate_batch(ps, generation_config=gc)
                t_hf = time.perf_counter() - t
                hf_tok = sum(len(o.generated_tokens) for o in out.values())
                print(f"3. transformers generate_batch, same requests: {hf_tok / t_hf:.1f} tok/s "
                      f"(minillm serve at once: {tps:.1f})", flush=True)

        prefix = torch.randint(3, V, (512,), generator=torch.Generator().manual_seed(1)).tolist()
        ttft = []
        for tl in ([11, 12, 13], [21, 22, 23]):
            t = time.perf_counter()
            stream = client.completions.create(model="m", prompt=prefix + tl, max_tokens=2, temperature=0, stream=True)
            next(iter(stream))
            ttft.append(time.perf_counter() - t)
            stream.close()
        print(f"4. 512-token shared prefix: time to first token {ttft[0] * 1e3:.0f} ms, then {ttft[1] * 1e3:.0f} ms "
              f"({ttft[0] / ttft[1]:.1f}x lower)", flush=True)
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()
        os.unlink(log.name)


if __name__ == "__main__":
    main()
