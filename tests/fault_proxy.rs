//! The fault proxy against a real `redis-server`, one per test, with raw RESP over TCP.
//!
//! Needs `redis-server` on the PATH. Every wait is bounded, and all traffic goes to 127.0.0.1.

use std::io;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use tokio::net::TcpStream;
use tokio::time::timeout;

#[path = "common/fault_proxy.rs"]
mod fault_proxy;
#[path = "common/redis_server.rs"]
mod redis_server;

use fault_proxy::{Fault, FaultProxy, ProxyStats};
use redis_server::RedisServer;

const PING: &[u8] = b"*1\r\n$4\r\nPING\r\n";
const INCR_K: &[u8] = b"*3\r\n$6\r\nINCRBY\r\n$1\r\nk\r\n$1\r\n1\r\n";
/// `INCRBY k 0`: the current value of `k` as a one-line integer reply.
const READ_K: &[u8] = b"*3\r\n$6\r\nINCRBY\r\n$1\r\nk\r\n$1\r\n0\r\n";
/// How long a reply must not come for the tests to call it lost.
const SILENCE: Duration = Duration::from_millis(300);
/// How long a reply or a reset may take when it is expected.
const ANSWER: Duration = Duration::from_secs(5);

/// What a client read after sending a command.
#[derive(Debug, PartialEq)]
enum Read {
    /// One complete one-line reply (`+PONG\r\n`, `:1\r\n`).
    Reply(String),
    /// The connection was reset.
    Reset,
    /// The connection was closed normally.
    Eof,
    /// Nothing within the wait.
    Silent,
}

fn upstream(redis: &RedisServer) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], redis.port))
}

async fn connect(addr: SocketAddr) -> TcpStream {
    timeout(ANSWER, TcpStream::connect(addr))
        .await
        .expect("connect in time")
        .expect("connect")
}

async fn send(stream: &TcpStream, mut data: &[u8]) {
    let sent = timeout(ANSWER, async {
        while !data.is_empty() {
            stream.writable().await?;
            match stream.try_write(data) {
                Ok(n) => data = &data[n..],
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    });
    sent.await.expect("send in time").expect("send");
}

/// Reads one one-line reply, or how the connection ended, within `wait`.
async fn read(stream: &TcpStream, wait: Duration) -> Read {
    let mut reply = Vec::new();
    let reading = async {
        let mut buf = [0u8; 256];
        loop {
            stream.readable().await?;
            match stream.try_read(&mut buf) {
                Ok(0) => return Ok(Read::Eof),
                Ok(n) => {
                    reply.extend_from_slice(&buf[..n]);
                    if reply.ends_with(b"\r\n") {
                        return Ok(Read::Reply(String::from_utf8_lossy(&reply).into_owned()));
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => return Err(e),
            }
        }
    };
    match timeout(wait, reading).await {
        Err(_) => Read::Silent,
        Ok(Ok(read)) => read,
        Ok(Err(e)) if e.kind() == io::ErrorKind::ConnectionReset => Read::Reset,
        Ok(Err(e)) => panic!("unexpected read error: {e}"),
    }
}

async fn command(stream: &TcpStream, cmd: &[u8], wait: Duration) -> Read {
    send(stream, cmd).await;
    read(stream, wait).await
}

fn reply(text: &str) -> Read {
    Read::Reply(text.to_string())
}

/// The value of `k`, read on a direct connection to Redis.
async fn value_of_k(redis: &RedisServer) -> Read {
    let direct = connect(upstream(redis)).await;
    command(&direct, READ_K, ANSWER).await
}

#[tokio::test]
async fn none_forwards_commands_and_replies_and_counts_chunks() {
    let redis = RedisServer::start();
    let proxy = FaultProxy::start(upstream(&redis)).await;
    assert_eq!(proxy.fault(), Fault::None);
    assert_eq!(proxy.url(), format!("redis://127.0.0.1:{}", proxy.addr().port()));
    let client = connect(proxy.addr()).await;
    assert_eq!(command(&client, PING, ANSWER).await, reply("+PONG\r\n"));
    assert_eq!(command(&client, INCR_K, ANSWER).await, reply(":1\r\n"));
    assert_eq!(value_of_k(&redis).await, reply(":1\r\n"));
    let stats = proxy.stats();
    assert_eq!(
        stats,
        ProxyStats {
            accepted: 1,
            resets: 0,
            requests_forwarded: 2,
            replies_forwarded: 2
        },
        "one chunk per command each way"
    );
}

#[tokio::test]
async fn delay_adds_fixed_each_way_and_keeps_order() {
    let redis = RedisServer::start();
    let proxy = FaultProxy::start(upstream(&redis)).await;
    let fixed = Duration::from_millis(100);
    proxy.set(Fault::Delay {
        fixed,
        jitter: Duration::from_millis(50),
    });
    let client = connect(proxy.addr()).await;
    let started = Instant::now();
    assert_eq!(command(&client, PING, ANSWER).await, reply("+PONG\r\n"));
    let round_trip = started.elapsed();
    assert!(
        round_trip >= 2 * fixed,
        "round trip {round_trip:?} under twice {fixed:?}"
    );

    // Chunks with different jitter still arrive in order: INCRBY k 1..=8, sent one by one, must
    // read back the running sums.
    let mut expected = String::new();
    let mut sum = 0;
    for i in 1..=8u32 {
        let digit = i.to_string();
        send(
            &client,
            format!("*3\r\n$6\r\nINCRBY\r\n$1\r\nk\r\n$1\r\n{digit}\r\n").as_bytes(),
        )
        .await;
        sum += i;
        expected.push_str(&format!(":{sum}\r\n"));
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let mut got = String::new();
    while got.len() < expected.len() {
        match read(&client, ANSWER).await {
            Read::Reply(part) => got.push_str(&part),
            other => panic!("expected replies, got {other:?} after {got:?}"),
        }
    }
    assert_eq!(got, expected);

    // Back to no delay on the same connection.
    proxy.set(Fault::None);
    let started = Instant::now();
    assert_eq!(command(&client, PING, ANSWER).await, reply("+PONG\r\n"));
    assert!(
        started.elapsed() < fixed,
        "no delay after set(None): {:?}",
        started.elapsed()
    );
}

#[tokio::test]
async fn blackhole_delivers_nothing_then_none_serves_new_connections() {
    let redis = RedisServer::start();
    let proxy = FaultProxy::start(upstream(&redis)).await;
    let open = connect(proxy.addr()).await;
    assert_eq!(command(&open, PING, ANSWER).await, reply("+PONG\r\n"));

    proxy.set(Fault::Blackhole);
    assert_eq!(command(&open, INCR_K, SILENCE).await, Read::Silent, "open connection");
    let new = connect(proxy.addr()).await;
    assert_eq!(command(&new, PING, SILENCE).await, Read::Silent, "new connection");
    assert_eq!(
        value_of_k(&redis).await,
        reply(":0\r\n"),
        "the request never reached Redis"
    );
    assert_eq!(proxy.stats().resets, 0);

    proxy.set(Fault::None);
    let after = connect(proxy.addr()).await;
    assert_eq!(command(&after, PING, ANSWER).await, reply("+PONG\r\n"));
    // The connection opened during the black hole was never closed and works again.
    assert_eq!(command(&new, PING, ANSWER).await, reply("+PONG\r\n"));
}

#[tokio::test]
async fn reset_before_forward_resets_the_client_and_the_command_does_not_run() {
    let redis = RedisServer::start();
    let proxy = FaultProxy::start(upstream(&redis)).await;
    let open = connect(proxy.addr()).await;
    assert_eq!(command(&open, PING, ANSWER).await, reply("+PONG\r\n"));

    proxy.set(Fault::ResetBeforeForward);
    assert_eq!(command(&open, INCR_K, ANSWER).await, Read::Reset, "open connection");
    let new = connect(proxy.addr()).await;
    assert_eq!(command(&new, INCR_K, ANSWER).await, Read::Reset, "new connection");
    assert_eq!(value_of_k(&redis).await, reply(":0\r\n"));
    assert_eq!(proxy.stats().resets, 2);

    proxy.set(Fault::None);
    let after = connect(proxy.addr()).await;
    assert_eq!(command(&after, INCR_K, ANSWER).await, reply(":1\r\n"));
}

#[tokio::test]
async fn reset_after_forward_resets_the_client_but_the_command_runs() {
    let redis = RedisServer::start();
    let proxy = FaultProxy::start(upstream(&redis)).await;
    proxy.set(Fault::ResetAfterForward);
    let client = connect(proxy.addr()).await;
    assert_eq!(command(&client, INCR_K, ANSWER).await, Read::Reset);
    assert_eq!(value_of_k(&redis).await, reply(":1\r\n"));
    let stats = proxy.stats();
    assert_eq!(
        (stats.resets, stats.requests_forwarded, stats.replies_forwarded),
        (1, 1, 0)
    );
}

#[tokio::test]
async fn drop_replies_runs_commands_silently_and_keeps_the_connection() {
    let redis = RedisServer::start();
    let proxy = FaultProxy::start(upstream(&redis)).await;
    proxy.set(Fault::DropReplies);
    let client = connect(proxy.addr()).await;
    assert_eq!(command(&client, INCR_K, SILENCE).await, Read::Silent);
    assert_eq!(value_of_k(&redis).await, reply(":1\r\n"));

    proxy.set(Fault::None);
    assert_eq!(
        command(&client, INCR_K, ANSWER).await,
        reply(":2\r\n"),
        "same connection, next reply"
    );
    assert_eq!(proxy.stats().resets, 0);
}

#[tokio::test]
async fn cut_all_resets_open_connections_and_accepts_new_ones() {
    let redis = RedisServer::start();
    let proxy = FaultProxy::start(upstream(&redis)).await;
    let first = connect(proxy.addr()).await;
    let second = connect(proxy.addr()).await;
    assert_eq!(command(&first, PING, ANSWER).await, reply("+PONG\r\n"));
    assert_eq!(command(&second, PING, ANSWER).await, reply("+PONG\r\n"));

    proxy.cut_all();
    assert_eq!(read(&first, ANSWER).await, Read::Reset);
    assert_eq!(read(&second, ANSWER).await, Read::Reset);
    assert_eq!(proxy.stats().resets, 2);

    let after = connect(proxy.addr()).await;
    assert_eq!(command(&after, PING, ANSWER).await, reply("+PONG\r\n"));
}

#[tokio::test]
async fn unreachable_upstream_resets_the_client() {
    let closed = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let proxy = FaultProxy::start(closed).await;
    let client = connect(proxy.addr()).await;
    assert_eq!(read(&client, ANSWER).await, Read::Reset);
    assert_eq!(
        proxy.stats(),
        ProxyStats {
            accepted: 1,
            resets: 1,
            ..ProxyStats::default()
        }
    );
}

#[tokio::test]
async fn dropping_the_proxy_closes_its_listener_and_connections() {
    let redis = RedisServer::start();
    let proxy = FaultProxy::start(upstream(&redis)).await;
    let addr = proxy.addr();
    let client = connect(addr).await;
    assert_eq!(command(&client, PING, ANSWER).await, reply("+PONG\r\n"));

    drop(proxy);
    assert_eq!(read(&client, ANSWER).await, Read::Eof);
    let refused = timeout(ANSWER, async {
        for _ in 0..100 {
            if TcpStream::connect(addr).await.is_err() {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        false
    });
    assert!(refused.await.expect("bounded"), "the proxy still accepts after drop");
}
