// SPDX-License-Identifier: GPL-2.0
/* Stream verdict for offloaded WebSocket pairs.
 *
 * Each socket of a pair is in SOCKS (a sockhash keyed by socket cookie). Bytes arriving on one
 * socket are redirected to the egress of its peer, unless the peer's receiver is behind: then
 * the skb stays on the source socket (SK_PASS), where TCP flow control applies, and userspace
 * relays it. Redirection resumes only once userspace has relayed every passed byte, so byte
 * order holds.
 */
#include <linux/types.h>
#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>
#include "wsplice.h"

/* Only the fields the verdict reads; CO-RE relocates their offsets against the running
 * kernel's BTF at load time. */
struct sk_buff {
	char cb[48]; /* starts with struct tcp_skb_cb: __u32 seq, __u32 end_seq */
} __attribute__((preserve_access_index));

struct tcp_sock {
	__u32 copied_seq;
	__u64 bytes_acked;
} __attribute__((preserve_access_index));

/* sk_skb's bpf_skb_adjust_room removes at most this many head bytes per call. */
#define TRIM_STEP 4095
/* Receive-side coalescing makes skbs far larger than 64 KiB, and bytes the carrier read
 * itself from such an skb before the verdict sees it come back whole (130,966 overlapping
 * bytes were seen on loopback): 256 steps trim up to 1 MiB. */
#define TRIM_STEPS 256

struct {
	__uint(type, BPF_MAP_TYPE_SOCKHASH);
	__uint(max_entries, 65536);
	__type(key, __u64);
	__type(value, __u32);
} SOCKS SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 65536);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, __u64);
	__type(value, struct wsplice_link);
} LINKS SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 65536);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, __u64);
	__type(value, struct wsplice_flow);
} FLOWS SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_RINGBUF);
	__uint(max_entries, 1 << 20);
} EVENTS SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, WSPLICE_COUNTERS);
	__type(key, __u32);
	__type(value, __u64);
} COUNTERS SEC(".maps");

static __always_inline int pass_to_userspace(struct wsplice_flow *flow, __u64 cookie, __u32 len)
{
	struct wsplice_event event = { .cookie = cookie };

	__sync_fetch_and_add(&flow->passed, len);
	if (bpf_ringbuf_output(&EVENTS, &event, sizeof(event), 0) != 0) {
		__u32 index = WSPLICE_EVENTS_LOST;
		__u64 *lost = bpf_map_lookup_elem(&COUNTERS, &index);

		if (lost)
			__sync_fetch_and_add(lost, 1);
	}
	return SK_PASS;
}

SEC("sk_skb/stream_verdict")
int wsplice_verdict(struct __sk_buff *skb)
{
	__u64 cookie = bpf_get_socket_cookie(skb);
	__u32 len = skb->len;
	struct wsplice_link *link;
	struct wsplice_flow *flow;
	struct bpf_sock *peer, *self;
	struct tcp_sock *peer_tcp, *self_tcp;
	struct sk_buff *kskb;
	__u32 start_seq;
	__u64 peer_acked, held;
	__u32 end_seq;
	__s32 overlap;

	/* A zero-length skb redirected to the peer sets EPIPE on it. */
	if (len == 0)
		return SK_DROP;

	link = bpf_map_lookup_elem(&LINKS, &cookie);
	flow = bpf_map_lookup_elem(&FLOWS, &cookie);
	if (!link || !flow)
		return SK_PASS; /* not (or no longer) a pair: leave the bytes to userspace */

	flow->last_ns = bpf_ktime_get_ns();

	/* tcp_read_skb hands the verdict whole skbs: a retransmission that overlaps bytes already
	 * received is queued whole, and an skb the carrier (or the HTTP parser) read part of
	 * comes back whole too. Redirected as it is, its head would reach the peer twice, so
	 * what lies before next_seq is trimmed, counted from the skb's own sequence number. */
	self = bpf_map_lookup_elem(&SOCKS, &cookie);
	if (!self)
		return SK_PASS; /* leaving the map: userspace reads the rest */
	self_tcp = bpf_skc_to_tcp_sock(self);
	if (!self_tcp) {
		bpf_sk_release(self);
		return SK_PASS;
	}
	/* TCP_SKB_CB(skb)->seq: coalescing keeps it, and the skb carries len bytes from there
	 * (its neighbours and rcv_nxt gave a wrong start for large coalesced skbs). */
	kskb = (struct sk_buff *)(void *)skb; /* an sk_skb program's context is the kernel's skb */
	if (bpf_probe_read_kernel(&start_seq, sizeof(start_seq), &kskb->cb[0]) != 0) {
		bpf_sk_release(self);
		flow->broken = 1;
		return pass_to_userspace(flow, cookie, len);
	}
	end_seq = start_seq + len;
	if (!flow->seq_known) {
		/* Before the first skb, userspace has read exactly up to copied_seq. */
		flow->next_seq = self_tcp->copied_seq;
		flow->seq_known = 1;
	}
	bpf_sk_release(self);

	overlap = (__s32)(flow->next_seq - start_seq);
	if (overlap >= (__s32)len)
		return SK_DROP; /* nothing new in it */
	if (overlap > 0) {
		__s32 left = overlap;

		for (int step = 0; step < TRIM_STEPS && left > 0; step++) {
			__s32 cut = left > TRIM_STEP ? TRIM_STEP : left;

			if (bpf_skb_adjust_room(skb, -cut, 0, 0) != 0)
				break;
			left -= cut;
		}
		if (left > 0) {
			flow->broken = 1;
			return pass_to_userspace(flow, cookie, len);
		}
		__sync_fetch_and_add(&flow->trimmed, overlap);
		len = skb->len;
	}
	flow->next_seq = end_seq;

	/* Userspace still owes the peer bytes passed earlier: keep passing to hold order. */
	if (flow->passed != link->relayed)
		return pass_to_userspace(flow, cookie, len);

	/* The peer is not in the map yet (insertion race) or is gone: a failed redirect would
	 * drop the bytes, so userspace gets them. */
	peer = bpf_map_lookup_elem(&SOCKS, &link->peer_cookie);
	if (!peer)
		return pass_to_userspace(flow, cookie, len);
	peer_tcp = bpf_skc_to_tcp_sock(peer);
	peer_acked = peer_tcp ? peer_tcp->bytes_acked : 0;
	bpf_sk_release(peer);
	if (!peer_tcp)
		return pass_to_userspace(flow, cookie, len);

	/* Bytes given to the peer that its receiver has not acked yet: the psock queue plus the
	 * peer's write queue. Above the limit, TCP flow control on the source takes over. */
	held = link->peer_base + link->relayed + flow->redirected - peer_acked;
	if ((__s64)held > 0 && held + len > link->limit)
		return pass_to_userspace(flow, cookie, len);

	__sync_fetch_and_add(&flow->redirected, len);
	return bpf_sk_redirect_hash(skb, &SOCKS, &link->peer_cookie, 0);
}

char LICENSE[] SEC("license") = "GPL";
