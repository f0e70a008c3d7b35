//! A TCP proxy on an ephemeral loopback port that injects network faults between a client and
//! one upstream (a test `redis-server`): delays, a black hole, resets before or after the
//! request reaches the upstream, and lost replies. Shared by the integration tests (`#[path]`).
//!
//! The mode is read once per chunk, so [`FaultProxy::set`] applies at once to open connections
//! too. The upstream is dialled again for every accepted client, so a restarted upstream on the
//! same port serves new connections. A reset is an abortive close (`SO_LINGER` 0): the client
//! reads `ECONNRESET`. When either side of a connection closes, the proxy closes both. Dropping
//! the proxy stops listening and aborts every task it started.
#![allow(dead_code)]

use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch};
use tokio::task::{JoinHandle, JoinSet};
use tokio::time::{sleep, sleep_until, timeout, Instant};

/// How long a client waits for the upstream to accept before it is reset.
const DIAL_TIMEOUT: Duration = Duration::from_secs(2);
/// The largest chunk read at once.
const CHUNK: usize = 16 * 1024;

/// What the proxy does with the bytes of every connection, from the next chunk on.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Fault {
    /// Forward both ways.
    None,
    /// Deliver each chunk, in each direction, `fixed` plus a uniform random part of `[0, jitter]`
    /// after it was read, never before an earlier chunk of the same direction.
    Delay { fixed: Duration, jitter: Duration },
    /// Accept connections, deliver nothing either way (bytes are discarded) and never close.
    Blackhole,
    /// Reset the client on its next request bytes, without forwarding them.
    ResetBeforeForward,
    /// Forward requests; on the upstream's reply, discard it and reset the client: the command
    /// ran but the client never hears the answer.
    ResetAfterForward,
    /// Forward requests and discard every reply byte; connections stay open.
    DropReplies,
}

/// Counters since the proxy started. Forwarded counts are chunks, not commands.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ProxyStats {
    pub accepted: u64,
    pub resets: u64,
    pub requests_forwarded: u64,
    pub replies_forwarded: u64,
}

/// A fault-injecting TCP proxy to one upstream, listening on 127.0.0.1.
pub struct FaultProxy {
    addr: SocketAddr,
    shared: Arc<Shared>,
    accept_task: JoinHandle<()>,
}

struct Shared {
    fault: Mutex<Fault>,
    /// Bumped by [`FaultProxy::cut_all`]; every connection resets its client when it changes.
    cuts: watch::Sender<u64>,
    accepted: AtomicU64,
    resets: AtomicU64,
    requests_forwarded: AtomicU64,
    replies_forwarded: AtomicU64,
}

impl Shared {
    fn fault(&self) -> Fault {
        *self.fault.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl FaultProxy {
    /// Listens on `127.0.0.1:0` on the current tokio runtime, forwarding to `upstream` with
    /// [`Fault::None`].
    pub async fn start(upstream: SocketAddr) -> FaultProxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind the fault proxy");
        let addr = listener.local_addr().expect("fault proxy address");
        let shared = Arc::new(Shared {
            fault: Mutex::new(Fault::None),
            cuts: watch::Sender::new(0),
            accepted: AtomicU64::new(0),
            resets: AtomicU64::new(0),
            requests_forwarded: AtomicU64::new(0),
            replies_forwarded: AtomicU64::new(0),
        });
        let accept_task = tokio::spawn(accept_loop(listener, upstream, Arc::clone(&shared)));
        FaultProxy {
            addr,
            shared,
            accept_task,
        }
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `redis://127.0.0.1:<port>`.
    pub fn url(&self) -> String {
        format!("redis://{}", self.addr)
    }

    /// Switches the mode for every connection, open or new, from its next chunk on.
    pub fn set(&self, fault: Fault) {
        *self.shared.fault.lock().unwrap_or_else(|e| e.into_inner()) = fault;
    }

    pub fn fault(&self) -> Fault {
        self.shared.fault()
    }

    pub fn stats(&self) -> ProxyStats {
        ProxyStats {
            accepted: self.shared.accepted.load(Relaxed),
            resets: self.shared.resets.load(Relaxed),
            requests_forwarded: self.shared.requests_forwarded.load(Relaxed),
            replies_forwarded: self.shared.replies_forwarded.load(Relaxed),
        }
    }

    /// Resets every open client connection now; new connections are still accepted.
    pub fn cut_all(&self) {
        self.shared.cuts.send_modify(|generation| *generation += 1);
    }
}

impl Drop for FaultProxy {
    /// Aborting the accept task drops the listener and its set of connection tasks, which
    /// aborts them too.
    fn drop(&mut self) {
        self.accept_task.abort();
    }
}

async fn accept_loop(listener: TcpListener, upstream: SocketAddr, shared: Arc<Shared>) {
    let mut connections = JoinSet::new();
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((client, _)) => {
                    shared.accepted.fetch_add(1, Relaxed);
                    // Subscribed before the task starts, so a cut right after accept still counts.
                    let cuts = shared.cuts.subscribe();
                    connections.spawn(connection(client, upstream, Arc::clone(&shared), cuts));
                }
                // Out of descriptors, for example: do not spin.
                Err(_) => sleep(Duration::from_millis(10)).await,
            },
            // Reap finished connections so the set stays as small as the open connections.
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
        }
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum End {
    /// A side closed or failed: close both sides normally.
    Closed,
    /// Reset the client.
    Reset,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Dir {
    /// Client to upstream.
    Request,
    /// Upstream to client.
    Reply,
}

async fn connection(client: TcpStream, upstream: SocketAddr, shared: Arc<Shared>, mut cuts: watch::Receiver<u64>) {
    let server = match timeout(DIAL_TIMEOUT, TcpStream::connect(upstream)).await {
        Ok(Ok(server)) => server,
        _ => return reset(client, &shared),
    };
    let _ = client.set_nodelay(true);
    let _ = server.set_nodelay(true);
    let end = tokio::select! {
        end = pump(&client, &server, Dir::Request, &shared) => end,
        end = pump(&server, &client, Dir::Reply, &shared) => end,
        _ = cuts.changed() => End::Reset,
    };
    if end == End::Reset {
        reset(client, &shared);
    }
}

/// Closes the client with an RST instead of a FIN.
fn reset(client: TcpStream, shared: &Shared) {
    let _ = client.set_zero_linger();
    shared.resets.fetch_add(1, Relaxed);
    drop(client);
}

/// Moves one direction: chunks are read as they come, stamped with their delivery time, and
/// written in order. After a normal end of the reading side, chunks already queued are delivered.
async fn pump(from: &TcpStream, to: &TcpStream, dir: Dir, shared: &Shared) -> End {
    let (tx, rx) = mpsc::unbounded_channel();
    let deliver = deliver(to, rx, dir, shared);
    tokio::pin!(deliver);
    let end = tokio::select! {
        end = read_loop(from, tx, dir, shared) => end,
        end = &mut deliver => return end,
    };
    match end {
        End::Closed => deliver.await,
        End::Reset => End::Reset,
    }
}

async fn read_loop(from: &TcpStream, tx: mpsc::UnboundedSender<(Instant, Vec<u8>)>, dir: Dir, shared: &Shared) -> End {
    let mut buf = vec![0u8; CHUNK];
    let mut rng = XorShift::seeded();
    let mut last = Instant::now();
    loop {
        let n = match read_some(from, &mut buf).await {
            Ok(n) if n > 0 => n,
            // A black hole never closes the client, even when the upstream goes away.
            _ if dir == Dir::Reply && shared.fault() == Fault::Blackhole => return std::future::pending().await,
            _ => return End::Closed,
        };
        let at = match (shared.fault(), dir) {
            (Fault::Blackhole, _) | (Fault::DropReplies, Dir::Reply) => continue,
            (Fault::ResetBeforeForward, Dir::Request) | (Fault::ResetAfterForward, Dir::Reply) => return End::Reset,
            (Fault::Delay { fixed, jitter }, _) => Instant::now() + fixed + rng.up_to(jitter),
            _ => Instant::now(),
        };
        last = last.max(at);
        if tx.send((last, buf[..n].to_vec())).is_err() {
            return End::Closed;
        }
    }
}

async fn deliver(
    to: &TcpStream,
    mut rx: mpsc::UnboundedReceiver<(Instant, Vec<u8>)>,
    dir: Dir,
    shared: &Shared,
) -> End {
    let counter = match dir {
        Dir::Request => &shared.requests_forwarded,
        Dir::Reply => &shared.replies_forwarded,
    };
    while let Some((at, chunk)) = rx.recv().await {
        sleep_until(at).await;
        if write_all(to, &chunk).await.is_err() {
            return End::Closed;
        }
        counter.fetch_add(1, Relaxed);
    }
    End::Closed
}

/// Reads what is available (at least one byte, or 0 at end of stream).
async fn read_some(stream: &TcpStream, buf: &mut [u8]) -> io::Result<usize> {
    loop {
        stream.readable().await?;
        match stream.try_read(buf) {
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            result => return result,
        }
    }
}

async fn write_all(stream: &TcpStream, mut data: &[u8]) -> io::Result<()> {
    while !data.is_empty() {
        stream.writable().await?;
        match stream.try_write(data) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => data = &data[n..],
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// xorshift64, seeded from the clock and a per-process counter: enough for delay jitter.
struct XorShift(u64);

impl XorShift {
    fn seeded() -> XorShift {
        static SALT: AtomicU64 = AtomicU64::new(0);
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64);
        XorShift((nanos ^ SALT.fetch_add(0x9E37_79B9_7F4A_7C15, Relaxed)) | 1)
    }

    /// Uniform in `[0, max]`, at nanosecond resolution.
    fn up_to(&mut self, max: Duration) -> Duration {
        let max = u64::try_from(max.as_nanos()).unwrap_or(u64::MAX);
        if max == 0 {
            return Duration::ZERO;
        }
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        Duration::from_nanos(self.0 % max.saturating_add(1))
    }
}
