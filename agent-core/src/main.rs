//! The `hearth` binary: runs the CLI and turns any error into one line on stderr and exit code 1.
//!
//! Two hidden steps of the job sandbox are dispatched before anything else runs: they must stay
//! single-threaded to enter new namespaces (see `hearth::jobs::sandbox`).

mod cli;

use std::path::Path;
use std::process::ExitCode;

use hearth::jobs::sandbox;

fn main() -> ExitCode {
    let args: Vec<std::ffi::OsString> = std::env::args_os().take(3).collect();
    if let [_, step, plan] = args.as_slice() {
        if step == sandbox::SHIM_COMMAND {
            return sandbox::shim_main(Path::new(plan));
        }
        if step == sandbox::INIT_COMMAND {
            return sandbox::init_main(Path::new(plan));
        }
    }
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
