//! `ratify-coordinator`: the coordinator daemon.

fn main() -> std::process::ExitCode {
    ratify_coordinator::daemon::main()
}
