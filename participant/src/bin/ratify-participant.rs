//! `ratify-participant`: the ready-made sled key-value participant daemon.

fn main() -> std::process::ExitCode {
    ratify_participant::daemon::main()
}
