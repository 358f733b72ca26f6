// SPDX-License-Identifier: GPL-2.0
// cgroup/sock_create: put ramfw's mark on every socket the engine's cgroup creates, so the
// nftables ruleset (meta mark) filters the engine's traffic and nobody else's.
//
// Two loaders: bcc compiles this file where kernel headers exist; elsewhere ramfw/bpf.py
// loads the same four instructions assembled by hand (mark_program), with no compiler.
// The mark comes from the map, not from this text.
#include <uapi/linux/bpf.h>

BPF_ARRAY(ramfw_config, u32, 1);

int ramfw_mark(struct bpf_sock *sk)
{
	int key = 0;
	u32 *mark = ramfw_config.lookup(&key);

	if (mark)
		sk->mark = *mark;
	return 1;
}
