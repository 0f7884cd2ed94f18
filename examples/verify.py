"""Check minillm's logits against transformers, in Python, offline. Runs on the embedded default
model, or on any folder / hub id you pass; needs the test extra (`pip install -e ".[test]"`):

    python examples/verify.py [MODEL]

The same from the shell: `minillm verify [-m MODEL] [--dtype bfloat16] [--json]`.
"""
import sys
import tempfile
from pathlib import Path

import minillm

model = sys.argv[1] if len(sys.argv) > 1 else None
try:
    import transformers  # noqa: F401  (the reference)
except ImportError:
    sys.exit('examples/verify.py needs transformers: pip install -e ".[test]" in a minillm checkout')

# 1. against transformers on the same checkpoint: fp32 passes at max |diff| <= 1e-4 x max |ref logit|
llm = minillm.load(model, device="cpu")
with tempfile.TemporaryDirectory() as tmp:
    saved = Path(tmp) / "reference.safetensors"
    rep = minillm.verify(llm, prompts=["def fibonacci(n):", "import os\n\nclass Config:"],
                         new_tokens=16, save=saved)
    print(f"vs transformers: passed={rep.passed} max_abs_diff={rep.max_abs_diff:.2e} kl={rep.kl:.2e} "
          f"top1={rep.top1_agreement:.1%} greedy={rep.greedy_agreement:.0%}")

    # 2. against saved logits (here the ones just written; in practice logits produced elsewhere,
    #    one `input_ids.K` / `logits.K` pair per prompt), in another dtype: bf16 is judged on KL and
    #    top-1 agreement, since its logits cannot match fp32 to 1e-4
    half = minillm.load(model, device="cpu", dtype="bfloat16")
    rep = minillm.verify(half, reference=saved)
    print(f"bf16 vs saved fp32 reference: passed={rep.passed} kl={rep.kl:.2e} top1={rep.top1_agreement:.1%}")
    for row in rep.prompts:
        print("   ", {k: row[k] for k in ("max_abs_diff", "kl", "top1_agreement") if k in row})
sys.exit(0 if rep.passed else 1)
