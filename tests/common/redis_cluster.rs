//! A Redis Cluster of `redis-server` children on loopback ports, made with
//! `redis-cli --cluster create` and stopped by pid on drop. Needs `redis_server.rs` beside it
//! as module `redis_server`.
#![allow(dead_code)]

use std::net::TcpListener;
use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use super::redis_server::RedisServer;

pub struct RedisCluster {
    pub masters: Vec<RedisServer>,
    /// Each master's cluster node id.
    pub ids: Vec<String>,
    dir: PathBuf,
    /// `redis-cli` arguments for a TLS cluster.
    cli_tls: Vec<String>,
}

/// TLS files of a cluster: certificate, key and CA (PEM paths).
pub struct ClusterTls {
    pub cert: String,
    pub key: String,
    pub ca: String,
}

/// A port `p` such that both `p` and its cluster bus port `p + 10000` are free now.
fn free_port_pair(salt: u64) -> u16 {
    let mut x = salt ^ u64::from(std::process::id()) ^ 0x9e37_79b9_7f4a_7c15;
    for _ in 0..200 {
        x = x.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        let port = 20000 + (x >> 33) as u16 % 10000;
        if TcpListener::bind(("127.0.0.1", port)).is_ok() && TcpListener::bind(("127.0.0.1", port + 10000)).is_ok() {
            return port;
        }
    }
    panic!("no free port pair for a cluster node");
}

fn run(args: &[&str]) -> String {
    run_with(args, &[])
}

/// Runs `redis-cli` (the first of `args`) with `tls` arguments first.
fn run_with(args: &[&str], tls: &[String]) -> String {
    let out = Command::new("timeout")
        .arg("120")
        .arg(args[0])
        .args(tls)
        .args(&args[1..])
        .output()
        .expect("redis-cli (apt-get install redis-tools)");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{args:?} failed: {text}");
    text
}

impl RedisCluster {
    /// Starts `n` masters (no replicas, `cluster-require-full-coverage no`, so that slots of a
    /// dead master fail alone) and waits until every node reports the cluster ok.
    pub fn start(n: usize) -> RedisCluster {
        Self::start_with(n, None)
    }

    /// [`start`](Self::start) with TLS on client and cluster bus connections (TLS-only ports).
    pub fn start_tls(n: usize, tls: ClusterTls) -> RedisCluster {
        Self::start_with(n, Some(tls))
    }

    fn start_with(n: usize, tls: Option<ClusterTls>) -> RedisCluster {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .subsec_nanos();
        let dir = std::env::temp_dir().join(format!("tollgate-cluster-{}-{nanos}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let mut masters = Vec::new();
        let mut salt = u64::from(nanos);
        while masters.len() < n {
            salt += 1;
            let port = free_port_pair(salt);
            let conf = dir.join(format!("nodes-{port}.conf"));
            let mut args = vec![
                "--cluster-enabled",
                "yes",
                "--cluster-config-file",
                conf.to_str().unwrap(),
                "--cluster-node-timeout",
                "1000",
                "--cluster-require-full-coverage",
                "no",
                "--dir",
                dir.to_str().unwrap(),
            ];
            if let Some(t) = &tls {
                args.extend([
                    "--tls-cert-file",
                    &t.cert,
                    "--tls-key-file",
                    &t.key,
                    "--tls-ca-cert-file",
                    &t.ca,
                    "--tls-auth-clients",
                    "no",
                    "--tls-cluster",
                    "yes",
                ]);
            }
            let files = tls.as_ref().map(|t| (t.cert.clone(), t.key.clone()));
            if let Some(s) = RedisServer::start_on_with(port, &args, files) {
                masters.push(s);
            }
        }
        let addrs: Vec<String> = masters.iter().map(|m| format!("127.0.0.1:{}", m.port)).collect();
        let mut args = vec!["redis-cli", "--cluster", "create"];
        args.extend(addrs.iter().map(String::as_str));
        args.extend(["--cluster-replicas", "0", "--cluster-yes"]);
        let cli_tls: Vec<String> = match &tls {
            Some(t) => ["--tls", "--cacert", &t.ca, "--cert", &t.cert, "--key", &t.key]
                .iter()
                .map(|s| s.to_string())
                .collect(),
            None => Vec::new(),
        };
        run_with(&args, &cli_tls);
        let ids = masters.iter().map(|m| m.cli(&["CLUSTER", "MYID"])).collect();
        let cluster = RedisCluster {
            masters,
            ids,
            dir,
            cli_tls,
        };
        cluster.wait_ok(&(0..n).collect::<Vec<_>>());
        cluster
    }

    /// Waits (at most 30 s) until the masters `live` all report `cluster_state:ok` and agree on
    /// the owner of every served slot.
    pub fn wait_ok(&self, live: &[usize]) {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let ok = live
                .iter()
                .all(|&i| self.masters[i].cli(&["CLUSTER", "INFO"]).contains("cluster_state:ok"));
            let views: Vec<String> = live.iter().map(|&i| self.slots_view(i)).collect();
            if ok && views.windows(2).all(|w| w[0] == w[1]) {
                return;
            }
            assert!(Instant::now() < deadline, "the cluster did not settle: {views:?}");
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Master `i`'s view of slot ownership, as comparable text.
    fn slots_view(&self, i: usize) -> String {
        let mut lines: Vec<String> = self.masters[i]
            .cli(&["CLUSTER", "NODES"])
            .lines()
            .filter(|l| l.contains("master") && !l.contains("fail"))
            .map(|l| {
                let f: Vec<&str> = l.split_whitespace().collect();
                format!("{} {}", f[0], f[8..].join(" "))
            })
            .collect();
        lines.sort();
        lines.join("\n")
    }

    pub fn urls(&self) -> Vec<String> {
        self.masters.iter().map(|m| m.url()).collect()
    }

    /// The index of the master serving `slot`, as master 0 sees it.
    pub fn owner(&self, slot: u16) -> usize {
        let nodes = self.masters[0].cli(&["CLUSTER", "NODES"]);
        for line in nodes.lines() {
            let f: Vec<&str> = line.split_whitespace().collect();
            for range in f.iter().skip(8) {
                if range.starts_with('[') {
                    continue;
                }
                let (a, b) = range.split_once('-').unwrap_or((range, range));
                let (a, b): (u16, u16) = (a.parse().unwrap(), b.parse().unwrap());
                if (a..=b).contains(&slot) {
                    return self.ids.iter().position(|id| id == f[0]).expect("a known master");
                }
            }
        }
        panic!("slot {slot} is not served");
    }

    /// Keys stored in `slot` on master `i`.
    pub fn keys_in_slot(&self, i: usize, slot: u16) -> Vec<String> {
        self.masters[i]
            .cli(&["CLUSTER", "GETKEYSINSLOT", &slot.to_string(), "1000"])
            .lines()
            .map(str::to_string)
            .filter(|k| !k.is_empty())
            .collect()
    }

    /// Moves `count` slots from master `from` to master `to` with `redis-cli --cluster reshard`
    /// (keys included).
    pub fn reshard(&self, from: usize, to: usize, count: usize) -> String {
        let entry = format!("127.0.0.1:{}", self.masters[to].port);
        run_with(
            &[
                "redis-cli",
                "--cluster",
                "reshard",
                &entry,
                "--cluster-from",
                &self.ids[from],
                "--cluster-to",
                &self.ids[to],
                "--cluster-slots",
                &count.to_string(),
                "--cluster-yes",
            ],
            &self.cli_tls,
        )
    }

    /// Step one of a manual slot migration: `slot` importing on `to`, migrating on `from`.
    pub fn begin_migration(&self, slot: u16, from: usize, to: usize) {
        let s = slot.to_string();
        assert_eq!(
            self.masters[to].cli(&["CLUSTER", "SETSLOT", &s, "IMPORTING", &self.ids[from]]),
            "OK"
        );
        assert_eq!(
            self.masters[from].cli(&["CLUSTER", "SETSLOT", &s, "MIGRATING", &self.ids[to]]),
            "OK"
        );
    }

    /// Moves `key` from master `from` to master `to` (during a migration).
    pub fn migrate_key(&self, key: &str, from: usize, to: usize) {
        let port = self.masters[to].port.to_string();
        let out = self.masters[from].cli(&["MIGRATE", "127.0.0.1", &port, key, "0", "5000"]);
        assert_eq!(out, "OK", "MIGRATE {key}");
    }

    /// Last step: every master learns that `slot` is served by `to`.
    pub fn end_migration(&self, slot: u16, to: usize) {
        let s = slot.to_string();
        for m in &self.masters {
            let out = m.cli(&["CLUSTER", "SETSLOT", &s, "NODE", &self.ids[to]]);
            assert!(out == "OK" || out.is_empty(), "SETSLOT NODE: {out}");
        }
    }

    /// Every string value's low 32 bits (a fixed window's count), summed over all masters:
    /// with one long window, everything granted and not returned.
    pub fn window_counts(&self, live: &[usize]) -> u64 {
        let mut used = 0;
        for &i in live {
            let m = &self.masters[i];
            for key in m.cli(&["--scan"]).lines().filter(|k| !k.is_empty()) {
                if m.cli(&["TYPE", key]) == "string" {
                    let v: u64 = m.cli(&["GET", key]).parse().expect("a window count");
                    used += v % (1 << 32);
                }
            }
        }
        used
    }
}

impl Drop for RedisCluster {
    fn drop(&mut self) {
        // The servers stop by pid when `masters` drops; then their files go.
        self.masters.clear();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
