//! Every atom the NIF returns or matches, in one place.

rustler::atoms! {
    /// Returned by a fast-path NIF whose work outgrew a normal scheduler's slice: the
    /// Erlang wrapper then calls the `_dirty` variant.
    dirty,
    ok, error, busy, closed, too_large, bad_ip, index, state, queued_bytes, frames_in_queue,
    last_error, undefined, down, connecting, up, peer_addr, local_addr, msgs_out, bytes_out,
    writes,
    connected_since, reconnects, sndbuf, recbuf, teleport_pool_stale, unacked_frames,
    unacked_bytes, last_acked, listen, socket_opt, nodelay, keepalive, keepalive_time,
    keepalive_interval, keepalive_retries, priority, tos, user_timeout, bind_ip, ip, port,
    handshaking, incoming, id, peer, msgs_in, bytes_in, teleport_log, warning, info, debug,
    invalid_event, invalid_field, dropped, callsite,
    // The readers (see `reader`).
    teleport_accepted, teleport_tick, read, wait, more, done, normal, infinity, reader,
    longest_turn_cpu_us, longest_turn_wall_us, eof,
    // TLS (see `runtime::load_tls`).
    tls, verify, verify_peer, verify_none, certfile, keyfile, cacertfile, server_name_check, key,
    versions, tlsv1_3 = "tlsv1.3", tlsv1_2 = "tlsv1.2",
}
