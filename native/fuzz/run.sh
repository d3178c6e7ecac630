#!/bin/sh
# Coverage-guided fuzzing of teleport_core's decoder, frame reader and handshake: cargo-fuzz
# (libFuzzer) on stable Rust, with `--sanitizer none` (the default AddressSanitizer build needs
# nightly's -Z flags).
#
#   sh native/fuzz/run.sh smoke   each target for FUZZ_SMOKE_SECONDS (default 12): `make test`
#   sh native/fuzz/run.sh long    each target for FUZZ_SECONDS (default 600): `make fuzz`
#   sh native/fuzz/run.sh build   only build the targets
#
# Installs cargo-fuzz if it is missing. Exits non-zero if a target finds a crash, a hang
# (an input taking over FUZZ_TIMEOUT seconds, default 10) or an input that blows the memory
# limits; the input is then in native/fuzz/artifacts/TARGET/. The corpus that the fuzzer grows
# is kept in native/fuzz/corpus/TARGET/ (gitignored) and starts from native/fuzz/seeds/TARGET/
# (native/fuzz/seeds/decode_etf/ for a target without seeds of its own).
# Other settings: FUZZ_TARGETS (default: every target), FUZZ_MAX_LEN (default 4096).
set -eu

mode=${1:-smoke}
case $mode in
  smoke) seconds=${FUZZ_SMOKE_SECONDS:-12} ;;
  long) seconds=${FUZZ_SECONDS:-600} ;;
  build) seconds=0 ;;
  *) echo "usage: sh native/fuzz/run.sh [smoke|long|build]" >&2; exit 2 ;;
esac
targets=${FUZZ_TARGETS:-"decode_etf decode_scan frame_stream handshake"}
max_len=${FUZZ_MAX_LEN:-4096}
timeout=${FUZZ_TIMEOUT:-10}
cargo_fuzz_version=0.13.2

fuzz_dir=$(cd "$(dirname "$0")" && pwd)
target_dir=$fuzz_dir/target
logs=$target_dir/fuzz-logs

if ! command -v cargo >/dev/null 2>&1 && [ -x "$HOME/.cargo/bin/cargo" ]; then
  PATH="$HOME/.cargo/bin:$PATH"
fi
command -v cargo >/dev/null 2>&1 || {
  echo "fuzz: cargo not found; install Rust (https://rustup.rs)" >&2
  exit 1
}
if ! cargo fuzz --version >/dev/null 2>&1; then
  echo "==> fuzz: installing cargo-fuzz $cargo_fuzz_version"
  cargo install cargo-fuzz --locked --version "$cargo_fuzz_version"
fi

# The flags every cargo-fuzz call gets: stable-friendly, debug assertions and overflow
# checks on, this crate's own target directory whatever CARGO_TARGET_DIR says.
set -- -s none -a --fuzz-dir "$fuzz_dir" --target-dir "$target_dir"

echo "==> fuzz: building $targets ($(cargo fuzz --version), $(rustc --version))"
for t in $targets; do
  cargo fuzz build "$@" "$t"
done
[ "$mode" = build ] && exit 0

mkdir -p "$logs"
failed=""
for t in $targets; do
  corpus=$fuzz_dir/corpus/$t
  artifacts=$fuzz_dir/artifacts/$t
  log=$logs/$t.log
  mkdir -p "$corpus" "$artifacts"
  echo "==> fuzz: $t for ${seconds}s (corpus native/fuzz/corpus/$t, log ${log#"$PWD"/})"
  # The first corpus directory is where libFuzzer adds new inputs; the seeds are only read.
  # The decoder targets share the real encodings of seeds/decode_etf/.
  seeds=$fuzz_dir/seeds/$t
  [ -d "$seeds" ] || seeds=$fuzz_dir/seeds/decode_etf
  # Every input that once found a bug runs first, each time: regressions/TARGET-* (and the
  # *.etf terms for the decoder targets), read from a directory of their own.
  past=$target_dir/regressions/$t
  rm -rf "$past" && mkdir -p "$past"
  for f in "$fuzz_dir"/regressions/"$t"-*; do [ -f "$f" ] && cp "$f" "$past"/; done
  case $t in
    decode_*) for f in "$fuzz_dir"/regressions/*.etf; do [ -f "$f" ] && cp "$f" "$past"/; done ;;
  esac
  rm -f "$log.rc"
  {
    cargo fuzz run "$@" "$t" "$corpus" "$seeds" "$past" -- \
      -max_total_time="$seconds" -max_len="$max_len" -timeout="$timeout" \
      -rss_limit_mb=2048 -print_final_stats=1 2>&1
    echo $? >"$log.rc"
  } | if [ "$mode" = long ]; then tee "$log"; else cat >"$log"; fi
  rc=$(cat "$log.rc" 2>/dev/null || echo 1)
  rm -f "$log.rc"
  execs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -n 1)
  rate=$(sed -n 's/^stat::average_exec_per_sec: *//p' "$log" | tail -n 1)
  files=$(find "$corpus" -type f | wc -l | tr -d ' ')
  if [ "$rc" = 0 ]; then
    echo "fuzz: $t: ${execs:-?} executions in ${seconds}s (${rate:-?}/s), corpus $files inputs, no crash"
  else
    echo "fuzz: $t: FAILED (exit $rc) after ${execs:-?} executions; from its log:" >&2
    grep -E -A 3 'panicked at|^teleport_fuzz:|ERROR: libFuzzer|^error|^Error' "$log" | head -n 40 >&2 || :
    sed -n '/^Failing input:/,/^Reproduce with:/p' "$log" >&2
    echo "fuzz: $t: failing inputs in ${artifacts#"$PWD"/}/:" >&2
    ls -l "$artifacts" >&2
    failed="$failed $t"
  fi
done
if [ -n "$failed" ]; then
  echo "fuzz: FAILED:$failed (see native/fuzz/README.md: a crasher becomes a regression test)" >&2
  exit 1
fi
echo "fuzz: $mode run passed"
