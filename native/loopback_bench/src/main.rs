//! Raw loopback TCP throughput: a sender thread writes `frames` frames of `size` bytes (a
//! 4-byte length, then the payload, with one `write_all` per frame) to a receiver thread
//! over 127.0.0.1; the receiver reads each frame with `read_exact` into one reused buffer.
//! The clock runs from the sender's first write to the receiver's last byte.
//!
//! With `--fresh 1` the receiver reads every frame into a newly allocated buffer and drops
//! it, as a receiver that hands each frame on as a message must (page faults included).
//!
//! Usage: loopback_bench [--frames N] [--size BYTES] [--rounds R] [--fresh 0|1]
//! Prints one line per round, then a JSON line `{"rounds":[GB/s, ...], ...}` (GB = 1e9 B).

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::thread;
use std::time::Instant;

fn arg(args: &[String], name: &str, default: usize) -> usize {
    args.windows(2)
        .find(|w| w[0] == name)
        .map(|w| w[1].parse().expect("a number"))
        .unwrap_or(default)
}

/// One round on a fresh connection; returns (seconds, bytes received).
fn round(frames: usize, size: usize, fresh: bool) -> (f64, u64) {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = listener.local_addr().expect("addr");
    let receiver = thread::spawn(move || {
        let (mut sock, _) = listener.accept().expect("accept");
        let mut header = [0u8; 4];
        let mut buf = vec![0u8; size];
        let mut total = 0u64;
        for _ in 0..frames {
            sock.read_exact(&mut header).expect("read header");
            let len = u32::from_be_bytes(header) as usize;
            if fresh {
                let mut own = vec![0u8; len];
                sock.read_exact(&mut own).expect("read payload");
                total += std::hint::black_box(own).len() as u64;
                continue;
            }
            if buf.len() < len {
                buf.resize(len, 0);
            }
            sock.read_exact(&mut buf[..len]).expect("read payload");
            total += len as u64;
        }
        (Instant::now(), total)
    });
    let mut sock = TcpStream::connect(addr).expect("connect");
    sock.set_nodelay(true).expect("nodelay");
    // Header and payload in one buffer, as one frame goes out in one write_all.
    let mut frame = Vec::with_capacity(size + 4);
    frame.extend_from_slice(&(size as u32).to_be_bytes());
    let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
    frame.extend((0..size).map(|_| {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x as u8
    }));
    let start = Instant::now();
    for _ in 0..frames {
        sock.write_all(&frame).expect("write");
    }
    let (end, total) = receiver.join().expect("receiver");
    (end.duration_since(start).as_secs_f64(), total)
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let frames = arg(&args, "--frames", 100);
    let size = arg(&args, "--size", 10 * 1024 * 1024);
    let rounds = arg(&args, "--rounds", 5);
    let fresh = arg(&args, "--fresh", 0) != 0;
    let mut gbps = Vec::new();
    for r in 1..=rounds {
        let (secs, bytes) = round(frames, size, fresh);
        let g = bytes as f64 / secs / 1e9;
        println!("round {r}: {frames} frames x {size} bytes in {secs:.3} s = {g:.3} GB/s");
        gbps.push(g);
    }
    let list: Vec<String> = gbps.iter().map(|g| format!("{g:.4}")).collect();
    println!(
        "{{\"frames\":{frames},\"frame_bytes\":{size},\"fresh\":{fresh},\"rounds\":[{}]}}",
        list.join(",")
    );
}
