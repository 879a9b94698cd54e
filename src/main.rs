//! The `edgehub` command line.

use std::{collections::HashMap, path::PathBuf, process::ExitCode};

use anyhow::Context;
use clap::{Parser, Subcommand};
use edgehub::{
    app::{device_key, Hub},
    config::{self, Settings},
    core::auth::module_keys,
    model::identity::{ConnectionString, ModuleId},
    ops::tls,
};
use tracing_log::LogTracer;

/// mimalloc instead of the system allocator: a message's way through the hub is many small,
/// short-lived allocations (decoded sections, queue entries, frames), where glibc's allocator
/// took about a sixth of the hub's CPU.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(
    name = "edgehub",
    version,
    about = "An IoT Edge hub for the Azure IoT SDKs"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the hub until SIGINT or SIGTERM.
    Run {
        #[arg(long, default_value = "config/edgehub.json")]
        config: PathBuf,
    },
    /// Print the two environment values a module needs to connect (stdout), then how clients
    /// connect over each transport and with certificates (stderr, `# ` lines).
    ModuleEnv {
        #[arg(long, default_value = "config/edgehub.json")]
        config: PathBuf,
        #[arg(long)]
        module: String,
    },
    /// Self-check: config, certificates, ports, dataDir, upstream; one line each with a fix.
    Check {
        #[arg(long, default_value = "config/edgehub.json")]
        config: PathBuf,
    },
    /// Exit 0 when the hub answers on its metrics listener (container health checks).
    Health {
        #[arg(long, default_value = "127.0.0.1:9600")]
        metrics: std::net::SocketAddr,
    },
    /// Validate a config file; prints every error with its JSON path.
    CheckConfig {
        #[arg(long, default_value = "config/edgehub.json")]
        config: PathBuf,
    },
}

fn load(path: &std::path::Path) -> Result<Settings, ExitCode> {
    let env: HashMap<String, String> = std::env::vars().collect();
    config::load(path, &env).map_err(|errs| {
        for e in &errs.0 {
            eprintln!("error: {e}");
        }
        ExitCode::from(2)
    })
}

fn init_logs(settings: &Settings) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(&settings.log_level));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()));
    // `log` records (rustls) reach tracing through `QuietSni`, not tracing-log's own bridge.
    let installed = if settings.log_format == "json" {
        tracing::subscriber::set_global_default(builder.json().finish())
    } else {
        tracing::subscriber::set_global_default(builder.finish())
    };
    if installed.is_ok() && log::set_boxed_logger(Box::new(QuietSni(LogTracer::new()))).is_ok() {
        log::set_max_level(log::LevelFilter::Trace);
    }
}

/// Forwards `log` records to tracing, with rustls's "Illegal SNI" warnings as debug: every SDK
/// (and Proton) sends the gateway's IP address as SNI, which rustls warns about on each
/// connection although it is normal client behaviour.
struct QuietSni(LogTracer);

impl QuietSni {
    fn is_sni_notice(record: &log::Record<'_>) -> bool {
        record.level() == log::Level::Warn
            && record.target().starts_with("rustls::")
            && record.args().to_string().starts_with("Illegal SNI")
    }
}

impl log::Log for QuietSni {
    fn enabled(&self, metadata: &log::Metadata<'_>) -> bool {
        self.0.enabled(metadata)
    }

    fn log(&self, record: &log::Record<'_>) {
        if Self::is_sni_notice(record) {
            let args = *record.args();
            let demoted = log::Record::builder()
                .level(log::Level::Debug)
                .target(record.target())
                .module_path(record.module_path())
                .file(record.file())
                .line(record.line())
                .args(args)
                .build();
            self.0.log(&demoted);
        } else {
            self.0.log(record);
        }
    }

    fn flush(&self) {
        self.0.flush();
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Check { config } => {
            let env: HashMap<String, String> = std::env::vars().collect();
            let results = edgehub::ops::check::run(&config, &env);
            for r in &results {
                println!("{r}");
            }
            if results
                .iter()
                .any(|r| r.verdict == edgehub::ops::check::Verdict::Error)
            {
                ExitCode::from(1)
            } else {
                ExitCode::SUCCESS
            }
        }
        Command::Health { metrics } => match edgehub::ops::check::health(metrics) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("unhealthy: {e}");
                ExitCode::FAILURE
            }
        },
        Command::CheckConfig { config } => match load(&config) {
            Err(code) => code,
            Ok(s) if !s.route_errors.is_empty() => {
                for e in &s.route_errors {
                    eprintln!("error: {e}");
                }
                ExitCode::from(2)
            }
            Ok(s) => {
                println!(
                    "config OK: {} modules, {} routes",
                    s.modules.len(),
                    s.routes.len()
                );
                ExitCode::SUCCESS
            }
        },
        Command::ModuleEnv { config, module } => {
            let settings = match load(&config) {
                Ok(s) => s,
                Err(code) => return code,
            };
            match module_env(&settings, &module) {
                Ok((lines, guide)) => {
                    println!("{lines}");
                    // On stderr: stdout stays the two `NAME=value` lines that scripts read.
                    for line in guide {
                        eprintln!("{line}");
                    }
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("error: {e:#}");
                    ExitCode::FAILURE
                }
            }
        }
        Command::Run { config } => {
            // Taken before the file is read: a change made while the hub starts is a change.
            let seen = config_file_state(&config);
            let settings = match load(&config) {
                Ok(s) => s,
                Err(code) => return code,
            };
            init_logs(&settings);
            let rt = match tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()
            {
                Ok(rt) => rt,
                Err(e) => {
                    eprintln!("error: starting the runtime: {e}");
                    return ExitCode::FAILURE;
                }
            };
            match rt.block_on(run(settings, config, seen)) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    tracing::error!("{e:#}");
                    ExitCode::FAILURE
                }
            }
        }
    }
}

/// The two environment values, and the guide to every way of connecting to this hub.
fn module_env(settings: &Settings, module: &str) -> anyhow::Result<(String, Vec<String>)> {
    let id = ModuleId::parse(module).with_context(|| format!("module id {module:?}"))?;
    if !settings.modules.contains_key(&id) && id.as_str() != "$edgeHub" {
        anyhow::bail!("module {module:?} is not in the config's `modules`");
    }
    let key = device_key(settings)?;
    let certs = tls::ensure_certs(settings)?;
    let keys = module_keys(settings, &key, &id);
    let cs = ConnectionString {
        host_name: settings.iothub_hostname.clone(),
        gateway_host_name: Some(settings.gateway_hostname.clone()),
        device_id: settings.device_id.to_string(),
        module_id: Some(id.to_string()),
        shared_access_key: Some(keys.primary.to_base64()),
        shared_access_key_name: None,
    };
    let env = format!(
        "EdgeHubConnectionString={cs}\nEdgeModuleCACertificateFile={}",
        certs.ca_cert.display()
    );
    Ok((env, edgehub::ops::connect::guide(settings, &certs.ca_cert)))
}

async fn run(settings: Settings, config: PathBuf, seen: FileState) -> anyhow::Result<()> {
    use tokio::signal::unix::{signal, SignalKind};
    // Signal handlers first: a SIGTERM or SIGHUP that comes as soon as the hub says it is ready
    // must find them (without one, either signal would kill the process).
    let term = signal(SignalKind::terminate())?;
    let interrupt = signal(SignalKind::interrupt())?;
    let hup = signal(SignalKind::hangup())
        .inspect_err(
            |e| tracing::warn!(error = %e, "SIGHUP cannot be watched; reload on file change only"),
        )
        .ok();
    raise_open_files_limit();
    let hub = Hub::start(settings).await?;
    let core = hub.core.clone();
    let stop = hub.shutdown_token();
    let watcher = tokio::spawn(watch_config(core, config, seen, hup, stop));
    wait_for_signal(term, interrupt).await;
    watcher.abort();
    tracing::info!("shutting down");
    hub.shutdown().await;
    tracing::info!("stopped");
    Ok(())
}

/// Raises the soft limit on open files to the hard limit: every connection and every store
/// file takes a descriptor, and distributions' default soft limit (often 1024) is far below
/// what `limits.maxConnections` allows.
fn raise_open_files_limit() {
    let was = rlimit::getrlimit(rlimit::Resource::NOFILE).map(|(soft, _)| soft);
    match rlimit::increase_nofile_limit(u64::MAX) {
        Ok(limit) => tracing::info!(limit, was = was.unwrap_or(limit), "open files limit"),
        Err(e) => tracing::warn!(error = %e, "open files limit could not be raised"),
    }
}

/// What tells a config file's versions apart. The modification time alone misses a file put in
/// place with the same time (`cp -p`, a second write within the file system's time
/// granularity): its size and inode tell those apart.
type FileState = Option<(Option<std::time::SystemTime>, u64, u64)>;

fn config_file_state(path: &PathBuf) -> FileState {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(path)
        .ok()
        .map(|m| (m.modified().ok(), m.len(), m.ino()))
}

/// Reloads routes and TTLs on SIGHUP and when the config file changes from `last` (its time,
/// size or inode, checked every 2 s).
async fn watch_config(
    core: std::sync::Arc<edgehub::core::HubCore>,
    path: PathBuf,
    mut last: FileState,
    mut hup: Option<tokio::signal::unix::Signal>,
    stop: tokio_util::sync::CancellationToken,
) {
    let mut tick = tokio::time::interval(std::time::Duration::from_secs(2));
    loop {
        let why = tokio::select! {
            _ = stop.cancelled() => return,
            Some(_) = async {
                match hup.as_mut() {
                    Some(h) => h.recv().await,
                    None => std::future::pending().await,
                }
            } => "SIGHUP",
            _ = tick.tick() => {
                let now = config_file_state(&path);
                if now == last { continue; }
                last = now;
                "file change"
            }
        };
        let env: HashMap<String, String> = std::env::vars().collect();
        match edgehub::app::reload(&core, &path, &env).await {
            Ok(n) => tracing::info!(trigger = why, routes = n, "config reloaded"),
            Err(errs) => {
                for e in &errs.0 {
                    tracing::error!(
                        trigger = why,
                        "config not reloaded, the running one stays: {e}"
                    );
                }
            }
        }
    }
}

async fn wait_for_signal(
    mut term: tokio::signal::unix::Signal,
    mut interrupt: tokio::signal::unix::Signal,
) {
    tokio::select! {
        _ = interrupt.recv() => {}
        _ = term.recv() => {}
    }
}
