//! `wsplice`: parse arguments, load the config, call the library.
#![forbid(unsafe_code)]

mod demo;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};
use wsplice::config::{self, Config, ConfigErrors, DataplaneMode, QuickForm};

/// sysexits.h EX_USAGE / EX_CONFIG-style code for a bad config or bad flags.
const EXIT_CONFIG: u8 = 64;

#[derive(Parser)]
#[command(
    name = "wsplice",
    version,
    about = "WebSocket load balancer whose established streams are carried by the kernel"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Serve a config file, or one cluster given by flags (the quick form).
    Run(RunArgs),
    /// Validate a config file: exit 0, or print `file:line: message` lines and exit 64.
    Check {
        #[arg(short, long)]
        config: PathBuf,
    },
    /// Three built-in echo backends, the balancer, and a web page showing who answered.
    Demo(demo::DemoArgs),
}

#[derive(Args)]
struct RunArgs {
    /// TOML config file.
    #[arg(short, long, conflicts_with_all = ["listen", "member", "lbmethod", "tls_cert", "tls_key"])]
    config: Option<PathBuf>,
    /// Quick form: address to listen on, e.g. 0.0.0.0:8080.
    #[arg(long, requires = "member")]
    listen: Option<String>,
    /// Quick form: a member ws://HOST:PORT (repeat for more).
    #[arg(long)]
    member: Vec<String>,
    /// Quick form: byrequests (default), bytraffic, least-conn or hash (of the client address).
    #[arg(long)]
    lbmethod: Option<String>,
    /// Quick form: serve wss:// with this PEM certificate chain (with --tls-key).
    #[arg(long, requires = "tls_key")]
    tls_cert: Option<String>,
    /// Quick form: the certificate's PEM private key.
    #[arg(long, requires = "tls_cert")]
    tls_key: Option<String>,
    /// Worker threads (default: one per core).
    #[arg(long)]
    workers: Option<usize>,
    /// auto (default), sockmap, splice or userspace.
    #[arg(long)]
    dataplane: Option<String>,
    /// Hand TLS listeners' connections to kernel TLS where the kernel has it (as
    /// `kernel_tls = true` in [server]).
    #[arg(long)]
    kernel_tls: bool,
}

fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_target(false)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
}

fn config_failure(errors: &ConfigErrors) -> ExitCode {
    eprintln!("{errors}");
    ExitCode::from(EXIT_CONFIG)
}

/// Applies the flags that override a file's [server] settings.
fn apply_overrides(config: &mut Config, args: &RunArgs) -> Result<(), String> {
    if let Some(workers) = args.workers {
        if !(1..=1024).contains(&workers) {
            return Err("command line: --workers must be between 1 and 1024".into());
        }
        config.server.workers = workers;
    }
    if args.kernel_tls {
        config.server.kernel_tls = true;
    }
    if let Some(mode) = &args.dataplane {
        config.server.dataplane = DataplaneMode::parse(mode)
            .map_err(|message| format!("command line: --dataplane: {message}"))?;
    }
    Ok(())
}

fn run(args: RunArgs) -> ExitCode {
    let loaded = match (&args.config, &args.listen) {
        (Some(path), _) => config::load_file(path),
        (None, Some(listen)) => config::quick(&QuickForm {
            listen: listen.clone(),
            members: args.member.clone(),
            lbmethod: args.lbmethod.clone(),
            tls_cert: args.tls_cert.clone(),
            tls_key: args.tls_key.clone(),
        }),
        (None, None) => {
            eprintln!(
                "command line: give -c FILE, or --listen ADDR --member URL [--member URL ...] [--tls-cert FILE --tls-key FILE]"
            );
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    let mut config = match loaded {
        Ok(config) => config,
        Err(errors) => return config_failure(&errors),
    };
    if let Err(message) = apply_overrides(&mut config, &args) {
        eprintln!("{message}");
        return ExitCode::from(EXIT_CONFIG);
    }
    init_logging();
    match wsplice::server::start(config) {
        Ok(server) => {
            server.wait();
            ExitCode::SUCCESS
        }
        Err(error) => {
            tracing::error!("{error}");
            ExitCode::FAILURE
        }
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Run(args) => run(args),
        Command::Check { config: path } => match config::load_file(&path) {
            Ok(config) => {
                println!(
                    "{}: ok ({} listeners, {} routes, {} clusters)",
                    path.display(),
                    config.listeners.len(),
                    config.routes.len(),
                    config.clusters.len()
                );
                ExitCode::SUCCESS
            }
            Err(errors) => config_failure(&errors),
        },
        Command::Demo(args) => {
            init_logging();
            demo::run(args)
        }
    }
}
