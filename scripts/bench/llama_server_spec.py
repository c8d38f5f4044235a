"""One greedy generation from a running llama-server (scripts/bench-spec-llama's anchor): a short warm-up,
then GEN tokens from PROMPT (end of sequence ignored, the prompt reused from the warm-up's slot, as the
engine's bench does). Prints JSON: decode tok/s (llama-server's own `timings.predicted_per_second`), the
tokens, and when it speculated, drafted and accepted tokens, acceptance and tokens per verify step.
Usage: llama_server_spec.py BASE_URL PROMPT GEN"""
import json
import sys
import urllib.request

base, prompt, gen = sys.argv[1], sys.argv[2], int(sys.argv[3])


def complete(n):
    body = {"prompt": prompt, "n_predict": n, "temperature": 0, "ignore_eos": True, "cache_prompt": True,
            "return_tokens": True}
    req = urllib.request.Request(f"{base}/completion", json.dumps(body).encode(),
                                 {"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=600) as r:
        return json.load(r)


complete(8)
v = complete(gen)
t = v["timings"]
out = {"decode_tps": t["predicted_per_second"], "tokens": v.get("tokens", [])}
if t.get("draft_n"):
    drafted, accepted = t["draft_n"], t["draft_n_accepted"]
    # After the prompt's own first token, each verify step yields its accepted drafts and one token of the
    # target's (the engine's tokens_per_step counts so too).
    rounds = max(t["predicted_n"] - 1 - accepted, 1)
    out.update(drafted=drafted, accepted=accepted, acceptance_rate=accepted / drafted,
               tokens_per_step=(accepted + rounds) / rounds)
print(json.dumps(out))
