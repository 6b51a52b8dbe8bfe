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
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    let result = match cli.command {
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
