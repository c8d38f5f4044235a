"""A random-weight Gemma 3 GGUF of a real model's shape, for speed measurements where the weights cannot travel.

    python random_gguf.py TOKENIZER_GGUF OUT --shape gemma3-4b [--seed N]

Writes a GGUF of llama.cpp's `gemma3` architecture with the named checkpoint's dimensions (taken from the
Hugging Face configs of google/gemma-3-*-pt) and Q8_0 weights drawn at random (int8 uniform, each 32-value
block's scale chosen so the weights' standard deviation is 0.02, the checkpoints' initialiser), pre-norms at
1.0 (llama.cpp's Gemma 3 converter stores 1 + w), post-norms at --post-norm (see main). The tokenizer
(every `tokenizer.*` key) is copied from TOKENIZER_GGUF, any Gemma 3 GGUF: the real Gemma 3 270M of fixtures/gguf (262,144 entries). The tensors are
views of one random buffer at random offsets, so a 4B model (4.1 GB) is written in seconds; its answers are noise, its cost per
token is the real model's. `--shape tokenizer` writes the tokenizer alone (no tensors, ~6 MB): what a machine
without the fixtures needs to make the model there.

Needs the `gguf` package of llama.cpp's gguf-py (as vendored in the llama-cpp-python sdist:
scripts/setup-gguf.sh) and numpy.
"""

import argparse
import sys

import numpy as np
from gguf import GGMLQuantizationType, GGUFReader, GGUFValueType, GGUFWriter, RopeScalingType

# hidden, layers, feed-forward, heads, KV heads, head dim, sliding window, RoPE scaling factor (global layers)
SHAPES = {
    "gemma3-270m": (640, 18, 2048, 4, 1, 256, 512, None),
    "gemma3-1b": (1152, 26, 6912, 4, 1, 256, 512, None),
    "gemma3-4b": (2560, 34, 10240, 8, 4, 256, 1024, 8.0),
    "gemma3-12b": (3840, 48, 15360, 16, 8, 256, 1024, 8.0),
    "gemma3-27b": (5376, 62, 21504, 32, 16, 128, 1024, 8.0),
}
Q8_0_BLOCK = 32  # values per Q8_0 block: an f16 scale, then 32 int8 (ggml-common.h, block_q8_0)


def copy_tokenizer(reader, writer):
    """Copies every tokenizer.* key of `reader` into `writer`, with its type."""
    for key, field in reader.fields.items():
        if not key.startswith("tokenizer."):
            continue
        kind = field.types[0]
        value = field.contents()
        if kind == GGUFValueType.ARRAY:
            writer.add_key_value(key, value, kind, sub_type=field.types[-1])
        else:
            writer.add_key_value(key, value, kind)


def q8_0_buffer(n_values, rng):
    """Random Q8_0 blocks for `n_values` weights (a multiple of 32), as uint8 of shape (n_values / 32, 34)."""
    blocks = n_values // Q8_0_BLOCK
    out = np.empty((blocks, 2 + Q8_0_BLOCK), dtype=np.uint8)
    # int8 uniform on [-127, 127] has standard deviation 127 / sqrt(3): scale it to 0.02.
    out[:, :2] = np.frombuffer(np.float16(0.02 * np.sqrt(3) / 127).tobytes(), dtype=np.uint8)
    out[:, 2:] = rng.integers(-127, 128, size=(blocks, Q8_0_BLOCK), dtype=np.int8).view(np.uint8)
    return out


def main():
    a = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    a.add_argument("tokenizer_gguf")
    a.add_argument("out")
    a.add_argument("--shape", required=True, choices=sorted(SHAPES) + ["tokenizer"])
    a.add_argument("--seed", type=int, default=0)
    a.add_argument("--post-norm", type=float, default=0.6, help="the post-norms' weight (default 0.6)")
    args = a.parse_args()
    reader = GGUFReader(args.tokenizer_gguf)
    w = GGUFWriter(args.out, "gemma3")
    copy_tokenizer(reader, w)
    if args.shape == "tokenizer":
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.close()
        return
    hidden, layers, ff, heads, kv_heads, head_dim, window, rope_factor = SHAPES[args.shape]
    vocab = len(reader.fields["tokenizer.ggml.tokens"].data)
    w.add_name(f"random {args.shape}")
    w.add_context_length(131072 if rope_factor else 32768)
    w.add_embedding_length(hidden)
    w.add_block_count(layers)
    w.add_feed_forward_length(ff)
    w.add_head_count(heads)
    w.add_head_count_kv(kv_heads)
    w.add_key_length(head_dim)
    w.add_value_length(head_dim)
    w.add_layer_norm_rms_eps(1e-6)
    w.add_rope_freq_base(1e6)
    w.add_sliding_window(window)
    if rope_factor:
        w.add_rope_scaling_type(RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(rope_factor)
    w.add_file_type(7)  # LLAMA_FTYPE_MOSTLY_Q8_0

    rng = np.random.default_rng(args.seed)
    # (name, ne0 (the row: input features), ne1 (rows)) in GGUF's order; every matrix is a prefix of one buffer.
    mats = [("token_embd.weight", hidden, vocab)]
    for i in range(layers):
        b = f"blk.{i}."
        mats += [
            (b + "attn_q.weight", hidden, heads * head_dim),
            (b + "attn_k.weight", hidden, kv_heads * head_dim),
            (b + "attn_v.weight", hidden, kv_heads * head_dim),
            (b + "attn_output.weight", heads * head_dim, hidden),
            (b + "ffn_gate.weight", hidden, ff),
            (b + "ffn_up.weight", hidden, ff),
            (b + "ffn_down.weight", ff, hidden),
        ]
    # Each matrix starts at its own random block of a buffer one spare block per 2 of the largest longer, so
    # that no two matrices (a layer's gate and up, one layer and the next) are the same weights.
    largest = max(n0 * n1 for _, n0, n1 in mats) // Q8_0_BLOCK
    spare = largest // 2
    base = q8_0_buffer((largest + spare) * Q8_0_BLOCK, rng)
    for name, n0, n1 in mats:
        assert n0 % Q8_0_BLOCK == 0, name
        at = int(rng.integers(0, spare + 1))
        view = base[at : at + n0 * n1 // Q8_0_BLOCK].reshape(n1, n0 // Q8_0_BLOCK * (2 + Q8_0_BLOCK))
        w.add_tensor(name, view, raw_dtype=GGMLQuantizationType.Q8_0)
    ones = {n: np.ones(n, dtype=np.float32) for n in (hidden, head_dim)}
    # Gemma's post-norms give every sublayer's output unit RMS. At 1.0 the random sublayers drown the
    # embedding and the model answers one token whatever the prompt (an equality check then compares
    # nothing); at 1 / sqrt(2 x layers) the embedding drowns them and the model echoes the prompt's last
    # token. 0.6 (measured on gemma3-1b) gives answers of several tokens that differ with the prompt.
    post = np.full(hidden, args.post_norm, dtype=np.float32)
    w.add_tensor("output_norm.weight", ones[hidden])
    for i in range(layers):
        b = f"blk.{i}."
        for norm in ("attn_norm", "ffn_norm"):
            w.add_tensor(b + norm + ".weight", ones[hidden])
        for norm in ("post_attention_norm", "post_ffw_norm"):
            w.add_tensor(b + norm + ".weight", post)
        w.add_tensor(b + "attn_q_norm.weight", ones[head_dim])
        w.add_tensor(b + "attn_k_norm.weight", ones[head_dim])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    params = sum(n0 * n1 for _, n0, n1 in mats)
    print(f"{args.out}: {args.shape}, {params / 1e9:.2f} B parameters in Q8_0, vocabulary {vocab}", file=sys.stderr)


if __name__ == "__main__":
    main()
