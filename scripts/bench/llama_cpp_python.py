"""Speed anchor for the llama.cpp engine: llama-cpp-python (llama.cpp's C API from Python) on the same GGUF,
the same prompt ids and thread count; greedy decode of N tokens. Prints one JSON object.
usage: llama_cpp_python.py MODEL.gguf IDS(comma-separated) N_GEN THREADS"""
import json
import sys
import time

import llama_cpp
import numpy as np

model, ids, n_gen, threads = sys.argv[1], [int(x) for x in sys.argv[2].split(",")], int(sys.argv[3]), int(sys.argv[4])
llm = llama_cpp.Llama(model_path=model, n_ctx=len(ids) + n_gen + 16, n_batch=512, n_ubatch=512,
                      n_threads=threads, n_threads_batch=threads, verbose=False, logits_all=False)
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
print(json.dumps({"prefill_tps": len(ids) / prefill, "decode_tps": (n_gen - 1) / decode, "tokens": tokens,
                  "version": llama_cpp.__version__}))
