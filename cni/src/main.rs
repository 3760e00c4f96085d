//! `nsm-cni`: the binary a container runtime executes. A thin shell: read
//! the environment and stdin, run the command, print JSON on stdout.
//! It must never print anything but the result or error object on stdout.

use std::io::{Read, Write};
use std::process::ExitCode;

use nsm_cni::plugin;
use nsm_cni::spec::{self, CniError, Invocation, ProcessEnv, code};

fn main() -> ExitCode {
    let mut stdin = Vec::new();
    let read = std::io::stdin().read_to_end(&mut stdin);
    // Errors are reported in the version the runtime speaks, when we can tell.
    let version = serde_json::from_slice::<serde_json::Value>(&stdin)
        .ok()
        .and_then(|v| v["cniVersion"].as_str().map(str::to_string))
        .filter(|v| spec::SUPPORTED_VERSIONS.contains(&v.as_str()))
        .unwrap_or_else(|| spec::SPEC_VERSION.to_string());
    let outcome = read
        .map_err(|e| CniError::new(code::IO, "cannot read stdin").details(e.to_string()))
        .and_then(|_| Invocation::from_env(&ProcessEnv))
        .and_then(|inv| plugin::run(&inv, &stdin));
    let mut out = std::io::stdout().lock();
    match outcome {
        Ok(Some(result)) => {
            let _ = writeln!(out, "{result}");
            ExitCode::SUCCESS
        }
        Ok(None) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("nsm-cni: {e} (code {})", e.code);
            let _ = writeln!(out, "{}", e.to_json(&version));
            ExitCode::FAILURE
        }
    }
}
