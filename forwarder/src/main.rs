//! `nsm-forwarder` binary: parses the command line, sets up logging to
//! stderr, and runs [`nsm_forwarder::run`] until SIGTERM or SIGINT.
//!
//! It must stay thin: every decision lives in the library, so tests and
//! the testbed drive exactly what the binary does.

#![forbid(unsafe_code)]

use clap::Parser;
use tokio::signal::unix::{SignalKind, signal};

/// sysexits.h EX_USAGE / EX_SOFTWARE.
const EX_USAGE: i32 = 64;
const EX_SOFTWARE: i32 = 70;

fn main() {
    let config = nsm_forwarder::Config::parse();
    // Logs on stderr (RUST_LOG, default info; colour codes only for a
    // terminal), and spans over OTLP when an endpoint is configured.
    let trace = nsm_trace::TraceConfig::from_env(
        "nsm-forwarder",
        &config.name,
        config.otlp_endpoint.as_deref(),
    );
    let telemetry = match nsm_trace::init(&trace) {
        Ok(t) => t,
        Err(e) => {
            eprintln!("nsm-forwarder: {e}");
            std::process::exit(EX_USAGE);
        }
    };
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("nsm-forwarder: tokio runtime: {e}");
            std::process::exit(EX_SOFTWARE);
        }
    };
    let result = rt.block_on(async move {
        let mut term = signal(SignalKind::terminate()).map_err(|e| e.to_string())?;
        let mut int = signal(SignalKind::interrupt()).map_err(|e| e.to_string())?;
        let shutdown = async move {
            tokio::select! {
                _ = term.recv() => {}
                _ = int.recv() => {}
            }
        };
        nsm_forwarder::run(config, shutdown)
            .await
            .map_err(|e| e.to_string())
    });
    if let Err(e) = result {
        tracing::error!(error = %e, "nsm-forwarder failed");
        eprintln!("nsm-forwarder: {e}");
        // exit() skips destructors: export the spans buffered so far.
        drop(telemetry);
        std::process::exit(1);
    }
}
