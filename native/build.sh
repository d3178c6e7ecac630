#!/bin/sh
# Builds the NIF (release profile) and puts it where teleport_nif loads it from: priv/.
# One script for every build tool: rebar3's pre_hook, the Mix compiler in mix.exs and the
# Makefile all call it, from the project's top directory.
set -eu
cd "$(dirname "$0")/.."
if ! command -v cargo >/dev/null 2>&1 && [ -x "$HOME/.cargo/bin/cargo" ]; then
  PATH="$HOME/.cargo/bin:$PATH"
fi
command -v cargo >/dev/null 2>&1 || {
  echo "teleport: cargo not found; install Rust (https://rustup.rs) or run 'make setup'" >&2
  exit 1
}
cargo build --quiet --release --manifest-path native/Cargo.toml -p teleport_nif
mkdir -p priv
so=native/target/release/libteleport_nif.so
[ -f "$so" ] || so=native/target/release/libteleport_nif.dylib
# Copy to a temporary name of this build's own and rename: a VM that has the old file open
# keeps it intact, and two builds at once (rebar3 and mix) never trip over each other.
tmp="priv/teleport_nif.so.tmp.$$"
cp "$so" "$tmp"
mv -f "$tmp" priv/teleport_nif.so
