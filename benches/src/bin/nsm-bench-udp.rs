//! `nsm-bench-udp`: the packet-rate sender and receiver `nsm-bench` runs
//! inside the pods (see `nsm_benches::udp`). Prints one line of counts.
//!
//! ```text
//! nsm-bench-udp send ADDR:PORT IP_SIZE SECONDS
//! nsm-bench-udp recv PORT MAX_SECONDS
//! ```

use std::process::ExitCode;
use std::time::Duration;

use nsm_benches::udp;

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let argv: Vec<&str> = args.iter().map(String::as_str).collect();
    let result = match argv.as_slice() {
        ["send", to, size, secs] => match (to.parse(), size.parse(), secs.parse::<f64>()) {
            (Ok(to), Ok(size), Ok(secs)) if secs > 0.0 => {
                udp::send(to, size, Duration::from_secs_f64(secs))
            }
            _ => return usage(),
        },
        ["recv", port, secs] => match (port.parse(), secs.parse::<f64>()) {
            // Idle for 1 s after traffic began means the sender is done.
            (Ok(port), Ok(secs)) if secs > 0.0 => {
                udp::receive(port, Duration::from_secs(1), Duration::from_secs_f64(secs))
            }
            _ => return usage(),
        },
        _ => return usage(),
    };
    match result {
        Ok(c) => {
            println!("{}", c.line());
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("nsm-bench-udp: {e}");
            ExitCode::FAILURE
        }
    }
}

fn usage() -> ExitCode {
    eprintln!("usage: nsm-bench-udp send ADDR:PORT IP_SIZE SECONDS | recv PORT MAX_SECONDS");
    ExitCode::from(2)
}
