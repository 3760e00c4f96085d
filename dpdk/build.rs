//! Build script: with the `dpdk` feature, bindings to Debian's DPDK 22.11
//! (bindgen), the C shim for its static-inline fast path (cc) and the link
//! flags of the shared `libdpdk` (pkg-config). Without the feature it does
//! nothing, so a plain workspace build needs neither DPDK nor libclang.

fn main() {
    // Without this line cargo reruns the script whenever any file of the
    // package changes; with it, only for the files named below.
    println!("cargo:rerun-if-changed=build.rs");
    #[cfg(feature = "dpdk")]
    dpdk::build();
}

#[cfg(feature = "dpdk")]
mod dpdk {
    use std::env;
    use std::path::PathBuf;
    use std::process::Command;

    /// DPDK 22.11 (ABI 23) is what Debian 12 ships; the shim and the
    /// bindings were written against it. Newer LTS releases keep these
    /// calls, older ones lack `rte_pktmbuf_free_bulk` semantics we rely on.
    const MIN_VERSION: &str = "22.11";

    /// Functions called from Rust through the generated bindings. An
    /// allowlist keeps the bindings small (the full headers are ~100k lines)
    /// and makes an API change in a DPDK update fail here, by name.
    const FUNCTIONS: &[&str] = &[
        "rte_eal_init",
        "rte_eal_cleanup",
        "rte_eal_get_runtime_dir",
        "rte_strerror",
        "rte_socket_id",
        "rte_eth_dev_count_avail",
        "rte_eth_find_next",
        "rte_eth_dev_adjust_nb_rx_tx_desc",
        "rte_eth_dev_is_valid_port",
        "rte_eth_dev_get_port_by_name",
        "rte_eth_dev_get_name_by_port",
        "rte_eth_dev_info_get",
        "rte_eth_dev_socket_id",
        "rte_eth_dev_configure",
        "rte_eth_rx_queue_setup",
        "rte_eth_tx_queue_setup",
        "rte_eth_dev_start",
        "rte_eth_dev_stop",
        "rte_eth_dev_close",
        "rte_eth_promiscuous_enable",
        "rte_eth_promiscuous_disable",
        "rte_eth_promiscuous_get",
        "rte_eth_allmulticast_enable",
        "rte_eth_macaddr_get",
        "rte_eth_dev_get_mtu",
        "rte_eth_dev_set_mtu",
        "rte_eth_link_get_nowait",
        "rte_eth_stats_get",
        "rte_pktmbuf_pool_create",
        "rte_pktmbuf_free_bulk",
        "rte_mempool_free",
        "rte_mempool_avail_count",
        // The shim (csrc/shim.c).
        "nsm_.*",
    ];

    pub(super) fn build() {
        let manifest = PathBuf::from(
            env::var_os("CARGO_MANIFEST_DIR").expect("cargo sets CARGO_MANIFEST_DIR"),
        );
        let out = PathBuf::from(env::var_os("OUT_DIR").expect("cargo sets OUT_DIR"));
        let shim_c = manifest.join("csrc/shim.c");
        let shim_h = manifest.join("csrc/shim.h");
        println!("cargo:rerun-if-changed={}", shim_c.display());
        println!("cargo:rerun-if-changed={}", shim_h.display());
        println!("cargo:rerun-if-env-changed=PKG_CONFIG_PATH");

        let cflags = dpdk_cflags();

        // The shim first: its static archive references the shared rte_*
        // libraries, so it must come before them on the link line.
        let mut cc = cc::Build::new();
        cc.file(&shim_c)
            .warnings(true)
            .extra_warnings(true)
            .opt_level(2);
        for flag in &cflags {
            cc.flag(flag);
        }
        cc.compile("nsm_dpdk_shim");

        // Shared linking (not --static): Debian's EAL then finds its PMD
        // plugin directory by itself (see README: drivers).
        pkg_config::Config::new()
            .atleast_version(MIN_VERSION)
            .statik(false)
            .probe("libdpdk")
            .unwrap_or_else(|e| panic!("libdpdk (>= {MIN_VERSION}) not found by pkg-config: {e}\n(apt-get install libdpdk-dev)"));

        let mut builder = bindgen::Builder::default()
            .header(shim_h.to_string_lossy())
            .clang_args(&cflags)
            .allowlist_var("RTE_PKTMBUF_HEADROOM")
            .allowlist_var("RTE_ETH_NAME_MAX_LEN")
            .allowlist_var("RTE_MAX_ETHPORTS")
            .allowlist_type("nsm_mbuf_view")
            // The mbuf and mempool structs are only ever handled through
            // pointers on the Rust side (fields are read by the shim), and
            // their packed/aligned unions are what bindgen renders worst.
            .opaque_type("rte_mbuf")
            .opaque_type("rte_mempool")
            .derive_default(true)
            .derive_debug(true)
            .generate_comments(false)
            .layout_tests(true)
            .parse_callbacks(Box::new(bindgen::CargoCallbacks::new()));
        for f in FUNCTIONS {
            builder = builder.allowlist_function(f);
        }
        let bindings = builder
            .generate()
            .unwrap_or_else(|e| panic!("bindgen over {}: {e}", shim_h.display()));
        bindings
            .write_to_file(out.join("bindings.rs"))
            .expect("write bindings.rs");
    }

    /// `pkg-config --cflags libdpdk`, whole: the pkg-config crate only
    /// reports include paths and defines, but DPDK's headers also need
    /// `-include rte_config.h` and the `-march` the library was built for
    /// (its inline functions assume SSE4.2 on x86_64).
    fn dpdk_cflags() -> Vec<String> {
        let pkg_config = env::var("PKG_CONFIG").unwrap_or_else(|_| "pkg-config".to_owned());
        let output = Command::new(&pkg_config)
            .args(["--cflags", "libdpdk"])
            .output()
            .unwrap_or_else(|e| panic!("run {pkg_config} --cflags libdpdk: {e} (apt-get install pkg-config libdpdk-dev)"));
        assert!(
            output.status.success(),
            "{pkg_config} --cflags libdpdk failed: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        String::from_utf8(output.stdout)
            .expect("pkg-config output is UTF-8")
            .split_whitespace()
            .map(str::to_owned)
            .collect()
    }
}
