# teleport: the two commands are `make bench` and `make test`. Both set up what is missing
# on a fresh Debian machine first (Erlang/OTP, rebar3, Elixir from Debian; Rust crates via
# cargo), then build the NIF through rebar3's pre_hook.

SHELL := /bin/bash
export PATH := $(HOME)/.cargo/bin:$(PATH)
CARGO := cargo
MANIFEST := --manifest-path native/Cargo.toml
DEBS := erlang-nox erlang-dev rebar3 erlang-common-test erlang-dialyzer erlang-eunit \
        erlang-tools elixir erlang-proper erlang-edoc erlang-xmerl erlang-ssl iproute2

.PHONY: all setup nif test test-rust test-erlang test-mix lint bench bench-net bench-codec fuzz fuzz-smoke clean

all: nif

## setup: installs the Debian packages that are missing (needs root or sudo) and fetches crates.
setup: .setup-done
.setup-done:
	@missing=""; for p in $(DEBS); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
	  echo "==> installing Debian packages:$$missing"; \
	  SUDO=""; [ "$$(id -u)" = 0 ] || SUDO=sudo; \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq $$missing >/dev/null; \
	fi
	@command -v $(CARGO) >/dev/null || { echo "cargo is missing: install Rust from https://rustup.rs"; exit 1; }
	$(CARGO) fetch $(MANIFEST) --quiet
	@touch $@

nif: setup
	sh native/build.sh

## test: every test and check, as CI runs it.
test: setup test-rust lint test-erlang test-mix fuzz-smoke
	@echo "==> make test: all passed"

test-rust: setup
	$(CARGO) test $(MANIFEST) --release --workspace

lint: setup
	$(CARGO) fmt $(MANIFEST) --all -- --check
	$(CARGO) clippy $(MANIFEST) --release --workspace --all-targets -- -D warnings
	rebar3 xref
	rebar3 dialyzer

test-erlang: setup
	rebar3 eunit
	rebar3 ct

## bench: the transport benchmark, teleport vs disterl on peer nodes of this machine (the
## 2015 ring at full size, small messages, calls, disterl's latency under load, one stream
## against raw loopback TCP, peak RSS); about 2.5 minutes on 2 cores. Prints a table and
## writes bench/results/latest.json and latest.svg. The codec benchmark is `make bench-codec'.
bench: nif
	@# net_kernel:start/1 does not start epmd; start it well before the benchmark needs it.
	epmd -daemon
	rebar3 as bench compile
	$(CARGO) build --release --quiet --manifest-path native/loopback_bench/Cargo.toml \
	    --target-dir _build/loopback_bench
	erl -noshell -connect_all false -pa _build/bench/lib/teleport/ebin \
	    -pa _build/bench/lib/teleport/bench \
	    -eval 'try ring_bench:main() of ok -> halt(0) catch C:E:S -> io:format("~nfailed: ~p:~p~n~p~n", [C, E, S]), halt(1) end.'
	@echo "==> these are nodes of one machine over loopback; between hosts over a shaped link: sudo make bench-net"

## bench-net: the link benchmark, as root: hosts in network namespaces (own loopback and epmd
## each), every host's egress shaped by tc tbf to LINK_RATE (default 1gbit; no delay
## emulation), disterl vs teleport: bulk with a disterl ping beside it, bulk + small
## messages, a 10 s link cut, the bulk at LINK_RATE_2 (default 10gbit), the ring over
## NET_HOSTS (default 6) hosts on a bridge. About 5 minutes; removes everything it made on
## every exit. Prints a table and writes bench/results/net.json and net.svg.
bench-net: nif
	rebar3 as bench compile
	bench/net.sh

## bench-codec: encode/decode throughput against term_to_iovec/1 and binary_to_term/1, on a
## distributed node as teleport's are (a node's pids and refs carry its name and creation).
bench-codec: nif
	epmd -daemon
	rebar3 as bench compile
	erl -noshell -sname teleport_codec_bench_$$$$ \
	    -pa _build/bench/lib/teleport/ebin -pa _build/bench/lib/teleport/bench \
	    -eval 'codec_bench:main(), halt().'

## docs: doc/index.html, edoc's HTML of the Erlang modules (edoc ships with OTP), and
## doc/teleport_ex.md and .html, the Elixir facade's docs read back from its compiled module
## (no ExDoc: it is a hex package). Fails if a public function lacks a doc or a spec.
.PHONY: docs
docs: nif
	mix run --no-start tools/docs.exs

## example: two nodes from the shell; A sends B a file (FILE, else 100 MB of random bytes)
## with teleport:send/2, then with `!', while pinging B over disterl every 50 ms.
.PHONY: example
example: nif
	rebar3 compile
	sh examples/big_file.sh $(FILE)

test-mix: setup
	MIX_ENV=test mix test

fuzz-smoke: setup
	sh native/fuzz/run.sh smoke

## fuzz: a long fuzzing run of every target (FUZZ_SECONDS each, default 600).
fuzz: setup
	sh native/fuzz/run.sh long

clean:
	rm -rf _build native/target priv/*.so .setup-done

## soak: no loss, no duplicate, no reordering, no leak under load: 2 sender nodes x 8 senders
## x SOAK_MSGS (default 200000) messages of 100 B..1 MB, mostly small, spread over 4 receivers
## on a third node, full rounds repeated until SOAK_MINUTES (default 2) have passed; every
## node's VmRSS sampled every SOAK_SAMPLE_MS (default 3000) and checked flat after warm-up.
## SOAK_KILL_EVERY_S (default 0: never; needs root) destroys the receiver's teleport sockets
## with `ss -K' that often, alternately from either end: still no loss, no duplicate.
## Prints each round, the totals and the RSS samples; fails on any loss or growth.
.PHONY: soak
soak: nif
	rebar3 as test compile
	erl -noshell -connect_all false -pa _build/test/lib/teleport/ebin \
	    -pa _build/test/lib/teleport/test \
	    -eval 'try teleport_soak:main() of ok -> halt(0) catch C:E:S -> io:format("~nfailed: ~p:~p~n~p~n", [C, E, S]), halt(1) end.'

## cover: line coverage of the Erlang code over every node the tests run on (eunit, and the
## suites' runner node and peers: test/teleport_cover.erl loads the cover-compiled modules on
## each peer and collects them before it stops), and of the Rust crates over the core's cargo
## tests and every VM of those Erlang runs (the NIF is built instrumented for the run, then
## rebuilt plain; a VM killed by a test leaves no counts, or a cut file that is skipped).
## Needs cargo-llvm-cov and the llvm-tools component (installed if missing). Prints both
## totals; HTML in _build/test/cover/index.html and _build/test/cover/rust/html/index.html.
COVER_ENV = eval "$$($(CARGO) llvm-cov show-env --sh $(MANIFEST) 2>/dev/null)"
# cargo does not see the instrumenting wrapper come or go: the crates' release builds are
# thrown away before and after, so neither kind of build is ever taken for the other.
COVER_CLEAN = $(CARGO) clean $(MANIFEST) --release --quiet -p teleport_core -p teleport_nif
.PHONY: cover
cover: setup
	@command -v cargo-llvm-cov >/dev/null || { rustup component add llvm-tools-preview && \
	  $(CARGO) install cargo-llvm-cov --locked; }
	@mkdir -p _build/test/cover; rm -f _build/test/cover/*.coverdata _build/test/cover/failed
	@( $(COVER_ENV); \
	  $(CARGO) llvm-cov clean --workspace $(MANIFEST); $(COVER_CLEAN); \
	  $(CARGO) test $(MANIFEST) --workspace --release --quiet || touch _build/test/cover/failed; \
	  rebar3 eunit --cover || touch _build/test/cover/failed; \
	  rebar3 ct --cover || touch _build/test/cover/failed; \
	  rebar3 cover --verbose > _build/test/cover/erlang.txt 2>&1; \
	  profdata=$$(ls $$(rustc --print sysroot)/lib/rustlib/*/bin/llvm-profdata); \
	  for f in native/target/*.profraw; do \
	    "$$profdata" merge -sparse -o /dev/null "$$f" 2>/dev/null || rm -f "$$f"; done; \
	  $(CARGO) llvm-cov report $(MANIFEST) --release --html --output-dir _build/test/cover/rust; \
	  $(CARGO) llvm-cov report $(MANIFEST) --release --lcov --output-path _build/test/cover/rust.lcov; \
	  $(CARGO) llvm-cov report $(MANIFEST) --release --summary-only > _build/test/cover/rust.txt; \
	  $(CARGO) llvm-cov clean --workspace $(MANIFEST); $(COVER_CLEAN) )
	@# Back to the plain NIF, in native/target and priv/.
	sh native/build.sh
	@cat _build/test/cover/erlang.txt _build/test/cover/rust.txt
	@echo "==> Erlang lines covered, all nodes: $$(grep -o 'total *| *[0-9]*%' \
	  _build/test/cover/erlang.txt | grep -o '[0-9]*%')"
	@awk '$$1 ~ /^teleport_(core|nif)\// { split($$1, p, "/"); n[p[1]] += $$8; m[p[1]] += $$9 } \
	  $$1 == "TOTAL" { t = $$10 } \
	  END { for (c in n) printf "==> Rust lines covered, %s: %.2f%%\n", c, 100 * (n[c] - m[c]) / n[c]; \
	        print "==> Rust lines covered, both crates: " t }' _build/test/cover/rust.txt
	@test ! -f _build/test/cover/failed || { echo "==> some tests failed (counted above all the same)"; exit 1; }
