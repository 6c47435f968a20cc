//! `simulator`: drives a realistic sensor fleet over MQTT, with faults, a progress
//! line and an exact manifest of what was sent. The generator is the library's
//! `fleet` module, the same one the gateway's simulated source uses.
// The doc comments of the CLI are its --help text (clap), not HTML: `<device>`
// there is a placeholder.
#![allow(rustdoc::invalid_html_tags)]

use std::process::ExitCode;

use clap::Parser;

mod auth;
mod cli;
mod run;
mod scenario;

use cli::Cli;

fn main() -> ExitCode {
    let cli = Cli::parse();
    let quiet = cli.quiet;
    let manifest = cli.manifest.clone();
    let s = match scenario::settings(cli) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("simulator: {e:#}");
            return ExitCode::from(2);
        }
    };
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("simulator: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match rt.block_on(run::run(s, quiet, manifest)) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::from(3),
        Err(e) => {
            eprintln!("simulator: {e:#}");
            ExitCode::FAILURE
        }
    }
}
