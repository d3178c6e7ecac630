# teleport: the two commands are `make bench` and `make test`. Both set up what is missing
# on a fresh Debian machine first (Erlang/OTP, rebar3, Elixir from Debian; Rust crates via
# cargo), then build the NIF through rebar3's pre_hook.

SHELL := /bin/bash
export PATH := $(HOME)/.cargo/bin:$(PATH)
CARGO := cargo
MANIFEST := --manifest-path native/Cargo.toml
DEBS := erlang-nox erlang-dev rebar3 erlang-common-test erlang-dialyzer erlang-eunit \
        erlang-tools elixir erlang-proper erlang-edoc erlang-xmerl

.PHONY: all setup nif test test-rust test-erlang test-mix lint bench bench-codec fuzz fuzz-smoke clean

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
	rebar3 as bench compile
	$(CARGO) build --release --quiet --manifest-path native/loopback_bench/Cargo.toml \
	    --target-dir _build/loopback_bench
	erl -noshell -connect_all false -pa _build/bench/lib/teleport/ebin \
	    -pa _build/bench/lib/teleport/bench \
	    -eval 'try ring_bench:main() of ok -> halt(0) catch C:E:S -> io:format("~nfailed: ~p:~p~n~p~n", [C, E, S]), halt(1) end.'

## bench-codec: encode/decode throughput against term_to_iovec/1 and binary_to_term/1.
bench-codec: nif
	rebar3 as bench compile
	erl -noshell -pa _build/bench/lib/teleport/ebin -pa _build/bench/lib/teleport/bench \
	    -eval 'codec_bench:main(), halt().'

test-mix: setup
	MIX_ENV=test mix test

fuzz-smoke: setup
	sh native/fuzz/run.sh smoke

## fuzz: a long fuzzing run of every target (FUZZ_SECONDS each, default 600).
fuzz: setup
	sh native/fuzz/run.sh long

clean:
	rm -rf _build native/target priv/*.so .setup-done
