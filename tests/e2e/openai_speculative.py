"""Speculative decoding end to end with the OpenAI Python SDK (tests/e2e/openai_sdk.rs starts two gateways on the
tiny Gemma 4 fixture: SPEC_URL's fast tier drafts with the fixture's 4-bit copy, PLAIN_URL's does not).

Greedy answers, chat and completions, streamed and not, are the plain server's text exactly; the speculating
server's `_routing.speculative` reports its verifications (acceptance rate in 0..1, at least one token per
verification), the plain server's has none; a seeded sampled request decodes plainly (a seed promises the same
tokens alone or batched); `/health` and `/metrics` count the rounds.
The same script runs against GGUF tiers on the llama.cpp engine (DRAFT: the draft's file name, `tiny-q8_0.gguf`;
DRAFTER: the kind `/health` names, `mtp_assistant` for a Gemma 4 assistant).
Usage: openai_speculative.py SPEC_URL PLAIN_URL [DRAFT [DRAFTER]]"""
import json
import sys
import urllib.request

from openai import OpenAI

from checks import check, done

spec_url, plain_url = sys.argv[1], sys.argv[2]
draft = sys.argv[3] if len(sys.argv) > 3 else "tiny-q4"
drafter = sys.argv[4] if len(sys.argv) > 4 else "draft_model"
spec = OpenAI(base_url=f"{spec_url}/v1", api_key="none", timeout=300)
plain = OpenAI(base_url=f"{plain_url}/v1", api_key="none", timeout=300)

PROMPTS = ["The capital of France is", "Once upon a time, in a land far away,", "def add(a, b):"]

for i, p in enumerate(PROMPTS):
    a = spec.completions.create(model="fast", prompt=p, max_tokens=40, temperature=0)
    b = plain.completions.create(model="fast", prompt=p, max_tokens=40, temperature=0)
    check(f"completion {i}: the same text as plain decoding", a.choices[0].text == b.choices[0].text,
          (a.choices[0].text, b.choices[0].text))
    s = a.model_extra["_routing"].get("speculative")
    check(f"completion {i}: _routing.speculative reports the rounds",
          s is not None and s["verify_steps"] > 0 and 0 <= s["acceptance_rate"] <= 1
          and s["tokens_per_step"] >= 1 and s["accepted_tokens"] <= s["draft_tokens"], a.model_extra)
    check(f"completion {i}: the plain server reports none", "speculative" not in b.model_extra["_routing"],
          b.model_extra)

messages = [{"role": "user", "content": "Write one sentence about the sea."}]
a = spec.chat.completions.create(model="fast", messages=messages, max_tokens=32, temperature=0)
b = plain.chat.completions.create(model="fast", messages=messages, max_tokens=32, temperature=0)
check("chat: the same answer as plain decoding", a.choices[0].message.content == b.choices[0].message.content,
      (a.choices[0].message.content, b.choices[0].message.content))
check("chat: the same finish reason", a.choices[0].finish_reason == b.choices[0].finish_reason)

text, routing = "", None
for chunk in spec.chat.completions.create(model="fast", messages=messages, max_tokens=32, temperature=0,
                                          stream=True):
    if chunk.choices and chunk.choices[0].delta.content:
        text += chunk.choices[0].delta.content
    if chunk.model_extra.get("_routing"):
        routing = chunk.model_extra["_routing"]
check("stream: the same text as plain decoding", text == b.choices[0].message.content, text)
check("stream: the last chunk's _routing reports speculation",
      routing is not None and routing.get("speculative", {}).get("verify_steps", 0) > 0, routing)

a = spec.completions.create(model="fast", prompt=PROMPTS[0], max_tokens=16, temperature=0.8, seed=5)
check("a seeded sampled request decodes plainly", "speculative" not in a.model_extra["_routing"], a.model_extra)
c = spec.completions.create(model="fast", prompt=PROMPTS[0], max_tokens=16, temperature=0.8, seed=5)
d = plain.completions.create(model="fast", prompt=PROMPTS[0], max_tokens=16, temperature=0.8, seed=5)
check("a seeded sampled request gives the plain server's tokens", c.choices[0].text == d.choices[0].text,
      (c.choices[0].text, d.choices[0].text))

h = json.load(urllib.request.urlopen(f"{spec_url}/health"))
sp = h["tiers"]["fast"]["backend"]["details"].get("speculative") or {}
check("/health shows the draft model and its rounds",
      sp.get("verify_steps", 0) > 0 and sp.get("draft_model", "").endswith(draft) and sp.get("drafter") == drafter
      and 0 <= sp.get("acceptance_rate", -1) <= 1, sp)
metrics = urllib.request.urlopen(f"{spec_url}/metrics").read().decode()
check("/metrics counts verifications and drafts",
      'jemma_speculative_verify_steps_total{tier="fast"}' in metrics
      and 'jemma_speculative_draft_tokens_total{tier="fast"}' in metrics, metrics[-2000:])
done()
