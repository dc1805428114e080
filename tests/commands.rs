//! The operator commands as an operator runs them: the built binary, flags after the
//! subcommand, exit status, stdout and stderr.

#![allow(clippy::unwrap_used)] // a failed unwrap in a test is a failed test, with its message

mod common;

use std::path::Path;
use std::process::Output;

use common::upstream::sha256;
use common::{FakeUpstream, TestMirror};
use pullthrough::config::Config;

const MIB: usize = 1024 * 1024;

use common::run_binary as pullthrough;

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn blob_file(root: &Path, digest: &str) -> std::path::PathBuf {
    let hex = digest.trim_start_matches("sha256:");
    root.join("blobs/sha256").join(&hex[..2]).join(hex)
}

/// A storage dir holding the given blobs, cached through a mirror.
async fn cached_blobs(sizes: &[usize]) -> (FakeUpstream, TestMirror, Vec<String>) {
    let up = FakeUpstream::start().await;
    let (_, blobs) = up.add_image("library/app", "v1", sizes);
    let m = TestMirror::start(&up).await;
    for b in &blobs {
        let path = format!("/v2/library/app/blobs/{b}");
        let body = m.get(&path).send().await.unwrap().bytes().await.unwrap();
        assert_eq!(&sha256(&body), b);
        common::wait_committed(&m, &path).await;
    }
    (up, m, blobs)
}

async fn verify_json(dir: &str, extra: &[&str]) -> (Output, serde_json::Value) {
    let mut args = vec!["verify", "--json", "--storage-dir", dir];
    args.extend_from_slice(extra);
    let out = pullthrough(&args, &[]).await;
    let json = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("stdout is not JSON ({e}):\n{}", stdout(&out)));
    (out, json)
}

#[tokio::test]
async fn verify_json_reports_files_bytes_corrupt_and_repaired() {
    let (_up, m, blobs) = cached_blobs(&[MIB, MIB, 100_000]).await;
    let root = m.storage();
    let dir = root.to_str().unwrap();

    let (out, report) = verify_json(dir, &[]).await;
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(report["files_checked"], 3);
    assert_eq!(report["files_ok"], 3);
    assert_eq!(report["bytes_checked"], (2 * MIB + 100_000) as u64);
    assert_eq!(report["corrupt"], serde_json::json!([]));
    assert_eq!(report["repaired"], 0);
    assert_eq!(report["healthy"], true);
    assert_eq!(report["storage_dir"], dir);

    let file = blob_file(&root, &blobs[1]);
    let mut bytes = std::fs::read(&file).unwrap();
    bytes[0] ^= 1;
    std::fs::write(&file, bytes).unwrap();

    let (out, report) = verify_json(dir, &[]).await;
    assert_eq!(out.status.code(), Some(1), "corrupt and not repaired");
    assert_eq!(report["files_ok"], 2);
    assert_eq!(report["healthy"], false);
    assert_eq!(
        report["corrupt"],
        serde_json::json!([{
            "kind": "blob",
            "digest": blobs[1],
            "size": MIB,
            "error": "digest mismatch",
            "removed": false,
        }])
    );
    assert!(file.exists());

    let (out, report) = verify_json(dir, &["--repair"]).await;
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(report["repaired"], 1);
    assert_eq!(report["corrupt"][0]["removed"], true);
    assert_eq!(report["healthy"], true);
    assert!(!file.exists());
}

#[tokio::test]
async fn verify_text_report_and_no_progress_bar_without_a_terminal() {
    let (_up, m, blobs) = cached_blobs(&[200_000]).await;
    let root = m.storage();
    // The global flag before the subcommand, as before.
    let out = pullthrough(&["--storage-dir", root.to_str().unwrap(), "verify"], &[]).await;
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(
        stdout(&out),
        "1 ok, 0 corrupt, 0 removed (1 files, 195.31 KiB checked)\n"
    );
    // A run this short writes no progress line; a bar would need a terminal.
    assert_eq!(stderr(&out), "");
    std::fs::write(blob_file(&root, &blobs[0]), b"garbage").unwrap();
    let out = pullthrough(&["verify", "--storage-dir", root.to_str().unwrap()], &[]).await;
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stdout(&out).starts_with(&format!("corrupt blob {} (digest mismatch)\n", blobs[0])),
        "{}",
        stdout(&out)
    );
}

#[tokio::test]
async fn storage_commands_take_the_config_after_the_subcommand() {
    let (_up, m, _blobs) = cached_blobs(&[MIB, MIB]).await;
    let root = m.storage();
    let config = root.join("ops.toml");
    std::fs::write(&config, format!("[storage]\ndir = {:?}\n", root)).unwrap();
    let config = config.to_str().unwrap();
    let out = pullthrough(&["cache", "stats", "--config", config], &[]).await;
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stdout(&out).contains("entries: 2"), "{}", stdout(&out));
    let out = pullthrough(&["cache", "prune", "--to", "1MiB", "-c", config], &[]).await;
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(
        stdout(&out).starts_with("pruned 1 files"),
        "{}",
        stdout(&out)
    );
    let out = pullthrough(&["verify", "--json"], &[("PULLTHROUGH_CONFIG", config)]).await;
    assert!(out.status.success(), "{}", stderr(&out));
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report["files_checked"], 1);
}

#[tokio::test]
async fn verify_of_a_missing_storage_dir_fails_with_the_reason() {
    let out = pullthrough(
        &["verify", "--storage-dir", "/nonexistent/pullthrough"],
        &[],
    )
    .await;
    assert_eq!(out.status.code(), Some(2));
    assert!(stderr(&out).contains("does not exist"), "{}", stderr(&out));
    assert_eq!(stdout(&out), "");
}

#[tokio::test]
async fn config_check_prints_the_effective_config_with_secrets_redacted() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("mirror.toml");
    std::fs::write(
        &file,
        "[server]\nlisten = \"127.0.0.1:5999\"\ntokens = [\"tok-file-secret\"]\n\
         [storage]\ndir = \"/srv/cache\"\nmax_size = \"50GiB\"\n\
         [upstreams.\"docker.io\"]\nusername = \"me\"\npassword = \"file-secret\"\n",
    )
    .unwrap();
    let out = pullthrough(
        &[
            "config",
            "check",
            "--config",
            file.to_str().unwrap(),
            "--max-size",
            "20GiB",
            "--tag-ttl",
            "90s",
        ],
        &[("PULLTHROUGH_UPSTREAM_PASSWORD", "env-secret")],
    )
    .await;
    assert!(out.status.success(), "{}", stderr(&out));
    let text = stdout(&out);
    assert!(
        text.starts_with("# pullthrough config check: valid."),
        "{text}"
    );
    for secret in ["tok-file-secret", "file-secret", "env-secret"] {
        assert!(!text.contains(secret), "{secret} shown in\n{text}");
    }
    assert!(text.contains("password = \"[REDACTED]\""), "{text}");
    // File, then environment, then flags: the printed values are the effective ones.
    let effective = Config::from_toml(&text).unwrap();
    assert_eq!(effective.server.listen.to_string(), "127.0.0.1:5999");
    assert_eq!(effective.storage.dir.to_str(), Some("/srv/cache"));
    assert_eq!(
        effective.storage.max_size,
        Some(bytesize::ByteSize::gib(20))
    );
    assert_eq!(effective.cache.tag_ttl.as_secs(), 90);
    assert_eq!(
        effective.upstreams["docker.io"].username.as_deref(),
        Some("me")
    );
}

#[tokio::test]
async fn config_check_redacts_the_credentials_of_each_url() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("mirror.toml");
    std::fs::write(
        &file,
        "[upstreams.\"docker.io\"]\n[upstreams.\"registry.example.com\"]\n\
         username = \"ci\"\npassword = \"up-secret\"\n\
         urls = [\"https://primary.example.com\",\n\
           { url = \"https://secondary.example.com\", username = \"ci2\", password = \"url-secret\" },\n\
           { url = \"https://tertiary.example.com\", credentials = \"same\" }]\n",
    )
    .unwrap();
    let out = pullthrough(
        &["config", "check", "--config", file.to_str().unwrap()],
        &[],
    )
    .await;
    assert!(out.status.success(), "{}", stderr(&out));
    let text = stdout(&out);
    for secret in ["up-secret", "url-secret"] {
        assert!(!text.contains(secret), "{secret} shown in\n{text}");
    }
    assert_eq!(text.matches("\"[REDACTED]\"").count(), 2, "{text}");
    let effective = Config::from_toml(&text).unwrap();
    effective.validate().unwrap();
    let up = &effective.upstreams["registry.example.com"];
    assert_eq!(
        up.base_urls(),
        [
            "https://primary.example.com",
            "https://secondary.example.com",
            "https://tertiary.example.com"
        ]
    );
    assert_eq!(up.urls[1].username.as_deref(), Some("ci2"));
    assert!(up.urls[2].same_credentials);
}

#[tokio::test]
async fn config_check_without_a_file_shows_the_defaults() {
    let out = pullthrough(&["config", "check"], &[]).await;
    assert!(out.status.success(), "{}", stderr(&out));
    let text = stdout(&out);
    assert!(text.contains("from the built-in defaults"), "{text}");
    assert!(
        text.contains("url = \"https://registry-1.docker.io\""),
        "{text}"
    );
}

#[tokio::test]
async fn config_check_fails_on_a_bad_file_with_the_reason() {
    let dir = tempfile::tempdir().unwrap();
    let cases = [
        (
            "[storage]\nmax_size = \"lots\"\n",
            "invalid size \"lots\": expected a number with an optional unit, e.g. 500MiB, 20GiB, 2TiB",
        ),
        ("[server]\nlisten_addr = \"x\"\n", "listen_addr"),
        (
            "[storage]\nlow_watermark = \"1GiB\"\n",
            "storage.low_watermark",
        ),
        (
            "[server]\nhtpasswd = \"/nonexistent/htpasswd\"\n",
            "cannot read server.htpasswd",
        ),
    ];
    for (i, (text, reason)) in cases.iter().enumerate() {
        let file = dir.path().join(format!("bad{i}.toml"));
        std::fs::write(&file, text).unwrap();
        let out = pullthrough(&["config", "check", "-c", file.to_str().unwrap()], &[]).await;
        assert_eq!(out.status.code(), Some(1), "{text}");
        assert!(stderr(&out).contains(reason), "{text}: {}", stderr(&out));
        assert_eq!(stdout(&out), "", "nothing printed for an invalid config");
    }
    let out = pullthrough(&["config", "check", "-c", "/nonexistent/mirror.toml"], &[]).await;
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).contains("cannot read config file"),
        "{}",
        stderr(&out)
    );
}

const TAG_RULES: &str = r#"[cache]
tag_ttl = "5m"

[upstreams."docker.io"]
[[upstreams."docker.io".tag_rules]]
match = "*:{latest,main}"
ttl = "1m"
[[upstreams."docker.io".tag_rules]]
match = 're:^[^:]+:v?[0-9]+\.[0-9]+\.[0-9]+$'
immutable = true

[upstreams."ghcr.io"]
url = "https://ghcr.io"
tag_ttl = "1h"
deny_repositories = ["org/secret"]
[[upstreams."ghcr.io".tag_rules]]
match = "ci/*:*"
always = true
[[upstreams."ghcr.io".tag_rules]]
match = "org/*:v*"
immutable = true
"#;

#[tokio::test]
async fn config_check_explain_names_the_tag_rule_a_reference_gets() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("mirror.toml");
    std::fs::write(&file, TAG_RULES).unwrap();
    let mut args = vec!["config", "check", "-c", file.to_str().unwrap()];
    for image in [
        "alpine:latest",
        "ghcr.io/org/app:v1.2.3",
        "ghcr.io/ci/tool:v1.2.3",
        "ghcr.io/org/app:edge",
        "alpine:3.20",
        "library/alpine:3.20.3",
        "ghcr.io/org/secret:v1",
    ] {
        args.extend(["--explain", image]);
    }
    let out = pullthrough(&args, &[]).await;
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(stderr(&out), "");
    let text = stdout(&out);
    for expected in [
        "docker.io/library/alpine:latest\n  upstream:  upstreams.\"docker.io\", repository library/alpine\n  \
         rule:      tag_rules #1 match = \"*:{latest,main}\"\n  freshness: ttl 1m (then revalidated with a HEAD)\n",
        "ghcr.io/org/app:v1.2.3\n  upstream:  upstreams.\"ghcr.io\", repository org/app\n  \
         rule:      tag_rules #2 match = \"org/*:v*\"\n  freshness: immutable (never revalidated once cached)\n",
        "ghcr.io/ci/tool:v1.2.3\n  upstream:  upstreams.\"ghcr.io\", repository ci/tool\n  \
         rule:      tag_rules #1 match = \"ci/*:*\"\n  freshness: always (a HEAD on every request)\n",
        "ghcr.io/org/app:edge\n  upstream:  upstreams.\"ghcr.io\", repository org/app\n  \
         rule:      none matches: the default tag_ttl (upstreams.\"ghcr.io\".tag_ttl)\n  freshness: ttl 1h",
        "docker.io/library/alpine:3.20\n  upstream:  upstreams.\"docker.io\", repository library/alpine\n  \
         rule:      none matches: the default tag_ttl (cache.tag_ttl)\n  freshness: ttl 5m",
        "docker.io/library/alpine:3.20.3\n  upstream:  upstreams.\"docker.io\", repository library/alpine\n  \
         rule:      tag_rules #2 match = 're:^[^:]+:v?[0-9]+\\.[0-9]+\\.[0-9]+$'\n  freshness: immutable",
        "ghcr.io/org/secret:v1\n  upstream:  upstreams.\"ghcr.io\", repository org/secret\n  \
         rule:      tag_rules #2 match = \"org/*:v*\"\n  freshness: immutable (never revalidated once cached)\n  \
         refused:   not mirrored",
    ] {
        assert!(text.contains(expected), "{expected}\nnot in\n{text}");
    }

    // A registry with no [upstreams] entry: the reason, exit 1.
    let out = pullthrough(
        &[
            "config",
            "check",
            "-c",
            file.to_str().unwrap(),
            "--explain",
            "quay.io/org/x:1",
        ],
        &[],
    )
    .await;
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).contains("quay.io/org/x:1: quay.io is not mirrored"),
        "{}",
        stderr(&out)
    );
}

#[tokio::test]
async fn config_check_names_a_bad_tag_rule() {
    let dir = tempfile::tempdir().unwrap();
    let cases = [
        (
            "match = \"*:v*\"\nttl = \"1m\"\nimmutable = true\n",
            "tag_rules #2 (match = \"*:v*\"): ttl and immutable are set: a rule has exactly one of ttl, immutable and always",
        ),
        (
            "match = \"*:v*\"\n",
            "tag_rules #2 (match = \"*:v*\"): no action: set one of ttl = \"…\", immutable = true or always = true",
        ),
        (
            "match = \"library/[:v*\"\nalways = true\n",
            "tag_rules #2 (match = \"library/[:v*\"): invalid glob \"library/[\"",
        ),
        (
            "match = \"re:^v([0-9]$\"\nalways = true\n",
            "tag_rules #2 (match = \"re:^v([0-9]$\"): invalid regular expression \"^v([0-9]$\"",
        ),
        (
            "match = \"latest\"\nalways = true\n",
            "tag_rules #2 (match = \"latest\"): expected REPOSITORY-GLOB:TAG-GLOB",
        ),
    ];
    for (i, (rule, reason)) in cases.iter().enumerate() {
        let text = format!(
            "[upstreams.\"docker.io\"]\n[[upstreams.\"docker.io\".tag_rules]]\n\
             match = \"*:latest\"\nttl = \"1m\"\n[[upstreams.\"docker.io\".tag_rules]]\n{rule}"
        );
        let file = dir.path().join(format!("bad{i}.toml"));
        std::fs::write(&file, &text).unwrap();
        let out = pullthrough(&["config", "check", "-c", file.to_str().unwrap()], &[]).await;
        assert_eq!(out.status.code(), Some(1), "{text}");
        assert!(stderr(&out).contains(reason), "{text}: {}", stderr(&out));
        assert_eq!(stdout(&out), "", "nothing printed for an invalid config");
    }
}

#[tokio::test]
async fn a_bad_size_flag_shows_the_accepted_forms() {
    let out = pullthrough(&["--max-size", "lots"], &[]).await;
    assert_eq!(out.status.code(), Some(2));
    assert!(
        stderr(&out).contains("invalid size \"lots\": expected a number with an optional unit"),
        "{}",
        stderr(&out)
    );
}

#[tokio::test]
async fn completions_and_man_page_print_to_stdout() {
    for shell in ["bash", "zsh", "fish"] {
        let out = pullthrough(&["completions", shell], &[]).await;
        assert!(out.status.success(), "{}", stderr(&out));
        assert!(stdout(&out).contains("storage-dir"), "{shell}");
    }
    let out = pullthrough(&["man"], &[]).await;
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stdout(&out).contains(".TH pullthrough 1"));
}

#[tokio::test]
async fn healthcheck_exits_zero_only_on_200() {
    let up = FakeUpstream::start().await;
    let m = TestMirror::start(&up).await;
    let url = format!("{}/healthz", m.url);
    let out = pullthrough(&["healthcheck", "--url", &url], &[]).await;
    assert!(out.status.success(), "{}", stderr(&out));
    let url = format!("{}/nothing-here", m.url);
    let out = pullthrough(&["healthcheck", "--url", &url], &[]).await;
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("answered 404"), "{}", stderr(&out));
}
