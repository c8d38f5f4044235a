"""Batched == alone, through a server: K greedy completions of different prompts one at a time (cold), one at
a time again (warm: the prompt is then a prefix-cache hit, and only its last token is read), then all K at
once (warm too); for each, whether the concurrent answer has the very text (and token count) of the warm lone
one, and at which character it first differs — and the same of warm against cold. The warm pair isolates
batching: a cold read takes a prompt in one large matrix product, a warm one re-reads a single row, and
llama.cpp's kernels for the two may round differently, which moves a greedy answer at a near-tie. What the engine tests check on CPU fixtures, here for whatever
the server runs on (a CUDA build: scripts/bench-cuda), through the OpenAI SDK. Prints one JSON object.
Usage: batched_equal.py BASE_URL MODEL K MAX_TOKENS"""
import json
import sys
from concurrent.futures import ThreadPoolExecutor

from openai import OpenAI

base, model, k, max_tokens = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
client = OpenAI(base_url=f"{base}/v1", api_key="none", timeout=600)
# Different lengths, so that the concurrent sequences sit at different positions at every step.
prompts = [f"Item {i}: " + "the quick brown fox jumps over the lazy dog " * (1 + 3 * i) for i in range(k)]


def tokens(prompt):
    # The text, and the token count beside it (the completions API has no token ids).
    r = client.completions.create(model=model, prompt=prompt, max_tokens=max_tokens, temperature=0)
    return r.choices[0].text, r.usage.completion_tokens


cold = [tokens(p) for p in prompts]
alone = [tokens(p) for p in prompts]
# All at once; a failed request raises here (it must not read as a difference).
with ThreadPoolExecutor(k) as pool:
    together = list(pool.map(tokens, prompts))


def first_difference(a, b):
    """None when equal, else the first character where the texts differ."""
    if a == b:
        return None
    (ta, _), (tb, _) = a, b
    return next((j for j, (x, y) in enumerate(zip(ta, tb)) if x != y), min(len(ta), len(tb)))


diffs = [first_difference(a, b) for a, b in zip(alone, together)]
warm = [first_difference(a, b) for a, b in zip(cold, alone)]
against_cold = [first_difference(a, b) for a, b in zip(cold, together)]
# The check compares something only if the prompts' answers differ from one another.
print(json.dumps({"k": k, "max_tokens": max_tokens, "distinct_answers": len(set(cold)),
                  "identical": sum(d is None for d in diffs),
                  "first_difference_char": diffs, "warm_identical_to_cold": sum(d is None for d in warm),
                  "warm_first_difference_char": warm, "together_first_difference_from_cold_char": against_cold,
                  "tokens": [n for _, n in alone]}))
