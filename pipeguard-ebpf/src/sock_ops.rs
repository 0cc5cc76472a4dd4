//! sock_ops: marks TCP connections the pod accepted, so their packets are replies (see
//! `reply`). Only the passive-established callback matters; it runs on the new child
//! socket, which inherits the listener's cgroup, once the handshake completes.

use aya_ebpf::{bindings::BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB, macros::sock_ops, programs::SockOpsContext};

use crate::reply;

/// sock_ops programs return 1 for "ok"; the value is not a verdict for these callbacks.
const OK: u32 = 1;

#[sock_ops]
pub fn pg_sock_ops(ctx: SockOpsContext) -> u32 {
    if ctx.op() == BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB {
        // Failing to mark (no memory for the storage) only means this connection's packets
        // are judged as egress: closed, never opened.
        reply::mark_accepted(&ctx);
    }
    OK
}
