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

/// The command line both services take: `run` (the default, its flags also
/// at the top level) or `check-config`. [`ServiceCli::parse_for`] names the
/// service in its help.
#[derive(clap::Parser, Debug)]
pub struct ServiceCli<R: clap::Args> {
    #[command(subcommand)]
    pub command: Option<ServiceCommand<R>>,
    #[command(flatten)]
    pub run: R,
}

#[derive(clap::Subcommand, Debug)]
pub enum ServiceCommand<R: clap::Args> {
    /// Run the service (the default command).
    Run(R),
    /// Validate the configuration and print the effective values (secrets masked).
    CheckConfig(ConfigArg),
}

/// `--config FILE`.
#[derive(clap::Args, Debug, Clone, Default)]
pub struct ConfigArg {
    /// Config file (TOML).
    #[arg(long, short, value_name = "FILE")]
    pub config: Option<std::path::PathBuf>,
}

impl ConfigArg {
    /// The file given, or `default` when it exists (else built-in defaults).
    pub fn path(&self, default: &str) -> Option<std::path::PathBuf> {
        crate::config::resolve_path(self.config.clone(), default)
    }
}

/// `--log-json`.
#[derive(clap::Args, Debug, Clone, Copy, Default)]
pub struct LogArg {
    /// Log as JSON lines instead of human-readable text.
    #[arg(long)]
    pub log_json: bool,
}

impl LogArg {
    /// `log` with the flag applied.
    pub fn apply(self, log: &LogConfig) -> LogConfig {
        let mut l = log.clone();
        if self.log_json {
            l.format = crate::config::LogFormat::Json;
        }
        l
    }
}

impl<R: clap::Args> ServiceCli<R> {
    /// The arguments to run with, or, for `check-config`, the exit code of
    /// printing what `check` loaded (see [`check_config`]).
    pub fn run_args(
        self,
        name: &str,
        check: impl FnOnce(&ConfigArg) -> Result<String, String>,
    ) -> Result<R, ExitCode> {
        match self.command {
            Some(ServiceCommand::CheckConfig(args)) => Err(check_config(name, check(&args))),
            Some(ServiceCommand::Run(args)) => Ok(args),
            None => Ok(self.run),
        }
    }
}

impl<R: clap::Args + clap::FromArgMatches> ServiceCli<R> {
    /// Parses the command line of the service `name` (its config file by
    /// default `default_config`, its environment prefix `env_prefix`).
    pub fn parse_for(
        name: &'static str,
        about: &'static str,
        default_config: &'static str,
        env_prefix: &'static str,
    ) -> Self {
        use clap::CommandFactory;
        let help = format!(
            "Config file (TOML). Default: {default_config} when it exists, else built-in defaults. {env_prefix}__SECTION__KEY variables override it."
        );
        let config = |a: clap::Arg| a.help(help.clone());
        let cmd = Self::command()
            .name(name)
            .bin_name(name)
            .about(about)
            .version(crate::VERSION)
            .mut_arg("config", config)
            .mut_subcommand("run", |s| {
                s.about(format!("Run the {name} (the default command)"))
                    .mut_arg("config", config)
            })
            .mut_subcommand("check-config", |s| s.mut_arg("config", config));
        let m = cmd.get_matches();
        <Self as clap::FromArgMatches>::from_arg_matches(&m).unwrap_or_else(|e| e.exit())
    }
}
