// SPDX-License-Identifier: GPL-2.0
// The DNS prefilter, in C: the readable reference of the program ramfw/kernel/prefilter.py
// assembles by hand (program()). ramfw loads only the hand-assembled program (no compiler,
// no kernel headers at run time); this file says what those instructions do, and
// tests/integration/test_prefilter_reference.py compiles it with bcc where it can and holds
// it, the hand-assembled program and the Python would_hold() to the same verdict on thousands
// of generated and adversarial packets. Change one, change the three.
//
// The pairing (ramfw/kernel/pairing.py: the same walk, then a query's key recorded or a
// reply's consumed) has no C version here: written as this walk in an inline function that
// the query and reply programs call, clang's code for it is more than the verifier follows
// (E2BIG: a million instructions; the hand-assembled programs take about 207,000). Its
// specification is pair_key() in Python, which the tests hold the hand-assembled programs to.
//
// What it is for. DNS replies (udp sport 53) go through a rule that holds them in a queue
// until the daemon has read them, so the addresses of an allowlisted name are allowed before
// the application sees them. Holding costs a round trip through userspace, and most replies
// are for names nobody allowlisted. This socket filter runs as an xt "bpf" match in front of
// that rule: it returns HOLD (1) when the reply's question name may be allowlisted and PASS
// (0) when it cannot be; a passed reply is still copied to the daemon, asynchronously.
//
// How it decides. The allowlist is turned into a set of 32-bit keys (keys_for() in Python):
// a one-label entry is keyed by its label, every other entry by its last two labels
// ("*.blob.core.windows.net" by windows.net). The program keys the question name by its
// last label and by its last two labels and looks both up: a hit is a HOLD. A collision only
// holds a reply the daemon then releases; an allowlisted name always hits.
//
// What it does not follow is held, for the daemon to read: a label "length" over 63 (a
// compression pointer, which has no business in a question), an IPv6 next header other than
// UDP (extension headers), and a name long enough to reach a loop bound. The root name
// (no label) is passed.
//
// Reading the packet. The packet starts at the IP header (netfilter's view of it).
// load_byte() compiles to LD_ABS/LD_IND, the classic socket-filter loads: a read past the end
// of the packet ends the program at once with 0, by the kernel's rule, not by a branch here.
// So a reply whose question is cut short is passed; the daemon, reading its copy, finds no
// whole question in it either.
#include <uapi/linux/bpf.h>

#define PASS 0
#define HOLD 1

#define IPV6_HEADER 40		// fixed; extension headers would follow it
#define IPV6_NEXT_HEADER 6	// byte offset of the next-header field
#define NEXT_HEADER_UDP 17	// IPPROTO_UDP
#define UDP_HEADER 8
#define DNS_HEADER 12		// id, flags, four counts: then the question name

#define MAX_LABEL 63		// a longer length byte is not a label: 0xC0.. is a pointer
#define MAX_LABELS 128		// loop bounds, for the verifier: a name that reaches one is held.
#define MAX_HASHED 130		// Only MAX_LABELS can be reached: two labels are 128 bytes at most.
#define NO_LABEL (~0ULL)	// "no label seen yet" (the hand-assembled program's -1)

// Keys made from the allowlist (MAX_KEYS in Python); the value is unused (1).
BPF_HASH(ramfw_prefilter, u32, u8, 65536);

// The key of the wire bytes [start, end), as key() in Python: h = h * 31 + (byte | 0x20),
// modulo 2^32. Wire bytes: each label's length byte, then its characters, e.g.
// "\x07example\x03com". The OR folds ASCII upper case to lower case without a branch (it
// changes other bytes too, length bytes included, the same way here and in keys_for()).
// Returns 0 and the key in *key, or -1 when MAX_HASHED bytes were hashed (the caller holds).
// Every byte read here lies before the name's terminating zero, which was read already: these
// reads cannot fall off the packet.
static __always_inline int hash(struct __sk_buff *skb, u64 start, u64 end, u32 *key)
{
	u32 h = 0;
	u64 at = start;

	for (int n = 0; n < MAX_HASHED; n++) {
		if (at >= end) {
			*key = h;
			return 0;
		}
		h = h * 31 + (u32)(load_byte(skb, at) | 0x20);
		at++;
	}
	return -1;
}

int ramfw_dns(struct __sk_buff *skb)
{
	u64 version = load_byte(skb, 0) >> 4;
	u64 at;				// read position: the next length byte of the name
	u64 last = NO_LABEL;		// where the last label read so far begins
	u64 second = NO_LABEL;		// where the label before it begins
	u32 key_last, key_two;
	int labels;

	// Find the question name: after the IP header, the UDP header and the DNS header. Nothing
	// else is checked (not the DNS flags, not the question count): the rule in front matches
	// UDP from port 53, and the daemon checks the rest on the replies this program holds.
	if (version == 6) {
		if (load_byte(skb, IPV6_NEXT_HEADER) != NEXT_HEADER_UDP)
			return HOLD;	// extension headers: not followed
		at = IPV6_HEADER + UDP_HEADER + DNS_HEADER;
	} else if (version == 4) {
		// The low nibble (IHL) is the header length in 32-bit words: options (IHL > 5) move
		// the UDP header further. The value is used as it is (the kernel has checked it).
		at = (load_byte(skb, 0) & 0x0f) * 4 + UDP_HEADER + DNS_HEADER;
	} else {
		return HOLD;
	}

	// Walk the labels: read each length byte, remember where the last two labels begin, and
	// stop at the zero length that ends the name. Only the length bytes are read here. At most
	// MAX_LABELS length bytes are read: a name of MAX_LABELS labels or more is held without
	// reading further (127 labels is the most a 255-byte DNS name can have).
	for (labels = 0; labels < MAX_LABELS; labels++) {
		u64 length = load_byte(skb, at);

		if (length == 0)
			break;
		if (length > MAX_LABEL)
			return HOLD;	// a compression pointer (or a reserved label type)
		second = last;
		last = at;
		at += 1 + length;
	}
	if (labels == MAX_LABELS)
		return HOLD;
	// Here "at" is the offset of the terminating zero: the name's end.

	if (last == NO_LABEL)
		return PASS;		// the root name "."
	if (second == NO_LABEL)
		second = last;		// one label: its last two labels are that label

	if (hash(skb, last, at, &key_last) < 0 || hash(skb, second, at, &key_two) < 0)
		return HOLD;
	if (ramfw_prefilter.lookup(&key_last) || ramfw_prefilter.lookup(&key_two))
		return HOLD;
	return PASS;
}
