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
        // The reader went away (`hearth jobs | head -1`): it has what it wanted, as with
        // ripgrep and coreutils, so there is nothing to say.
        Err(error) if error.chain().any(|cause| cause.is::<cli::output::StdoutClosed>()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("hearth: {}", one_line(&error));
            ExitCode::FAILURE
        }
    }
}

/// The error and its causes on one line, joined with ": ", each said once: many errors already
/// include their cause in their own message (so the API's messages are whole), and saying it again
/// from `source()` would repeat it.
fn one_line(error: &anyhow::Error) -> String {
    let mut line = String::new();
    for cause in error.chain() {
        let text = cause.to_string().replace('\n', " ");
        let text = text.trim();
        if text.is_empty() || line.contains(text) {
            continue;
        }
        if !line.is_empty() {
            line.push_str(": ");
        }
        line.push_str(text);
    }
    line
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, thiserror::Error)]
    #[error("cannot read job spec /x.toml: {source}")]
    struct SaysItsSource {
        source: std::io::Error,
    }

    #[derive(Debug, thiserror::Error)]
    #[error("cannot read job spec")]
    struct LeavesItsSource {
        #[source]
        source: std::io::Error,
    }

    fn not_found() -> std::io::Error {
        std::io::Error::from(std::io::ErrorKind::NotFound)
    }

    #[test]
    fn each_cause_is_said_once() {
        let repeated = anyhow::Error::new(SaysItsSource { source: not_found() }).context("running the job");
        let line = one_line(&repeated);
        assert_eq!(line.matches(&not_found().to_string()).count(), 1, "{line}");
        assert!(line.starts_with("running the job: cannot read job spec /x.toml: "), "{line}");

        let chained = anyhow::Error::new(LeavesItsSource { source: not_found() });
        assert_eq!(one_line(&chained), format!("cannot read job spec: {}", not_found()));

        let multiline = anyhow::anyhow!("first\nsecond");
        assert_eq!(one_line(&multiline), "first second");
    }
}
