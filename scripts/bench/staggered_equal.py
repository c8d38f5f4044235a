"""Batched == alone on cold servers, with newcomers joining running streams: K greedy completions of
prompts of different lengths (random words from a small list, seeded by TAG), sent one at a time to the
server at ALONE_URL, then sent 0.15 s apart to the server at TOGETHER_URL, so that each joins the ones
already decoding. Both servers must be fresh (the same model and settings, nothing cached): then no
prompt is a prefix-cache hit on either, and what differs is only which sequences share each step. Prints
one JSON object: for each prompt, at which character the staggered answer first leaves its lone twin
(null: identical), and how many distinct lone answers there were (the check compares something only if
they differ). docs/BENCHMARKS.md, "Batch invariance", runs it against `flash_attention` auto and off.
Usage: staggered_equal.py ALONE_URL TOGETHER_URL MODEL K MAX_TOKENS TAG"""
import json
import random
import sys
import time
from concurrent.futures import ThreadPoolExecutor

from openai import OpenAI

alone_url, together_url, model, k, max_tokens, tag = sys.argv[1:7]
k, max_tokens = int(k), int(max_tokens)
rng = random.Random(tag)
words = "alpha bravo charlie delta echo foxtrot golf hotel india juliet kilo lima mike november oscar papa".split()
# ~12 to ~570 tokens (K = 8): the later prompts' KV passes 256 tokens, past which flash attention decodes a
# sequence alone in pieces split across the threads, and beside others in one piece.
prompts = [f"{tag} {i}: " + " ".join(rng.choice(words) for _ in range(5 + 60 * i)) for i in range(k)]


def answer(client, prompt):
    r = client.completions.create(model=model, prompt=prompt, max_tokens=max_tokens, temperature=0)
    return r.choices[0].text


alone_client = OpenAI(base_url=f"{alone_url}/v1", api_key="none", timeout=600)
alone = [answer(alone_client, p) for p in prompts]
together_client = OpenAI(base_url=f"{together_url}/v1", api_key="none", timeout=600)


def joining(i):
    time.sleep(0.15 * i)
    return answer(together_client, prompts[i])


# A failed request raises here: it must not read as a difference.
with ThreadPoolExecutor(k) as pool:
    together = list(pool.map(joining, range(k)))


def first_difference(a, b):
    if a == b:
        return None
    return next((j for j, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


print(json.dumps({
    "tag": tag,
    "k": k,
    "distinct_answers": len(set(alone)),
    "first_difference_char": [first_difference(a, b) for a, b in zip(alone, together)],
}))
