"""Serving benchmark driver (scripts/bench-serving): against one OpenAI-compatible base URL, measures
  - prefix reuse: TTFT of a request whose ~N-token system prompt is new (cold) and of the next request with
    the same system prompt and a new question (warm); several rounds, each with a fresh system prompt,
    medians and the warm/cold ratio;
  - fan-out: 4 requests sent at once with one new ~N-token system prompt and different questions (parallel
    agents starting from one instruction set): the last one's TTFT over the cold TTFT (1.0: the preamble
    is read once; 4: once per request), and the cached tokens they report;
  - burst: 8 requests with new short prompts released at once: the time to the last answer (medians);
  - concurrency: aggregate tok/s of 1, 4 and 8 concurrent greedy streams, and the ratio to 1, in two
    ways: over the wall time of each run (requests sent, prompts read, the ramp and the tail included), and
    over its decode phase, from the moment the last stream got its first token to the moment the first one
    got its last, when every stream decodes (what llama-batched-bench's S_TG times). Each level runs
    CONCURRENCY_RUNS times (default 3), the levels interleaved, and the medians are printed.
Prints one JSON object. Client: the openai SDK (streaming), as a user's app would use it. With
SERVING_CLIENT=raw the concurrency streams are read by a minimal SSE reader instead (http.client, one JSON
parse per event, no models built): on a 2-core machine the clients share the cores with the server, and the
SDK's per-chunk parsing is part of what the decode phase then times; the raw reader takes less of them.
  With a fifth argument `chat`, the prefix part sends the preamble as a chat's system message and the
  question as its user message (/v1/chat/completions): the shape of an agent starting a new conversation.
  With SERVING_FANOUT=0 in the environment the fan-out is skipped (llama-cpp-python's server, whose RAM
  prompt cache grew past 24 GB under it on this 24 GB machine, 2026-12-02). SERVING_LEVELS (default
  "1,4,8"; 1, 4 and 8 always run) adds concurrency levels, e.g. "1,4,8,16,32" on a GPU; SERVING_TOKENS
  (default 48) sets each stream's length: a GPU decodes 48 tokens in a fraction of a second.
Usage: serving.py BASE_URL MODEL SYSTEM_TOKENS ROUNDS [chat]   (ROUNDS 0: concurrency only)"""
import http.client
import json
import os
import urllib.parse
import statistics
import sys
import threading
import time

from openai import OpenAI

base, model, sys_tokens, rounds = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
chat = len(sys.argv) > 5 and sys.argv[5] == "chat"
client = OpenAI(base_url=f"{base}/v1", api_key="none", timeout=600)
RAW = os.environ.get("SERVING_CLIENT", "sdk") == "raw"
WORDS = ("river stone garden lantern harbor meadow copper violet thunder orchard quiet signal "
         "window marble falcon silver autumn canyon ember velvet").split()


def system_prompt(seed):
    # About one token per word on Gemma's tokenizer (measured: 1,538 words gave 1,555 tokens); a
    # seed-specific opening makes every round's prompt new.
    n = sys_tokens
    return f"Session {seed}. " + " ".join(WORDS[(seed * 7 + i * 13) % len(WORDS)] for i in range(n))


def ttft(system, question):
    t0 = time.perf_counter()
    first = None
    usage = None
    if chat:
        stream = client.chat.completions.create(
            model=model, messages=[{"role": "system", "content": system}, {"role": "user", "content": question}],
            max_tokens=4, temperature=0, stream=True, stream_options={"include_usage": True})
    else:
        stream = client.completions.create(
            model=model, prompt=f"{system}\nQuestion: {question}\nAnswer:", max_tokens=4, temperature=0,
            stream=True, stream_options={"include_usage": True})
    for chunk in stream:
        text = (chunk.choices[0].delta.content if chat else chunk.choices[0].text) if chunk.choices else None
        if first is None and text:
            first = time.perf_counter() - t0
        if chunk.usage:
            usage = chunk.usage
    cached = 0
    if usage is not None and getattr(usage, "prompt_tokens_details", None):
        cached = usage.prompt_tokens_details.cached_tokens or 0
    return first if first is not None else time.perf_counter() - t0, usage.prompt_tokens if usage else 0, cached


def raw_stream(i, n_tokens):
    """(tokens, arrival times) of one streamed completion read with http.client: the same request as the
    SDK's, each `data:` event parsed with json alone."""
    url = urllib.parse.urlsplit(base)
    conn = http.client.HTTPConnection(url.hostname, url.port, timeout=600)
    body = json.dumps({"model": model, "prompt": f"Story {i}: once upon a time", "max_tokens": n_tokens,
                       "temperature": 0, "stream": True, "stream_options": {"include_usage": True}})
    conn.request("POST", f"{url.path.rstrip('/')}/v1/completions", body,
                 {"Content-Type": "application/json", "Authorization": "Bearer none"})
    resp = conn.getresponse()
    if resp.status != 200:
        raise RuntimeError(f"HTTP {resp.status}: {resp.read()[:200]!r}")
    n, arrivals, usage = 0, [], None
    for line in resp:
        if not line.startswith(b"data:"):
            continue
        data = line[5:].strip()
        if data == b"[DONE]":
            break
        event = json.loads(data)
        if "error" in event:
            raise RuntimeError(f"stream error: {event['error']}")
        choices = event.get("choices")
        if choices and choices[0].get("text"):
            n += 1
            arrivals.append(time.perf_counter())
        if event.get("usage"):
            usage = event["usage"]
    conn.close()
    if usage and usage.get("completion_tokens"):
        n = usage["completion_tokens"]
    return n, arrivals


def stream_tokens(results, i, n_tokens):
    if RAW:
        results[i] = raw_stream(i, n_tokens)
        return
    n = 0
    arrivals = []
    usage = None
    stream = client.completions.create(
        model=model, prompt=f"Story {i}: once upon a time", max_tokens=n_tokens, temperature=0, stream=True,
        stream_options={"include_usage": True})
    for chunk in stream:
        if chunk.choices and chunk.choices[0].text:
            n += 1
            arrivals.append(time.perf_counter())
        if chunk.usage:
            usage = chunk.usage
    # Tokens, not chunks: a server may hold back a token's text (an incomplete UTF-8 sequence, a possible
    # stop string) and send it with the next, which random-weight models do often.
    if usage is not None and usage.completion_tokens:
        n = usage.completion_tokens
    results[i] = (n, arrivals)


def aggregate(k, n_tokens=int(os.environ.get("SERVING_TOKENS", "48"))):
    """(tok/s over the run's wall time, tok/s over its decode phase)."""
    results = [None] * k
    threads = [threading.Thread(target=stream_tokens, args=(results, i, n_tokens)) for i in range(k)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    # The decode phase: every stream has had its first token and none has had its last. Each stream's rate
    # in it, the intervals between its chunks there over their span (n chunks, n - 1 intervals: counting
    # the chunks would overstate a stream by n / (n - 1)), summed over the streams. Chunks, not tokens:
    # within the phase a chunk is one token on the real model.
    decode = float("nan")
    if all(r[1] for r in results):
        start = max(r[1][0] for r in results)
        end = min(r[1][-1] for r in results)
        rates = []
        for _, arrivals in results:
            inside = [t for t in arrivals if start <= t <= end]
            if len(inside) > 1 and inside[-1] > inside[0]:
                rates.append((len(inside) - 1) / (inside[-1] - inside[0]))
        if len(rates) == len(results):
            decode = sum(rates)
    return sum(r[0] for r in results) / wall, decode


def burst(run, k=8, words=8):
    """Seconds from releasing k requests at once (distinct ~16-token prompts, one token each; the threads
    wait at a barrier) to the last answer: how a server reads a burst of new short prompts (one pass over
    the weights for all of them, or one each). Each run's prompts are new: they share at most BOS and a
    leading digit with an earlier run's (a repeated prompt would be a prefix-cache hit, not a read)."""
    done = [None] * k
    barrier = threading.Barrier(k + 1)

    def one(i):
        prompt = f"{run * k + i} burst client: " + " ".join(
            WORDS[(i * 5 + j * 7 + run) % len(WORDS)] for j in range(words)
        )
        barrier.wait()
        client.completions.create(model=model, prompt=prompt, max_tokens=1, temperature=0)
        done[i] = time.perf_counter()

    threads = [threading.Thread(target=one, args=(i,)) for i in range(k)]
    for t in threads:
        t.start()
    barrier.wait()
    t0 = time.perf_counter()
    for t in threads:
        t.join()
    return max(done) - t0


def fanout(system, k=4):
    results = [None] * k

    def one(i):
        results[i] = ttft(system, f"What is word number {i + 2}?")

    threads = [threading.Thread(target=one, args=(i,)) for i in range(k)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return max(r[0] for r in results), statistics.mean(r[2] for r in results)


cold, warm, prompt_tokens, cached, fan, fan_cached = [], [], 0, [], [], []
if rounds > 0:
    ttft(system_prompt(999), "warm-up")
else:
    aggregate(1, 8)  # warm-up: the first request of a server pays one-off costs
for r in range(rounds):
    s = system_prompt(r)
    c, prompt_tokens, _ = ttft(s, "What is the first word?")
    w, _, hit = ttft(s, "What is the last word?")
    cold.append(c)
    warm.append(w)
    cached.append(hit)
    if os.environ.get("SERVING_FANOUT", "1") != "0":
        f, fc = fanout(system_prompt(r + 500))
        fan.append(f)
        fan_cached.append(fc)
bursts = [burst(run) for run in range(int(os.environ.get("CONCURRENCY_RUNS", "3")))]
levels = sorted({1, 4, 8} | {int(x) for x in os.environ.get("SERVING_LEVELS", "1,4,8").split(",")})
runs = {k: [] for k in levels}
for _ in range(int(os.environ.get("CONCURRENCY_RUNS", "3"))):
    for k in runs:
        runs[k].append(aggregate(k))
med = lambda v: statistics.median(v) if v else None
one, four, eight = (med([w for w, _ in runs[k]]) for k in (1, 4, 8))
# A server that runs requests one at a time has no phase where all decode (NaN): no figure.
d_one, d_four, d_eight = (med([d for _, d in runs[k] if d == d]) for k in (1, 4, 8))
ratio = lambda a, b: a / b if a and b else None
print(json.dumps({
    "client": "raw" if RAW else "sdk",
    "prompt_tokens": prompt_tokens,
    "ttft_cold_s": med(cold), "ttft_warm_s": med(warm),
    "warm_over_cold": med(warm) / med(cold) if cold else None,
    "cached_tokens": med(cached),
    "fanout_ttft_s": med(fan), "fanout_over_cold": med(fan) / med(cold) if fan else None,
    "fanout_cached_tokens": med(fan_cached),
    "tok_s_1": one, "tok_s_4": four, "tok_s_8": eight,
    "x4": four / one, "x8": eight / one,
    "decode_tok_s_1": d_one, "decode_tok_s_4": d_four, "decode_tok_s_8": d_eight,
    "decode_x4": ratio(d_four, d_one), "decode_x8": ratio(d_eight, d_one),
    "burst_last_s": med(bursts),
    # Every level, 1, 4 and 8 included: wall-time and decode-phase tok/s, their ratios to one stream.
    "levels": {k: {"tok_s": med([w for w, _ in runs[k]]), "x": med([w for w, _ in runs[k]]) / one,
                   "decode_tok_s": med([d for _, d in runs[k] if d == d]),
                   "decode_x": ratio(med([d for _, d in runs[k] if d == d]), d_one)} for k in levels},
}))
