use clap::Parser;
use slim_operator::api;
use slim_operator::app::{RunError, run};
use slim_operator::cli::{Cli, Command};

#[tokio::main]
async fn main() {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Crds => api::crds_yaml().map(|yaml| print!("{yaml}")).map_err(RunError::Crds),
        Command::Run(args) => run(*args).await,
    };
    if let Err(error) = result {
        eprintln!("slim-operator: {}", slim_k8s_common::error_chain(&error));
        std::process::exit(1);
    }
}
