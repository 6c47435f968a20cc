//! `aggregator`: consumes `weather`, serves per-device and fleet aggregates as
//! Prometheus metrics and JSON. Thin: parse the command line, load the config, run.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use iot_gateway::config::{resolve_path, AggregatorConfig, LogFormat};

const DEFAULT_CONFIG: &str = "configs/aggregator.toml";

#[derive(Parser, Debug)]
#[command(
    name = "aggregator",
    version = iot_gateway::VERSION,
    about = "Consumer-group service: aggregates the readings in Kafka and serves them as Prometheus metrics and JSON."
)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    #[command(flatten)]
    run: RunArgs,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run the aggregator (the default command).
    Run(RunArgs),
    /// Validate the configuration and print the effective values (secrets masked).
    CheckConfig(ConfigArg),
}

#[derive(clap::Args, Debug, Clone, Default)]
struct ConfigArg {
    /// Config file (TOML). Default: configs/aggregator.toml when it exists, else
    /// built-in defaults. AGGREGATOR__SECTION__KEY variables override it.
    #[arg(long, short, value_name = "FILE")]
    config: Option<PathBuf>,
}

#[derive(clap::Args, Debug, Clone, Default)]
struct RunArgs {
    #[command(flatten)]
    config: ConfigArg,
    /// Log as JSON lines instead of human-readable text.
    #[arg(long)]
    log_json: bool,
}

fn load(args: &ConfigArg) -> Result<AggregatorConfig, String> {
    let path = resolve_path(args.config.clone(), DEFAULT_CONFIG);
    AggregatorConfig::load(path.as_deref()).map_err(|e| e.to_string())
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Some(Command::CheckConfig(args)) => {
            iot_gateway::cli::check_config("aggregator", load(&args).map(|c| c.to_masked_toml()))
        }
        Some(Command::Run(args)) => run(args),
        None => run(cli.run),
    }
}

fn run(args: RunArgs) -> ExitCode {
    let cfg = load(&args.config);
    let log = |c: &AggregatorConfig| {
        let mut l = c.log.clone();
        if args.log_json {
            l.format = LogFormat::Json;
        }
        l
    };
    iot_gateway::cli::run_service("aggregator", cfg, log, iot_gateway::aggregator::run)
}
