"""The Python API in one screen: load a model, generate (greedy and sampled, one prompt and a
batch), and stream. Runs offline on the embedded default model, or on any folder / hub id:

    python examples/api.py [MODEL]
"""
import sys

import minillm

llm = minillm.load(sys.argv[1] if len(sys.argv) > 1 else None, device="cpu")
print(f"{llm.config.arch}: {llm.config.num_layers} layers, hidden {llm.config.hidden_size}, from {llm.path}")

r = llm.generate("def fibonacci(n):", max_new_tokens=40, temperature=0)   # greedy
print(f"--- greedy ({r.finish_reason}, {len(r.token_ids)} tokens)\ndef fibonacci(n):{r.text}")

prompts = ["import ", "class Stack:"]
for p, r in zip(prompts, llm.generate(prompts, max_new_tokens=30, temperature=0.8, top_p=0.95, seed=0)):
    print(f"--- sampled, seed 0\n{p}{r.text}")

print("--- streamed, stops at a blank line")
print("def parse(", end="", flush=True)
for piece in llm.stream("def parse(", max_new_tokens=60, seed=1, stop="\n\n"):
    print(piece, end="", flush=True)
print()
