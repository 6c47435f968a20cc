//! `simulator`: not implemented yet (see README, "Status").
fn main() {
    eprintln!("simulator: not implemented yet");
    std::process::exit(2);
}
