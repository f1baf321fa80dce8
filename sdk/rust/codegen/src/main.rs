//! `cargo run -p codegen` writes the generated code; `-- --check` lists
//! the stale files instead.

use std::process::ExitCode;

fn main() -> ExitCode {
    let check = std::env::args().any(|a| a == "--check");
    match codegen::run(&codegen::root(), check) {
        Ok(stale) if stale.is_empty() => ExitCode::SUCCESS,
        Ok(stale) => {
            eprintln!("generated code is stale; run `cargo run -p codegen` and commit:");
            for f in stale {
                eprintln!("  {}", f.display());
            }
            ExitCode::FAILURE
        }
        Err(e) => {
            eprintln!("codegen: {e}");
            ExitCode::from(2)
        }
    }
}
