//! The `session-manager` binary: parses the command line and hands over to the library.

use std::process::ExitCode;

use clap::FromArgMatches;
use session_manager::config::{markdown_reference, Cli, CliCommand, ConfigReport, Settings};
use tokio_util::sync::CancellationToken;

fn main() -> ExitCode {
    // What the real environment sets, so that `config` can tell the `.env` file's values apart
    // (the file never overrides a variable that is already set).
    let before: std::collections::HashSet<std::ffi::OsString> =
        std::env::vars_os().map(|(name, _)| name).collect();
    if let Err(e) = dotenvy::dotenv() {
        if !e.not_found() {
            eprintln!("error: cannot read .env: {e}");
            return ExitCode::from(2);
        }
    }
    let from_dotenv: Vec<String> = std::env::vars_os()
        .map(|(name, _)| name)
        .filter(|name| !before.contains(name))
        .filter_map(|name| name.into_string().ok())
        .collect();
    let matches = Cli::raw_command().get_matches();
    let command = match CliCommand::from_arg_matches(&matches) {
        Ok(command) => command,
        Err(e) => e.exit(),
    };
    let command = match command {
        CliCommand::Config { markdown: true } => {
            print!("{}", markdown_reference());
            return ExitCode::SUCCESS;
        }
        CliCommand::Config { markdown: false } => {
            let report = ConfigReport::new(&matches).with_dotenv(&from_dotenv);
            print!("{report}");
            return if report.problems.is_empty() {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            };
        }
        other => other,
    };
    let settings = match Settings::from_matches(&matches) {
        Ok(settings) => settings,
        Err(errors) => {
            eprintln!(
                "error: invalid configuration ({} problem(s)):",
                errors.0.len()
            );
            for problem in &errors.0 {
                eprintln!("  {problem}");
            }
            eprintln!("Run `session-manager config` to see the effective configuration.");
            return ExitCode::from(2);
        }
    };
    session_manager::telemetry::init_tracing(settings.log_format);
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async move {
        match command {
            CliCommand::Migrate => session_manager::migrate(&settings).await,
            _ => {
                let addr = settings.listen_addr();
                let listener = tokio::net::TcpListener::bind(addr).await.map_err(|e| {
                    anyhow::anyhow!("cannot listen on {addr} (SM_LISTEN_ADDR): {e}")
                })?;
                let callback = match settings.http.callback_listen_addr {
                    Some(addr) => Some(tokio::net::TcpListener::bind(addr).await.map_err(|e| {
                        anyhow::anyhow!("cannot listen on {addr} (SM_CALLBACK_LISTEN_ADDR): {e}")
                    })?),
                    None => None,
                };
                let listeners = session_manager::Listeners {
                    main: listener,
                    callback,
                };
                let shutdown = CancellationToken::new();
                let signal = shutdown.clone();
                let signals = tokio::spawn(async move {
                    session_manager::shutdown_signal().await;
                    signal.cancel();
                });
                let result = session_manager::serve(settings, listeners, shutdown).await;
                signals.abort();
                result
            }
        }
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e:#}");
            ExitCode::FAILURE
        }
    }
}
