//! `pullthrough cache purge` and `cache refresh`: through a running mirror's admin API
//! (`--mirror`, see `handlers/purge.rs`), or on the storage directory at rest, with a pull
//! layer of this process (refused while a mirror serves the directory, as `warm` is). Each
//! subject's result on stdout, a line or (`--json`) one JSON array.

use std::process::ExitCode;
use std::sync::Arc;

use super::warm::{Http, HttpError};
use crate::cli::{GlobalArgs, MirrorArgs, PurgeArgs, RefreshArgs};
use crate::clock::Clock;
use crate::metrics::Metrics;
use crate::mirror::purge::Subject;
use crate::mirror::{Housekeeping, Mirror};

/// Where the command runs: a mirror's admin API, or a pull layer of its own on the storage
/// directory.
enum Where {
    Remote(Http),
    AtRest {
        mirror: Arc<Mirror>,
        by: String,
        /// Flushes the purge's log lines when the command ends.
        _logs: crate::logging::FlushGuard,
    },
}

/// One subject's outcome: the JSON answer, or why there is none.
type Outcome = Result<serde_json::Value, String>;

impl Where {
    fn open(global: &GlobalArgs, args: &MirrorArgs, what: &str) -> anyhow::Result<Where> {
        if let Some(url) = &args.mirror {
            return Ok(Where::Remote(Http::new(url, args.mirror_token.clone())?));
        }
        let config = global.load_config()?;
        let dir = config.storage.dir.clone();
        // The purge's log line goes where a mirror's would.
        let logs = crate::logging::init(config.log.format, None)?;
        let mirror = Mirror::new(
            config,
            Arc::new(Metrics::new()),
            Clock::system(),
            crate::mirror::Services::default(),
        )
        .map_err(|e| e.context(format!("cannot {what} {} directly", dir.display())))?;
        let user = std::env::var("USER")
            .or_else(|_| std::env::var("LOGNAME"))
            .unwrap_or_else(|_| "unknown".to_owned());
        Ok(Where::AtRest {
            mirror: Arc::new(mirror),
            by: format!("local user {user:?} (pullthrough cache {what})"),
            _logs: logs,
        })
    }

    async fn ask(&self, path: &str, param: &str, value: &str) -> Outcome {
        let Where::Remote(http) = self else {
            return Err("not a remote mirror".into());
        };
        let request = http.post(path).query(&[(param, value)]);
        let response = http.send(request).await.map_err(|e| e.to_string())?;
        response
            .json()
            .await
            .map_err(|e| HttpError::from(e).to_string())
    }

    async fn purge(&self, subject: &Subject) -> Outcome {
        match self {
            Where::Remote(_) => {
                let (param, value) = match subject {
                    Subject::Digest(d) => ("digest", d.to_string()),
                    other => ("reference", other.to_string()),
                };
                self.ask("/_pullthrough/cache/purge", param, &value).await
            }
            Where::AtRest { mirror, by, .. } => {
                let purged = mirror.purge(subject, by).await.map_err(|e| e.to_string())?;
                serde_json::to_value(purged).map_err(|e| e.to_string())
            }
        }
    }

    async fn refresh(&self, subject: &Subject) -> Outcome {
        match self {
            Where::Remote(_) => {
                let value = subject.to_string();
                self.ask("/_pullthrough/cache/refresh", "reference", &value)
                    .await
            }
            Where::AtRest { mirror, by, .. } => {
                let Some((registry, repo, tag)) = subject.tags() else {
                    return Err("a digest never changes: nothing to refresh".into());
                };
                let refreshed = mirror
                    .refresh(registry, repo, tag, by)
                    .await
                    .map_err(|e| e.to_string())?;
                Ok(serde_json::json!({ "refreshed": refreshed }))
            }
        }
    }

    /// Saves the index of a storage directory purged at rest.
    async fn close(&self) {
        if let Where::AtRest { mirror, .. } = self {
            Housekeeping::of(mirror).save_index().await;
        }
    }
}

/// `pullthrough cache purge`: exit status 1 when a purge failed, 2 when none could start.
pub fn run_purge(global: &GlobalArgs, args: &PurgeArgs) -> ExitCode {
    let mut subjects = args.references.clone();
    subjects.extend(args.digest.iter().cloned().map(Subject::Digest));
    run(global, &args.mirror, Job::Purge, &subjects)
}

/// `pullthrough cache refresh`: exit status 1 when a tag could not be refreshed.
pub fn run_refresh(global: &GlobalArgs, args: &RefreshArgs) -> ExitCode {
    run(global, &args.mirror, Job::Refresh, &args.references)
}

#[derive(Clone, Copy)]
enum Job {
    Purge,
    Refresh,
}

impl Job {
    fn name(self) -> &'static str {
        match self {
            Job::Purge => "purge",
            Job::Refresh => "refresh",
        }
    }

    /// The outcome for `subject`, its line of text, and whether it succeeded.
    async fn step(self, place: &Where, subject: &Subject) -> (Outcome, String, bool) {
        match self {
            Job::Purge => {
                let outcome = place.purge(subject).await;
                let line = match &outcome {
                    Ok(v) => purge_line(v),
                    Err(e) => format!("not purged {subject}: {e}"),
                };
                let ok = outcome.is_ok();
                (outcome, line, ok)
            }
            Job::Refresh => {
                let outcome = place.refresh(subject).await;
                let (ok, line) = match &outcome {
                    Ok(v) => refresh_lines(v),
                    Err(e) => (false, format!("not refreshed {subject}: {e}")),
                };
                (outcome, line, ok)
            }
        }
    }
}

fn run(global: &GlobalArgs, args: &MirrorArgs, job: Job, subjects: &[Subject]) -> ExitCode {
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(r) => r,
        Err(e) => return super::finish(Err(e.into())),
    };
    let done = runtime.block_on(async {
        let place = Where::open(global, args, job.name())?;
        let mut all_ok = true;
        let mut results = Vec::new();
        for subject in subjects {
            let (outcome, line, ok) = job.step(&place, subject).await;
            all_ok &= ok;
            if !args.json {
                println!("{line}");
            }
            results.push(match outcome {
                Ok(v) => v,
                Err(e) => serde_json::json!({ "subject": subject.to_string(), "error": e }),
            });
        }
        place.close().await;
        anyhow::Ok((all_ok, results))
    });
    let (all_ok, results) = match done {
        Ok(done) => done,
        Err(e) => return super::finish(Err(e)),
    };
    if args.json {
        match serde_json::to_string_pretty(&results) {
            Ok(text) => println!("{text}"),
            Err(e) => return super::finish(Err(e.into())),
        }
    }
    if all_ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

fn count(v: &serde_json::Value, field: &str) -> usize {
    v[field].as_array().map_or(0, Vec::len)
}

/// `purged docker.io/library/alpine:3.20: 1 tag record, 0 manifests, …`, or that there was
/// nothing to purge.
fn purge_line(v: &serde_json::Value) -> String {
    let subject = v["subject"].as_str().unwrap_or("?");
    let fleet = match v["fleet"].as_bool() {
        Some(true) => "; the other replicas were told",
        Some(false) => "; the other replicas could not be told (the coordinator is down)",
        None => "",
    };
    if v["found"] == false {
        return format!("nothing to purge for {subject}{fleet}");
    }
    format!(
        "purged {subject}: {} tag records, {} manifests, {} blobs, {} links, {} shared-tier objects{fleet}",
        count(v, "tags"),
        count(v, "manifests"),
        count(v, "blobs"),
        count(v, "unlinked"),
        count(v, "shared"),
    )
}

/// One line per tag refreshed, and whether every one was.
fn refresh_lines(v: &serde_json::Value) -> (bool, String) {
    let empty = Vec::new();
    let tags = v["refreshed"].as_array().unwrap_or(&empty);
    if tags.is_empty() {
        return (true, "no tags held: nothing to refresh".to_owned());
    }
    let mut ok = true;
    let lines: Vec<String> = tags
        .iter()
        .map(|t| {
            let reference = t["reference"].as_str().unwrap_or("?");
            let digest = |field: &str| t[field].as_str().unwrap_or("-").to_owned();
            match (t["status"].as_str(), t["error"].as_str()) {
                (_, Some(e)) => {
                    ok = false;
                    format!("not refreshed {reference}: {e}")
                }
                (Some("STALE"), _) => {
                    ok = false;
                    format!(
                        "not refreshed {reference}: the upstream did not answer; still {}",
                        digest("before")
                    )
                }
                _ if t["before"].is_null() => {
                    format!("refreshed {reference}: fetched {}", digest("after"))
                }
                _ if t["changed"] == true => format!(
                    "refreshed {reference}: {} -> {}",
                    digest("before"),
                    digest("after")
                ),
                _ => format!("refreshed {reference}: unchanged, {}", digest("after")),
            }
        })
        .collect();
    (ok, lines.join("\n"))
}
