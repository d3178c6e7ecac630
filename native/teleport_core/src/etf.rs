//! Tags and limits of Erlang's external term format (ETF).
//!
//! The authoritative description is `erts/doc/src/erl_ext_dist.xml` in OTP. Only the tags that
//! `binary_to_term/1` accepts on OTP 25 are listed; the distribution-only `ATOM_CACHE_REF` and
//! the OTP 26 `LOCAL_EXT` are refused by the decoder exactly as `binary_to_term/1` refuses them.

// The tag constants carry the names the spec gives them; the spec is their documentation.
#![allow(missing_docs)]

/// The version byte that starts every encoded term.
pub const VERSION: u8 = 131;
/// A zlib-compressed term: `80, UncompressedSize:32, ZlibData`.
pub const COMPRESSED: u8 = 80;

pub const NEW_FLOAT_EXT: u8 = 70;
pub const BIT_BINARY_EXT: u8 = 77;
pub const NEW_PID_EXT: u8 = 88;
pub const NEW_PORT_EXT: u8 = 89;
pub const NEWER_REFERENCE_EXT: u8 = 90;
pub const SMALL_INTEGER_EXT: u8 = 97;
pub const INTEGER_EXT: u8 = 98;
pub const FLOAT_EXT: u8 = 99;
pub const ATOM_EXT: u8 = 100;
pub const REFERENCE_EXT: u8 = 101;
pub const PORT_EXT: u8 = 102;
pub const PID_EXT: u8 = 103;
pub const SMALL_TUPLE_EXT: u8 = 104;
pub const LARGE_TUPLE_EXT: u8 = 105;
pub const NIL_EXT: u8 = 106;
pub const STRING_EXT: u8 = 107;
pub const LIST_EXT: u8 = 108;
pub const BINARY_EXT: u8 = 109;
pub const SMALL_BIG_EXT: u8 = 110;
pub const LARGE_BIG_EXT: u8 = 111;
pub const NEW_FUN_EXT: u8 = 112;
pub const EXPORT_EXT: u8 = 113;
pub const NEW_REFERENCE_EXT: u8 = 114;
pub const SMALL_ATOM_EXT: u8 = 115;
pub const MAP_EXT: u8 = 116;
pub const ATOM_UTF8_EXT: u8 = 118;
pub const SMALL_ATOM_UTF8_EXT: u8 = 119;
pub const V4_PORT_EXT: u8 = 120;

/// The most characters an atom may have (`binary_to_term/1` refuses longer ones).
pub const MAX_ATOM_CHARS: usize = 255;

/// Binaries at least this long are referenced, not copied, by the encoder: the iolist it returns
/// holds the caller's own binary. Below it a copy into the shared output buffer is cheaper than
/// one more iolist element (and one more `iovec` for `writev`).
pub const ENCODE_SHARE_MIN: usize = 2048;

/// Binaries at least this long may be decoded as sub-binaries of the received buffer (a
/// multiple of 256 below 64 KiB: [`crate::decode::may_share`]'s filter reads it so). At 64 KiB,
/// a message of one 64 KB binary was copied out of its frame, just under the bar.
pub const DECODE_SHARE_MIN: usize = 16 * 1024;

/// Whether the decoder should return a binary of `len` bytes found in a buffer of `total` bytes
/// as a sub-binary of that buffer (zero-copy) rather than as a copy.
///
/// A sub-binary keeps the whole buffer alive, so only binaries that are a large share of it are
/// shared: at worst a kept sub-binary pins 16 times its own size.
#[inline]
pub fn share_on_decode(len: usize, total: usize) -> bool {
    len >= DECODE_SHARE_MIN && len.saturating_mul(16) >= total
}

/// The largest ratio of inflated to deflated size that zlib can produce (about 1032:1), plus
/// slack. A compressed term claiming more than this is refused before anything is allocated.
pub const MAX_INFLATE_RATIO: usize = 1040;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn share_rule_needs_size_and_share_of_buffer() {
        assert!(!share_on_decode(DECODE_SHARE_MIN - 1, DECODE_SHARE_MIN));
        assert!(share_on_decode(DECODE_SHARE_MIN, DECODE_SHARE_MIN + 10));
        assert!(share_on_decode(1 << 20, 16 << 20));
        assert!(!share_on_decode(1 << 20, (16 << 20) + 1));
        // No overflow for absurd lengths.
        assert!(share_on_decode(usize::MAX / 2, usize::MAX));
    }
}
