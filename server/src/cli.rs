//! The `keel` command line.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[derive(Parser, Debug)]
#[command(
    name = "keel",
    version,
    about = "Keel: a durable log on io_uring that speaks Kafka"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run the broker: Kafka clients connect to 127.0.0.1:9092 by default, data goes to
    /// ./keel-data. Stops cleanly on SIGTERM or SIGINT.
    Serve {
        /// A Kafka-style properties file (`key=value` lines), applied before the flags below.
        #[arg(long)]
        config: Option<PathBuf>,
        /// The data directory (`log.dirs`).
        #[arg(long)]
        data_dir: Option<PathBuf>,
        /// Where to listen (`listeners`), e.g. 127.0.0.1:9092.
        #[arg(long)]
        listen: Option<String>,
        /// Any setting by its Kafka name, e.g. `-o num.partitions=3`; repeatable.
        #[arg(short = 'o', long = "set", value_name = "KEY=VALUE")]
        settings: Vec<String>,
    },
    /// Open a data directory (recovering it if it was not shut down cleanly) and print every
    /// partition's offsets and size. Exits non-zero if any partition cannot be opened.
    Check {
        /// The data directory.
        #[arg(default_value = "keel-data")]
        data_dir: PathBuf,
        /// Truncate damaged logs at the first bad batch instead of refusing to open them.
        #[arg(long)]
        truncate_damaged: bool,
    },
    /// Print the batch headers of a segment file (`<base offset>.log`), checking each CRC.
    Dump {
        file: PathBuf,
        /// Stop after this many batches.
        #[arg(long, default_value_t = u64::MAX)]
        limit: u64,
    },
}

pub fn main() -> ExitCode {
    use std::io::IsTerminal;
    // RUST_LOG overrides; a broker logs at info by default (start, topics, shutdown).
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Serve {
            config,
            data_dir,
            listen,
            settings,
        } => serve(config, data_dir, listen, settings),
        Command::Check {
            data_dir,
            truncate_damaged,
        } => crate::tools::check(&data_dir, truncate_damaged, &mut std::io::stdout()),
        Command::Dump { file, limit } => crate::tools::dump(&file, limit, &mut std::io::stdout()),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(message) => {
            eprintln!("keel: {message}");
            ExitCode::FAILURE
        }
    }
}

fn serve(
    file: Option<PathBuf>,
    data_dir: Option<PathBuf>,
    listen: Option<String>,
    settings: Vec<String>,
) -> Result<(), String> {
    let mut config = match file {
        Some(path) => crate::config::BrokerConfig::from_file(&path).map_err(|e| e.to_string())?,
        None => crate::config::BrokerConfig::default(),
    };
    let mut pairs: Vec<(String, String)> = Vec::new();
    if let Some(dir) = data_dir {
        pairs.push(("log.dirs".into(), dir.display().to_string()));
    }
    if let Some(listen) = listen {
        pairs.push(("listeners".into(), listen));
    }
    for s in settings {
        let (k, v) = s
            .split_once('=')
            .ok_or_else(|| format!("-o {s}: expected KEY=VALUE"))?;
        pairs.push((k.trim().to_string(), v.trim().to_string()));
    }
    for (k, v) in pairs {
        config.set(&k, &v).map_err(|e| e.to_string())?;
    }
    crate::serve::run(config).map_err(|e| e.to_string())
}
