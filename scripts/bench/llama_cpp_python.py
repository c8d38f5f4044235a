"""Speed anchor for the llama.cpp engine: llama-cpp-python (llama.cpp's C API from Python) on the same GGUF,
the same prompt ids and thread count; greedy decode of N tokens. One warm-up run (its tokens are printed),
then RUNS timed runs (default 1) from an empty cache, as `jemma bench` times its engine. Prints one JSON
object with the medians.
usage: llama_cpp_python.py MODEL.gguf IDS(comma-separated) N_GEN THREADS [RUNS]"""
import json
import statistics
import sys
import time

import llama_cpp
import numpy as np

model, ids, n_gen, threads = sys.argv[1], [int(x) for x in sys.argv[2].split(",")], int(sys.argv[3]), int(sys.argv[4])
runs = max(1, int(sys.argv[5])) if len(sys.argv) > 5 else 1
llm = llama_cpp.Llama(model_path=model, n_ctx=len(ids) + n_gen + 16, n_batch=512, n_ubatch=512,
                      n_threads=threads, n_threads_batch=threads, verbose=False, logits_all=False)


def run():
    """One run from an empty cache: (prefill tok/s, decode tok/s, greedy tokens)."""
    llm.reset()  # eval() then drops every cached cell past n_tokens = 0
    t = time.perf_counter()
    llm.eval(ids)
    prefill = time.perf_counter() - t
    nxt = int(np.argmax(llm.scores[llm.n_tokens - 1]))
    tokens = [nxt]
    t = time.perf_counter()
    for _ in range(n_gen - 1):
        llm.eval([nxt])
        nxt = int(np.argmax(llm.scores[llm.n_tokens - 1]))
        tokens.append(nxt)
    decode = time.perf_counter() - t
    return len(ids) / prefill, (n_gen - 1) / decode, tokens


_, _, tokens = run()
timed = [run() for _ in range(runs)]
print(json.dumps({"prefill_tps": statistics.median(r[0] for r in timed),
                  "decode_tps": statistics.median(r[1] for r in timed), "tokens": tokens,
                  "version": llama_cpp.__version__}))
