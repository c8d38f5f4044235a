"""One greedy generation from a running llama-server (scripts/bench-spec-llama's anchor): a short warm-up,
then GEN tokens from PROMPT (end of sequence ignored, the prompt reused from the warm-up's slot, as the
engine's bench does). Prints JSON: decode tok/s (llama-server's own `timings.predicted_per_second`), the
tokens, and when it speculated, drafted and accepted tokens, acceptance and tokens per verify step.
With K (the server drafts exactly K tokens a round: --spec-draft-n-min = -n-max = K), a run that did not
speculate is an error, and the verify steps are the rounds that drafted (drafts / K), as the engine counts
them (a step near the end with no room for K drafts is a plain one, as in the engine).
Usage: llama_server_spec.py BASE_URL PROMPT GEN [K]"""
import json
import sys
import urllib.request

base, prompt, gen = sys.argv[1], sys.argv[2], int(sys.argv[3])
k = int(sys.argv[4]) if len(sys.argv) > 4 else None


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
if k:
    if not t.get("draft_n"):
        sys.exit(f"llama-server did not speculate: {json.dumps(t)}")
    drafted, accepted = t["draft_n"], t["draft_n_accepted"]
    # Each round yields its drafts that stood and one token of the target's own (the engine's
    # tokens_per_step: (accepted + rounds) / rounds).
    rounds = max(drafted // k, 1)
    out.update(drafted=drafted, accepted=accepted, acceptance_rate=accepted / drafted,
               tokens_per_step=(accepted + rounds) / rounds)
print(json.dumps(out))
