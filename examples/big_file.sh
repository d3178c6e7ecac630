#!/bin/sh
# Two nodes started from the shell; node A sends a big file to node B with teleport:send/2
# (then, for comparison, with `!' over distributed Erlang) while a process on A pings B over
# distributed Erlang every 50 ms. Prints each chunk as it goes, the throughput and the
# ping's latencies; examples/stats_reporter.erl logs teleport's counters after each transfer.
# `make example' builds teleport and runs it.
#
#   examples/big_file.sh [FILE]      FILE defaults to BIG_FILE_MB (100) MB of random bytes
#
# Environment: BIG_FILE_MB (100), BIG_FILE_CHUNK_MB (10; the size of each message, 0 sends
# the whole file as one message), BIG_FILE_MODE (both, teleport or disterl), TELEPORT_EBIN
# (teleport's ebin directory; default _build/default/lib/teleport/ebin, from rebar3 compile).
set -eu
cd "$(dirname "$0")/.."
ebin=$(cd "${TELEPORT_EBIN:-_build/default/lib/teleport/ebin}" 2>/dev/null && pwd) || {
  echo "big_file: no teleport ebin; run 'rebar3 compile' (or 'make example') first" >&2
  exit 1
}
mb=${BIG_FILE_MB:-100}
chunk_mb=${BIG_FILE_CHUNK_MB:-10}
mode=${BIG_FILE_MODE:-both}
case $mode in teleport|disterl|both) ;; *) echo "BIG_FILE_MODE: teleport, disterl or both" >&2; exit 2;; esac

work=$(mktemp -d "${TMPDIR:-/tmp}/teleport_big_file.XXXXXX")
b_pid=""
cleanup() {
  [ -n "$b_pid" ] && kill "$b_pid" 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT INT TERM
erlc -o "$work" examples/big_file.erl examples/stats_reporter.erl

file=${1:-}
if [ -z "$file" ]; then
  file=$work/random.bin
  echo "writing $mb MB of random bytes to $file"
  head -c $((mb * 1000000)) /dev/urandom > "$file"
fi
size=$(wc -c < "$file")
if [ "$chunk_mb" -eq 0 ]; then chunk=$size; else chunk=$((chunk_mb * 1000000)); fi
[ "$chunk" -gt 0 ] || chunk=1

# No erl_crash.dump files in the source tree: a failing node's reason goes to stderr.
export ERL_CRASH_DUMP_SECONDS=0
cookie=teleport_big_file_$$
b=big_file_b_$$
a=big_file_a_$$
erl -noshell -sname "$b" -setcookie "$cookie" -pa "$ebin" -pa "$work" \
    -eval "big_file:receiver(\"$work/received.bin\")" &
b_pid=$!
status=0
erl -noshell -sname "$a" -setcookie "$cookie" -pa "$ebin" -pa "$work" \
    -eval "big_file:sender(\"$b\", \"$file\", $chunk, $mode)" || status=$?
# A tells B to stop when it is done; if A failed before that, B is stopped here.
i=0
while kill -0 "$b_pid" 2>/dev/null && [ $i -lt 50 ]; do sleep 0.1; i=$((i + 1)); done
exit $status
