//! `gateway`: MQTT / simulated sensor readings -> validated, keyed JSON -> Kafka.
//! Thin: parse the command line, load the config, run.

use std::process::ExitCode;

use iot_gateway::cli::{ConfigArg, LogArg, ServiceCli};
use iot_gateway::config::GatewayConfig;

#[derive(clap::Args, Debug, Clone, Default)]
struct RunArgs {
    #[command(flatten)]
    config: ConfigArg,
    /// Feed N simulated devices in process instead of reading MQTT.
    #[arg(long, value_name = "N")]
    simulate: Option<usize>,
    #[command(flatten)]
    log: LogArg,
}

fn load(args: &ConfigArg, simulate: Option<usize>) -> Result<GatewayConfig, String> {
    let path = args.path("configs/gateway.toml");
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
    let cli = ServiceCli::<RunArgs>::parse_for(
        "gateway",
        "Edge gateway: sensor readings over MQTT (or simulated) -> validated, keyed JSON -> Kafka, at least once.",
        "configs/gateway.toml",
        "GATEWAY",
    );
    let args = match cli.run_args("gateway", |a| load(a, None).map(|c| c.to_masked_toml())) {
        Ok(args) => args,
        Err(code) => return code,
    };
    let cfg = load(&args.config, args.simulate);
    // SIGHUP loads the configuration again, the same way.
    let again = args.clone();
    let loader: iot_gateway::gateway::reload::Loader =
        std::sync::Arc::new(move || load(&again.config, again.simulate));
    let log = args.log;
    iot_gateway::cli::run_service(
        "gateway",
        cfg,
        |c| log.apply(&c.log),
        move |c, stop| iot_gateway::gateway::run_with_reload(c, stop, Some(loader)),
    )
}
