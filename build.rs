//! Embeds the git commit and the target triple for `--version`.

use std::path::Path;
use std::process::Command;

fn main() {
    let commit = Command::new("git")
        .args(["rev-parse", "--short=12", "HEAD"])
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .filter(|c| !c.is_empty())
        .unwrap_or_else(|| "unknown".into());
    println!("cargo:rustc-env=IOT_GIT_COMMIT={commit}");
    println!(
        "cargo:rustc-env=IOT_BUILD_TARGET={}",
        std::env::var("TARGET").unwrap_or_default()
    );
    // Again when HEAD moves (a commit, a checkout); a missing file would make
    // cargo rerun this on every build, so only existing ones are named.
    let mut watched = false;
    if let Ok(head) = std::fs::read_to_string(".git/HEAD") {
        for f in [".git/HEAD".to_string(), ".git/packed-refs".to_string()]
            .into_iter()
            .chain(
                head.strip_prefix("ref: ")
                    .map(|r| format!(".git/{}", r.trim())),
            )
        {
            if Path::new(&f).exists() {
                println!("cargo:rerun-if-changed={f}");
                watched = true;
            }
        }
    }
    if !watched {
        println!("cargo:rerun-if-changed=build.rs");
    }
}
