//! The `nbd-s3` command line: `serve`, `check-config`, and the ad-hoc
//! single-export flags kept from the original Python server. This file only decides *which*
//! configuration to run; `service::run` runs it.

use clap::{Args, Parser, Subcommand};
use nbd_s3::config::{summary_table, AdHoc, Config, ConfigError, Secret, DEFAULT_CONFIG_PATH};
use nbd_s3::control::client::{self, ClientError};
use nbd_s3::control::protocol::{Copied, Deleted, SnapshotEntry, SnapshotList, Status};
use nbd_s3::control::Request;
use std::io::{IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;

/// The example configuration the packages install; served when no file exists at all, so a
/// fresh checkout runs with `cargo run -- serve`.
const EMBEDDED_CONFIG: &str = include_str!("../etc/nbd-s3/exports.toml");
/// How the embedded default is named in messages.
const EMBEDDED_NAME: &str = "<embedded default etc/nbd-s3/exports.toml>";

/// Network block devices whose blocks live in S3-compatible object storage.
#[derive(Debug, Parser)]
#[command(name = "nbd-s3", version, about, propagate_version = true)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the daemon (exports from the configuration file, or one ad-hoc export from flags).
    Serve(Box<ServeArgs>),
    /// Parse and validate the configuration, print a summary of the exports.
    CheckConfig(CheckArgs),
    /// Show the running daemon's exports: state, clients, dirty bytes, lease holder.
    Status(ListArgs),
    /// Point-in-time snapshots of an export (served read-only as EXPORT@SNAP).
    #[command(subcommand)]
    Snapshot(SnapshotCommand),
    /// A clone copies what it still reads from its base (server-side), then needs it no more.
    Flatten(ExportArgs),
    /// Delete objects of an export that no snapshot or live block needs (left by a crash);
    /// prints how many.
    Gc(ExportArgs),
}

#[derive(Debug, Subcommand)]
enum SnapshotCommand {
    /// Take a snapshot: it holds every write replied to before the command started.
    Create(SnapshotArgs),
    /// List snapshots: export, snapshot, created, bytes only it holds, clones based on it.
    List(SnapshotListArgs),
    /// Delete a snapshot and free what nothing else needs.
    Delete(SnapshotArgs),
    /// Make the export read exactly as the snapshot did (refused while clients are attached).
    Rollback(SnapshotArgs),
}

#[derive(Debug, Args)]
struct SnapshotArgs {
    /// The export.
    export: String,
    /// The snapshot: 1-64 characters of A-Z a-z 0-9 . _ -
    #[arg(value_parser = snapshot_name)]
    snapshot: String,
    #[command(flatten)]
    target: ControlArgs,
    /// Print JSON instead of text.
    #[arg(long)]
    json: bool,
}

#[derive(Debug, Args)]
struct SnapshotListArgs {
    /// Only this export's snapshots.
    export: Option<String>,
    #[command(flatten)]
    list: ListArgs,
}

#[derive(Debug, Args)]
struct ExportArgs {
    /// The export.
    export: String,
    #[command(flatten)]
    target: ControlArgs,
    /// Print JSON instead of text.
    #[arg(long)]
    json: bool,
}

fn snapshot_name(name: &str) -> Result<String, String> {
    nbd_s3::store::check_snapshot_name(name).map(|()| name.to_owned())
}

/// How an admin command finds the running daemon.
#[derive(Debug, Args)]
struct ControlArgs {
    /// Configuration file naming the control socket [default: /etc/nbd-s3/exports.toml].
    #[arg(long, env = "NBD_S3_CONFIG", value_name = "PATH")]
    config: Option<PathBuf>,
    /// The daemon's control socket (instead of reading it from the configuration).
    #[arg(long, value_name = "SOCKET")]
    control: Option<PathBuf>,
}

/// An admin command that prints a table.
#[derive(Debug, Args)]
struct ListArgs {
    #[command(flatten)]
    target: ControlArgs,
    /// Print JSON instead of a table.
    #[arg(long)]
    json: bool,
}

#[derive(Debug, Args)]
struct CheckArgs {
    /// Configuration file [default: /etc/nbd-s3/exports.toml].
    #[arg(long, env = "NBD_S3_CONFIG", value_name = "PATH")]
    config: Option<PathBuf>,
}

#[derive(Debug, Args)]
struct ServeArgs {
    /// Configuration file [default: /etc/nbd-s3/exports.toml; the embedded example when that
    /// does not exist]. Ignored in ad-hoc mode (--export-name).
    #[arg(long, env = "NBD_S3_CONFIG", value_name = "PATH")]
    config: Option<PathBuf>,
    /// Log level or filter (error, warn, info, debug, trace; RUST_LOG syntax wins if set).
    #[arg(long, env = "NBD_LOG_LEVEL", value_name = "LEVEL")]
    log_level: Option<String>,
    /// Take listeners and client connections over from the daemon answering on the control
    /// socket ([server] control), which flushes, hands over and exits; clients see a pause,
    /// not a reset. Starts normally when no daemon answers there.
    #[arg(long)]
    takeover: bool,
    #[command(flatten)]
    adhoc: AdHocArgs,
}

/// Ad-hoc single-export mode: given `--export-name`, no configuration file is read.
#[derive(Debug, Args)]
#[command(next_help_heading = "Ad-hoc single export (no configuration file)")]
struct AdHocArgs {
    /// Serve one export with this name, built from the flags below.
    #[arg(long, env = "NBD_EXPORT_NAME", value_name = "NAME")]
    export_name: Option<String>,
    /// Address to listen on.
    #[arg(long, env = "NBD_HOST", default_value = "0.0.0.0")]
    host: String,
    /// TCP port to listen on.
    #[arg(long, env = "NBD_PORT", default_value_t = 10809)]
    port: u16,
    /// Export size (B, KiB..TiB, KB..TB).
    #[arg(long, env = "NBD_SIZE", default_value = "1GB")]
    size: String,
    /// S3 endpoint URL (omit for AWS; file:///dir for a local directory).
    #[arg(long, env = "NBD_S3_ENDPOINT", value_name = "URL")]
    s3_endpoint: Option<String>,
    /// S3 access key id.
    #[arg(
        long,
        env = "NBD_S3_ACCESS_KEY",
        value_name = "KEY",
        hide_env_values = true
    )]
    s3_access_key: Option<String>,
    /// S3 secret access key.
    #[arg(
        long,
        env = "NBD_S3_SECRET_KEY",
        value_name = "SECRET",
        hide_env_values = true
    )]
    s3_secret_key: Option<Secret>,
    /// Bucket holding the export's blocks (prefix `<export-name>/`).
    #[arg(long, env = "NBD_S3_BUCKET", default_value = "nbd-storage")]
    s3_bucket: String,
    /// S3 region.
    #[arg(long, env = "NBD_S3_REGION", value_name = "REGION")]
    s3_region: Option<String>,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::CheckConfig(args) => check_config(args),
        Command::Serve(args) => serve(*args),
        Command::Status(args) => admin(&args.target, &Request::Status, |value| {
            print_listing(args.json, value, |s: Status| client::status_table(&s))
        }),
        Command::Snapshot(command) => snapshot(command),
        Command::Flatten(args) => {
            let done = format!("flattened {}", args.export);
            let request = Request::Flatten {
                export: args.export,
            };
            admin(&args.target, &request, |value| {
                print_listing(args.json, value, |c: Copied| {
                    format!("{done}; {} blocks copied\n", c.copied_blocks)
                })
            })
        }
        Command::Gc(args) => {
            let request = Request::Gc {
                export: args.export,
            };
            admin(&args.target, &request, |value| {
                print_listing(args.json, value, |d: Deleted| {
                    format!("{}\n", d.deleted_objects)
                })
            })
        }
    }
}

fn snapshot(command: SnapshotCommand) -> ExitCode {
    match command {
        SnapshotCommand::Create(a) => {
            let request = Request::SnapshotCreate {
                export: a.export,
                snapshot: a.snapshot,
            };
            admin(&a.target, &request, |value| {
                print_listing(a.json, value, |s: SnapshotEntry| {
                    client::snapshot_table(&[s])
                })
            })
        }
        SnapshotCommand::List(a) => {
            let request = Request::SnapshotList { export: a.export };
            admin(&a.list.target, &request, |value| {
                print_listing(a.list.json, value, |l: SnapshotList| {
                    client::snapshot_table(&l.snapshots)
                })
            })
        }
        SnapshotCommand::Delete(a) => {
            let done = format!("deleted {}@{}", a.export, a.snapshot);
            let request = Request::SnapshotDelete {
                export: a.export.clone(),
                snapshot: a.snapshot.clone(),
            };
            deleting(&a, &request, done)
        }
        SnapshotCommand::Rollback(a) => {
            let done = format!("rolled {} back to {}", a.export, a.snapshot);
            let request = Request::SnapshotRollback {
                export: a.export.clone(),
                snapshot: a.snapshot.clone(),
            };
            deleting(&a, &request, done)
        }
    }
}

/// A snapshot command that deletes objects: prints `done` and how many were freed.
fn deleting(a: &SnapshotArgs, request: &Request, done: String) -> ExitCode {
    admin(&a.target, request, |value| {
        print_listing(a.json, value, |d: Deleted| {
            format!("{done}; {} objects freed\n", d.deleted_objects)
        })
    })
}

/// Runs one admin command against the daemon and prints its result with `show`.
fn admin(
    target: &ControlArgs,
    request: &Request,
    show: impl FnOnce(serde_json::Value) -> Result<(), ClientError>,
) -> ExitCode {
    let outcome = client::locate(target.control.clone(), target.config.clone())
        .and_then(|socket| client::call(&socket, request))
        .and_then(show);
    match outcome {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("nbd-s3: {e}");
            ExitCode::from(e.exit_code())
        }
    }
}

/// Prints a listing as JSON (`--json`, exactly what the daemon sent) or as `table`.
fn print_listing<T: serde::de::DeserializeOwned>(
    json: bool,
    value: serde_json::Value,
    table: impl FnOnce(T) -> String,
) -> Result<(), ClientError> {
    if json {
        println!("{value:#}");
        return Ok(());
    }
    print!("{}", table(client::decode(value)?));
    Ok(())
}

/// Prints every line of a configuration error to stderr.
fn report(err: &ConfigError) {
    let mut stderr = std::io::stderr().lock();
    for line in err.lines() {
        let _ = writeln!(stderr, "{line}");
    }
}

fn check_config(args: CheckArgs) -> ExitCode {
    let path = args
        .config
        .unwrap_or_else(|| PathBuf::from(DEFAULT_CONFIG_PATH));
    match Config::load(&path) {
        Ok(cfg) => {
            let table = summary_table(&cfg);
            // check-config writes to stderr; a redirected stdout gets the table
            // too so scripts can capture it.
            eprint!("{}: OK\n{table}", path.display());
            for warning in nbd_s3::config::file_warnings(&path, &cfg) {
                eprintln!("warning: {warning}");
            }
            if !std::io::stdout().is_terminal() {
                print!("{table}");
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            report(&e);
            ExitCode::FAILURE
        }
    }
}

fn serve(args: ServeArgs) -> ExitCode {
    for warning in nbd_s3::config::command_line_warnings(std::env::args_os()) {
        eprintln!("warning: {warning}");
    }
    if let Some(level) = &args.log_level {
        // Read by service::logging (RUST_LOG still wins); set before any thread exists.
        std::env::set_var("NBD_LOG_LEVEL", level);
    }
    let takeover = args.takeover;
    let (config, path) = match choose_config(args) {
        Ok(chosen) => chosen,
        Err(e) => {
            report(&e);
            return ExitCode::FAILURE;
        }
    };
    run_daemon(config, path, takeover)
}

/// Runs the daemon (service developer's `service::run`: logging, signals, sd-notify).
fn run_daemon(config: Config, path: Option<PathBuf>, takeover: bool) -> ExitCode {
    nbd_s3::service::run(config, path, takeover)
}

/// Ad-hoc flags, else the named file, else the default file, else the embedded example.
fn choose_config(args: ServeArgs) -> Result<(Config, Option<PathBuf>), ConfigError> {
    let a = args.adhoc;
    if let Some(export_name) = a.export_name {
        let adhoc = AdHoc {
            export_name,
            host: a.host,
            port: a.port,
            size: a.size,
            s3_endpoint: a.s3_endpoint,
            s3_access_key: a.s3_access_key,
            s3_secret_key: a.s3_secret_key,
            s3_bucket: a.s3_bucket,
            s3_region: a.s3_region,
        };
        return Ok((adhoc.into_config()?, None));
    }
    if let Some(path) = args.config {
        return Ok((Config::load(&path)?, Some(path)));
    }
    let default = PathBuf::from(DEFAULT_CONFIG_PATH);
    if default.exists() {
        return Ok((Config::load(&default)?, Some(default)));
    }
    let mut config = Config::parse(EMBEDDED_CONFIG, EMBEDDED_NAME, Path::new("/"))?;
    let store_note = usable_file_store(&mut config);
    nbd_s3::service::logging::init();
    tracing::warn!(
        "{DEFAULT_CONFIG_PATH} does not exist: serving the embedded example configuration{store_note} (write {DEFAULT_CONFIG_PATH} or pass --config to change it; edits are not watched)"
    );
    Ok((config, None))
}

/// The embedded example stores blocks in `/var/lib/nbd-s3`; a user who cannot write there (a
/// fresh checkout, not root) gets a directory under their home instead of a failing daemon.
fn usable_file_store(config: &mut Config) -> String {
    let Some(dir) = config
        .s3
        .endpoint
        .as_deref()
        .and_then(|e| e.strip_prefix("file://"))
    else {
        return String::new();
    };
    if std::fs::create_dir_all(dir).is_ok()
        && nix::unistd::access(dir, nix::unistd::AccessFlags::W_OK).is_ok()
    {
        return format!(" with blocks in {dir}");
    }
    let base = std::env::var_os("XDG_DATA_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".local/share")));
    let Some(fallback) = base.map(|b| b.join("nbd-s3")).filter(|f| f.is_absolute()) else {
        return String::new();
    };
    let note = format!(
        " with blocks in {} ({dir} is not writable)",
        fallback.display()
    );
    config.s3.endpoint = Some(format!("file://{}", fallback.display()));
    note
}
