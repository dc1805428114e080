//! `pullthrough config check`: the configuration loaded exactly as the server loads it (file or
//! defaults, environment, flags, `validate`), plus the files the server reads at start-up (TLS
//! certificate and key, htpasswd), then printed as TOML with secrets redacted; with
//! `--explain REFERENCE`, which tag rule each reference gets instead.

use std::fmt::Write as _;
use std::io::Write;
use std::process::ExitCode;

use anyhow::Context;

use crate::cli::GlobalArgs;
use crate::config::Config;
use crate::image::ImageRef;
use crate::oci::Reference;
use crate::tag_rules::Freshness;

/// Prints the effective config (or the explanations of `explain`) to `out` and returns 0, or
/// the error on stderr and 1.
pub fn run(global: &GlobalArgs, explain: &[ImageRef], out: &mut dyn Write) -> ExitCode {
    let result = match explain {
        [] => check(global),
        refs => explain_refs(global, refs),
    };
    match result {
        Ok(text) => match out.write_all(text.as_bytes()) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("pullthrough: {e}");
                ExitCode::from(2)
            }
        },
        Err(e) => {
            eprintln!("pullthrough: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// The effective configuration as commented TOML, or why the server would refuse it.
pub fn check(global: &GlobalArgs) -> anyhow::Result<String> {
    let config = global.load_config()?;
    server_files(&config)?;
    let source = match &global.config {
        Some(path) => format!("{}", path.display()),
        None => "the built-in defaults".to_owned(),
    };
    let body = config
        .to_redacted_toml()
        .map_err(|e| anyhow::anyhow!("cannot print the config: {e}"))?;
    Ok(format!(
        "# pullthrough config check: valid.\n\
         # Effective configuration from {source}, then the environment and the command line.\n\
         # Secrets are shown as [REDACTED].\n\n{body}"
    ))
}

/// For each reference: its upstream, the tag rule that decides for it (the first that matches,
/// or none: the default TTL), and what its cached tag gets. The config is checked as by
/// [`check`] first.
pub fn explain_refs(global: &GlobalArgs, refs: &[ImageRef]) -> anyhow::Result<String> {
    let config = global.load_config()?;
    server_files(&config)?;
    let mut text = String::new();
    for image in refs {
        let (name, up) = config
            .upstreams
            .iter()
            .find(|(name, up)| {
                name.as_str() == image.registry()
                    || up.aliases.iter().any(|a| a == image.registry())
            })
            .with_context(|| {
                format!(
                    "{image}: {} is not mirrored (no [upstreams.\"{}\"] entry)",
                    image.registry(),
                    image.registry()
                )
            })?;
        let policy = up.policy(config.cache.tag_ttl);
        let (rule, freshness) = match image.reference() {
            Reference::Tag(tag) => match policy.tag_rules().explain(image.repo(), tag) {
                (Some(rule), freshness) => (rule.to_string(), freshness),
                (None, freshness) => {
                    let key = match up.tag_ttl {
                        Some(_) => format!("upstreams.\"{name}\".tag_ttl"),
                        None => "cache.tag_ttl".to_owned(),
                    };
                    (
                        format!("none matches: the default tag_ttl ({key})"),
                        freshness,
                    )
                }
            },
            Reference::Digest(_) => (
                "none: a digest names content that never changes".to_owned(),
                Freshness::Immutable,
            ),
        };
        // Infallible: writing to a String.
        let _ = writeln!(
            text,
            "{image}\n  upstream:  upstreams.\"{name}\", repository {}\n  rule:      {rule}\n  \
             freshness: {freshness}",
            image.repo()
        );
        if !policy.admits(image.repo()) {
            let _ = writeln!(
                text,
                "  refused:   not mirrored by this upstream's allow_repositories / \
                 deny_repositories (403 DENIED)"
            );
        }
    }
    Ok(text)
}

/// The files the server reads before it listens, read the same way.
fn server_files(config: &Config) -> anyhow::Result<()> {
    if let (Some(cert), Some(key)) = (&config.server.tls_cert, &config.server.tls_key) {
        crate::server::tls::Tls::load(cert, key).map_err(|e| {
            anyhow::anyhow!(
                "server.tls_cert {} / server.tls_key {}: {e:#}",
                cert.display(),
                key.display()
            )
        })?;
    }
    crate::server::admission::Access::from_config(&config.server)?;
    Ok(())
}
