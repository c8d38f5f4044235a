#!/usr/bin/env bash
# Fuzzing smoke run (CI): each cargo-fuzz target for FUZZ_SECONDS (default 60) from the committed seeds.
# Targets: the request parser/validator, the Gemma 4 output/tool-call parser, the chat-template renderer, the
# media decoders (images, audio) and the audio feature extractor.
# cargo-fuzz needs sanitizer flags that stable rustc accepts only with RUSTC_BOOTSTRAP=1 (the machine's one
# toolchain is stable). A crash fails the run and leaves its input in fuzz/artifacts/<target>/: turn it into
# a regression test.
. "$(dirname "$0")/lib.sh"
cd "$JEMMA_ROOT/fuzz"
SECS=${FUZZ_SECONDS:-60}
cargo_install_ensure cargo-fuzz cargo-fuzz 0.13.2
export RUSTC_BOOTSTRAP=1
for t in request tool_parser template media; do
  work=$(mktemp -d)
  mkdir -p "$work/corpus"
  log "fuzzing $t for ${SECS}s"
  status=0
  # Deadlines: libFuzzer's own per-input -timeout (an input that hangs is a finding, saved like a crash) and
  # a bound on the whole target, its build included.
  bounded $((SECS + 1200)) cargo fuzz run -O "$t" "$work/corpus" "seeds/$t" -- -max_total_time="$SECS" \
    -timeout=20 -rss_limit_mb=4096 -print_final_stats=1 >"$work/log" 2>&1 || status=$?
  grep -E "^Done|stat::number_of_executed_units|==[0-9]+==|panicked|SUMMARY" "$work/log" || true
  [ "$status" -eq 0 ] || tail -40 "$work/log" >&2
  rm -rf "$work"
  [ "$status" -eq 0 ] || die "fuzz target $t failed (see fuzz/artifacts/$t)"
done
echo "fuzz: 4 passed, 0 failed"
