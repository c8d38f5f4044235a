"""Continuous batching through the gateway with the OpenAI Python SDK (tests/e2e/real_model.rs starts the
server: the real Gemma 3 270M on the llama.cpp engine, one tier with max_concurrency = 8).

Eight greedy streams sent at once all complete, each within its max_tokens; the engine ran them together
(its /health saw more than one running at a time); a repeated prompt reports its cached tokens in
usage.prompt_tokens_details.cached_tokens. A batched answer may leave its lone twin at a near-tie:
llama.cpp multiplies a lone row and a batch's rows with different Q4_K kernels (the engine's tests pin this
down: bit-exact on Q8_0, near-ties only elsewhere); how many answers stay identical throughout is printed.
With a second argument `mlx` (tests/e2e/openai_sdk.rs: the tiny Gemma 4 fixture on the MLX engine) every
batched answer must equal its lone one (the MLX engine's batched forward is exact there), and the prefix
check is a new chat with the same system prompt as an earlier one (the MLX prefix cache's shared checkpoint).
Usage: openai_batching.py BASE_URL [mlx]"""
import json
import sys
import threading
import urllib.request

from openai import OpenAI

base = sys.argv[1]
mlx = len(sys.argv) > 2 and sys.argv[2] == "mlx"
client = OpenAI(base_url=f"{base}/v1", api_key="none", timeout=300)
passed = failed = 0


def check(name, cond, detail=""):
    global passed, failed
    if cond:
        passed += 1
        print(f"ok   {name}")
    else:
        failed += 1
        print(f"FAIL {name} {detail}")


PROMPTS = [f"Question {i}: name a {w}.\nAnswer:" for i, w in
           enumerate(["colour", "country", "fruit", "river", "planet", "metal", "tree", "bird"])]
# Different lengths, so that streams end at different times and others run on.
LENGTHS = [24, 40, 16, 32, 48, 20, 36, 28]


def stream(prompt, n):
    text, usage, first = "", None, None
    for chunk in client.completions.create(model="fast", prompt=prompt, max_tokens=n, temperature=0,
                                           stream=True, stream_options={"include_usage": True}):
        if chunk.choices and chunk.choices[0].text:
            text += chunk.choices[0].text
            if first is None:
                first = chunk.choices[0].text
        if chunk.usage:
            usage = chunk.usage
    return text, usage, first


alone = [stream(p, n) for p, n in zip(PROMPTS, LENGTHS)]
check("alone answers are non-empty", all(a[0] for a in alone), alone)

results = [None] * 8
running_seen = []
done = threading.Event()


def poll():
    while not done.is_set():
        h = json.load(urllib.request.urlopen(f"{base}/health"))
        running_seen.append(h["tiers"]["fast"]["backend"]["details"].get("running", 0))
        done.wait(0.02)


def worker(i):
    results[i] = stream(PROMPTS[i], LENGTHS[i])


poller = threading.Thread(target=poll)
poller.start()
threads = [threading.Thread(target=worker, args=(i,)) for i in range(8)]
for t in threads:
    t.start()
for t in threads:
    t.join()
done.set()
poller.join()
check("8 concurrent streams all complete", all(r is not None and r[1] is not None for r in results))
for i, (r, a) in enumerate(zip(results, alone)):
    # The same length unless a near-tie led one of them to an end-of-text token.
    check(f"stream {i}: an answer within max_tokens", 0 < r[1].completion_tokens <= LENGTHS[i], r[1])
same = sum(r[0] == a[0] for r, a in zip(results, alone))
print(f"info: {same}/8 batched answers identical to their lone ones throughout")
if mlx:
    check("batched answers equal lone ones", same == 8)
check("the engine ran several at once", max(running_seen, default=0) > 1, f"running seen {set(running_seen)}")
if mlx:
    system = "You are a terse assistant. " * 8
    usages = []
    for q in ["Name a colour.", "Name a river."]:
        r = client.chat.completions.create(
            model="fast", max_tokens=4, temperature=0,
            messages=[{"role": "system", "content": system}, {"role": "user", "content": q}])
        usages.append(r.usage)
    cached = usages[1].prompt_tokens_details.cached_tokens if usages[1].prompt_tokens_details else 0
    check("a new chat with the same system prompt reports cached tokens",
          0 < cached < usages[1].prompt_tokens, usages)
else:
    _, usage, _ = stream(PROMPTS[0] + " A", 4)
    cached = usage.prompt_tokens_details.cached_tokens if usage.prompt_tokens_details else 0
    check("a repeated prompt reports cached tokens", cached >= usage.prompt_tokens - 3, usage)
print(f"{passed} passed, {failed} failed")
sys.exit(1 if failed else 0)
