//! Raw bindings: bindgen's output over `csrc/shim.h` (DPDK's EAL, ethdev,
//! mbuf and mempool headers plus the `nsm_*` shim), restricted to the
//! functions listed in `build.rs`. Nothing here is safe to call without
//! reading the DPDK documentation of the function; the safe wrappers are in
//! the other modules.

#![allow(
    non_camel_case_types,
    non_upper_case_globals,
    non_snake_case,
    dead_code,
    unreachable_pub,
    missing_debug_implementations,
    unsafe_op_in_unsafe_fn,
    clippy::all,
    clippy::pedantic,
    clippy::undocumented_unsafe_blocks,
    clippy::cast_possible_truncation
)]

include!(concat!(env!("OUT_DIR"), "/bindings.rs"));
