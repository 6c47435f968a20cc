//! `gateway`: not implemented yet (see README, "Status").
fn main() {
    eprintln!("gateway: not implemented yet");
    std::process::exit(2);
}
