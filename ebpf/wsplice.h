/* Structures shared by wsplice.bpf.c and the Rust loader (dataplane/src/offload/maps.rs).
 * Every field is a fixed-width integer so both sides agree on the layout. */
#ifndef WSPLICE_H
#define WSPLICE_H

/* LINKS[source cookie]: written by userspace only, read by the verdict. */
struct wsplice_link {
	__u64 peer_cookie; /* the socket this source's bytes are redirected to */
	__u64 limit;       /* max bytes redirected to the peer and not yet acked by its receiver */
	__u64 peer_base;   /* bytes userspace had written into the peer when the pair was inserted */
	__u64 relayed;     /* bytes userspace has since relayed from this source into the peer */
};

/* FLOWS[source cookie]: written by the verdict only (atomic adds), read by userspace. */
struct wsplice_flow {
	__u64 redirected; /* bytes redirected to the peer's egress */
	__u64 passed;     /* bytes left on this socket for userspace to relay (backpressure) */
	__u64 last_ns;    /* bpf_ktime_get_ns() of the last skb seen */
	__u64 trimmed;    /* bytes of retransmitted skbs that overlapped bytes already seen */
	__u32 next_seq;   /* TCP sequence number the next new byte from this source carries */
	__u32 seq_known;  /* next_seq is set (from copied_seq, on the first skb) */
	__u64 broken;     /* an overlap could not be trimmed: userspace must end the pair */
};

/* EVENTS ring buffer: one record per passed skb, so userspace relays it. */
struct wsplice_event {
	__u64 cookie;
};

/* COUNTERS array indexes. */
#define WSPLICE_EVENTS_LOST 0
#define WSPLICE_COUNTERS 1

#endif
