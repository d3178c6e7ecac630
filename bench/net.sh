#!/usr/bin/env bash
# `make bench-net': the link benchmark (bench/net_bench.erl) in network namespaces, as root.
# Every namespace it makes is named after this shell's pid (TELEPORT_NETNS_RUN); the trap
# removes them, and every process in them, on every way out: success, failure, Ctrl-C, kill.
set -uo pipefail
cd "$(dirname "$0")/.."
EBIN="-pa _build/bench/lib/teleport/ebin -pa _build/bench/lib/teleport/bench"
export TELEPORT_NETNS_RUN="b$$"
ERL=""
cleanup() {
    erl -noshell $EBIN -eval 'teleport_netns:cleanup_main(), halt().'
    left=$(ip netns list 2>/dev/null | grep -c "^tpn${TELEPORT_NETNS_RUN}x" || true)
    [ "$left" = 0 ] || echo "bench-net: $left namespaces of this run could not be removed"
}
# On a signal the benchmark is killed first (so it makes nothing more), then cleaned up.
stop() {
    [ -z "$ERL" ] || { kill -KILL "$ERL" 2>/dev/null; wait "$ERL" 2>/dev/null; }
    echo "bench-net: interrupted"
    exit 130
}
trap cleanup EXIT
trap stop INT TERM HUP
if [ "$(id -u)" != 0 ]; then
    echo "bench-net: network namespaces need root (run: sudo make bench-net)"; exit 2
fi
for t in ip tc ss; do
    command -v $t >/dev/null || { echo "bench-net: \`$t' is missing (Debian package iproute2; make setup installs it)"; exit 2; }
done
# In the background, so that a signal reaches the trap at once (bash runs traps only
# between commands, and `wait' is one it interrupts).
erl -noshell $EBIN \
    -eval 'try net_bench:main() of ok -> halt(0) catch error:{bad_parameter, _, Msg} -> io:format("~ts~n", [Msg]), halt(2); C:E:S -> io:format("~nfailed: ~p:~p~n~p~n", [C, E, S]), halt(1) end.' &
ERL=$!
wait "$ERL"
exit $?
