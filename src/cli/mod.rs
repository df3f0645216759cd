//! The `dispatch` command line: `dispatch serve` runs the gateway; `create`, `get`,
//! `exec` and `delete` are its client, as Dispatch's `dispatch` CLI was (see client.rs).

mod client;
mod http;
mod manifest;
mod output;
mod source;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};

use crate::config::{Config, Overrides};
use crate::server::{Server, shutdown_signal};

#[derive(Parser)]
#[command(
    name = "dispatch",
    version,
    about = "Function invocation gateway, Dispatch and OpenFaaS compatible"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the gateway.
    Serve(ServeArgs),
    /// Create functions, secrets, images, APIs... one, or every document of a YAML file.
    Create(client::CreateArgs),
    /// List objects, or show one.
    Get(client::GetArgs),
    /// Run a function.
    Exec(client::ExecArgs),
    /// Delete an object, or every document of a YAML file.
    Delete(client::DeleteArgs),
    /// Send an async run that ended ERROR again, from the dead letters.
    Retry(client::RetryArgs),
    /// Emit an event: every function subscribed to its type gets an async run.
    Emit(client::EmitArgs),
}

#[derive(Args)]
struct ServeArgs {
    /// Configuration file (TOML), overlaid on the embedded defaults. (`DISPATCH_CONFIG` is
    /// the client verbs' config.json, as in Dispatch.)
    #[arg(long, env = "DISPATCH_SERVE_CONFIG")]
    config: Option<PathBuf>,
    /// Address of the control and exec API [default: 127.0.0.1:8080].
    #[arg(long)]
    listen: Option<String>,
    /// Directory of the store [default: ~/.dispatch/data].
    #[arg(long)]
    data_dir: Option<String>,
    /// Log format: text or json.
    #[arg(long)]
    log_format: Option<String>,
    /// Address of the API endpoints' HTTP listener, or "off" [default: 127.0.0.1:8081].
    #[arg(long, value_name = "ADDR")]
    api_http: Option<String>,
    /// Address of the API endpoints' HTTPS listener, or "off" [default: 127.0.0.1:8443].
    #[arg(long, value_name = "ADDR")]
    api_https: Option<String>,
}

pub fn main() -> ExitCode {
    match Cli::parse().command {
        Command::Serve(args) => serve(args),
        Command::Create(args) => client::create(args),
        Command::Get(args) => client::get(args),
        Command::Exec(args) => client::exec(args),
        Command::Delete(args) => client::delete(args),
        Command::Retry(args) => client::retry(args),
        Command::Emit(args) => client::emit(args),
    }
}

fn serve(args: ServeArgs) -> ExitCode {
    let flags = Overrides {
        listen: args.listen,
        data_dir: args.data_dir,
        log_format: args.log_format,
        api_http: args.api_http,
        api_https: args.api_https,
    };
    let config = match Config::load(args.config.as_deref(), &flags, std::env::vars()) {
        Ok(config) => config,
        Err(e) => {
            eprintln!("dispatch: {e}");
            return ExitCode::from(2);
        }
    };
    crate::telemetry::init(config.server.log_format);
    let workers = match config.server.workers {
        0 => std::thread::available_parallelism().map_or(1, |n| n.get()),
        n => n,
    };
    // On one core a single-threaded scheduler does the same work without the multi-thread
    // scheduler's cross-thread wake-ups and atomics.
    let mut runtime = if workers == 1 {
        tokio::runtime::Builder::new_current_thread()
    } else {
        let mut builder = tokio::runtime::Builder::new_multi_thread();
        builder.worker_threads(workers);
        builder
    };
    let runtime = match runtime.enable_all().build() {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("dispatch: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    runtime.block_on(async move {
        let server = match Server::start(config).await {
            Ok(server) => server,
            Err(e) => {
                eprintln!("dispatch: {e}");
                return ExitCode::FAILURE;
            }
        };
        // One line on stdout, for people and for scripts that start on port 0.
        println!(
            "dispatch: listening on {}://{} (store: {})",
            server.scheme(),
            server.local_addr(),
            server.store_name()
        );
        println!("dispatch: API endpoints: {}", server.api_summary());
        server.run(shutdown_signal()).await;
        ExitCode::SUCCESS
    })
}
