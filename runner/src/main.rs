//! `agentrun-runner`: not built yet. Until it is, runners use the unary RunnerService RPCs.

fn main() {
    eprintln!("agentrun-runner is not implemented yet; see README.md (Status)");
    std::process::exit(2);
}
