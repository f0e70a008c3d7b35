//! The Redis stores (feature `redis`): [`RedisStore`] on one server and [`RedisClusterStore`]
//! on Redis Cluster, both through the Lua scripts in `lua/`.
//!
//! One concern per module, lowest first (a module imports only the ones above it in this list):
//!
//! * `error`: every failure as a [`StoreError`](crate::store::StoreError) of the right class;
//! * `tls`: the TLS options and the TLS clients built from them;
//! * `config`: [`RedisConfig`], and the `redis::Client` it makes;
//! * `wire`: the scripts, the arguments of one call and the decoding of its reply;
//! * `join`: waiting for several calls at once;
//! * `slots`: a cluster's hash slots, masters and redirections;
//! * `single`: [`RedisStore`];
//! * `router`: a cluster's connections and slot map, and the send rounds that follow
//!   redirections;
//! * `cluster`: [`RedisClusterStore`]: a batch as calls per slot, their outcomes, the registry.

mod cluster;
mod config;
mod error;
mod join;
mod router;
mod single;
mod slots;
mod tls;
mod wire;

pub use cluster::{ClusterStats, RedisClusterStore};
pub use config::RedisConfig;
pub use single::RedisStore;
pub use slots::key_slot;
#[doc(hidden)]
pub use wire::decode_reply_resp;
