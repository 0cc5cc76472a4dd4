//! sock_ops: marks TCP connections the pod accepted, so their packets are replies (see
//! `reply`): the passive-established callback runs on the new child socket, which inherits
//! the listener's cgroup, once the handshake completes. And ends a connection's record
//! (`owner`) when TCP reaches CLOSE: connections with a record (accepted, or a guarded
//! pod's established ones) ask for state callbacks, since close() (`pg_sock_release`)
//! comes before their last packets.

use aya_ebpf::{
    bindings::{
        BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB, BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB, BPF_SOCK_OPS_STATE_CB,
        BPF_SOCK_OPS_STATE_CB_FLAG, BPF_TCP_CLOSE,
    },
    helpers::generated::bpf_get_socket_cookie,
    macros::sock_ops,
    programs::SockOpsContext,
};

use crate::{fast, owner, reply};

/// sock_ops programs return 1 for "ok"; the value is not a verdict for these callbacks.
const OK: u32 = 1;

#[sock_ops]
pub fn pg_sock_ops(ctx: SockOpsContext) -> u32 {
    match ctx.op() {
        BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB => {
            // Only a record needs the callbacks (to be removed at CLOSE). Failing to mark (a
            // full table) only means this connection's packets are judged as egress: closed,
            // never opened.
            if reply::mark_accepted(&ctx) {
                ask_for_state_changes(&ctx);
            }
        }
        // Only a guarded pod's connection has a record to remove: other pods' connections
        // (the agent attaches above every pod) are spared the callbacks.
        BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB
            if !fast::by_cookie(unsafe { bpf_get_socket_cookie(ctx.ops.cast()) }).is_null() =>
        {
            ask_for_state_changes(&ctx)
        }
        BPF_SOCK_OPS_STATE_CB if ctx.arg(1) == BPF_TCP_CLOSE => {
            owner::forget(unsafe { bpf_get_socket_cookie(ctx.ops.cast()) });
        }
        _ => {}
    }
    OK
}

/// Keeps whatever callbacks another program asked for on this socket. It fails only for
/// flags the kernel does not know, never for this one (a record without its CLOSE would hold
/// its slot for good: nothing ages records out).
#[inline(always)]
fn ask_for_state_changes(ctx: &SockOpsContext) {
    let _ = ctx.set_cb_flags((ctx.cb_flags() | BPF_SOCK_OPS_STATE_CB_FLAG) as i32);
}
