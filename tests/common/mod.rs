//! Test daemon: the real server on an ephemeral port over a temp dir, in front of the fake
//! upstream.

#![allow(dead_code)]

pub mod upstream;

use std::path::PathBuf;
use std::time::Duration;

use pullthrough::config::{Config, Secret, DOCKER_HUB};
use tokio::sync::oneshot;

pub use upstream::FakeUpstream;

pub struct TestMirror {
    pub url: String,
    pub dir: tempfile::TempDir,
    pub client: reqwest::Client,
    shutdown: Option<oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<anyhow::Result<()>>>,
}

/// A config for tests: the fake upstream as docker.io, fast timeouts.
pub fn test_config(upstream_url: &str, dir: &std::path::Path) -> Config {
    let mut config = Config::default();
    config.storage.dir = dir.to_owned();
    config.server.shutdown_grace = Duration::from_secs(5);
    let up = config.upstreams.get_mut(DOCKER_HUB).unwrap();
    up.url = upstream_url.to_owned();
    up.connect_timeout = Duration::from_secs(2);
    up.first_byte_timeout = Duration::from_secs(5);
    up.idle_timeout = Duration::from_secs(5);
    config
}

impl TestMirror {
    pub async fn start(upstream: &FakeUpstream) -> TestMirror {
        Self::start_with(upstream, |_| {}).await
    }

    pub async fn start_with(
        upstream: &FakeUpstream,
        tweak: impl FnOnce(&mut Config),
    ) -> TestMirror {
        let dir = tempfile::tempdir().unwrap();
        Self::start_in(upstream, dir, tweak).await
    }

    pub async fn start_in(
        upstream: &FakeUpstream,
        dir: tempfile::TempDir,
        tweak: impl FnOnce(&mut Config),
    ) -> TestMirror {
        let mut config = test_config(&upstream.url, dir.path());
        tweak(&mut config);
        config.validate().unwrap();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let (tx, rx) = oneshot::channel::<()>();
        let task = tokio::spawn(pullthrough::serve(config, listener, async {
            let _ = rx.await;
        }));
        TestMirror {
            url,
            dir,
            client: reqwest::Client::builder()
                .redirect(reqwest::redirect::Policy::none())
                .build()
                .unwrap(),
            shutdown: Some(tx),
            task: Some(task),
        }
    }

    /// Stops the server and returns its storage dir, for restart tests.
    pub async fn stop(mut self) -> tempfile::TempDir {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        if let Some(task) = self.task.take() {
            let _ = tokio::time::timeout(Duration::from_secs(10), task).await;
        }
        let dir = tempfile::tempdir().unwrap();
        std::mem::replace(&mut self.dir, dir)
    }

    pub fn storage(&self) -> PathBuf {
        self.dir.path().to_owned()
    }

    pub fn get(&self, path: &str) -> reqwest::RequestBuilder {
        self.client.get(format!("{}{path}", self.url))
    }

    pub fn head(&self, path: &str) -> reqwest::RequestBuilder {
        self.client.head(format!("{}{path}", self.url))
    }

    pub async fn metrics(&self) -> String {
        self.get("/metrics")
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap()
    }
}

impl Drop for TestMirror {
    fn drop(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
    }
}

pub fn secret(s: &str) -> Secret {
    Secret::new(s)
}

/// The first OCI error code of a response body.
pub async fn error_code(resp: reqwest::Response) -> String {
    let v: serde_json::Value = resp.json().await.unwrap();
    v["errors"][0]["code"].as_str().unwrap_or("").to_owned()
}

pub fn x_cache(resp: &reqwest::Response) -> String {
    resp.headers()
        .get("x-cache")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_owned()
}

/// Waits until a blob download in the background has been committed (HEAD answers HIT).
pub async fn wait_committed(m: &TestMirror, path: &str) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let r = m.head(path).send().await.unwrap();
        if x_cache(&r) == "HIT" {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{path} was not committed"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}
