/*
 * nsm-dpdk C shim: out-of-line copies of the DPDK functions that are
 * `static inline` in the headers (the fast path of rte_ethdev.h and
 * rte_mbuf.h) and of the thread-local rte_errno. bindgen can declare them
 * but there is no symbol to link against, so each gets a one-line wrapper
 * here. Nothing else belongs in this file: every other call goes through
 * the bindgen bindings directly.
 */
#ifndef NSM_DPDK_SHIM_H
#define NSM_DPDK_SHIM_H

#include <stdint.h>

#include <rte_eal.h>
#include <rte_errno.h>
#include <rte_ethdev.h>
#include <rte_lcore.h>
#include <rte_mbuf.h>
#include <rte_mempool.h>

/* rte_errno is a per-lcore (thread-local) variable behind a macro. */
int nsm_rte_errno(void);

/* rte_eth_rx_burst / rte_eth_tx_burst. */
uint16_t nsm_eth_rx_burst(uint16_t port_id, uint16_t queue_id,
			  struct rte_mbuf **rx_pkts, uint16_t nb_pkts);
uint16_t nsm_eth_tx_burst(uint16_t port_id, uint16_t queue_id,
			  struct rte_mbuf **tx_pkts, uint16_t nb_pkts);

/* rte_pktmbuf_alloc / rte_pktmbuf_alloc_bulk / rte_pktmbuf_free. */
struct rte_mbuf *nsm_pktmbuf_alloc(struct rte_mempool *mp);
int nsm_pktmbuf_alloc_bulk(struct rte_mempool *mp, struct rte_mbuf **mbufs,
			   unsigned int count);
void nsm_pktmbuf_free(struct rte_mbuf *m);

/*
 * rte_pktmbuf_mtod plus the fields the receive path reads for every frame,
 * in one call.
 */
struct nsm_mbuf_view {
	uint8_t *data;
	uint32_t pkt_len;
	uint16_t data_len;
	uint16_t nb_segs;
	/* The driver removed a VLAN tag (RTE_MBUF_F_RX_VLAN_STRIPPED):
	 * net_af_packet does whenever the kernel accelerated the tag. */
	uint8_t vlan_stripped;
};
void nsm_pktmbuf_view(const struct rte_mbuf *m, struct nsm_mbuf_view *v);

/* rte_pktmbuf_reset_headroom + data_len = pkt_len = 0: a fresh tx mbuf. */
void nsm_pktmbuf_reset_len(struct rte_mbuf *m);

/* rte_pktmbuf_append / prepend / trim / headroom / tailroom. */
char *nsm_pktmbuf_append(struct rte_mbuf *m, uint16_t len);
char *nsm_pktmbuf_prepend(struct rte_mbuf *m, uint16_t len);
int nsm_pktmbuf_trim(struct rte_mbuf *m, uint16_t len);
uint16_t nsm_pktmbuf_headroom(const struct rte_mbuf *m);
uint16_t nsm_pktmbuf_tailroom(const struct rte_mbuf *m);

#endif
