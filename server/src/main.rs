//! `keel`: parse flags, hand over to the library.

fn main() -> std::process::ExitCode {
    keel_server::cli::main()
}
