use std::process::ExitCode;

use clap::Parser;
use pullthrough::cli::{CacheCommand, Cli, Command};
use pullthrough::config::Config;

fn main() -> ExitCode {
    let cli = Cli::parse();
    let config = match Config::load(
        cli.config.as_deref(),
        |k| std::env::var(k).ok(),
        &cli.overrides(),
    ) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("pullthrough: {e}");
            return ExitCode::from(2);
        }
    };
    if let Some(command) = &cli.command {
        return admin(command, &config.storage.dir);
    }
    let _flush_logs_on_exit = match pullthrough::logging::init(config.log.format) {
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

fn admin(command: &Command, dir: &std::path::Path) -> ExitCode {
    let result = match command {
        Command::Cache(CacheCommand::Stats) => pullthrough::admin::stats(dir).map(|r| (r, true)),
        Command::Cache(CacheCommand::Prune { to }) => {
            pullthrough::admin::prune(dir, to.as_u64()).map(|r| (r, true))
        }
        Command::Verify { repair } => pullthrough::admin::verify(dir, *repair),
    };
    match result {
        Ok((report, ok)) => {
            print!("{report}");
            if ok {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            }
        }
        Err(e) => {
            eprintln!("pullthrough: {e:#}");
            ExitCode::from(2)
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
