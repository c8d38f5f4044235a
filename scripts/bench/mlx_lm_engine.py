"""mlx-lm side of scripts/bench-engine: one stream_generate run on the same weights and prompt ids.

Prints one JSON line: prefill_tps, decode_tps, peak_memory_bytes (MLX), peak_rss_bytes (process), tokens.
"""
import json
import resource
import sys
import time

import mlx.core as mx
from mlx_lm import stream_generate
from mlx_lm.utils import load

model_dir, ids_csv, max_tokens = sys.argv[1], sys.argv[2], int(sys.argv[3])
ids = [int(x) for x in ids_csv.split(",")]
model, tokenizer = load(model_dir)
# mlx-lm stops at EOS; the benchmark wants exactly max_tokens, as `jemma generate --ignore-eos` does.
tokenizer._eos_token_ids = set()
mx.reset_peak_memory()
tokens, last = [], None
t0 = time.perf_counter()
for r in stream_generate(model, tokenizer, mx.array(ids), max_tokens=max_tokens):
    tokens.append(r.token)
    last = r
wall = time.perf_counter() - t0
rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
print(json.dumps({"prefill_tps": last.prompt_tps, "decode_tps": last.generation_tps, "tokens": tokens,
                  "peak_memory_bytes": mx.get_peak_memory(), "peak_rss_bytes": rss, "wall_s": wall}))
