use slim_identity_agent::cli;

#[tokio::main]
async fn main() {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(DEFAULT_LOG_FILTER)),
        )
        .with_writer(std::io::stderr)
        // Colour codes only on a terminal (a Pod's log is a file).
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let args: Vec<String> = std::env::args().skip(1).collect();
    let command = match cli::parse(&args) {
        Ok(command) => command,
        Err(message) => {
            if !message.is_empty() {
                eprintln!("{message}");
            }
            eprintln!("{}", cli::USAGE);
            std::process::exit(2);
        }
    };
    std::process::exit(cli::execute(command).await);
}

/// Our own messages at info, dependencies' at warn: `notify` reports every replaced version
/// directory's vanished watch ("unable to remove watch descriptor") at info, twice per rotation.
const DEFAULT_LOG_FILTER: &str = "warn,slim_identity_agent=info";
