//! What the service binaries share: printing a checked config, and running a
//! service with logging, a runtime and signal-driven shutdown, with exit codes
//! 0 (clean), 1 (runtime error) and 2 (bad configuration).

use std::fmt::Display;
use std::future::Future;
use std::process::ExitCode;

use tokio_util::sync::CancellationToken;

use crate::config::LogConfig;

/// `check-config`: prints the effective config, or the error (exit 2).
pub fn check_config(name: &str, loaded: Result<String, String>) -> ExitCode {
    match loaded {
        Ok(toml) => {
            print!("{toml}");
            eprintln!("configuration OK");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("{name}: invalid configuration: {e}");
            ExitCode::from(2)
        }
    }
}

/// Runs `service(cfg, shutdown)` until it returns; SIGINT/SIGTERM cancel `shutdown`.
pub fn run_service<C, F, Fut, E>(
    name: &str,
    cfg: Result<C, String>,
    log: impl Fn(&C) -> LogConfig,
    service: F,
) -> ExitCode
where
    F: FnOnce(C, CancellationToken) -> Fut,
    Fut: Future<Output = Result<(), E>>,
    E: Display,
{
    let cfg = match cfg {
        Ok(c) => c,
        Err(e) => {
            eprintln!("{name}: invalid configuration: {e}");
            return ExitCode::from(2);
        }
    };
    let l = log(&cfg);
    crate::telemetry::init_tracing(l.format, &l.level);
    let rt = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("{name}: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    crate::guard::exit_on_panic(name);
    rt.block_on(async {
        let shutdown = crate::shutdown::on_signals();
        match service(cfg, shutdown).await {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                tracing::error!("{e}");
                eprintln!("{name}: {e}");
                ExitCode::FAILURE
            }
        }
    })
}
