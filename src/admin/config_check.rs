//! `pullthrough config check`: the configuration loaded exactly as the server loads it (file or
//! defaults, environment, flags, `validate`), plus the files the server reads at start-up (TLS
//! certificate and key, htpasswd), then printed as TOML with secrets redacted.

use std::io::Write;
use std::process::ExitCode;

use crate::cli::GlobalArgs;
use crate::config::Config;

/// Prints the effective config to `out` and returns 0, or the error on stderr and 1.
pub fn run(global: &GlobalArgs, out: &mut dyn Write) -> ExitCode {
    match check(global) {
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
