// No unwrap on anything a client or an upstream controls; tests (their own crates, and
// `#[cfg(test)]` modules by clippy.toml) may.
#![deny(clippy::unwrap_used)]

use std::process::ExitCode;

use clap::Parser;
use pullthrough::cli::{Cli, GlobalArgs};
use pullthrough::config::Config;

/// Parses the command line: an operator command runs in `admin`, no command runs the mirror.
fn main() -> ExitCode {
    let cli = Cli::parse();
    match &cli.command {
        Some(command) => pullthrough::admin::run(&cli.global, command),
        None => serve(&cli.global),
    }
}

fn serve(global: &GlobalArgs) -> ExitCode {
    let config = match global.load_config() {
        Ok(c) => c,
        Err(e) => {
            eprintln!("pullthrough: {e}");
            return ExitCode::from(2);
        }
    };
    // Spans still buffered are sent when this is dropped, after the runtime stopped.
    let (traces, _send_traces_on_exit) = match pullthrough::trace::layer(&config.tracing) {
        Ok(t) => t.unzip(),
        Err(e) => {
            eprintln!("pullthrough: {e}");
            return ExitCode::from(2);
        }
    };
    let _flush_logs_on_exit = match pullthrough::logging::init(config.log.format, traces) {
        Ok(guard) => guard,
        Err(e) => {
            eprintln!("pullthrough: cannot start the log writer: {e}");
            return ExitCode::FAILURE;
        }
    };
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("pullthrough: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    // The server runs as a task on a worker, not on this thread: connection tasks it spawns
    // then start on the same worker instead of waking another thread each time.
    match runtime.block_on(async { tokio::spawn(run(config)).await }) {
        Ok(Ok(())) => ExitCode::SUCCESS,
        Ok(Err(e)) => {
            tracing::error!("{e:#}");
            ExitCode::FAILURE
        }
        Err(e) => {
            tracing::error!("{e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(config: Config) -> anyhow::Result<()> {
    let listener = tokio::net::TcpListener::bind(config.server.listen)
        .await
        .map_err(|e| anyhow::anyhow!("cannot listen on {}: {e}", config.server.listen))?;
    pullthrough::serve(config, listener, shutdown_signal()).await
}

async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let Ok(mut term) = signal(SignalKind::terminate()) else {
        let _ = tokio::signal::ctrl_c().await;
        return;
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}
