//! The `hearth` binary: runs the CLI and turns any error into one line on stderr and exit code 1.
//!
//! The hidden first step of the job sandbox is dispatched before anything else runs: it must stay
//! single-threaded to enter new namespaces and fork the job's init (see `hearth::jobs::sandbox`).

mod cli;

use std::path::Path;
use std::process::ExitCode;

use hearth::jobs::sandbox;

fn main() -> ExitCode {
    let args: Vec<std::ffi::OsString> = std::env::args_os().take(3).collect();
    if let [_, step, plan] = args.as_slice()
        && step == sandbox::SHIM_COMMAND
    {
        return sandbox::shim_main(Path::new(plan));
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
