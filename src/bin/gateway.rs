//! `gateway`: MQTT / simulated sensor readings -> validated, keyed JSON -> Kafka.
//! Thin: parse the command line, load the config, run.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use iot_gateway::config::{resolve_path, GatewayConfig, LogFormat};

const DEFAULT_CONFIG: &str = "configs/gateway.toml";

#[derive(Parser, Debug)]
#[command(
    name = "gateway",
    version = iot_gateway::VERSION,
    about = "Edge gateway: sensor readings over MQTT (or simulated) -> validated, keyed JSON -> Kafka, at least once."
)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    #[command(flatten)]
    run: RunArgs,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run the gateway (the default command).
    Run(RunArgs),
    /// Validate the configuration and print the effective values (secrets masked).
    CheckConfig(ConfigArg),
}

#[derive(clap::Args, Debug, Clone, Default)]
struct ConfigArg {
    /// Config file (TOML). Default: configs/gateway.toml when it exists, else
    /// built-in defaults. GATEWAY__SECTION__KEY variables override it.
    #[arg(long, short, value_name = "FILE")]
    config: Option<PathBuf>,
}

#[derive(clap::Args, Debug, Clone, Default)]
struct RunArgs {
    #[command(flatten)]
    config: ConfigArg,
    /// Feed N simulated devices in process instead of reading MQTT.
    #[arg(long, value_name = "N")]
    simulate: Option<usize>,
    /// Log as JSON lines instead of human-readable text.
    #[arg(long)]
    log_json: bool,
}

fn load(args: &ConfigArg, simulate: Option<usize>) -> Result<GatewayConfig, String> {
    let path = resolve_path(args.config.clone(), DEFAULT_CONFIG);
    let mut cfg = GatewayConfig::load(path.as_deref()).map_err(|e| e.to_string())?;
    if let Some(n) = simulate {
        cfg.simulate.devices = n;
        cfg.mqtt.enabled = false;
        cfg.validate(std::path::Path::new("--simulate"))
            .map_err(|e| e.to_string())?;
    }
    Ok(cfg)
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Some(Command::CheckConfig(args)) => {
            iot_gateway::cli::check_config("gateway", load(&args, None).map(|c| c.to_masked_toml()))
        }
        Some(Command::Run(args)) => run(args),
        None => run(cli.run),
    }
}

fn run(args: RunArgs) -> ExitCode {
    let cfg = load(&args.config, args.simulate);
    let log = |c: &GatewayConfig| {
        let mut l = c.log.clone();
        if args.log_json {
            l.format = LogFormat::Json;
        }
        l
    };
    // SIGHUP loads the configuration again, the same way.
    let again = args.clone();
    let loader: iot_gateway::gateway::reload::Loader =
        std::sync::Arc::new(move || load(&again.config, again.simulate));
    iot_gateway::cli::run_service("gateway", cfg, log, move |c, stop| {
        iot_gateway::gateway::run_with_reload(c, stop, Some(loader))
    })
}
