/* See shim.h: one-line out-of-line wrappers, no logic of their own. */
#include "shim.h"

int nsm_rte_errno(void)
{
	return rte_errno;
}

uint16_t nsm_eth_rx_burst(uint16_t port_id, uint16_t queue_id,
			  struct rte_mbuf **rx_pkts, uint16_t nb_pkts)
{
	return rte_eth_rx_burst(port_id, queue_id, rx_pkts, nb_pkts);
}

uint16_t nsm_eth_tx_burst(uint16_t port_id, uint16_t queue_id,
			  struct rte_mbuf **tx_pkts, uint16_t nb_pkts)
{
	return rte_eth_tx_burst(port_id, queue_id, tx_pkts, nb_pkts);
}

struct rte_mbuf *nsm_pktmbuf_alloc(struct rte_mempool *mp)
{
	return rte_pktmbuf_alloc(mp);
}

int nsm_pktmbuf_alloc_bulk(struct rte_mempool *mp, struct rte_mbuf **mbufs,
			   unsigned int count)
{
	return rte_pktmbuf_alloc_bulk(mp, mbufs, count);
}

void nsm_pktmbuf_free(struct rte_mbuf *m)
{
	rte_pktmbuf_free(m);
}

void nsm_pktmbuf_view(const struct rte_mbuf *m, struct nsm_mbuf_view *v)
{
	v->data = rte_pktmbuf_mtod(m, uint8_t *);
	v->pkt_len = m->pkt_len;
	v->data_len = m->data_len;
	v->nb_segs = m->nb_segs;
	v->vlan_stripped = (m->ol_flags & RTE_MBUF_F_RX_VLAN_STRIPPED) != 0;
}

void nsm_pktmbuf_reset_len(struct rte_mbuf *m)
{
	rte_pktmbuf_reset_headroom(m);
	m->data_len = 0;
	m->pkt_len = 0;
}

char *nsm_pktmbuf_append(struct rte_mbuf *m, uint16_t len)
{
	return rte_pktmbuf_append(m, len);
}

char *nsm_pktmbuf_prepend(struct rte_mbuf *m, uint16_t len)
{
	return rte_pktmbuf_prepend(m, len);
}

int nsm_pktmbuf_trim(struct rte_mbuf *m, uint16_t len)
{
	return rte_pktmbuf_trim(m, len);
}

uint16_t nsm_pktmbuf_headroom(const struct rte_mbuf *m)
{
	return rte_pktmbuf_headroom(m);
}

uint16_t nsm_pktmbuf_tailroom(const struct rte_mbuf *m)
{
	return rte_pktmbuf_tailroom(m);
}
