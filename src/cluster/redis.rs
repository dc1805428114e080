//! The [`Coordinator`] on a Redis server (`redis` crate, one multiplexed connection that
//! reconnects by itself). Leases are `SET NX PX` with a random token as the value prefix;
//! renewing and releasing compare that token in a script, so a replica whose lease expired
//! can neither extend nor delete its successor's.

use std::sync::Arc;
use std::time::Duration;

use futures_util::future::{BoxFuture, FutureExt};
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::AsyncCommands;

use super::coordinator::{
    holder_of, lease_value, Claim, CoordError, CoordResult, Coordinator, Lease,
};

const RENEW: &str = r"
local v = redis.call('GET', KEYS[1])
if v and string.sub(v, 1, string.len(ARGV[1]) + 1) == ARGV[1] .. ' ' then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  return 1
end
return 0";

const RELEASE: &str = r"
local v = redis.call('GET', KEYS[1])
if v and string.sub(v, 1, string.len(ARGV[1]) + 1) == ARGV[1] .. ' ' then
  return redis.call('DEL', KEYS[1])
end
return 0";

/// Adds to a counter, giving a counter it creates its window.
const ADD: &str = r"
local n = redis.call('INCRBY', KEYS[1], ARGV[1])
if tonumber(ARGV[2]) > 0 and redis.call('PTTL', KEYS[1]) == -1 then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return n";

pub struct RedisCoordinator {
    connection: ConnectionManager,
    renew: redis::Script,
    release: redis::Script,
    add: redis::Script,
}

fn err(e: redis::RedisError) -> CoordError {
    CoordError::Engine {
        engine: "redis",
        source: Arc::new(e),
    }
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX).max(1)
}

/// `SET key value NX PX ttl`: whether the key was absent (and is now set).
async fn set_if_absent(
    c: &mut ConnectionManager,
    key: &str,
    value: &str,
    ttl: Duration,
) -> CoordResult<bool> {
    let set: Option<String> = redis::cmd("SET")
        .arg(key)
        .arg(value)
        .arg("NX")
        .arg("PX")
        .arg(millis(ttl))
        .query_async(c)
        .await
        .map_err(err)?;
    Ok(set.is_some())
}

impl RedisCoordinator {
    /// A coordinator for the Redis at `url`; connects on first use and reconnects after
    /// failures, each attempt bounded so a request fails fast while Redis is down.
    pub fn new(url: &str) -> anyhow::Result<RedisCoordinator> {
        // The URL may hold a password: the error must not quote it.
        let client = redis::Client::open(url)
            .map_err(|e| anyhow::anyhow!("invalid cluster.redis URL: {:?}", e.kind()))?;
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(Duration::from_millis(500)))
            .set_response_timeout(Some(Duration::from_secs(1)))
            .set_number_of_retries(1)
            .set_max_delay(Duration::from_millis(500));
        let connection = ConnectionManager::new_lazy_with_config(client, config)
            .map_err(|e| anyhow::anyhow!("cannot set up the Redis connection: {:?}", e.kind()))?;
        Ok(RedisCoordinator {
            connection,
            renew: redis::Script::new(RENEW),
            release: redis::Script::new(RELEASE),
            add: redis::Script::new(ADD),
        })
    }

    fn conn(&self) -> ConnectionManager {
        self.connection.clone()
    }
}

impl Coordinator for RedisCoordinator {
    fn claim<'a>(
        &'a self,
        key: &'a str,
        holder: &'a str,
        ttl: Duration,
    ) -> BoxFuture<'a, CoordResult<Claim>> {
        async move {
            let mut c = self.conn();
            let token = hex::encode(rand_token());
            let value = lease_value(&token, holder);
            if set_if_absent(&mut c, key, &value, ttl).await? {
                return Ok(Claim::Acquired(Lease {
                    key: key.to_owned(),
                    token,
                }));
            }
            let current: Option<String> = c.get(key).await.map_err(err)?;
            match current {
                Some(v) => Ok(Claim::Held {
                    holder: holder_of(&v).to_owned(),
                }),
                // Expired between the two requests: try once more.
                None if set_if_absent(&mut c, key, &value, ttl).await? => {
                    Ok(Claim::Acquired(Lease {
                        key: key.to_owned(),
                        token,
                    }))
                }
                None => Ok(Claim::Held {
                    holder: String::new(),
                }),
            }
        }
        .boxed()
    }

    fn renew<'a>(&'a self, lease: &'a Lease, ttl: Duration) -> BoxFuture<'a, CoordResult<bool>> {
        async move {
            let mut c = self.conn();
            let n: i64 = self
                .renew
                .key(&lease.key)
                .arg(&lease.token)
                .arg(millis(ttl))
                .invoke_async(&mut c)
                .await
                .map_err(err)?;
            Ok(n == 1)
        }
        .boxed()
    }

    fn release<'a>(&'a self, lease: &'a Lease) -> BoxFuture<'a, CoordResult<()>> {
        async move {
            let mut c = self.conn();
            let _: i64 = self
                .release
                .key(&lease.key)
                .arg(&lease.token)
                .invoke_async(&mut c)
                .await
                .map_err(err)?;
            Ok(())
        }
        .boxed()
    }

    fn get<'a>(&'a self, key: &'a str) -> BoxFuture<'a, CoordResult<Option<Vec<u8>>>> {
        async move { self.conn().get(key).await.map_err(err) }.boxed()
    }

    fn set<'a>(
        &'a self,
        key: &'a str,
        value: Vec<u8>,
        ttl: Option<Duration>,
    ) -> BoxFuture<'a, CoordResult<()>> {
        async move {
            let mut c = self.conn();
            match ttl {
                Some(ttl) => c.pset_ex(key, value, millis(ttl)).await.map_err(err),
                None => c.set(key, value).await.map_err(err),
            }
        }
        .boxed()
    }

    fn delete<'a>(&'a self, key: &'a str) -> BoxFuture<'a, CoordResult<()>> {
        async move {
            let _: i64 = self.conn().del(key).await.map_err(err)?;
            Ok(())
        }
        .boxed()
    }

    fn add<'a>(
        &'a self,
        key: &'a str,
        by: i64,
        window: Option<Duration>,
    ) -> BoxFuture<'a, CoordResult<i64>> {
        async move {
            let mut c = self.conn();
            self.add
                .key(key)
                .arg(by)
                .arg(window.map_or(0, millis))
                .invoke_async(&mut c)
                .await
                .map_err(err)
        }
        .boxed()
    }

    fn zadd<'a>(
        &'a self,
        set: &'a str,
        members: Vec<(String, f64)>,
    ) -> BoxFuture<'a, CoordResult<()>> {
        async move {
            if members.is_empty() {
                return Ok(());
            }
            let items: Vec<(f64, String)> = members.into_iter().map(|(m, s)| (s, m)).collect();
            let _: i64 = self.conn().zadd_multiple(set, &items).await.map_err(err)?;
            Ok(())
        }
        .boxed()
    }

    fn zrange<'a>(
        &'a self,
        set: &'a str,
        min: f64,
        max: f64,
        limit: usize,
    ) -> BoxFuture<'a, CoordResult<Vec<(String, f64)>>> {
        async move {
            let bound = |v: f64| {
                if v == f64::INFINITY {
                    "+inf".to_owned()
                } else if v == f64::NEG_INFINITY {
                    "-inf".to_owned()
                } else {
                    v.to_string()
                }
            };
            redis::cmd("ZRANGEBYSCORE")
                .arg(set)
                .arg(bound(min))
                .arg(bound(max))
                .arg("WITHSCORES")
                .arg("LIMIT")
                .arg(0)
                .arg(limit)
                .query_async(&mut self.conn())
                .await
                .map_err(err)
        }
        .boxed()
    }

    fn zrem<'a>(&'a self, set: &'a str, members: Vec<String>) -> BoxFuture<'a, CoordResult<()>> {
        async move {
            if members.is_empty() {
                return Ok(());
            }
            let _: i64 = self.conn().zrem(set, members).await.map_err(err)?;
            Ok(())
        }
        .boxed()
    }
}

/// 16 random bytes for a lease token.
fn rand_token() -> [u8; 16] {
    let mut bytes = [0u8; 16];
    if getrandom::fill(&mut bytes).is_err() {
        // A lease token only has to differ between holders: the time does, without the OS.
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos());
        bytes = nanos.to_le_bytes();
    }
    bytes
}
