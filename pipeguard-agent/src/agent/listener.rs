//! The HTTP listener, bounded so no client can take what enforcement needs: every pod on
//! the node can reach this port. A connection cap (derived from the descriptor limit, so a
//! reserve always stays for scans, map updates and the API client), a per-source cap, a
//! deadline for the request head, a cap on its size, and an idle timeout (nothing read or
//! written) close what a slow or hostile client holds. Event streams send keep-alives, so
//! only dead streams go idle.

use std::{
    collections::HashMap,
    net::IpAddr,
    pin::Pin,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    task::{Context, Poll},
    time::{Duration, Instant},
};

use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    net::TcpStream,
};

/// Descriptors kept free for the agent's own work whatever the HTTP load.
pub const FD_RESERVE: u64 = 128;

#[derive(Clone, Debug)]
pub struct Limits {
    /// Open connections at most; more are closed as soon as accepted.
    pub max_connections: usize,
    /// Open connections from one address at most.
    pub per_source: usize,
    /// The whole request head must arrive within this.
    pub header_read_timeout: Duration,
    /// A connection that moves no byte either way for this long is closed.
    pub idle_timeout: Duration,
    /// Request head size at most (hyper's buffer; its minimum is 8 KiB).
    pub max_head_bytes: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            // 2,000 event subscribers, probes and scrapers, with room to spare; about 18 KiB
            // each, so the cap also bounds the listener's memory (~45 MB).
            max_connections: 2560,
            // One pod (one IP) cannot take more than this share.
            per_source: 32,
            // A real client sends its head in one packet.
            header_read_timeout: Duration::from_secs(5),
            // Event streams write a keep-alive every `stream::KEEPALIVE`.
            idle_timeout: Duration::from_secs(60),
            max_head_bytes: 16 * 1024,
        }
    }
}

impl Limits {
    /// The default caps, lowered so that `FD_RESERVE` descriptors stay free below the
    /// process's soft limit `nofile`.
    pub fn for_fd_limit(nofile: u64) -> Self {
        let mut limits = Self::default();
        let usable = nofile.saturating_sub(FD_RESERVE).max(8) as usize;
        limits.max_connections = limits.max_connections.min(usable);
        limits.per_source = limits.per_source.min(limits.max_connections);
        limits
    }
}

/// Counts open connections in total and per source address.
#[derive(Default)]
pub struct Connections {
    open: Mutex<(usize, HashMap<IpAddr, usize>)>,
    /// Connections closed at once because a cap was reached.
    pub refused: AtomicU64,
    /// Connections closed by the head deadline or the idle timeout.
    pub timed_out: AtomicU64,
}

/// One open connection; gives its slot back when dropped.
pub struct Slot {
    connections: Arc<Connections>,
    source: IpAddr,
}

impl Connections {
    pub fn open(&self) -> usize {
        self.open.lock().expect("connections lock").0
    }

    fn take(self: &Arc<Self>, source: IpAddr, limits: &Limits) -> Option<Slot> {
        let mut open = self.open.lock().expect("connections lock");
        let from_source = open.1.get(&source).copied().unwrap_or(0);
        if open.0 >= limits.max_connections || from_source >= limits.per_source {
            self.refused.fetch_add(1, Ordering::Relaxed);
            return None;
        }
        open.0 += 1;
        open.1.insert(source, from_source + 1);
        Some(Slot {
            connections: self.clone(),
            source,
        })
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut open = self.connections.open.lock().expect("connections lock");
        open.0 -= 1;
        if let Some(n) = open.1.get_mut(&self.source) {
            *n -= 1;
            if *n == 0 {
                open.1.remove(&self.source);
            }
        }
    }
}

/// Serves `router` on `listener` within `limits` until the listener fails for good.
pub async fn serve(
    listener: tokio::net::TcpListener,
    router: axum::Router,
    limits: Limits,
    connections: Arc<Connections>,
) {
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(error) => {
                // EMFILE and friends: the reserve is for enforcement, so wait instead of
                // spinning; the caps make this rare.
                tracing::warn!(%error, "accepting an HTTP connection failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let Some(slot) = connections.take(peer.ip(), &limits) else {
            drop(stream);
            continue;
        };
        let service = hyper_util::service::TowerToHyperService::new(router.clone());
        let limits = limits.clone();
        tokio::spawn(async move {
            let activity = Arc::new(Activity::new());
            let io = TokioIo::new(Tracked {
                inner: stream,
                activity: activity.clone(),
            });
            let mut builder = hyper::server::conn::http1::Builder::new();
            builder
                .timer(TokioTimer::new())
                .header_read_timeout(limits.header_read_timeout)
                .max_buf_size(limits.max_head_bytes.max(8192))
                .keep_alive(true);
            let conn = builder.serve_connection(io, service);
            let timed_out = tokio::select! {
                result = conn => matches!(result, Err(e) if e.is_timeout()),
                () = activity.idle_for(limits.idle_timeout) => true,
            };
            if timed_out {
                slot.connections.timed_out.fetch_add(1, Ordering::Relaxed);
            }
            drop(slot);
        });
    }
}

/// When a connection last moved a byte, in milliseconds since it opened.
struct Activity {
    start: Instant,
    last_ms: AtomicU64,
}

impl Activity {
    fn new() -> Self {
        Self {
            start: Instant::now(),
            last_ms: AtomicU64::new(0),
        }
    }

    fn touch(&self) {
        self.last_ms
            .store(self.start.elapsed().as_millis() as u64, Ordering::Relaxed);
    }

    /// Resolves once nothing has moved for `idle`.
    async fn idle_for(&self, idle: Duration) {
        loop {
            let last = self.start + Duration::from_millis(self.last_ms.load(Ordering::Relaxed));
            let deadline = last + idle;
            if Instant::now() >= deadline {
                return;
            }
            tokio::time::sleep_until(deadline.into()).await;
        }
    }
}

/// A TCP stream that notes every successful read or write in its `Activity`.
struct Tracked {
    inner: TcpStream,
    activity: Arc<Activity>,
}

impl AsyncRead for Tracked {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        let result = Pin::new(&mut this.inner).poll_read(cx, buf);
        if matches!(result, Poll::Ready(Ok(()))) && buf.filled().len() > before {
            this.activity.touch();
        }
        result
    }
}

impl AsyncWrite for Tracked {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, data: &[u8]) -> Poll<std::io::Result<usize>> {
        let this = self.get_mut();
        let result = Pin::new(&mut this.inner).poll_write(cx, data);
        if matches!(result, Poll::Ready(Ok(n)) if n > 0) {
            this.activity.touch();
        }
        result
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

/// Raises the soft descriptor limit to the hard one and returns the soft limit in force.
pub fn raise_fd_limit() -> std::io::Result<u64> {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes into the struct we own.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    if limit.rlim_cur < limit.rlim_max {
        let raised = libc::rlimit {
            rlim_cur: limit.rlim_max,
            rlim_max: limit.rlim_max,
        };
        // SAFETY: setrlimit reads the struct we own.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raised) } != 0 {
            return Err(std::io::Error::last_os_error());
        }
        limit.rlim_cur = limit.rlim_max;
    }
    Ok(limit.rlim_cur)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn caps_follow_the_descriptor_limit_and_leave_the_reserve() {
        assert_eq!(Limits::for_fd_limit(1 << 20).max_connections, 2560);
        let low = Limits::for_fd_limit(256);
        assert_eq!(low.max_connections, 256 - FD_RESERVE as usize);
        assert!(low.per_source <= low.max_connections);
        assert_eq!(Limits::for_fd_limit(10).max_connections, 8);
    }

    #[test]
    fn slots_are_capped_in_total_and_per_source_and_given_back() {
        let limits = Limits {
            max_connections: 3,
            per_source: 2,
            ..Limits::default()
        };
        let c = Arc::new(Connections::default());
        let (a, b): (IpAddr, IpAddr) = ("10.0.0.1".parse().unwrap(), "10.0.0.2".parse().unwrap());
        let a1 = c.take(a, &limits).unwrap();
        let _a2 = c.take(a, &limits).unwrap();
        assert!(c.take(a, &limits).is_none(), "per-source cap");
        let _b1 = c.take(b, &limits).unwrap();
        assert!(c.take(b, &limits).is_none(), "total cap");
        assert_eq!(c.refused.load(Ordering::Relaxed), 2);
        drop(a1);
        assert_eq!(c.open(), 2);
        assert!(c.take(b, &limits).is_some(), "a freed slot is usable again");
    }
}
