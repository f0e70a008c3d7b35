//! The commands tollgate sends, for least-privilege ACL users in tests.
#![allow(dead_code)]

/// From the client `EVALSHA`, `SCRIPT LOAD` (after `NOSCRIPT`) and `ZREM` (leaving the
/// registry); from the Lua scripts in `lua/` the rest.
pub const COMMANDS: [&str; 17] = [
    "evalsha",
    "script|load",
    "zrem",
    "time",
    "mget",
    "exists",
    "get",
    "set",
    "setrange",
    "append",
    "del",
    "zadd",
    "zremrangebyscore",
    "zcard",
    "zrange",
    "pexpire",
    "info",
];

/// What a Redis Cluster adds: the slot map, migrations, and telling a down registry master
/// from a down cluster.
pub const CLUSTER_COMMANDS: [&str; 3] = ["cluster|slots", "asking", "ping"];
