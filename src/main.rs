//! The `keygate` command: parse arguments, load config, run. Everything else
//! lives in the library.

use std::io::Read;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

mod allocator;

#[derive(Parser)]
#[command(
    name = "keygate",
    version,
    about = "API-key authentication gateway for HTTP APIs"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the gateway.
    Serve {
        /// Config file.
        #[arg(long, default_value = "config/keygate.yaml")]
        config: PathBuf,
    },
    /// Zero-setup demo: embedded store in ./data, a built-in echo upstream,
    /// gateway on :8080, admin on 127.0.0.1:8081.
    Quickstart {
        /// Directory for the demo's embedded store.
        #[arg(long, default_value = "data")]
        data_dir: PathBuf,
    },
    /// Validate a config file: exit 0, or print file:line:column and exit 2.
    CheckConfig {
        #[arg(long, default_value = "config/keygate.yaml")]
        config: PathBuf,
    },
    /// Read a token on stdin and print its SHA-256 hex (for admin.tokens[].sha256).
    HashToken,
    /// Ask a running keygate's admin listener whether it is healthy: exit 0 on
    /// a 2xx answer, 1 otherwise (for container health checks).
    Healthcheck {
        /// What to ask; `.../readyz` checks readiness instead of liveness.
        #[arg(long, default_value = keygate::cli::healthcheck::DEFAULT_URL)]
        url: String,
    },
    /// Manage API keys through the admin API.
    Keys(Box<keygate::cli::KeysCommand>),
}

/// Exit codes of DESIGN.md section 1.
const EXIT_RUNTIME: u8 = 1;
const EXIT_USAGE: u8 = 2;

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::CheckConfig { config } => match keygate::config::load(&config) {
            Ok(cfg) => {
                println!("{}: ok ({} routes)", config.display(), cfg.routes.len());
                ExitCode::SUCCESS
            }
            Err(e) => fail(EXIT_USAGE, &e.to_string()),
        },
        Command::HashToken => hash_token(),
        Command::Healthcheck { url } => match keygate::cli::healthcheck::check(&url) {
            Ok(_) => ExitCode::SUCCESS,
            Err(e) => fail(EXIT_RUNTIME, &e),
        },
        Command::Serve { config } => {
            let cfg = match keygate::config::load(&config) {
                Ok(c) => c,
                Err(e) => return fail(EXIT_USAGE, &e.to_string()),
            };
            let _logs = keygate::telemetry::init(&cfg.logging);
            run(keygate::server::serve(config, cfg))
        }
        Command::Quickstart { data_dir } => {
            let _logs = keygate::telemetry::init(&Default::default());
            run(keygate::quickstart::run(data_dir))
        }
        Command::Keys(cmd) => keys(*cmd),
    }
}

/// `keygate keys ...`: one admin API client call on a current-thread runtime.
fn keys(cmd: keygate::cli::KeysCommand) -> ExitCode {
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            return fail(
                EXIT_RUNTIME,
                &format!("cannot start the async runtime: {e}"),
            );
        }
    };
    match runtime.block_on(keygate::cli::run(cmd)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => fail(e.exit_code(), &e.to_string()),
    }
}

fn run<E: std::fmt::Display>(fut: impl std::future::Future<Output = Result<(), E>>) -> ExitCode {
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            return fail(
                EXIT_RUNTIME,
                &format!("cannot start the async runtime: {e}"),
            );
        }
    };
    match runtime.block_on(fut) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => fail(EXIT_RUNTIME, &e.to_string()),
    }
}

fn hash_token() -> ExitCode {
    let mut input = String::new();
    if let Err(e) = std::io::stdin().read_to_string(&mut input) {
        return fail(EXIT_RUNTIME, &format!("cannot read stdin: {e}"));
    }
    let token = input.strip_suffix('\n').unwrap_or(&input);
    let token = token.strip_suffix('\r').unwrap_or(token);
    if token.is_empty() {
        return fail(
            EXIT_USAGE,
            "no token on stdin: pipe the token in, e.g. `printf %s \"$TOKEN\" | keygate hash-token`",
        );
    }
    println!("{}", keygate::keys::TokenHash::of(token).to_hex());
    ExitCode::SUCCESS
}

fn fail(code: u8, message: &str) -> ExitCode {
    eprintln!("keygate: {message}");
    ExitCode::from(code)
}
