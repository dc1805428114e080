//! The process-wide budget of response data buffered toward HTTP/2 clients
//! (`server.response_buffer_budget`).
//!
//! hyper runs each HTTP/2 stream in a task that takes a chunk from the body whenever h2 lets
//! the stream queue more, and h2 keeps the chunk until it is written to the socket. Each stream
//! and connection is bounded (see `connection`), but a client that never reads can open
//! hundreds of connections from as many addresses as it likes: only a bound on the whole
//! process holds. Here every byte a body hands to hyper is charged against one semaphore of
//! bytes: a body reserves a chunk's worth before it is asked for a chunk (so that waiting for
//! room holds no data), keeps what the chunk needs, and the chunk's `Bytes` gives it back when
//! h2 drops it (written, or its stream or connection gone).
//!
//! A stream's own state (hyper's task and the request's future, h2's stream, the response
//! head) costs memory whether or not its body has data in flight, so each admitted stream is
//! charged [`STREAM_COST`] too, until its response body is dropped: a client cannot hold memory
//! with many streams that have nothing buffered yet.
//!
//! When the budget is spent, new streams are reset with REFUSED_STREAM at once
//! (`admit_stream`, in `request`) and streaming bodies wait for room. If it stays spent for
//! [`SHED_AFTER`], the stalled connection holding the most is closed, one per [`SHED_AFTER`]: a
//! connection that does not read keeps its data for as long as it stays, and would otherwise
//! hold the budget until its keep-alive ping fails. A connection whose client reads, however
//! slowly, is never closed for it: it only waits for room.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::{Arc, Mutex, Weak};
use std::task::{ready, Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body::Frame;
use prometheus_client::metrics::gauge::Gauge;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;

use super::activity::Activity;
use crate::handlers::body::Body;
use crate::metrics::Metrics;

/// What a body reserves before it is polled: one HTTP/2 file chunk (see `connection`); a
/// smaller chunk gives the rest back at once.
pub const RESERVE: usize = 16 * 1024;
/// What an admitted HTTP/2 stream costs besides its data, charged for its lifetime: about what
/// a stream's own state takes in a release build (hyper's task with the request's future, h2's
/// stream record, the response head). `bench/h2flood.sh` measures the whole.
pub const STREAM_COST: usize = 4 * 1024;
/// How long the budget must stay spent before a connection is closed for it, and how often
/// one is while it stays spent.
pub const SHED_AFTER: Duration = Duration::from_secs(1);

pub struct ResponseBudget {
    bytes: Arc<Semaphore>,
    total: usize,
    /// The bytes charged, as `pullthrough_response_buffer_bytes`.
    gauge: Gauge,
    metrics: Arc<Metrics>,
    connections: Mutex<Connections>,
    pressure: Mutex<Pressure>,
}

#[derive(Default)]
struct Connections {
    next: u64,
    open: crate::hashing::Map<u64, Weak<Activity>>,
}

/// When the budget was first found spent, and last.
#[derive(Default)]
struct Pressure {
    since: Option<Instant>,
    last: Option<Instant>,
}

/// A connection's place in the budget's list of connections, for as long as it is served.
pub struct Registration {
    budget: Arc<ResponseBudget>,
    id: u64,
}

impl Drop for Registration {
    fn drop(&mut self) {
        crate::sync::lock(&self.budget.connections)
            .open
            .remove(&self.id);
    }
}

impl ResponseBudget {
    pub fn new(total: usize, metrics: Arc<Metrics>) -> ResponseBudget {
        // A semaphore holds at most `usize::MAX >> 3` permits.
        let total = total.clamp(RESERVE, Semaphore::MAX_PERMITS);
        ResponseBudget {
            bytes: Arc::new(Semaphore::new(total)),
            total,
            gauge: metrics.response_buffer_bytes.clone(),
            metrics,
            connections: Mutex::default(),
            pressure: Mutex::default(),
        }
    }

    /// Lists a connection, so that it may be closed when it holds the most.
    pub fn register(self: &Arc<Self>, conn: &Arc<Activity>) -> Registration {
        let mut c = crate::sync::lock(&self.connections);
        c.next += 1;
        let id = c.next;
        c.open.insert(id, Arc::downgrade(conn));
        Registration {
            budget: self.clone(),
            id,
        }
    }

    /// A new stream of `conn`, charged [`STREAM_COST`] for as long as the charge lives; `None`
    /// when there is no room for it and its first chunk: it should be refused. That counts as
    /// the budget being found spent (see [`ResponseBudget::pressure`]).
    pub fn admit_stream(self: &Arc<Self>, conn: &Arc<Activity>) -> Option<Charge> {
        let admitted = (self.bytes.available_permits() >= STREAM_COST + RESERVE)
            .then(|| self.try_reserve(STREAM_COST))
            .flatten();
        match admitted {
            Some(permit) => Some(Charge::new(permit, &self.gauge, conn)),
            None => {
                self.pressure();
                None
            }
        }
    }

    /// The budget was found spent: once it has been for `SHED_AFTER` (found spent again at
    /// least that late, with no gap as long in between), the connection holding the most is
    /// closed, and then one every `SHED_AFTER` while it stays spent.
    fn pressure(&self) {
        let now = Instant::now();
        let (began, shed) = {
            let mut p = crate::sync::lock(&self.pressure);
            let began = p.last.is_none_or(|last| now - last > SHED_AFTER);
            if began {
                p.since = Some(now);
            }
            p.last = Some(now);
            let shed = match p.since {
                Some(since) if now - since >= SHED_AFTER => {
                    p.since = Some(now);
                    true
                }
                _ => false,
            };
            (began, shed)
        };
        // Each look at the connections starts the interval in which the next one finds which
        // did not move: the first at the start of the pressure, then one per shedding.
        if began || shed {
            let stalled = self.look();
            if shed {
                self.shed_heaviest(stalled);
            }
        }
    }

    /// The connections that gave nothing back since the last look, with what they hold.
    fn look(&self) -> Vec<(usize, Arc<Activity>)> {
        let c = crate::sync::lock(&self.connections);
        c.open
            .values()
            .filter_map(Weak::upgrade)
            .filter(|a| a.stalled_since_last_look())
            .map(|a| (a.held(), a))
            .collect()
    }

    fn shed_heaviest(&self, stalled: Vec<(usize, Arc<Activity>)>) {
        let heaviest = stalled.into_iter().max_by_key(|(held, _)| *held);
        if let Some((held, conn)) = heaviest {
            tracing::info!(
                held,
                "closing the stalled connection holding the most of server.response_buffer_budget"
            );
            self.metrics.connection_shed();
            conn.shed();
        }
    }

    /// `n` bytes, waiting for them as long as it takes (finding the budget spent each
    /// `SHED_AFTER / 2` while it waits).
    async fn reserve(self: Arc<Self>, n: usize) -> OwnedSemaphorePermit {
        let n = u32::try_from(n).unwrap_or(u32::MAX);
        let acquire = self.bytes.clone().acquire_many_owned(n);
        tokio::pin!(acquire);
        loop {
            tokio::select! {
                permit = &mut acquire => match permit {
                    Ok(permit) => return permit,
                    // Never closed.
                    Err(_) => std::future::pending::<()>().await,
                },
                () = tokio::time::sleep(SHED_AFTER / 2) => self.pressure(),
            }
        }
    }

    fn try_reserve(&self, n: usize) -> Option<OwnedSemaphorePermit> {
        let n = u32::try_from(n).ok()?;
        self.bytes.clone().try_acquire_many_owned(n).ok()
    }

    /// `body` with its data chunks charged to the budget and to `conn`, holding its stream's
    /// charge until it is dropped.
    pub fn wrap(self: &Arc<Self>, body: Body, conn: Arc<Activity>, stream: Charge) -> Budgeted {
        Budgeted {
            inner: body,
            budget: self.clone(),
            conn,
            reserved: None,
            waiting: None,
            _stream: stream,
        }
    }
}

/// Bytes of the budget charged to a connection, given back when dropped.
pub struct Charge {
    _permit: OwnedSemaphorePermit,
    n: usize,
    gauge: Gauge,
    conn: Arc<Activity>,
}

impl Charge {
    fn new(permit: OwnedSemaphorePermit, gauge: &Gauge, conn: &Arc<Activity>) -> Charge {
        let n = permit.num_permits();
        gauge.inc_by(n as i64);
        conn.hold(n);
        Charge {
            _permit: permit,
            n,
            gauge: gauge.clone(),
            conn: conn.clone(),
        }
    }
}

impl Drop for Charge {
    fn drop(&mut self) {
        self.gauge.dec_by(self.n as i64);
        self.conn.release(self.n);
    }
}

/// A response body whose chunks are charged to the budget (see the module's doc).
pub struct Budgeted {
    inner: Body,
    budget: Arc<ResponseBudget>,
    conn: Arc<Activity>,
    reserved: Option<OwnedSemaphorePermit>,
    waiting: Option<Pin<Box<dyn Future<Output = OwnedSemaphorePermit> + Send>>>,
    _stream: Charge,
}

/// A chunk's bytes and their charge, given back when h2 drops the chunk.
struct Charged {
    bytes: Bytes,
    _charge: Charge,
}

impl AsRef<[u8]> for Charged {
    fn as_ref(&self) -> &[u8] {
        &self.bytes
    }
}

impl Budgeted {
    /// Charges `data` to the permit reserved for it: a smaller chunk gives the rest back, a
    /// bigger one (a whole manifest, already in memory) takes what more is free.
    fn charge(&mut self, data: Bytes, mut permit: OwnedSemaphorePermit) -> Bytes {
        let len = data.len();
        let held = permit.num_permits();
        if len < held {
            drop(permit.split(held - len));
        } else if len > held {
            if let Some(more) = self.budget.try_reserve(len - held) {
                permit.merge(more);
            }
        }
        Bytes::from_owner(Charged {
            bytes: data,
            _charge: Charge::new(permit, &self.budget.gauge, &self.conn),
        })
    }
}

impl http_body::Body for Budgeted {
    type Data = Bytes;
    type Error = io::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, io::Error>>> {
        let this = &mut *self;
        let small = http_body::Body::size_hint(&this.inner)
            .exact()
            .is_some_and(|n| n <= RESERVE as u64);
        if this.reserved.is_none() && !http_body::Body::is_end_stream(&this.inner) && small {
            // A small body (an error, most manifests) never waits: its bytes are in memory
            // already, and waiting would keep them and the stream's state longer (a refused
            // stream's error among them). Charged if there is room.
            this.reserved = this.budget.try_reserve(RESERVE);
        } else if this.reserved.is_none() && !http_body::Body::is_end_stream(&this.inner) {
            if this.waiting.is_none() {
                match this.budget.try_reserve(RESERVE) {
                    Some(permit) => this.reserved = Some(permit),
                    None => this.waiting = Some(Box::pin(this.budget.clone().reserve(RESERVE))),
                }
            }
            if let Some(waiting) = this.waiting.as_mut() {
                let permit = ready!(waiting.as_mut().poll(cx));
                this.waiting = None;
                this.reserved = Some(permit);
            }
        }
        let polled = ready!(Pin::new(&mut this.inner).poll_frame(cx));
        let frame = match polled {
            Some(Ok(frame)) => frame,
            other => {
                this.reserved = None;
                return Poll::Ready(other);
            }
        };
        let data = match frame.into_data() {
            Ok(data) if !data.is_empty() => data,
            Ok(data) => return Poll::Ready(Some(Ok(Frame::data(data)))),
            Err(frame) => return Poll::Ready(Some(Ok(frame))),
        };
        let Some(permit) = this.reserved.take() else {
            // A small body with no room, or one that said it had ended yet had more: charge
            // what is free.
            let charged = match this.budget.try_reserve(data.len().min(this.budget.total)) {
                Some(permit) => this.charge(data, permit),
                None => data,
            };
            return Poll::Ready(Some(Ok(Frame::data(charged))));
        };
        Poll::Ready(Some(Ok(Frame::data(this.charge(data, permit)))))
    }

    fn is_end_stream(&self) -> bool {
        http_body::Body::is_end_stream(&self.inner)
    }

    fn size_hint(&self) -> http_body::SizeHint {
        http_body::Body::size_hint(&self.inner)
    }
}
