//! The connection to the etcd cluster: a small tokio runtime of its own
//! (one thread), so the blocking [`crate::store::Store`] calls work from any
//! thread; unary calls with a deadline that move to the next endpoint on
//! failure; the watch of the whole prefix feeding a queue; the replica's
//! lease kept alive.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicI64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use etcdv3client::grpc::TonicClient;
use etcdv3client::pb;
use parking_lot::{Condvar, Mutex};
use tokio::sync::mpsc;
use tonic::transport::{Channel, Endpoint};

use super::keys::prefix_end;

/// Deadline of one unary call: past it the cluster counts as unreachable
/// for this call (a write may still have happened; the watch tells).
pub const CALL_TIMEOUT: Duration = Duration::from_secs(3);
/// TTL of the replica's lease: its presence keys vanish this long after it
/// dies or is cut off.
pub const LEASE_TTL: i64 = 6;
/// Deadline of one try of a call while other endpoints remain to try.
const ATTEMPT_TIMEOUT: Duration = Duration::from_millis(1500);

/// One event of the watch: a key (full, with the prefix), its value
/// (`None`: deleted) and the revision that wrote it.
#[derive(Debug, Clone)]
pub struct Event {
    /// The full key.
    pub key: Vec<u8>,
    /// The value, `None` for a deletion.
    pub value: Option<Vec<u8>>,
    /// The revision of the change.
    pub rev: i64,
}

/// The watch's output, read by the store under the registry lock.
#[derive(Debug, Default)]
pub struct FeedState {
    /// Events not taken yet, in revision order.
    pub events: VecDeque<Event>,
    /// Every event up to this revision is in `events` or was taken.
    pub watch_rev: i64,
    /// The history the watch needs was compacted: the store must reload.
    pub compacted: bool,
    /// Whether the watch stream is up now.
    pub alive: bool,
}

/// The watch's queue, with a condition for waiters and a notification for
/// the task that applies remote changes.
#[derive(Debug, Default)]
pub struct Feed {
    /// The state.
    pub state: Mutex<FeedState>,
    /// Signalled on every change of the state.
    pub changed: Condvar,
    /// Wakes the applying task.
    pub notify: tokio::sync::Notify,
}

/// Handle to the connection (cheap to clone).
#[derive(Clone)]
pub struct Conn {
    inner: Arc<Inner>,
}

struct Inner {
    /// One lazily connected channel per endpoint.
    channels: Vec<Channel>,
    /// Endpoint used now (rotates on failure).
    current: AtomicUsize,
    /// The runtime the calls and tasks run on (dropped in the background).
    rt: Mutex<Option<tokio::runtime::Runtime>>,
    handle: tokio::runtime::Handle,
    /// The lease of this replica (0: none yet).
    pub lease: AtomicI64,
    /// Progress requests for the current watch.
    progress: Mutex<Option<mpsc::UnboundedSender<()>>>,
    /// Generation of the current watch (an older loop stops).
    watch_gen: AtomicUsize,
}

impl Drop for Inner {
    fn drop(&mut self) {
        if let Some(rt) = self.rt.lock().take() {
            rt.shutdown_background();
        }
    }
}

impl std::fmt::Debug for Conn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Conn")
            .field("endpoints", &self.inner.channels.len())
            .finish_non_exhaustive()
    }
}

/// Why a call failed.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{0}")]
pub struct CallError(pub String);

impl Conn {
    /// Prepares channels to `endpoints` (`host:port`); nothing connects
    /// until the first call.
    pub fn new(endpoints: &[String]) -> Result<Self, CallError> {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("etcd")
            .enable_all()
            .build()
            .map_err(|e| CallError(format!("etcd runtime: {e}")))?;
        let handle = rt.handle().clone();
        let _guard = handle.enter();
        let mut channels = Vec::new();
        for ep in endpoints {
            let endpoint = Endpoint::from_shared(format!("http://{ep}"))
                .map_err(|e| CallError(format!("etcd endpoint {ep:?}: {e}")))?
                .connect_timeout(Duration::from_secs(1))
                .http2_keep_alive_interval(Duration::from_secs(2))
                .keep_alive_timeout(Duration::from_secs(2))
                .keep_alive_while_idle(true)
                .tcp_nodelay(true);
            channels.push(endpoint.connect_lazy());
        }
        Ok(Self {
            inner: Arc::new(Inner {
                channels,
                current: AtomicUsize::new(0),
                rt: Mutex::new(Some(rt)),
                handle,
                lease: AtomicI64::new(0),
                progress: Mutex::new(None),
                watch_gen: AtomicUsize::new(0),
            }),
        })
    }

    /// The client of the endpoint in use.
    fn client(&self) -> etcdv3client::Client<TonicClient> {
        let i = self.inner.current.load(Ordering::Relaxed) % self.inner.channels.len();
        etcdv3client::Client::with_service(TonicClient::new(self.inner.channels[i].clone()))
    }

    /// Moves to the next endpoint (after a failure on `tried`).
    fn rotate(&self, tried: usize) {
        let _ = self.inner.current.compare_exchange(
            tried,
            tried + 1,
            Ordering::Relaxed,
            Ordering::Relaxed,
        );
    }

    /// Runs `call` on the runtime and waits for it, from any thread. A
    /// call that fails or does not answer in time is tried on the next
    /// endpoint, each endpoint at most once, all within [`CALL_TIMEOUT`]
    /// plus a second; the endpoint that answered is used next time. (A
    /// transaction tried twice is safe: its guards refuse the second if the
    /// first went through, and the watch brings the first.)
    pub fn block<T: Send + 'static, F>(
        &self,
        what: &'static str,
        call: impl Fn(etcdv3client::Client<TonicClient>) -> F + Send + Sync + 'static,
    ) -> Result<T, CallError>
    where
        F: std::future::Future<Output = Result<T, etcdv3client::Error>> + Send + 'static,
    {
        let n = self.inner.channels.len();
        let deadline = Instant::now() + CALL_TIMEOUT + Duration::from_secs(1);
        let call = Arc::new(call);
        let mut last = CallError(format!("etcd {what}: no endpoint"));
        for attempt in 0..n {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                break;
            }
            // Leave room for the other endpoints after a silent one.
            let slice = if attempt + 1 < n {
                left.min(ATTEMPT_TIMEOUT)
            } else {
                left
            };
            let tried = self.inner.current.load(Ordering::Relaxed);
            let client = self.client();
            let (tx, rx) = std::sync::mpsc::sync_channel(1);
            let c = call.clone();
            self.inner.handle.spawn(async move {
                let r = tokio::time::timeout(slice, c(client)).await;
                let _ = tx.send(r);
            });
            last = match rx.recv_timeout(slice + Duration::from_millis(200)) {
                Ok(Ok(Ok(v))) => return Ok(v),
                Ok(Ok(Err(e))) => CallError(format!("etcd {what}: {e}")),
                Ok(Err(_)) | Err(_) => CallError(format!(
                    "etcd {what}: no answer within {} ms",
                    slice.as_millis()
                )),
            };
            self.rotate(tried);
        }
        Err(last)
    }

    /// A transaction.
    pub fn txn(&self, req: pb::TxnRequest) -> Result<pb::TxnResponse, CallError> {
        self.block("transaction", move |mut c| {
            let req = req.clone();
            async move { c.kv.txn(req).await }
        })
    }

    /// A range read.
    pub fn range(&self, req: pb::RangeRequest) -> Result<pb::RangeResponse, CallError> {
        self.block("read", move |mut c| {
            let req = req.clone();
            async move { c.kv.range(req).await }
        })
    }

    /// Asks the watch for a progress notification.
    pub fn request_progress(&self) {
        if let Some(tx) = &*self.inner.progress.lock() {
            let _ = tx.send(());
        }
    }

    /// Starts the watch of every key from `prefix` at `start` into `feed`;
    /// reconnects (on the next endpoint) until the connection is dropped.
    pub fn start_watch(&self, prefix: Vec<u8>, start: i64, feed: Arc<Feed>) {
        feed.state.lock().watch_rev = start - 1;
        let (tx, progress) = mpsc::unbounded_channel();
        *self.inner.progress.lock() = Some(tx);
        let gen = self.inner.watch_gen.fetch_add(1, Ordering::SeqCst) + 1;
        let weak = Arc::downgrade(&self.inner);
        self.inner
            .handle
            .spawn(watch_loop(weak, gen, prefix, feed, progress));
    }

    /// Starts keeping a lease alive: granted (again after it expired), its
    /// id in [`Conn::lease_id`]; `on_grant` runs (on the runtime) after each
    /// grant, to put the keys that live under it.
    pub fn start_lease(&self, on_grant: impl Fn(i64) + Send + Sync + 'static) {
        let weak = Arc::downgrade(&self.inner);
        self.inner
            .handle
            .spawn(lease_loop(weak, Arc::new(on_grant)));
    }

    /// The lease in force (0: none).
    pub fn lease_id(&self) -> i64 {
        self.inner.lease.load(Ordering::Relaxed)
    }

    /// Runs a task on the connection's runtime (it ends when it returns or
    /// the connection goes).
    pub fn spawn_task(&self, task: impl std::future::Future<Output = ()> + Send + 'static) {
        self.inner.handle.spawn(task);
    }

    /// A client of the endpoint in use (for a task of
    /// [`Conn::spawn_task`]).
    pub fn client_now(&self) -> etcdv3client::Client<TonicClient> {
        self.client()
    }

    /// Runs a call in the background, without waiting (presence keys).
    pub fn spawn<F>(&self, call: impl FnOnce(etcdv3client::Client<TonicClient>) -> F)
    where
        F: std::future::Future<Output = ()> + Send + 'static,
    {
        let fut = call(self.client());
        self.inner.handle.spawn(async move {
            let _ = tokio::time::timeout(CALL_TIMEOUT, fut).await;
        });
    }
}

/// Follows the prefix from `feed.watch_rev + 1`, forever (while the
/// connection lives): events into the queue, progress notifications move
/// `watch_rev`. A broken stream is reopened on the next endpoint.
async fn watch_loop(
    inner: std::sync::Weak<Inner>,
    gen: usize,
    prefix: Vec<u8>,
    feed: Arc<Feed>,
    mut progress: mpsc::UnboundedReceiver<()>,
) {
    let mut backoff = Duration::from_millis(100);
    loop {
        let Some(conn) = inner.upgrade().map(|inner| Conn { inner }) else {
            return;
        };
        if conn.inner.watch_gen.load(Ordering::SeqCst) != gen {
            return;
        }
        let tried = conn.inner.current.load(Ordering::Relaxed);
        let client = conn.client();
        drop(conn);
        let start = feed.state.lock().watch_rev + 1;
        let outcome = watch_once(client, &prefix, start, &feed, &mut progress).await;
        {
            let mut st = feed.state.lock();
            st.alive = false;
            if matches!(outcome, WatchEnd::Compacted) {
                st.compacted = true;
            }
        }
        feed.changed.notify_all();
        feed.notify.notify_one();
        if let WatchEnd::Failed(e) = &outcome {
            tracing::warn!("etcd watch: {e}; reopening");
        }
        if matches!(outcome, WatchEnd::Compacted) {
            // The store reloads and starts a new watch.
            return;
        }
        if let Some(inner) = inner.upgrade() {
            (Conn { inner }).rotate(tried);
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(Duration::from_secs(1));
    }
}

/// Why one watch stream ended.
enum WatchEnd {
    Failed(String),
    Compacted,
}

async fn watch_once(
    mut client: etcdv3client::Client<TonicClient>,
    prefix: &[u8],
    start: i64,
    feed: &Feed,
    progress: &mut mpsc::UnboundedReceiver<()>,
) -> WatchEnd {
    let (tx, rx) = mpsc::channel::<pb::WatchRequest>(4);
    let create = pb::WatchCreateRequest {
        key: prefix.to_vec(),
        range_end: prefix_end(prefix),
        start_revision: start,
        progress_notify: true,
        ..Default::default()
    };
    if tx.send(create.into()).await.is_err() {
        return WatchEnd::Failed("request channel closed".into());
    }
    let mut request = tonic::Request::new(tokio_stream::wrappers::ReceiverStream::new(rx));
    // Without a leader the member cancels the watch instead of staying
    // silent, so a replica notices it is cut off.
    request.metadata_mut().insert(
        "hasleader",
        tonic::metadata::MetadataValue::from_static("true"),
    );
    let opened = tokio::time::timeout(CALL_TIMEOUT, client.watch.watch(request)).await;
    let mut stream = match opened {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => return WatchEnd::Failed(e.to_string()),
        Err(_) => return WatchEnd::Failed("no answer".into()),
    };
    loop {
        tokio::select! {
            msg = stream.message() => match msg {
                Ok(Some(resp)) => {
                    if resp.compact_revision > 0 {
                        return WatchEnd::Compacted;
                    }
                    if resp.canceled {
                        return WatchEnd::Failed(format!("canceled: {}", resp.cancel_reason));
                    }
                    take(feed, resp);
                }
                Ok(None) => return WatchEnd::Failed("stream ended".into()),
                Err(e) => return WatchEnd::Failed(e.to_string()),
            },
            Some(()) = progress.recv() => {
                let _ = tx.send(pb::WatchRequest::progress_watch()).await;
            }
        }
    }
}

/// Queues a watch response's events, or moves `watch_rev` on a progress
/// notification.
fn take(feed: &Feed, resp: pb::WatchResponse) {
    let mut st = feed.state.lock();
    st.alive = true;
    let header_rev = resp.header.as_ref().map_or(0, |h| h.revision);
    if resp.events.is_empty() {
        // The creation answer carries the current revision while older
        // events may still come; only a progress notification means
        // "everything up to here was sent".
        if !resp.created {
            st.watch_rev = st.watch_rev.max(header_rev);
        }
    }
    for ev in resp.events {
        let Some(kv) = ev.kv else { continue };
        let deleted = ev.r#type == pb::event::EventType::Delete as i32;
        st.watch_rev = st.watch_rev.max(kv.mod_revision);
        st.events.push_back(Event {
            key: kv.key,
            value: (!deleted).then_some(kv.value),
            rev: kv.mod_revision,
        });
    }
    drop(st);
    feed.changed.notify_all();
    feed.notify.notify_one();
}

/// Grants the lease and keeps it alive; grants a new one when it is lost.
async fn lease_loop(inner: std::sync::Weak<Inner>, on_grant: Arc<dyn Fn(i64) + Send + Sync>) {
    loop {
        let Some(conn) = inner.upgrade().map(|inner| Conn { inner }) else {
            return;
        };
        let tried = conn.inner.current.load(Ordering::Relaxed);
        let mut client = conn.client();
        let req = pb::LeaseGrantRequest {
            ttl: LEASE_TTL,
            id: 0,
        };
        let granted = tokio::time::timeout(CALL_TIMEOUT, client.lease.lease_grant(req)).await;
        let id = match granted {
            Ok(Ok(r)) if r.id != 0 => r.id,
            other => {
                tracing::debug!("etcd lease grant failed: {other:?}");
                conn.rotate(tried);
                drop(conn);
                tokio::time::sleep(Duration::from_millis(500)).await;
                continue;
            }
        };
        conn.inner.lease.store(id, Ordering::Relaxed);
        drop(conn);
        on_grant(id);
        keep_alive(&mut client, id).await;
        if let Some(inner) = inner.upgrade() {
            inner.lease.store(0, Ordering::Relaxed);
            (Conn { inner }).rotate(tried);
        }
        tracing::warn!("etcd lease {id:x} lost; granting a new one");
    }
}

/// Refreshes the lease every third of its TTL until a refresh fails or
/// reports it expired.
async fn keep_alive(client: &mut etcdv3client::Client<TonicClient>, id: i64) {
    let (tx, rx) = mpsc::channel::<pb::LeaseKeepAliveRequest>(1);
    // The first refresh is queued before the call: etcd answers the
    // stream's headers with its first response, so a call that waited for
    // them before sending would time out (and the lease be granted again
    // every `CALL_TIMEOUT`, with every presence key put again).
    if tx.try_send(pb::LeaseKeepAliveRequest { id }).is_err() {
        return;
    }
    let stream = tokio_stream::wrappers::ReceiverStream::new(rx);
    let Ok(Ok(mut answers)) =
        tokio::time::timeout(CALL_TIMEOUT, client.lease.lease_keep_alive(stream)).await
    else {
        return;
    };
    let every = Duration::from_millis(LEASE_TTL as u64 * 1000 / 3);
    let mut last_ok = Instant::now();
    let mut first = true;
    loop {
        if !std::mem::take(&mut first) && tx.send(pb::LeaseKeepAliveRequest { id }).await.is_err() {
            return;
        }
        match tokio::time::timeout(CALL_TIMEOUT, answers.message()).await {
            Ok(Ok(Some(r))) if r.ttl > 0 => last_ok = Instant::now(),
            Ok(Ok(Some(_))) => return, // expired
            Ok(Ok(None)) | Ok(Err(_)) => return,
            Err(_) => {
                if last_ok.elapsed() > Duration::from_secs(LEASE_TTL as u64) {
                    return;
                }
            }
        }
        tokio::time::sleep(every).await;
    }
}
