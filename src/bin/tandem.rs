//! `tandem`: one binary for every part (controller, agent, CRD generation).

use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use tracing_subscriber::EnvFilter;

#[derive(Parser)]
#[command(
    name = "tandem",
    version,
    about = "Consistency groups for Kubernetes volumes"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

// Parsed once at start; boxing the agent's flags would save nothing that matters.
#[allow(clippy::large_enum_variant)]
#[derive(Subcommand)]
enum Command {
    /// Run the controller (ConsistencyGroup and GroupSnapshot reconcilers).
    Controller(tandem::controller::ControllerArgs),
    /// Run the node agent (freezes, snapshots and thaws this node's volumes).
    Agent(tandem::agent::AgentArgs),
    /// The command line, as `kubectl tandem` runs it (the binary invoked as `kubectl-tandem` is it).
    Cli(tandem::cli::CliArgs),
    /// The controller's RBD group calls without an API server (a test guest without Kubernetes).
    #[command(subcommand)]
    Rbd(tandem::controller::rbd_oneshot::RbdCommand),
    /// Print the CustomResourceDefinitions as YAML, or write one file per kind into --out.
    Crds {
        /// Folder to write `<plural>.yaml` files into, instead of printing.
        #[arg(long)]
        out: Option<PathBuf>,
    },
}

#[tokio::main]
async fn main() -> ExitCode {
    // Invoked as `kubectl-tandem` (a symlink, a copy, Krew's install): the kubectl plugin.
    let plugin = std::env::args_os()
        .next()
        .map(PathBuf::from)
        .and_then(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()))
        .is_some_and(|name| name.starts_with("kubectl-tandem"));
    // A command line logs only warnings (kube's own), unless RUST_LOG says otherwise.
    let cli = plugin || std::env::args().nth(1).as_deref() == Some("cli");
    let default_filter = if cli { "warn" } else { "info" };
    tracing_subscriber::fmt()
        .with_env_filter(
            EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default_filter)),
        )
        .with_writer(std::io::stderr)
        // Colour only for a person at a terminal: container logs (kubectl logs) get plain text.
        .with_ansi(std::io::stderr().is_terminal())
        .init();
    if plugin {
        return ExitCode::from(tandem::cli::main_as_plugin().await);
    }
    let result: Result<(), Box<dyn std::error::Error + Send + Sync>> = match Cli::parse().command {
        Command::Controller(args) => match kube::Client::try_default().await {
            Ok(client) => tandem::controller::run(client, args)
                .await
                .map_err(Into::into),
            Err(e) => Err(format!("cannot reach the Kubernetes API: {e}").into()),
        },
        Command::Agent(args) => tandem::agent::run(args).await,
        Command::Cli(args) => return ExitCode::from(tandem::cli::run(args).await),
        Command::Rbd(command) => {
            tokio::task::spawn_blocking(move || tandem::controller::rbd_oneshot::run(&command))
                .await
                .map_err(Into::into)
                .and_then(|r| r.map_err(Into::into))
        }
        Command::Crds { out } => write_crds(out),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("tandem: {e}");
            ExitCode::FAILURE
        }
    }
}

fn write_crds(out: Option<PathBuf>) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    for crd in tandem::api::crds() {
        let yaml = tandem::api::crd_yaml(&crd)?;
        match &out {
            Some(dir) => std::fs::write(dir.join(tandem::api::crd_file_name(&crd)), yaml)?,
            None => print!("---\n{yaml}"),
        }
    }
    Ok(())
}
