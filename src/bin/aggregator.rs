//! `aggregator`: not implemented yet (see README, "Status").
fn main() {
    eprintln!("aggregator: not implemented yet");
    std::process::exit(2);
}
