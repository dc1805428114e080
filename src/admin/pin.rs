//! `pullthrough cache pin|unpin`: through a running mirror's admin API (`--mirror`, see
//! `handlers/pins.rs`), or on the storage directory when no mirror serves it.

use std::process::ExitCode;
use std::time::Duration;

use crate::cli::{GlobalArgs, PinArgs};
use crate::config::{PinConfig, Secret};
use crate::store::pins::{PinError, PinSummary};
use crate::store::{Limits, Mode, Store};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Change {
    Pin,
    Unpin,
}

/// Why the command did not change the pins: refused (exit status 1) or could not run (2).
enum Failure {
    Refused(String),
    Error(anyhow::Error),
}

impl<E: Into<anyhow::Error>> From<E> for Failure {
    fn from(e: E) -> Failure {
        Failure::Error(e.into())
    }
}

/// Runs the command: exit status 0 when the pins changed, 1 when refused (the pinned content
/// would exceed the bound, an image is not pinned), 2 when it could not run.
pub fn run(global: &GlobalArgs, args: &PinArgs, change: Change) -> ExitCode {
    let result = match &args.mirror {
        Some(url) => through_mirror(url, args, change),
        None => at_rest(global, args, change),
    };
    match result {
        Ok(summary) => {
            let verb = match change {
                Change::Pin => "pinned",
                Change::Unpin => "unpinned",
            };
            let names: Vec<String> = args.images.iter().map(ToString::to_string).collect();
            println!("{verb} {}", names.join(", "));
            println!("{}", line(&summary));
            ExitCode::SUCCESS
        }
        Err(Failure::Refused(why)) => {
            eprintln!("pullthrough: {why}");
            ExitCode::FAILURE
        }
        Err(Failure::Error(e)) => {
            eprintln!("pullthrough: {e:#}");
            ExitCode::from(2)
        }
    }
}

/// `3 pins (1 from the config): 12 files, 8.0 MiB cached, 1.0 MiB not cached yet`
pub fn line(s: &PinSummary) -> String {
    format!(
        "{} pins ({} from the config): {} files, {} cached, {} not cached yet",
        s.config.len() + s.runtime.len(),
        s.config.len(),
        s.files,
        bytesize::ByteSize(s.bytes),
        bytesize::ByteSize(s.pending_bytes.unwrap_or(0))
    )
}

fn at_rest(global: &GlobalArgs, args: &PinArgs, change: Change) -> Result<PinSummary, Failure> {
    let config = global.load_config()?;
    let dir = &config.storage.dir;
    // Served: its lock tells whether a mirror holds the directory (then --mirror is the way).
    let store = Store::open_pinned(
        dir,
        Limits::from_config(&config.storage),
        Mode::Serve,
        config.pins(),
    )
    .map_err(|e| match e.kind() {
        std::io::ErrorKind::ResourceBusy => anyhow::anyhow!(
            "cannot change the pins of {} directly: {e}; use `pullthrough cache pin --mirror URL`",
            dir.display()
        ),
        _ => anyhow::anyhow!("cannot open storage dir {}: {e}", dir.display()),
    })?;
    let store = std::sync::Arc::new(store);
    let runtime = tokio::runtime::Builder::new_current_thread().build()?;
    let done = runtime.block_on(async {
        match change {
            Change::Pin => {
                let add = args
                    .images
                    .iter()
                    .map(|i| PinConfig::image(i.clone(), args.platform.clone()))
                    .collect();
                store.pin(add).await
            }
            Change::Unpin => store.unpin(args.images.clone()).await,
        }
    });
    match done {
        Ok(summary) => Ok(summary),
        Err(e @ PinError::Io(_)) => Err(Failure::Error(e.into())),
        Err(e) => Err(Failure::Refused(e.to_string())),
    }
}

fn through_mirror(url: &url::Url, args: &PinArgs, change: Change) -> Result<PinSummary, Failure> {
    if !matches!(url.scheme(), "http" | "https") {
        return Err(anyhow::anyhow!("--mirror must be an http:// or https:// URL").into());
    }
    if !url.username().is_empty() || url.password().is_some() {
        return Err(anyhow::anyhow!(
            "--mirror: put no credentials in the URL; use PULLTHROUGH_MIRROR_TOKEN"
        )
        .into());
    }
    let client = reqwest::Client::builder()
        .connect_timeout(Duration::from_secs(10))
        // A pin reads the pinned manifests from the mirror's disk: quick, but not bounded.
        .timeout(Duration::from_secs(120))
        .build()?;
    let mut query: Vec<(&str, String)> = args
        .images
        .iter()
        .map(|i| ("image", i.to_string()))
        .collect();
    query.extend(args.platform.iter().map(|p| ("platform", p.to_string())));
    let endpoint = format!("{}/_pullthrough/pins", url.as_str().trim_end_matches('/'));
    let method = match change {
        Change::Pin => reqwest::Method::POST,
        Change::Unpin => reqwest::Method::DELETE,
    };
    let request = client.request(method, endpoint).query(&query);
    let request = with_token(request, args.mirror_token.as_ref());
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async {
        let response = request
            .send()
            .await
            .map_err(|e| anyhow::anyhow!("cannot reach the mirror: {}", e.without_url()))?;
        let status = response.status();
        if status.is_success() {
            return Ok(response
                .json::<PinSummary>()
                .await
                .map_err(|e| anyhow::anyhow!("the mirror's answer: {}", e.without_url()))?);
        }
        let body: serde_json::Value = response.json().await.unwrap_or_default();
        let message = body["errors"][0]["message"]
            .as_str()
            .unwrap_or("no error message")
            .to_owned();
        if status.is_client_error() && status.as_u16() != 401 && status.as_u16() != 403 {
            Err(Failure::Refused(message))
        } else {
            Err(anyhow::anyhow!("the mirror answered {}: {message}", status.as_u16()).into())
        }
    })
}

fn with_token(request: reqwest::RequestBuilder, token: Option<&Secret>) -> reqwest::RequestBuilder {
    match token {
        Some(t) => request.bearer_auth(t.expose()),
        None => request,
    }
}
