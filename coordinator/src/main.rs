//! The `tributary-coordinator` binary; see [`tributary_coordinator::cli`].

fn main() -> std::process::ExitCode {
    tributary_coordinator::cli::main()
}
