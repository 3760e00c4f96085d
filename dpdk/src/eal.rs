//! The DPDK Environment Abstraction Layer: started once per process.

use std::ffi::{CString, c_char, c_int};
use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use crate::error::{Error, rte_errno, strerror};
use crate::sys;

/// Set by the first [`Eal::init`] call and never cleared: `rte_eal_init`
/// refuses a second call (`EALREADY`) and, after `rte_eal_cleanup`, cannot
/// be called again at all, so one flag covers both.
static INIT_CALLED: AtomicBool = AtomicBool::new(false);

/// `argv[0]` handed to `rte_eal_init`; EAL uses it for log lines only.
const PROGRAM_NAME: &str = "nsm-dpdk";

/// A handle on the initialised EAL.
///
/// Cheap to clone: every [`Port`](crate::Port) and mbuf pool holds one, so
/// `rte_eal_cleanup` runs only when the last of them is gone and nothing can
/// touch DPDK memory after it.
///
/// Debian's shared DPDK loads its poll-mode drivers as plugins from
/// [`Eal::DEFAULT_PMD_DIR`] by itself (EAL detects that it is linked
/// dynamically); `-d <file or directory>` adds more.
#[derive(Clone)]
pub struct Eal {
    inner: Arc<EalInner>,
}

struct EalInner {
    args: Vec<String>,
}

impl Drop for EalInner {
    fn drop(&mut self) {
        // SAFETY: returns a pointer to EAL's static path buffer, read at once.
        let runtime_dir = unsafe { std::ffi::CStr::from_ptr(sys::rte_eal_get_runtime_dir()) }
            .to_string_lossy()
            .into_owned();
        // SAFETY: the last handle is gone: every Port and pool (each holds
        // an Eal) has been dropped, so no DPDK object is used after this.
        unsafe {
            sys::rte_eal_cleanup();
        }
        // EAL creates /var/run/dpdk/<file-prefix> even with --no-shconf and
        // leaves it behind, empty. rmdir removes only an empty directory, so
        // a runtime dir still in use by another process sharing the prefix
        // is safe.
        if !runtime_dir.is_empty() {
            let _ = std::fs::remove_dir(&runtime_dir);
        }
    }
}

impl fmt::Debug for Eal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Eal")
            .field("args", &self.inner.args)
            .finish()
    }
}

impl Eal {
    /// Where Debian's `librte-*` packages put the PMD plugins that EAL loads
    /// by default (DPDK 22.11, ABI 23).
    pub const DEFAULT_PMD_DIR: &'static str = "/usr/lib/x86_64-linux-gnu/dpdk/pmds-23.0";

    /// Starts the EAL (`rte_eal_init`) with `args`, which do not include a
    /// program name (one is prepended).
    ///
    /// For the forwarder and the tests, on a machine without hugepages:
    ///
    /// ```text
    /// --no-huge -m 256 --no-shconf --file-prefix=nsm-<unique> --no-pci
    /// --no-telemetry -l 0 --log-level=*:warning --vdev=net_af_packet0,iface=eth1
    /// ```
    ///
    /// `--no-shconf` (no shared config files, no multi-process) and a
    /// unique `--file-prefix` let several processes run side by side.
    /// `--in-memory` does the same but needs hugepages: EAL refuses it
    /// together with `--no-huge`. EAL pins the calling thread to the main
    /// lcore (`-l`); this function restores the thread's previous CPU
    /// affinity afterwards, so threads it spawns later are not confined to
    /// that core.
    ///
    /// EAL may run once per process: a second call returns
    /// [`Error::EalAlreadyInitialized`], also after a failed first call or
    /// after the last handle of a successful one was dropped.
    ///
    /// Must be called from the network namespace the vdevs should live in:
    /// `net_af_packet` opens its socket and `net_tap` creates its interface
    /// in the calling thread's namespace during this call.
    pub fn init<S: AsRef<str>>(args: &[S]) -> Result<Eal, Error> {
        let mut owned: Vec<String> = Vec::with_capacity(args.len() + 1);
        owned.push(PROGRAM_NAME.to_owned());
        owned.extend(args.iter().map(|a| a.as_ref().to_owned()));
        let mut cstrings = Vec::with_capacity(owned.len());
        for (index, arg) in owned.iter().enumerate() {
            let c = CString::new(arg.as_str()).map_err(|_| Error::EalArgument {
                index: index.saturating_sub(1),
                arg: arg.clone(),
            })?;
            cstrings.push(c);
        }
        if INIT_CALLED.swap(true, Ordering::SeqCst) {
            return Err(Error::EalAlreadyInitialized);
        }
        // EAL keeps pointers into argv (getopt permutes it; some options are
        // stored by reference), and it runs once per process: leaking the
        // strings and the array is the simple way to make them outlive it.
        let argv: &'static mut [*mut c_char] = Box::leak(
            cstrings
                .into_iter()
                .map(CString::into_raw)
                .chain(std::iter::once(std::ptr::null_mut()))
                .collect::<Vec<_>>()
                .into_boxed_slice(),
        );
        let argc = c_int::try_from(owned.len())
            .map_err(|_| Error::Config(format!("{} EAL arguments", owned.len())))?;

        let saved_affinity = current_affinity();
        // SAFETY: argv holds argc valid NUL-terminated strings followed by a
        // NULL, all leaked above so they live as long as the process;
        // INIT_CALLED guarantees this is the only call in the process.
        let ret = unsafe { sys::rte_eal_init(argc, argv.as_mut_ptr()) };
        if ret < 0 {
            let errno = rte_errno();
            if let Some(set) = saved_affinity {
                restore_affinity(&set);
            }
            return Err(Error::EalInit {
                args: owned[1..].join(" "),
                errno,
                reason: strerror(errno),
            });
        }
        if let Some(set) = saved_affinity {
            restore_affinity(&set);
        }
        owned.remove(0);
        Ok(Eal {
            inner: Arc::new(EalInner { args: owned }),
        })
    }

    /// The arguments [`Eal::init`] was called with.
    #[must_use]
    pub fn args(&self) -> &[String] {
        &self.inner.args
    }

    /// The id of the ethdev port called `name` (`net_af_packet0`,
    /// `net_tap0`, a PCI address, ...).
    pub fn port_by_name(&self, name: &str) -> Result<u16, Error> {
        let not_found = || Error::PortNotFound {
            name: name.to_owned(),
            available: self
                .ports()
                .into_iter()
                .map(|(_, n)| n)
                .collect::<Vec<_>>()
                .join(", "),
        };
        let Ok(cname) = CString::new(name) else {
            return Err(not_found());
        };
        let mut id: u16 = 0;
        // SAFETY: cname is a valid C string and id a valid out-pointer; the
        // EAL is initialised (self exists).
        let ret = unsafe { sys::rte_eth_dev_get_port_by_name(cname.as_ptr(), &raw mut id) };
        if ret == 0 { Ok(id) } else { Err(not_found()) }
    }

    /// Ids and names of all ethdev ports.
    #[must_use]
    pub fn ports(&self) -> Vec<(u16, String)> {
        let mut out = Vec::new();
        let max = u16::try_from(sys::RTE_MAX_ETHPORTS).unwrap_or(u16::MAX);
        // SAFETY: rte_eth_find_next only reads the port table.
        let mut id = unsafe { sys::rte_eth_find_next(0) };
        while id < max {
            if let Some(name) = port_name(id) {
                out.push((id, name));
            }
            // SAFETY: as above.
            id = unsafe { sys::rte_eth_find_next(id + 1) };
        }
        out
    }
}

/// The ethdev name of port `id`, if it exists.
pub(crate) fn port_name(id: u16) -> Option<String> {
    let mut buf = [0 as c_char; sys::RTE_ETH_NAME_MAX_LEN as usize];
    // SAFETY: buf is RTE_ETH_NAME_MAX_LEN bytes, the size the function
    // documents as enough for any name; it NUL-terminates on success.
    let ret = unsafe { sys::rte_eth_dev_get_name_by_port(id, buf.as_mut_ptr()) };
    if ret != 0 {
        return None;
    }
    // SAFETY: on success buf holds a NUL-terminated string.
    let name = unsafe { std::ffi::CStr::from_ptr(buf.as_ptr()) };
    Some(name.to_string_lossy().into_owned())
}

/// The calling thread's CPU affinity, if it can be read.
fn current_affinity() -> Option<libc::cpu_set_t> {
    // SAFETY: cpu_set_t is plain data; all-zero is a valid (empty) set.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    // SAFETY: pid 0 is the calling thread; set is a valid cpu_set_t of the
    // size passed.
    let ret =
        unsafe { libc::sched_getaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &raw mut set) };
    (ret == 0).then_some(set)
}

/// Puts back an affinity read by [`current_affinity`]. Best effort: a
/// thread left pinned still works, only less spread out.
fn restore_affinity(set: &libc::cpu_set_t) {
    // SAFETY: pid 0 is the calling thread; set is a valid cpu_set_t.
    unsafe {
        libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), set);
    }
}
