//! `aggregator`: consumes `weather`, serves per-device and fleet aggregates as
//! Prometheus metrics and JSON. Thin: parse the command line, load the config, run.

use std::process::ExitCode;

use iot_gateway::cli::{ConfigArg, LogArg, ServiceCli};
use iot_gateway::config::AggregatorConfig;

#[derive(clap::Args, Debug, Clone, Default)]
struct RunArgs {
    #[command(flatten)]
    config: ConfigArg,
    #[command(flatten)]
    log: LogArg,
}

fn load(args: &ConfigArg) -> Result<AggregatorConfig, String> {
    AggregatorConfig::load(args.path("configs/aggregator.toml").as_deref())
        .map_err(|e| e.to_string())
}

fn main() -> ExitCode {
    let cli = ServiceCli::<RunArgs>::parse_for(
        "aggregator",
        "Consumer-group service: aggregates the readings in Kafka and serves them as Prometheus metrics and JSON.",
        "configs/aggregator.toml",
        "AGGREGATOR",
    );
    let args = match cli.run_args("aggregator", |a| load(a).map(|c| c.to_masked_toml())) {
        Ok(args) => args,
        Err(code) => return code,
    };
    let log = args.log;
    iot_gateway::cli::run_service(
        "aggregator",
        load(&args.config),
        |c| log.apply(&c.log),
        iot_gateway::aggregator::run,
    )
}
