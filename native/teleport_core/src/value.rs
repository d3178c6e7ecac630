//! A plain-Rust picture of an Erlang term, so that the codec can be tested and fuzzed without
//! a VM: [`decode_value`] parses into it and [`encode_value`] writes it back with the same
//! [`Writer`] the NIF uses.

use crate::decode::{layout, parse, Builder, DecodeError, Layout};
use crate::encode::Writer;

/// An Erlang term as the parser sees it.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    /// An integer that fits in 64 bits.
    Int(i64),
    /// A float.
    Float(f64),
    /// Atom text as Unicode.
    Atom(String),
    /// A binary.
    Binary(Vec<u8>),
    /// A tuple.
    Tuple(Vec<Value>),
    /// Elements and tail (`Nil` for a proper list). Never empty: `[]` is `Nil`.
    List(Vec<Value>, Box<Value>),
    /// `[]`.
    Nil,
    /// Keys and values in encoded order.
    Map(Vec<(Value, Value)>),
    /// A term the VM decodes itself, kept as its encoding (tag included, no version byte).
    Opaque(u8, Vec<u8>),
}

impl Drop for Value {
    /// Drops children from an explicit stack: a term nested a million deep must not recurse
    /// (the derived drop would overflow the stack on such input, found by fuzzing).
    fn drop(&mut self) {
        let mut stack = Vec::new();
        take_children(self, &mut stack);
        while let Some(mut v) = stack.pop() {
            take_children(&mut v, &mut stack);
        }
    }
}

/// Moves the children of `v` onto `out`, leaving `v` a leaf.
fn take_children(v: &mut Value, out: &mut Vec<Value>) {
    match v {
        Value::Tuple(es) => out.append(es),
        Value::List(es, tail) => {
            out.append(es);
            out.push(std::mem::replace(&mut **tail, Value::Nil));
        }
        Value::Map(kvs) => {
            for (k, v) in kvs.drain(..) {
                out.push(k);
                out.push(v);
            }
        }
        _ => {}
    }
}

/// Builds [`Value`]s.
struct ValueBuilder;

impl Builder for ValueBuilder {
    type Term = Value;

    fn int(&mut self, v: i64) -> Result<Value, DecodeError> {
        Ok(Value::Int(v))
    }
    fn float(&mut self, v: f64) -> Result<Value, DecodeError> {
        Ok(Value::Float(v))
    }
    fn atom(&mut self, text: &[u8], utf8: bool, _raw: &[u8]) -> Result<Value, DecodeError> {
        Ok(Value::Atom(if utf8 {
            String::from_utf8(text.to_vec()).map_err(|_| DecodeError::BadAtom)?
        } else {
            text.iter().map(|&c| c as char).collect()
        }))
    }
    fn binary(&mut self, data: &[u8], _offset: usize) -> Result<Value, DecodeError> {
        Ok(Value::Binary(data.to_vec()))
    }
    fn opaque(&mut self, tag: u8, raw: &[u8]) -> Result<Value, DecodeError> {
        Ok(Value::Opaque(tag, raw.to_vec()))
    }
    fn nil(&mut self) -> Result<Value, DecodeError> {
        Ok(Value::Nil)
    }
    fn string(&mut self, bytes: &[u8]) -> Result<Value, DecodeError> {
        self.list(
            &mut bytes
                .iter()
                .map(|&c| Value::Int(c as i64))
                .collect::<Vec<_>>(),
            Value::Nil,
        )
    }
    fn tuple(&mut self, elems: &mut [Value]) -> Result<Value, DecodeError> {
        Ok(Value::Tuple(take_all(elems)))
    }
    fn list(&mut self, elems: &mut [Value], tail: Value) -> Result<Value, DecodeError> {
        if elems.is_empty() {
            return Ok(tail);
        }
        // Like `binary_to_term/1`, `[a | [b]]` in two list headers is the list `[a, b]`.
        let mut elems = take_all(elems);
        let mut tail = tail;
        let tail = match &mut tail {
            Value::List(more, rest) => {
                elems.append(more);
                std::mem::replace(&mut **rest, Value::Nil)
            }
            _ => tail,
        };
        Ok(Value::List(elems, Box::new(tail)))
    }
    fn map(&mut self, pairs: &mut [Value]) -> Result<Value, DecodeError> {
        let pairs: Vec<(Value, Value)> = pairs
            .chunks_exact_mut(2)
            .map(|kv| {
                (
                    std::mem::replace(&mut kv[0], Value::Nil),
                    std::mem::replace(&mut kv[1], Value::Nil),
                )
            })
            .collect();
        for (i, (k, _)) in pairs.iter().enumerate() {
            if pairs[..i].iter().any(|(k2, _)| k2 == k) {
                return Err(DecodeError::Refused);
            }
        }
        Ok(Value::Map(pairs))
    }
}

/// Moves values out of a slice without cloning them (a clone of a deep term would recurse).
fn take_all(elems: &mut [Value]) -> Vec<Value> {
    elems
        .iter_mut()
        .map(|e| std::mem::replace(e, Value::Nil))
        .collect()
}

/// Decodes a whole encoded term (version byte first) into a [`Value`].
/// Compressed terms are refused here with `BadTag(80)`: inflating is the VM's job.
pub fn decode_value(input: &[u8]) -> Result<Value, DecodeError> {
    decode_value_used(input).map(|(v, _)| v)
}

/// Like [`decode_value`], also returning how many bytes the term took.
pub fn decode_value_used(input: &[u8]) -> Result<(Value, usize), DecodeError> {
    match layout(input)? {
        Layout::Plain => parse(input, 1, &mut ValueBuilder),
        Layout::Compressed { .. } => Err(DecodeError::BadTag(crate::etf::COMPRESSED)),
    }
}

/// Encodes a [`Value`] (version byte first) with the same [`Writer`] calls the NIF makes.
pub fn encode_value(v: &Value) -> Vec<u8> {
    let mut w = Writer::default();
    w.version();
    write_value(&mut w, v);
    w.finish().0
}

fn write_value(w: &mut Writer, v: &Value) {
    // Recursion is fine here: this is a test and fuzzing helper, not the NIF's walker.
    match v {
        Value::Int(i) => w.int(*i),
        Value::Float(f) => w.float(*f),
        Value::Atom(s) => w.atom_utf8(s.as_bytes()),
        Value::Binary(b) => w.binary(b),
        Value::Tuple(es) => {
            w.tuple_header(es.len());
            es.iter().for_each(|e| write_value(w, e));
        }
        Value::List(es, tail) => {
            let p = w.list_header();
            es.iter().for_each(|e| write_value(w, e));
            write_value(w, tail);
            w.patch(p, es.len() as u32);
        }
        Value::Nil => w.nil(),
        Value::Map(kvs) => {
            w.map_header(kvs.len());
            for (k, v) in kvs {
                write_value(w, k);
                write_value(w, v);
            }
        }
        Value::Opaque(_, raw) => w.raw(raw),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Value {
        Value::Map(vec![
            (Value::Atom("k".into()), Value::Float(-2.5)),
            (
                Value::Binary(b"key".to_vec()),
                Value::List(
                    vec![Value::Int(-70000), Value::Int(i64::MAX), Value::Nil],
                    Box::new(Value::Atom("tail".into())),
                ),
            ),
            (
                Value::Tuple(vec![]),
                Value::Tuple(vec![Value::Atom("ünïcode".into()); 300]),
            ),
        ])
    }

    #[test]
    fn encode_then_decode_is_identity() {
        let v = sample();
        assert_eq!(decode_value(&encode_value(&v)), Ok(v));
    }

    #[test]
    fn every_truncation_is_an_error_never_a_panic() {
        let bytes = encode_value(&sample());
        for cut in 0..bytes.len() {
            assert!(decode_value(&bytes[..cut]).is_err(), "cut at {cut}");
        }
    }

    #[test]
    fn repeated_map_keys_are_refused() {
        let bytes = [131, 116, 0, 0, 0, 2, 97, 1, 97, 2, 97, 1, 97, 3];
        assert_eq!(decode_value(&bytes), Err(DecodeError::Refused));
    }

    #[test]
    fn a_truncated_deep_term_fails_without_recursing() {
        // {<150,000 nested 1-tuples>, <missing>}: the partial values are dropped on error.
        let mut input = vec![131, 104, 2];
        for _ in 0..150_000 {
            input.extend_from_slice(&[104, 1]);
        }
        input.push(106);
        assert_eq!(decode_value(&input), Err(DecodeError::Truncated));
    }

    #[test]
    fn strings_are_lists_of_integers() {
        let v = decode_value(&[131, 107, 0, 2, b'h', b'i']).unwrap();
        assert_eq!(
            v,
            Value::List(vec![Value::Int(104), Value::Int(105)], Box::new(Value::Nil))
        );
    }
}
