//! The coordinator's command line, built inside this package so integration tests can start it
//! as a real process (`CARGO_BIN_EXE_coordinator-under-test`) and kill it.

fn main() -> std::process::ExitCode {
    tributary_coordinator::cli::main()
}
