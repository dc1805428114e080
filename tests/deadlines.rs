//! Every wait has a deadline: a token realm, registry, shared store, coordinator or peer that
//! accepts connections and never answers costs a client at most its configured timeout, and
//! the next request is not stuck behind the first.

#![allow(clippy::unwrap_used)] // a failed unwrap in a test is a failed test, with its message
#![allow(clippy::expect_used)] // a failed expect in a test is a failed test, with its message

mod common;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::{error_code, FakeUpstream, TestMirror, SETTLE};

/// The upstream timeout these tests configure; `SETTLE` is far beyond it, so an answer within
/// `SETTLE` can only come from the deadline.
const TIMEOUT: Duration = Duration::from_secs(1);

async fn message(resp: reqwest::Response) -> String {
    let v: serde_json::Value = resp.json().await.unwrap();
    v["errors"][0]["message"]
        .as_str()
        .unwrap_or_default()
        .to_owned()
}

#[tokio::test]
async fn a_hanging_token_realm_fails_cold_pulls_at_the_timeout_naming_the_token() {
    let up = FakeUpstream::start().await;
    up.add_image("library/app", "v1", &[10]);
    up.add_image("library/other", "v1", &[10]);
    up.behave(|b| {
        b.require_token = true;
        b.hang_token = true;
    });
    let m = TestMirror::start_with(&up, |c| {
        c.upstreams.get_mut("docker.io").unwrap().first_byte_timeout = TIMEOUT;
    })
    .await;
    // Two cold pulls at once, of two scopes, both waiting on the hanging realm.
    let (a, b) = tokio::time::timeout(
        SETTLE,
        futures_util::future::join(
            m.get("/v2/library/app/manifests/v1").send(),
            m.get("/v2/library/other/manifests/v1").send(),
        ),
    )
    .await
    .expect("a hanging token realm held cold pulls beyond the upstream timeout");
    for r in [a.unwrap(), b.unwrap()] {
        assert_eq!(r.status(), 503);
        let text = r.text().await.unwrap();
        assert!(text.contains("UNAVAILABLE"), "{text}");
        assert!(
            text.contains("docker.io") && text.contains("token"),
            "{text}"
        );
    }
    // The next request of the same scope is not stuck behind the first either.
    let r = tokio::time::timeout(SETTLE, m.get("/v2/library/app/manifests/v1").send())
        .await
        .expect("a later request joined a stuck token fetch")
        .unwrap();
    assert_eq!(r.status(), 503);
    assert!(message(r).await.contains("token"));
    let realm_asked = up.seen().iter().filter(|s| s.host == "token").count();
    assert!(realm_asked >= 1, "the realm was asked");
    // Once the realm answers, pulls work again.
    up.behave(|b| b.hang_token = false);
    m.advance(Duration::from_secs(60)); // past the back-off the timeouts started
    let r = tokio::time::timeout(SETTLE, m.get("/v2/library/app/manifests/v1").send())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(r.status(), 200, "{}", error_code(r).await);
}

/// A server that accepts connections and never answers; counts the connections it took.
struct BlackHole {
    url: String,
    accepted: Arc<AtomicU64>,
    task: tokio::task::JoinHandle<()>,
}

impl BlackHole {
    async fn start() -> BlackHole {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let accepted = Arc::new(AtomicU64::new(0));
        let count = accepted.clone();
        let task = tokio::spawn(async move {
            let mut held = Vec::new();
            while let Ok((conn, _)) = listener.accept().await {
                count.fetch_add(1, Ordering::SeqCst);
                held.push(conn);
            }
        });
        BlackHole {
            url,
            accepted,
            task,
        }
    }

    fn accepted(&self) -> u64 {
        self.accepted.load(Ordering::SeqCst)
    }
}

impl Drop for BlackHole {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn pull_image(m: &TestMirror, repo: &str, layers: &[String]) {
    let r = tokio::time::timeout(SETTLE, m.get(&format!("/v2/{repo}/manifests/v1")).send())
        .await
        .expect("a hanging tier held a cold manifest pull")
        .unwrap();
    assert_eq!(r.status(), 200);
    for l in layers {
        let r = tokio::time::timeout(SETTLE, async {
            let r = m
                .get(&format!("/v2/{repo}/blobs/{l}"))
                .send()
                .await
                .unwrap();
            assert_eq!(r.status(), 200);
            r.bytes().await.unwrap()
        })
        .await
        .expect("a hanging tier held a cold blob pull");
        assert_eq!(common::upstream::sha256(&r), *l);
    }
}

#[tokio::test]
async fn a_hanging_shared_store_costs_the_first_cold_pull_its_deadline_and_later_pulls_nothing() {
    let up = FakeUpstream::start().await;
    let (_, a) = up.add_image("library/app", "v1", &[100_000]);
    let (_, b) = up.add_image("library/other", "v1", &[100_000]);
    let store = BlackHole::start().await;
    let m = TestMirror::start_with(&up, |c| {
        common::join_cluster(c, "http://127.0.0.1:9");
        c.cluster = None;
        if let Some(shared) = &mut c.storage.shared {
            shared.endpoint = store.url.clone();
        }
    })
    .await;
    pull_image(&m, "library/app", &a).await;
    let asked = store.accepted();
    assert!(asked >= 1, "the shared store was asked");
    // Marked down: the next cold pull neither reads, writes nor uploads to it.
    pull_image(&m, "library/other", &b).await;
    assert_eq!(store.accepted(), asked, "a store marked down is not asked");
    assert_eq!(up.manifest_gets(), 2);
    assert_eq!(up.blob_gets(), 2);
}

#[tokio::test]
async fn a_hanging_coordinator_and_shared_store_do_not_hold_cold_pulls() {
    let up = FakeUpstream::start().await;
    let (_, a) = up.add_image("library/app", "v1", &[100_000]);
    let (_, b) = up.add_image("library/other", "v1", &[100_000]);
    let redis = BlackHole::start().await;
    let store = BlackHole::start().await;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let advertise = format!("http://{}", listener.local_addr().unwrap());
    let dir = tempfile::tempdir().unwrap();
    let mut config = common::test_config(&up.url, dir.path());
    common::join_cluster(&mut config, &advertise);
    if let Some(cluster) = &mut config.cluster {
        cluster.redis = common::secret(&redis.url.replace("http://", "redis://"));
    }
    if let Some(shared) = &mut config.storage.shared {
        shared.endpoint = store.url.clone();
    }
    let m = TestMirror::launch_on(listener, pullthrough::Clock::manual(), config, dir, |s| s).await;
    pull_image(&m, "library/app", &a).await;
    pull_image(&m, "library/other", &b).await;
    assert_eq!(up.blob_gets(), 2);
}

#[tokio::test]
async fn a_lease_holder_that_never_answers_costs_a_client_its_first_byte_timeout() {
    use pullthrough::cluster::coordinator::{Claim, Coordinator};
    let fleet = common::fleet::Fleet::new().await;
    let up = &fleet.upstream;
    let body = common::upstream::pseudo_random(300_000, 9);
    let digest = up.add_blob(body.clone());
    let holder = BlackHole::start().await;
    // A holder that took the lease, then stopped answering (and renewing).
    let claim = fleet
        .coordinator
        .claim(
            &format!("pullthrough:lease:blob:{digest}"),
            &holder.url,
            Duration::from_secs(3),
        )
        .await
        .unwrap();
    assert!(matches!(claim, Claim::Acquired(_)));
    let follower = fleet
        .replica_with(|c| {
            c.upstreams.get_mut("docker.io").unwrap().first_byte_timeout = TIMEOUT;
        })
        .await;
    let path = format!("/v2/library/app/blobs/{digest}");
    let r = tokio::time::timeout(SETTLE, follower.get(&path).send())
        .await
        .expect("a hanging lease holder held the client beyond its timeout")
        .unwrap();
    assert_eq!(r.status(), 503);
    let text = message(r).await;
    assert!(
        text.contains("docker.io") && text.contains("download"),
        "{text}"
    );
    assert!(holder.accepted() >= 1, "the holder was asked");
    // Once the lease expires, the follower takes the download over; one upstream body.
    common::eventually("the blob is served", SETTLE * 2, || async {
        let r = follower.get(&path).send().await.unwrap();
        r.status() == 200 && r.bytes().await.unwrap() == body
    })
    .await;
    assert_eq!(up.blob_gets(), 1);
}

/// The registry blob GETs the fake was sent, answered or not (a hanging one is never counted
/// by `blob_gets`).
fn blob_gets_sent(up: &FakeUpstream) -> usize {
    up.seen()
        .iter()
        .filter(|s| {
            s.host == "registry" && s.method == http::Method::GET && s.path.contains("/blobs/")
        })
        .count()
}

/// Waits until no download runs: what a failed one cost the upstream is then final.
async fn downloads_settled(m: &TestMirror) {
    common::eventually("the download ended", SETTLE, || async {
        common::metric(&m.metrics().await, "pullthrough_inflight_downloads") == 0.0
    })
    .await;
}

#[tokio::test]
async fn a_hanging_upstream_fails_a_cold_blob_once_within_first_byte_timeout_naming_the_wait() {
    let up = FakeUpstream::start().await;
    let digest = up.add_blob(common::upstream::pseudo_random(1000, 3));
    up.behave(|b| b.hang = true);
    let m = TestMirror::start_with(&up, |c| {
        let u = c.upstreams.get_mut("docker.io").unwrap();
        u.first_byte_timeout = TIMEOUT;
        u.head_timeout = TIMEOUT;
    })
    .await;
    let path = format!("/v2/library/app/blobs/{digest}");
    // Two clients, one after the other: each is the first to ask once the other's download
    // gave up, and each costs one upstream GET, not a retry of a GET that already took the
    // whole first_byte_timeout.
    for n in 1..=2 {
        let r = tokio::time::timeout(TIMEOUT * 3 / 2, m.get(&path).send())
            .await
            .expect("a hanging upstream held a cold blob beyond first_byte_timeout")
            .unwrap();
        assert_eq!(r.status(), 503);
        let text = message(r).await;
        assert!(
            text.contains("docker.io")
                && text.contains("timed out waiting for")
                && text.contains("response"),
            "{text}"
        );
        assert!(!text.contains("backing off"), "the first failures: {text}");
        downloads_settled(&m).await;
        assert_eq!(blob_gets_sent(&up), n, "one GET per download");
    }
}

/// A blob whose upstream sends its first 64 KiB, then stalls: every response, a resume's too,
/// with `resume_hangs` a resume gets no answer at all.
async fn stalled_blob(resume_hangs: bool) {
    let up = FakeUpstream::start().await;
    let body = common::upstream::pseudo_random(1024 * 1024, 5);
    let digest = up.add_blob(body.clone());
    up.behave(|b| b.hold_blob_after = Some(64 * 1024));
    let m = TestMirror::start_with(&up, |c| {
        let u = c.upstreams.get_mut("docker.io").unwrap();
        u.first_byte_timeout = TIMEOUT;
        u.idle_timeout = TIMEOUT;
    })
    .await;
    let mut r = m
        .get(&format!("/v2/library/app/blobs/{digest}"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let first = r.chunk().await.unwrap().expect("the first bytes");
    if resume_hangs {
        up.behave(|b| b.hang = true);
    }
    let mut got = first.len();
    let read = tokio::time::timeout(SETTLE, async {
        loop {
            match r.chunk().await {
                Ok(Some(c)) => got += c.len(),
                Ok(None) => return true,
                Err(_) => return false,
            }
        }
    })
    .await
    .expect("a stalled upstream held the client");
    assert!(!read, "a blob that never came whole was cut, not completed");
    assert!(got < body.len());
    downloads_settled(&m).await;
    // One stall noticed (idle_timeout), one resume within the next idle_timeout, then the cut:
    // not one stall per `resume_attempts`.
    assert_eq!(blob_gets_sent(&up), 2, "the first GET and one resume");
}

#[tokio::test]
async fn an_upstream_that_stalls_every_body_costs_a_client_two_idle_timeouts() {
    stalled_blob(false).await;
}

#[tokio::test]
async fn an_upstream_that_stalls_then_hangs_costs_a_client_two_idle_timeouts() {
    stalled_blob(true).await;
}
