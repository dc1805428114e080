//! Test daemon: the real server on an ephemeral port over a temp dir, in front of the fake
//! upstream (or any registry), with a manual clock; and the `pullthrough` binary, started on
//! an ephemeral port it reports itself.
//!
//! Nothing here waits a fixed time: TTLs, the negative cache and back-offs are moved past with
//! [`TestMirror::advance`], and what happens in the background is waited for with
//! [`eventually`].

#![allow(dead_code)]

pub mod fleet;
pub mod tools;
pub mod upstream;

use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use pullthrough::config::{Config, Secret, DOCKER_HUB};
use pullthrough::{Clock, Server};
use tokio::io::AsyncBufReadExt;
use tokio::sync::oneshot;

pub use upstream::FakeUpstream;

/// How long [`eventually`] waits by default for something that takes milliseconds.
pub const SETTLE: Duration = Duration::from_secs(10);

/// A tag TTL, negative-cache TTL or back-off that real time never ends during a test: tests
/// end it with `m.advance(PAST_TTL)`.
pub const TTL: Duration = Duration::from_secs(60);
/// Past [`TTL`], with a second to spare for tag records kept in whole seconds on disk.
pub const PAST_TTL: Duration = Duration::from_secs(61);

pub struct TestMirror {
    pub url: String,
    pub addr: SocketAddr,
    pub dir: tempfile::TempDir,
    pub client: reqwest::Client,
    /// The clock the mirror decides TTLs, the negative cache and back-offs by; it runs with
    /// real time and jumps on [`TestMirror::advance`].
    pub clock: Clock,
    shutdown: Option<oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<anyhow::Result<()>>>,
}

/// A config for tests: `upstream_url` as docker.io, fast timeouts, no prefetch.
pub fn test_config(upstream_url: &str, dir: &std::path::Path) -> Config {
    let mut config = Config::default();
    config.storage.dir = dir.to_owned();
    // Off: these tests count the upstream requests each client request costs, which prefetch's
    // background downloads would race with. tests/prefetch.rs turns it on.
    config.cache.prefetch_concurrency = 0;
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
        Self::start_for(&upstream.url, dir, tweak).await
    }

    /// In front of any registry at `upstream_url` (a real one in e2e tests), as docker.io.
    pub async fn start_for(
        upstream_url: &str,
        dir: tempfile::TempDir,
        tweak: impl FnOnce(&mut Config),
    ) -> TestMirror {
        let mut config = test_config(upstream_url, dir.path());
        tweak(&mut config);
        Self::launch(config, dir, |server| server).await
    }

    /// Runs `config` (whose storage dir is normally in `dir`) with a manual clock and whatever
    /// else `server` sets, e.g. an already bound metrics listener.
    pub async fn launch(
        config: Config,
        dir: tempfile::TempDir,
        server: impl FnOnce(Server) -> Server,
    ) -> TestMirror {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        Self::launch_on(listener, Clock::manual(), config, dir, server).await
    }

    /// [`TestMirror::launch`] on a listener bound already (so that a config can name its
    /// address, as `cluster.advertise` does) and with `clock`, which several mirrors may share.
    pub async fn launch_on(
        listener: tokio::net::TcpListener,
        clock: Clock,
        config: Config,
        dir: tempfile::TempDir,
        server: impl FnOnce(Server) -> Server,
    ) -> TestMirror {
        config.validate().unwrap();
        let addr = listener.local_addr().unwrap();
        let (tx, rx) = oneshot::channel::<()>();
        let task = tokio::spawn(server(Server::new(config).clock(clock.clone())).serve(
            listener,
            async {
                let _ = rx.await;
            },
        ));
        TestMirror {
            url: format!("http://{addr}"),
            addr,
            dir,
            client: reqwest::Client::builder()
                .redirect(reqwest::redirect::Policy::none())
                .build()
                .unwrap(),
            clock,
            shutdown: Some(tx),
            task: Some(task),
        }
    }

    /// Moves the mirror's clock forward: tag TTLs, negative-cache entries and back-offs that
    /// end within `by` are over.
    pub fn advance(&self, by: Duration) {
        self.clock.advance(by);
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

    /// `/_pullthrough/status`, parsed.
    pub async fn status(&self) -> serde_json::Value {
        self.get("/_pullthrough/status")
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap()
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

/// The cluster secret of the replicas [`join_cluster`] configures.
pub const CLUSTER_SECRET: &str = "fleet-secret-0123456789";

/// Sets `[storage.shared]` and `[cluster]` in `config` for a replica reachable at
/// `advertise`; the endpoints are placeholders where a test injects its own services.
pub fn join_cluster(config: &mut Config, advertise: &str) {
    config.storage.shared = Some(
        toml::from_str(
            r#"
            endpoint = "http://127.0.0.1:9"
            bucket = "pullthrough"
            region = "garage"
            "#,
        )
        .unwrap(),
    );
    if let Some(shared) = &mut config.storage.shared {
        shared.access_key_id = Some(Secret::new("GK-test"));
        shared.secret_access_key = Some(Secret::new("test-secret"));
    }
    let mut cluster: pullthrough::config::ClusterConfig = toml::from_str(&format!(
        r#"
        redis = "redis://127.0.0.1:9/0"
        advertise = "{advertise}"
        lease_ttl = "1s"
        "#
    ))
    .unwrap();
    cluster.secret = Some(Secret::new(CLUSTER_SECRET));
    config.cluster = Some(cluster);
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

/// The value of one series in a Prometheus text exposition (`name` with its labels, exactly
/// as exposed).
pub fn metric(text: &str, name: &str) -> f64 {
    text.lines()
        .find(|l| l.starts_with(name) && l[name.len()..].starts_with(' '))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no metric {name} in\n{text}"))
}

/// The sum of every series of `family` whose labels include `label` (e.g. `kind="blob_get"`),
/// whatever its other labels; 0 when there is none.
pub fn metric_sum(text: &str, family: &str, label: &str) -> f64 {
    text.lines()
        .filter(|l| {
            l.strip_prefix(family)
                .is_some_and(|rest| rest.starts_with('{') && l.contains(label))
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// Polls `probe` until it finds something and returns that; panics with `what` if it finds
/// nothing within `within`.
pub async fn wait_for<T, F, Fut>(what: &str, within: Duration, mut probe: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + within;
    loop {
        if let Some(found) = probe().await {
            return found;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "not within {within:?}: {what}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Polls `condition` until it holds; panics with `what` if it does not within `within`.
pub async fn eventually<F, Fut>(what: &str, within: Duration, mut condition: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let probe = || {
        let holds = condition();
        async move { holds.await.then_some(()) }
    };
    wait_for(what, within, probe).await;
}

/// Waits until a blob download in the background has been committed (HEAD answers HIT).
pub async fn wait_committed(m: &TestMirror, path: &str) {
    eventually(&format!("{path} is committed"), SETTLE, || async {
        x_cache(&m.head(path).send().await.unwrap()) == "HIT"
    })
    .await;
}

/// The `pullthrough` binary, running on a port it chose itself.
pub struct Daemon {
    pub child: tokio::process::Child,
    /// Where it listens, as it logged it.
    pub addr: SocketAddr,
}

/// Starts the binary with `args` plus `--listen 127.0.0.1:0 --log-format json` (flags win over
/// a config file), and returns once it has logged the address it listens on: it is accepting
/// connections then. The rest of its log is read and dropped, so it never blocks on stderr.
pub async fn start_daemon<I, S>(args: I) -> Daemon
where
    I: IntoIterator<Item = S>,
    S: AsRef<std::ffi::OsStr>,
{
    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_pullthrough"))
        .args(args)
        .args(["--listen", "127.0.0.1:0", "--log-format", "json"])
        .env("PULLTHROUGH_LOG", "info")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut lines = tokio::io::BufReader::new(child.stderr.take().unwrap()).lines();
    let mut seen = Vec::new();
    let addr = tokio::time::timeout(SETTLE, async {
        while let Some(line) = lines.next_line().await.unwrap() {
            let addr = serde_json::from_str::<serde_json::Value>(&line)
                .ok()
                .filter(|v| v["fields"]["message"] == "pullthrough listening")
                .and_then(|v| v["fields"]["addr"].as_str()?.parse::<SocketAddr>().ok());
            if addr.is_some() {
                return addr;
            }
            seen.push(line);
        }
        None
    })
    .await
    .ok()
    .flatten()
    .unwrap_or_else(|| {
        panic!(
            "pullthrough did not log its listen address; its log:\n{}",
            seen.join("\n")
        )
    });
    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
    Daemon { child, addr }
}

/// Runs the binary with `args` and `env` to its end, without the caller's PULLTHROUGH_*
/// variables.
pub async fn run_binary(args: &[&str], env: &[(&str, &str)]) -> std::process::Output {
    let mut command = tokio::process::Command::new(env!("CARGO_BIN_EXE_pullthrough"));
    command.args(args);
    for (k, _) in std::env::vars() {
        if k.starts_with("PULLTHROUGH_") {
            command.env_remove(k);
        }
    }
    command.envs(env.iter().copied());
    // tokio's Command: a blocking wait would stall the fake upstream on this runtime.
    command.output().await.unwrap()
}

/// A tmpfs of `size` mounted for the test's lifetime (needs root; `None` otherwise).
pub struct Tmpfs(tempfile::TempDir);

impl Tmpfs {
    pub fn mount(size: &str) -> Option<Tmpfs> {
        let dir = tempfile::tempdir().unwrap();
        let ok = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir.path())
            .status()
            .is_ok_and(|s| s.success());
        ok.then_some(Tmpfs(dir))
    }

    pub fn path(&self) -> &std::path::Path {
        self.0.path()
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(self.0.path())
            .status();
    }
}
