//! `keel-bench`: see `keel_bench::cli` for the modes.

fn main() -> std::process::ExitCode {
    keel_bench::main()
}
