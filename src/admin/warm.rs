//! `pullthrough warm`: the image list (arguments, `--file`, or the config's `[warm]`), the
//! HTTP [`Source`] of a running mirror (`--mirror`), progress on stderr (a bar per image on a
//! terminal, a line per image otherwise) and the summary on stdout. The walk itself is
//! `crate::warm`.

use std::collections::HashMap;
use std::io::{IsTerminal, Write};
use std::path::Path;
use std::process::ExitCode;
use std::sync::Mutex;
use std::time::Duration;

use futures_util::StreamExt;
use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};

use crate::cli::{GlobalArgs, WarmArgs};
use crate::config::{Config, Secret};
use crate::image::ImageRef;
use crate::oci::{media, Digest, Reference};
use crate::sync::lock;
use crate::warm::{
    self, Blob, Budget, ImageReport, Local, Manifest, Observer, Source, SourceError,
};

/// Runs the command: exit status 0 when every image was warmed, 1 when one was not (or the
/// pull budget stopped the run), 2 when it could not start.
pub fn run(global: &GlobalArgs, args: &WarmArgs) -> ExitCode {
    match start(global, args) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("pullthrough: {e:#}");
            ExitCode::from(2)
        }
    }
}

fn start(global: &GlobalArgs, args: &WarmArgs) -> anyhow::Result<ExitCode> {
    let config = global.load_config()?;
    let images = image_list(args, &config)?;
    let platforms = if args.platform.is_empty() {
        config.warm.platforms.clone()
    } else {
        args.platform.clone()
    };
    let runtime = tokio::runtime::Runtime::new()?;
    let display = Display::for_stderr();
    let summary = match &args.mirror {
        Some(url) => {
            let source = Http::new(url, args.mirror_token.clone())?;
            runtime.block_on(warm::warm(&source, &images, &platforms, &display))
        }
        None => {
            let dir = config.storage.dir.clone();
            let local = Local::open(config)
                .map_err(|e| e.context(format!("cannot warm {} directly", dir.display())))?;
            runtime.block_on(async {
                let summary = warm::warm(&local, &images, &platforms, &display).await;
                local.close().await;
                summary
            })
        }
    };
    display.finish();
    if args.json {
        println!("{}", serde_json::to_string_pretty(&summary)?);
    } else {
        for image in &summary.images {
            if let Some(e) = &image.error {
                println!("not warmed {}: {e}", image.image);
            }
        }
        println!("{}", summary.line());
    }
    Ok(if summary.complete() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

/// The arguments and the `--file`'s lines, or else the config's `[warm]` images; each once.
fn image_list(args: &WarmArgs, config: &Config) -> anyhow::Result<Vec<ImageRef>> {
    let mut images = args.images.clone();
    if let Some(path) = &args.file {
        images.extend(read_list(path)?);
    }
    if images.is_empty() && args.file.is_none() {
        images = config.warm.images.clone();
    }
    if images.is_empty() {
        anyhow::bail!("no images to warm: name some, give --file, or set [warm] images");
    }
    let mut seen = std::collections::HashSet::new();
    images.retain(|i| seen.insert(i.clone()));
    Ok(images)
}

/// One image per line; blank lines and `#` comments are skipped. Every bad line is reported,
/// with its number.
fn read_list(path: &Path) -> anyhow::Result<Vec<ImageRef>> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| anyhow::anyhow!("cannot read {}: {e}", path.display()))?;
    let mut images = Vec::new();
    let mut errors = Vec::new();
    for (i, line) in text.lines().enumerate() {
        // An image reference never contains `#`.
        let line = line.split('#').next().unwrap_or_default().trim();
        if line.is_empty() {
            continue;
        }
        match line.parse::<ImageRef>() {
            Ok(image) => images.push(image),
            Err(e) => errors.push(format!("{} line {}: {e}", path.display(), i + 1)),
        }
    }
    if !errors.is_empty() {
        anyhow::bail!("{}", errors.join("\n"));
    }
    Ok(images)
}

/// Why a request to the mirror failed. URLs are left out: the mirror's address is known to
/// the operator, and reqwest's errors would print it with every query.
#[derive(Debug, thiserror::Error)]
pub(super) enum HttpError {
    #[error("cannot reach the mirror: {0}")]
    Request(reqwest::Error),
    #[error("the mirror answered {status}: {message}")]
    Status { status: u16, message: String },
    #[error("the mirror's answer does not match {expected} (it hashes to {actual})")]
    Digest { expected: Digest, actual: Digest },
    #[error("the body ended after {got} of {want} bytes")]
    Short { got: u64, want: u64 },
    #[error("the mirror's status is not what this version reads: {0}")]
    StatusJson(String),
}

impl From<reqwest::Error> for HttpError {
    fn from(e: reqwest::Error) -> HttpError {
        HttpError::Request(e.without_url())
    }
}

/// A running mirror's registry API, asked as containerd would (`?ns=<registry>`); and its
/// admin API, for `cache purge|refresh` (`admin/purge.rs`).
pub(super) struct Http {
    client: reqwest::Client,
    base: String,
    token: Option<Secret>,
}

impl Http {
    pub(super) fn new(url: &url::Url, token: Option<Secret>) -> anyhow::Result<Http> {
        if !matches!(url.scheme(), "http" | "https") {
            anyhow::bail!("--mirror must be an http:// or https:// URL");
        }
        if !url.username().is_empty() || url.password().is_some() {
            anyhow::bail!("--mirror: put no credentials in the URL; use PULLTHROUGH_MIRROR_TOKEN");
        }
        let client = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(10))
            // A blob the mirror is still downloading arrives as fast as its upstream sends.
            .read_timeout(Duration::from_secs(120))
            .build()?;
        Ok(Http {
            client,
            base: url.as_str().trim_end_matches('/').to_owned(),
            token,
        })
    }

    fn get(&self, path: &str) -> reqwest::RequestBuilder {
        self.authorized(self.client.get(format!("{}{path}", self.base)))
    }

    pub(super) fn post(&self, path: &str) -> reqwest::RequestBuilder {
        self.authorized(self.client.post(format!("{}{path}", self.base)))
    }

    fn authorized(&self, request: reqwest::RequestBuilder) -> reqwest::RequestBuilder {
        match &self.token {
            Some(t) => request.bearer_auth(t.expose()),
            None => request,
        }
    }

    /// A 2xx response, or the status and the OCI error's message as the error.
    pub(super) async fn send(
        &self,
        request: reqwest::RequestBuilder,
    ) -> Result<reqwest::Response, HttpError> {
        let response = request.send().await?;
        if response.status().is_success() {
            return Ok(response);
        }
        let status = response.status().as_u16();
        let body: serde_json::Value = response.json().await.unwrap_or_default();
        let message = body["errors"][0]["message"]
            .as_str()
            .or_else(|| body["errors"][0]["code"].as_str())
            .unwrap_or("no error message")
            .to_owned();
        Err(HttpError::Status { status, message })
    }
}

fn x_cache(response: &reqwest::Response) -> &str {
    response
        .headers()
        .get("x-cache")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
}

impl Source for Http {
    async fn budget(&self, registry: &str) -> Result<Option<Budget>, SourceError> {
        let response = self.send(self.get("/_pullthrough/status")).await?;
        let status: serde_json::Value = response.json().await.map_err(HttpError::from)?;
        let upstreams = status["upstreams"]
            .as_array()
            .ok_or_else(|| HttpError::StatusJson("no upstreams".into()))?;
        let budget = upstreams
            .iter()
            .find(|u| u["name"] == registry)
            .and_then(|u| {
                Some(Budget {
                    remaining: u["remaining"].as_u64()?,
                    reserve: u["budget_reserve"].as_u64()?,
                })
            });
        Ok(budget)
    }

    async fn manifest(
        &self,
        image: &ImageRef,
        reference: &Reference,
    ) -> Result<Manifest, SourceError> {
        let path = format!("/v2/{}/manifests/{reference}", image.repo());
        let request = self
            .get(&path)
            .query(&[("ns", image.registry())])
            .header(http::header::ACCEPT, media::ACCEPT_ALL);
        let response = self.send(request).await?;
        let cached = matches!(x_cache(&response), "HIT" | "REVALIDATED" | "STALE");
        let media_type = response
            .headers()
            .get(http::header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_owned();
        let bytes = response.bytes().await.map_err(HttpError::from)?;
        let digest = Digest::sha256_of(&bytes);
        if let Reference::Digest(expected) = reference {
            if *expected != digest {
                return Err(HttpError::Digest {
                    expected: expected.clone(),
                    actual: digest,
                }
                .into());
            }
        }
        Ok(Manifest {
            media_type,
            digest,
            bytes,
            cached,
        })
    }

    /// A GET; a cached blob's body is not read (the mirror had it, which is all a warm needs
    /// to know), anything else is read to its end, so the mirror's download completes.
    async fn blob(
        &self,
        image: &ImageRef,
        blob: &Blob,
        progress: &(dyn Fn(u64) + Sync),
    ) -> Result<bool, SourceError> {
        let path = format!("/v2/{}/blobs/{}", image.repo(), blob.digest);
        let request = self.get(&path).query(&[("ns", image.registry())]);
        let response = self.send(request).await?;
        if x_cache(&response) == "HIT" {
            progress(blob.size);
            return Ok(true);
        }
        let mut body = response.bytes_stream();
        let mut got = 0;
        while let Some(chunk) = body.next().await {
            let chunk = chunk.map_err(HttpError::from)?;
            got += chunk.len() as u64;
            progress(chunk.len() as u64);
        }
        if got != blob.size {
            return Err(HttpError::Short {
                got,
                want: blob.size,
            }
            .into());
        }
        Ok(false)
    }
}

/// Progress on stderr: a bar per image on a terminal, else a line per image.
enum Display {
    Bars {
        multi: MultiProgress,
        bars: Mutex<HashMap<usize, ProgressBar>>,
    },
    Lines(Mutex<Box<dyn Write + Send>>),
}

impl Display {
    fn for_stderr() -> Display {
        if std::io::stderr().is_terminal() {
            Display::Bars {
                multi: MultiProgress::with_draw_target(ProgressDrawTarget::stderr()),
                bars: Mutex::new(HashMap::new()),
            }
        } else {
            Display::Lines(Mutex::new(Box::new(std::io::stderr())))
        }
    }

    fn finish(&self) {
        if let Display::Bars { multi, .. } = self {
            let _ = multi.clear();
        }
    }
}

fn style() -> ProgressStyle {
    ProgressStyle::with_template(
        "{msg:40!} {bar:25.cyan/blue} {binary_bytes}/{binary_total_bytes} ({binary_bytes_per_sec})",
    )
    .unwrap_or_else(|_| ProgressStyle::default_bar())
    .progress_chars("=> ")
}

/// `docker.io/library/alpine:3.19: 3 blobs (2 cached), 3.4 MiB (1.1 MiB fetched)`
fn report_line(r: &ImageReport) -> String {
    match &r.error {
        Some(e) => format!("{}: not warmed: {e}", r.image),
        None => format!(
            "{}: {} blobs ({} cached), {} ({} fetched)",
            r.image,
            r.blobs,
            r.blobs_cached,
            bytesize::ByteSize(r.bytes),
            bytesize::ByteSize(r.bytes_fetched)
        ),
    }
}

impl Observer for Display {
    fn planned(&self, index: usize, image: &ImageRef, blobs: usize, bytes: u64) {
        match self {
            Display::Bars { multi, bars } => {
                let bar = multi.add(ProgressBar::new(bytes).with_style(style()));
                bar.set_message(image.to_string());
                lock(bars).insert(index, bar);
            }
            Display::Lines(out) => {
                let _ = writeln!(
                    lock(out),
                    "warming {image}: {blobs} blobs, {}",
                    bytesize::ByteSize(bytes)
                );
            }
        }
    }

    fn progress(&self, index: usize, bytes: u64) {
        if let Display::Bars { bars, .. } = self {
            if let Some(bar) = lock(bars).get(&index) {
                bar.inc(bytes);
            }
        }
    }

    fn finished(&self, index: usize, report: &ImageReport) {
        match self {
            Display::Bars { multi, bars } => {
                let bar = lock(bars).remove(&index);
                if let Some(bar) = bar {
                    bar.finish_and_clear();
                }
                let _ = multi.println(report_line(report));
            }
            Display::Lines(out) => {
                let _ = writeln!(lock(out), "{}", report_line(report));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_list_file_skips_comments_and_names_bad_lines() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("images.txt");
        std::fs::write(
            &path,
            "# base images\nalpine:3.19\n\nghcr.io/org/app:1.0 # app\n",
        )
        .unwrap();
        let images = read_list(&path).unwrap();
        assert_eq!(images.len(), 2);
        assert_eq!(images[1].to_string(), "ghcr.io/org/app:1.0");
        std::fs::write(&path, "alpine\nBusybox\nok:1\nbad@sha256:1\n").unwrap();
        let e = read_list(&path).unwrap_err().to_string();
        assert!(
            e.contains("images.txt line 2: invalid image reference \"Busybox\""),
            "{e}"
        );
        assert!(e.contains("line 4:"), "{e}");
        assert!(!e.contains("line 3"), "{e}");
    }
}
