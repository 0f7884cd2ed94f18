"""Mean KL(fp32 || quantized) and top-1 agreement of minillm quantized runs against its own fp32 run, on
verify's default prompts plus 16 greedy tokens: `python examples/quant_quality.py MODEL int8 int4 ...`."""
import sys, torch, minillm
from minillm.verify import DEFAULT_PROMPTS
path = sys.argv[1]
ref = minillm.load(path, device="cpu", quantize="none")   # a GGUF file too: every tensor in float
seqs = []
for p in DEFAULT_PROMPTS:
    ids = ref.encode(p) if ref.tokenizer else torch.randint(3, ref.config.vocab_size, (40,), generator=torch.Generator().manual_seed(len(p))).tolist()
    out = ref.generate(ids, max_new_tokens=16, temperature=0, repetition_penalty=1.0).token_ids
    seqs.append(ids + out)
refl = [ref.logits([s])[0].double() for s in seqs]
del ref
for q in sys.argv[2:]:
    llm = minillm.load(path, device="cpu", quantize=q)
    kl = n = top = 0
    for s, r in zip(seqs, refl):
        l = llm.logits([s])[0].double()
        lp, lq = r.log_softmax(-1), l.log_softmax(-1)
        kl += (lp.exp() * (lp - lq)).sum().item(); top += (r.argmax(-1) == l.argmax(-1)).sum().item(); n += len(s)
    print(f"{path.split('/')[-1]:30s} {q:10s} mean KL {kl/n:.4f}  top-1 {top/n:.3f}", flush=True)
