//! Running system tools (`ip`, `sysctl`) with errors that say what failed.
//!
//! The testbed drives iproute2 rather than netlink directly: every step it
//! takes is a command a person can read in an error message and run by hand.

use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

/// A system command that failed.
#[derive(Debug, thiserror::Error)]
pub enum CmdError {
    /// The program could not be started.
    #[error("`{cmd}`: cannot run: {source}")]
    Spawn {
        /// The command line.
        cmd: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The program ran and failed.
    #[error("`{cmd}` failed ({status}): {stderr}")]
    Failed {
        /// The command line.
        cmd: String,
        /// Exit status as printed.
        status: String,
        /// Its standard error, trimmed to one line.
        stderr: String,
    },
}

/// Runs `program args...`, returning its stdout, or an error naming the command.
pub fn run<I, S>(program: &str, args: I) -> Result<String, CmdError>
where
    I: IntoIterator<Item = S>,
    S: AsRef<OsStr>,
{
    let args: Vec<_> = args
        .into_iter()
        .map(|a| a.as_ref().to_os_string())
        .collect();
    let cmd = std::iter::once(program.to_string())
        .chain(args.iter().map(|a| a.to_string_lossy().into_owned()))
        .collect::<Vec<_>>()
        .join(" ");
    let out = Command::new(program)
        .args(&args)
        .stdin(Stdio::null())
        .output()
        .map_err(|source| CmdError::Spawn {
            cmd: cmd.clone(),
            source,
        })?;
    if !out.status.success() {
        return Err(CmdError::Failed {
            cmd,
            status: out.status.to_string(),
            stderr: String::from_utf8_lossy(&out.stderr)
                .trim()
                .replace('\n', "; "),
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// `ip ARGS...` in the root namespace.
pub fn ip<I, S>(args: I) -> Result<String, CmdError>
where
    I: IntoIterator<Item = S>,
    S: AsRef<OsStr>,
{
    run("ip", args)
}

/// `ip -n NETNS ARGS...`: the command applies inside the namespace.
pub fn ip_in(netns: &str, args: &[&str]) -> Result<String, CmdError> {
    ip(["-n", netns].iter().chain(args))
}

/// Sets a sysctl inside a namespace (`/proc/sys/net` is per namespace).
pub fn sysctl_in(netns: &str, key: &str, value: &str) -> Result<(), CmdError> {
    run(
        "ip",
        [
            "netns",
            "exec",
            netns,
            "sysctl",
            "-qw",
            &format!("{key}={value}"),
        ],
    )
    .map(drop)
}

/// The directory holding named network namespaces.
pub const NETNS_DIR: &str = "/run/netns";

/// Names of every named network namespace on the host.
pub fn list_netns() -> Vec<String> {
    let Ok(dir) = std::fs::read_dir(NETNS_DIR) else {
        return Vec::new();
    };
    let mut names: Vec<String> = dir
        .filter_map(|e| e.ok())
        .filter_map(|e| e.file_name().into_string().ok())
        .collect();
    names.sort();
    names
}

/// Process ids of every process inside a named namespace.
pub fn netns_pids(netns: &str) -> Vec<i32> {
    ip(["netns", "pids", netns])
        .map(|out| {
            out.split_whitespace()
                .filter_map(|p| p.parse().ok())
                .collect()
        })
        .unwrap_or_default()
}

/// Finds a program: `$NSM_BIN_DIR`, then beside the running executable (and
/// its parent, for test binaries under `target/*/deps`), then `$PATH`.
pub fn find_program(name: &str) -> Option<PathBuf> {
    let mut dirs: Vec<PathBuf> = Vec::new();
    if let Some(d) = std::env::var_os("NSM_BIN_DIR") {
        dirs.push(PathBuf::from(d));
    }
    if let Ok(exe) = std::env::current_exe()
        && let Some(d) = exe.parent()
    {
        dirs.push(d.to_path_buf());
        if d.file_name() == Some(OsStr::new("deps"))
            && let Some(p) = d.parent()
        {
            dirs.push(p.to_path_buf());
        }
    }
    if let Some(path) = std::env::var_os("PATH") {
        dirs.extend(std::env::split_paths(&path));
    }
    dirs.into_iter()
        .map(|d| d.join(name))
        .find(|p| is_executable(p))
}

fn is_executable(p: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    p.metadata()
        .map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        .unwrap_or(false)
}

/// Runs `stop` once, on a thread of its own, when SIGINT, SIGTERM or SIGHUP
/// arrives, instead of letting the signal kill the process: for programs
/// that must remove what they built (a lab) before they exit.
///
/// A handler that sets a flag, and a watcher thread, rather than a blocked
/// mask and `sigwait`: the processes such a program starts inherit the
/// signal mask, and blocked SIGTERM/SIGINT would never reach them (a
/// handler resets to the default at exec; a mask does not).
///
/// # Errors
/// When a handler cannot be installed or the thread not started.
pub fn on_termination_signal(stop: impl FnOnce() + Send + 'static) -> std::io::Result<()> {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};
    let flag = Arc::new(AtomicBool::new(false));
    for s in [
        signal_hook::consts::SIGINT,
        signal_hook::consts::SIGTERM,
        signal_hook::consts::SIGHUP,
    ] {
        signal_hook::flag::register(s, flag.clone())?;
    }
    std::thread::Builder::new()
        .name("signals".into())
        .spawn(move || {
            while !flag.load(Ordering::SeqCst) {
                std::thread::sleep(std::time::Duration::from_millis(50));
            }
            stop();
        })?;
    Ok(())
}

/// Whether the process may create namespaces and links.
pub fn is_root() -> bool {
    nix::unistd::geteuid().is_root()
}
