//! The `hearth` binary: runs the CLI and turns any error into one line on stderr and exit code 1.

mod cli;

use std::process::ExitCode;

fn main() -> ExitCode {
    match cli::run() {
        Ok(code) => code,
        Err(error) => {
            // `{:#}` joins the error's causes with ": " on one line.
            let line = format!("{error:#}").replace('\n', " ");
            eprintln!("hearth: {line}");
            ExitCode::FAILURE
        }
    }
}
