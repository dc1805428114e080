//! Purges and refreshes (`pullthrough cache purge|refresh`): over the admin API of one mirror
//! and of a fleet (see `common::fleet`), and on a storage directory at rest with the binary.
//! What each makes the next pull do is counted at the fake upstream.

#![allow(clippy::unwrap_used)] // a failed unwrap in a test is a failed test, with its message

mod common;

use common::fleet::Fleet;
use common::run_binary as pullthrough;
use common::upstream::sha256;
use common::{error_code, eventually, x_cache, FakeUpstream, TestMirror, SETTLE};
use object_store::path::Path;
use object_store::ObjectStore;
use pullthrough::config::Secret;

/// `POST /_pullthrough/cache/<what>?<param>=<value>`, with `token` as a Bearer token.
async fn admin(
    m: &TestMirror,
    what: &str,
    param: &str,
    value: &str,
    token: Option<&str>,
) -> reqwest::Response {
    let request = m
        .client
        .post(format!("{}/_pullthrough/cache/{what}", m.url))
        .query(&[(param, value)]);
    let request = match token {
        Some(t) => request.bearer_auth(t),
        None => request,
    };
    request.send().await.unwrap()
}

/// A purge or refresh that must succeed: its JSON answer.
async fn admin_ok(m: &TestMirror, what: &str, param: &str, value: &str) -> serde_json::Value {
    let r = admin(m, what, param, value, None).await;
    assert_eq!(r.status(), 200, "{what} {value}");
    r.json().await.unwrap()
}

/// GETs `path`: its `X-Cache` and the digest of its body.
async fn pull(m: &TestMirror, path: &str) -> (String, String) {
    let r = m.get(path).send().await.unwrap();
    assert_eq!(r.status(), 200, "{path}");
    let cache = x_cache(&r);
    (cache, sha256(&r.bytes().await.unwrap()))
}

async fn status(m: &TestMirror) -> serde_json::Value {
    let r = m.get("/_pullthrough/status").send().await.unwrap();
    r.json().await.unwrap()
}

#[tokio::test]
async fn a_purged_tag_is_fetched_from_the_upstream_on_the_next_pull() {
    let up = FakeUpstream::start().await;
    let (digest, _) = up.add_image("library/alpine", "3.20", &[100]);
    let m = TestMirror::start(&up).await;
    let path = "/v2/library/alpine/manifests/3.20";
    pull(&m, path).await;
    assert_eq!(pull(&m, path).await.0, "HIT");
    assert_eq!(up.manifest_gets(), 1);

    let purged = admin_ok(&m, "purge", "reference", "alpine:3.20").await;
    assert_eq!(purged["subject"], "docker.io/library/alpine:3.20");
    assert_eq!(purged["found"], true);
    assert_eq!(purged["tags"], serde_json::json!(["3.20"]));
    assert!(purged.get("fleet").is_none(), "no cluster: {purged}");

    let (cache, got) = pull(&m, path).await;
    assert_eq!(got, digest);
    assert_eq!(cache, "MISS", "the tag was fetched again");
    assert_eq!(up.manifest_gets(), 2);

    // The status page lists the purge, with who asked.
    let s = status(&m).await;
    let recent = &s["recent_purges"][0];
    assert_eq!(recent["action"], "purge");
    assert_eq!(recent["subject"], "docker.io/library/alpine:3.20");
    assert!(
        recent["by"].as_str().unwrap().starts_with("127.0.0.1"),
        "{recent}"
    );
}

#[tokio::test]
async fn a_purged_repository_forgets_every_tag_and_a_purged_digest_its_content_and_links() {
    let up = FakeUpstream::start().await;
    let (one, layers) = up.add_image("library/app", "1", &[300]);
    up.add_image("library/app", "2", &[200]);
    let m = TestMirror::start(&up).await;
    pull(&m, "/v2/library/app/manifests/1").await;
    pull(&m, "/v2/library/app/manifests/2").await;
    let blob = format!("/v2/library/app/blobs/{}", layers[0]);
    pull(&m, &blob).await;
    common::wait_committed(&m, &blob).await;
    assert_eq!((up.manifest_gets(), up.blob_gets()), (2, 1));

    let purged = admin_ok(&m, "purge", "reference", "library/app").await;
    assert_eq!(purged["subject"], "docker.io/library/app");
    assert_eq!(purged["tags"], serde_json::json!(["1", "2"]));
    pull(&m, "/v2/library/app/manifests/1").await;
    pull(&m, "/v2/library/app/manifests/2").await;
    assert_eq!(up.manifest_gets(), 4, "both tags were fetched again");

    let purged = admin_ok(&m, "purge", "digest", &layers[0]).await;
    assert_eq!(purged["blobs"], serde_json::json!([layers[0]]));
    assert_eq!(
        purged["unlinked"],
        serde_json::json!(["docker.io/library/app"])
    );
    let (cache, got) = pull(&m, &blob).await;
    assert_eq!((cache.as_str(), got.as_str()), ("MISS", layers[0].as_str()));
    assert_eq!(up.blob_gets(), 2, "the blob was fetched again");

    // A manifest by digest reference: removed, and fetched again by the next pull.
    let by_digest = format!("/v2/library/app/manifests/{one}");
    assert_eq!(pull(&m, &by_digest).await.0, "HIT");
    let gets = up.manifest_gets();
    let purged = admin_ok(&m, "purge", "reference", &format!("library/app@{one}")).await;
    assert_eq!(purged["manifests"], serde_json::json!([one]));
    assert_eq!(pull(&m, &by_digest).await, ("MISS".to_owned(), one.clone()));
    assert_eq!(up.manifest_gets(), gets + 1);

    // Nothing to purge is an answer, not an error.
    let purged = admin_ok(&m, "purge", "reference", "library/app:9").await;
    assert_eq!(purged["found"], false, "{purged}");
}

#[tokio::test]
async fn a_refresh_picks_up_a_moved_tag_before_its_ttl_ends() {
    let up = FakeUpstream::start().await;
    let (old, _) = up.add_image("library/app", "latest", &[100]);
    let m = TestMirror::start(&up).await;
    let path = "/v2/library/app/manifests/latest";
    pull(&m, path).await;
    let (new, _) = up.add_image("library/app", "next", &[120]);
    up.retag("library/app", "latest", &new);
    assert_eq!(pull(&m, path).await, ("HIT".to_owned(), old.clone()));

    let answer = admin_ok(&m, "refresh", "reference", "library/app:latest").await;
    let refreshed = &answer["refreshed"][0];
    assert_eq!(refreshed["reference"], "docker.io/library/app:latest");
    assert_eq!(refreshed["before"], old.as_str());
    assert_eq!(refreshed["after"], new.as_str());
    assert_eq!(refreshed["changed"], true);
    assert_eq!(up.manifest_heads(), 1, "revalidated with a HEAD");
    let before = up.total();
    assert_eq!(pull(&m, path).await, ("HIT".to_owned(), new.clone()));
    assert_eq!(up.total(), before, "the refresh fetched the new manifest");

    // Unchanged: a HEAD, nothing fetched.
    let answer = admin_ok(&m, "refresh", "reference", "library/app:latest").await;
    assert_eq!(answer["refreshed"][0]["changed"], false);
    assert_eq!(answer["refreshed"][0]["status"], "REVALIDATED");
    assert_eq!(up.total(), before + 1);
}

#[tokio::test]
async fn bad_input_gets_registry_errors() {
    let up = FakeUpstream::start().await;
    let m = TestMirror::start(&up).await;
    let cases = [
        ("purge", "reference", "Alpine", 400, "NAME_INVALID"),
        ("purge", "digest", "sha256:12", 400, "DIGEST_INVALID"),
        (
            "purge",
            "reference",
            "alpine@sha256:12",
            400,
            "DIGEST_INVALID",
        ),
        ("purge", "nothing", "x", 400, "UNSUPPORTED"),
        (
            "purge",
            "reference",
            "quay.io/org/app:1",
            404,
            "NAME_UNKNOWN",
        ),
        (
            "refresh",
            "reference",
            &format!("alpine@sha256:{}", "ab".repeat(32)),
            400,
            "TAG_INVALID",
        ),
    ];
    for (what, param, value, status, code) in cases {
        let r = admin(&m, what, param, value, None).await;
        assert_eq!(r.status(), status, "{what} {param}={value}");
        assert_eq!(error_code(r).await, code, "{what} {param}={value}");
    }
    let r = m.get("/_pullthrough/cache/purge").send().await.unwrap();
    assert_eq!(r.status(), 405);
    assert_eq!(error_code(r).await, "UNSUPPORTED");
    // A refresh of a tag the upstream does not have is its 404.
    let r = admin(&m, "refresh", "reference", "library/none:1", None).await;
    assert_eq!(r.status(), 404);
    assert_eq!(error_code(r).await, "MANIFEST_UNKNOWN");
}

#[tokio::test]
async fn the_admin_api_asks_for_the_clients_credentials() {
    let up = FakeUpstream::start().await;
    up.add_image("library/alpine", "3.20", &[100]);
    let m = TestMirror::start_with(&up, |c| {
        c.server.tokens = vec![Secret::new("tok-one"), Secret::new("tok-two")];
    })
    .await;
    for token in [None, Some("wrong")] {
        for what in ["purge", "refresh"] {
            let r = admin(&m, what, "reference", "alpine:3.20", token).await;
            assert_eq!(r.status(), 401, "{what} with {token:?}");
            assert_eq!(error_code(r).await, "UNAUTHORIZED");
        }
    }
    let r = admin(&m, "purge", "reference", "alpine:3.20", Some("tok-two")).await;
    assert_eq!(r.status(), 200);
    let s: serde_json::Value = m
        .get("/_pullthrough/status")
        .bearer_auth("tok-two")
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let by = s["recent_purges"][0]["by"].as_str().unwrap();
    assert_eq!(by, "127.0.0.1 with token #2", "who asked, not the token");
}

#[tokio::test]
async fn a_purge_on_one_replica_is_a_fetch_on_the_next_pull_from_any() {
    let fleet = Fleet::new().await;
    let (digest, _) = fleet.upstream.add_image("library/alpine", "3.20", &[100]);
    let (a, b) = (fleet.replica().await, fleet.replica().await);
    let path = "/v2/library/alpine/manifests/3.20";
    pull(&a, path).await;
    fleet.wait_shared("manifests", &digest).await;
    assert_eq!(
        pull(&b, path).await.0,
        "HIT",
        "b knows the tag from the fleet"
    );
    assert_eq!(fleet.upstream.manifest_gets(), 1);

    let purged = admin_ok(&a, "purge", "reference", "alpine:3.20").await;
    assert_eq!(purged["fleet"], true, "{purged}");
    // b reads the fleet's purge log every 2 s.
    eventually("b applied a's purge", SETTLE, || async {
        status(&b).await["recent_purges"][0]["subject"] == "docker.io/library/alpine:3.20"
    })
    .await;
    let (cache, got) = pull(&b, path).await;
    assert_eq!((cache.as_str(), got.as_str()), ("MISS", digest.as_str()));
    assert_eq!(fleet.upstream.manifest_gets(), 2, "b fetched the tag again");
    let s = status(&b).await;
    assert_eq!(s["recent_purges"][0]["replica"], a.url.as_str());

    // A digest: gone from the shared tier and from every replica's disk.
    let purged = admin_ok(&b, "purge", "digest", &digest).await;
    let hex = digest.trim_start_matches("sha256:");
    assert_eq!(
        purged["shared"],
        serde_json::json!([format!("manifests/sha256/{hex}")])
    );
    let object = Path::from(format!("manifests/sha256/{hex}"));
    assert!(fleet.store.head(&object).await.is_err(), "deleted");
    eventually("a applied b's purge", SETTLE, || async {
        status(&a).await["recent_purges"][0]["subject"] == digest.as_str()
    })
    .await;
    let by_digest = format!("/v2/library/alpine/manifests/{digest}");
    let gets = fleet.upstream.manifest_gets();
    assert_eq!(pull(&a, &by_digest).await.0, "MISS");
    assert_eq!(fleet.upstream.manifest_gets(), gets + 1);
}

#[tokio::test]
async fn a_refresh_on_one_replica_moves_the_tag_for_the_fleet() {
    let fleet = Fleet::new().await;
    let (old, _) = fleet.upstream.add_image("library/app", "latest", &[100]);
    let (a, b) = (fleet.replica().await, fleet.replica().await);
    let path = "/v2/library/app/manifests/latest";
    pull(&a, path).await;
    pull(&b, path).await;
    let (new, _) = fleet.upstream.add_image("library/app", "next", &[120]);
    fleet.upstream.retag("library/app", "latest", &new);

    let answer = admin_ok(&a, "refresh", "reference", "library/app:latest").await;
    assert_eq!(answer["refreshed"][0]["after"], new.as_str());
    fleet.wait_shared("manifests", &new).await;
    eventually("b applied a's refresh", SETTLE, || async {
        status(&b).await["recent_purges"][0]["action"] == "refresh"
    })
    .await;
    let before = fleet.upstream.total();
    assert_eq!(pull(&b, path).await.1, new, "b follows the moved tag");
    assert_eq!(fleet.upstream.total(), before, "from the fleet's record");
    assert_ne!(old, new);
}

fn stdout(o: &std::process::Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn stderr(o: &std::process::Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

#[tokio::test]
async fn the_cli_purges_and_refreshes_a_storage_dir_at_rest_and_through_a_mirror() {
    let up = FakeUpstream::start().await;
    let (old, _) = up.add_image("library/alpine", "3.20", &[100]);
    let m = TestMirror::start(&up).await;
    let path = "/v2/library/alpine/manifests/3.20";
    pull(&m, path).await;
    let storage = m.storage();
    let dir = storage.to_str().unwrap().to_owned();

    // Refused while the mirror serves the directory.
    let out = pullthrough(
        &["cache", "purge", "alpine:3.20", "--storage-dir", &dir],
        &[],
    )
    .await;
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert!(stderr(&out).contains("cannot purge"), "{}", stderr(&out));
    assert!(stderr(&out).contains("--mirror"), "{}", stderr(&out));

    // Through the mirror.
    let out = pullthrough(
        &[
            "cache",
            "purge",
            "alpine:3.20",
            "--mirror",
            &m.url,
            "--json",
        ],
        &[],
    )
    .await;
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let json: serde_json::Value = serde_json::from_str(&stdout(&out)).unwrap();
    assert_eq!(json[0]["tags"], serde_json::json!(["3.20"]));
    pull(&m, path).await;
    assert_eq!(up.manifest_gets(), 2);

    // At rest.
    let dir_kept = m.stop().await;
    let out = pullthrough(
        &["cache", "purge", "alpine:3.20", "--storage-dir", &dir],
        &[],
    )
    .await;
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert_eq!(
        stdout(&out),
        "purged docker.io/library/alpine:3.20: 1 tag records, 0 manifests, 0 blobs, 0 links, \
         0 shared-tier objects\n"
    );
    assert!(
        stderr(&out).contains("purged") && stderr(&out).contains("local user"),
        "the purge is logged with who asked: {}",
        stderr(&out)
    );
    let out = pullthrough(
        &["cache", "purge", "alpine:3.20", "--storage-dir", &dir],
        &[],
    )
    .await;
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert_eq!(
        stdout(&out),
        "nothing to purge for docker.io/library/alpine:3.20\n"
    );

    // A refresh at rest asks the upstream, and the tag moved.
    let (new, _) = up.add_image("library/alpine", "next", &[120]);
    up.retag("library/alpine", "3.20", &new);
    let out = pullthrough(
        &[
            "cache",
            "refresh",
            "alpine:3.20",
            "--storage-dir",
            &dir,
            "--upstream",
            &up.url,
        ],
        &[],
    )
    .await;
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert_eq!(
        stdout(&out),
        format!("refreshed docker.io/library/alpine:3.20: fetched {new}\n")
    );
    assert_ne!(old, new);

    let m = TestMirror::start_in(&up, dir_kept, |_| {}).await;
    let gets = up.manifest_gets();
    assert_eq!(pull(&m, path).await, ("HIT".to_owned(), new));
    assert_eq!(
        up.manifest_gets(),
        gets,
        "the refresh at rest stored the tag"
    );
}
