//! `decode_etf`: arbitrary bytes through `decode_value`, the parser with the `Value` builder.
//!
//! Checks, for every input: no panic, no hang, no more heap than the input's budget
//! (`teleport_fuzz::with_budget`). For every input that decodes to a value `v` in `used` bytes:
//! - `used` is within the input, the first `used` bytes alone decode to `v` again (bytes after
//!   the term are ignored) and one byte fewer does not decode;
//! - `encode_value(v)` decodes to a value equal to `v`, using all of its bytes, and encoding
//!   that value again gives the same bytes (a fixpoint).
//!
//! Strings come back as lists of integers, atoms as UTF-8 and integers in their smallest form,
//! so the bytes of `encode_value(v)` may differ from the input's; the values may not.
#![no_main]

use libfuzzer_sys::fuzz_target;
use teleport_core::value::{decode_value_used, encode_value, Value};
use teleport_fuzz::{depth, dispose, run_check, MAX_ROUNDTRIP_DEPTH};

fuzz_target!(|data: &[u8]| run_check(data, check));

fn check(data: &[u8]) {
    let Ok((v, used)) = decode_value_used(data) else {
        return;
    };
    assert!(
        (2..=data.len()).contains(&used),
        "used {used} of {} bytes",
        data.len()
    );
    if used < data.len() {
        let (w, used_again) = decode_value_used(&data[..used])
            .unwrap_or_else(|e| panic!("the term's own {used} bytes fail to decode: {e:?}"));
        assert_eq!(
            used_again, used,
            "the term's own bytes decode to another length"
        );
        assert_same(&w, &v, "the term's own bytes decode to another value");
        dispose(w);
    }
    if let Ok((short, _)) = decode_value_used(&data[..used - 1]) {
        dispose(short);
        panic!("{} bytes decode although the term takes {used}", used - 1);
    }
    if depth(&v) <= MAX_ROUNDTRIP_DEPTH {
        let bytes = encode_value(&v);
        let (again, used2) = decode_value_used(&bytes)
            .unwrap_or_else(|e| panic!("encode_value({v:?}) = {bytes:?} does not decode: {e:?}"));
        assert_eq!(used2, bytes.len(), "re-encoded {v:?} as {bytes:?}");
        assert_same(&again, &v, "decode(encode(v)) != v");
        let bytes2 = encode_value(&again);
        assert_eq!(
            bytes2, bytes,
            "encode(decode(encode(v))) != encode(v) for {v:?}"
        );
        dispose(again);
    }
    dispose(v);
}

/// `a == b`, comparing only values shallow enough for the recursive `==` and `Debug`.
fn assert_same(a: &Value, b: &Value, what: &str) {
    if depth(a).max(depth(b)) <= MAX_ROUNDTRIP_DEPTH {
        assert!(a == b, "{what}: {a:?} != {b:?}");
    }
}
