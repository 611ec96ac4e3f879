// Program intake: decode (syntax: what the instructions say) and judge (policy: whether
// this device allows it), as separate steps, then the map-reference rewrite. The host
// verifier remains the authority on safety; this narrows what reaches it (DESIGN.md
// decision 6), and every refusal names the instruction and the helper or feature.

import { Status, QuotaId, NO_INSN } from './protocol.js';
import { ProtocolError, refuse, OffloadConfigError } from './errors.js';
import { decodeInsn, insnCount, isLdImm64SecondHalf, setInsnImm, Op, Pseudo, PseudoCall, Helper } from '../sys/bpf/insns.js';

// Helper ids in the kernel's enum order (__BPF_FUNC_MAPPER), so a refusal can name them.
const HELPER_NAMES = (
  'unspec map_lookup_elem map_update_elem map_delete_elem probe_read ktime_get_ns trace_printk get_prandom_u32 ' +
  'get_smp_processor_id skb_store_bytes l3_csum_replace l4_csum_replace tail_call clone_redirect get_current_pid_tgid ' +
  'get_current_uid_gid get_current_comm get_cgroup_classid skb_vlan_push skb_vlan_pop skb_get_tunnel_key ' +
  'skb_set_tunnel_key perf_event_read redirect get_route_realm perf_event_output skb_load_bytes get_stackid csum_diff ' +
  'skb_get_tunnel_opt skb_set_tunnel_opt skb_change_proto skb_change_type skb_under_cgroup get_hash_recalc ' +
  'get_current_task probe_write_user current_task_under_cgroup skb_change_tail skb_pull_data csum_update ' +
  'set_hash_invalid get_numa_node_id skb_change_head xdp_adjust_head probe_read_str get_socket_cookie get_socket_uid ' +
  'set_hash setsockopt skb_adjust_room redirect_map sk_redirect_map sock_map_update xdp_adjust_meta ' +
  'perf_event_read_value perf_prog_read_value getsockopt override_return sock_ops_cb_flags_set msg_redirect_map ' +
  'msg_apply_bytes msg_cork_bytes msg_pull_data bind xdp_adjust_tail skb_get_xfrm_state get_stack ' +
  'skb_load_bytes_relative fib_lookup sock_hash_update msg_redirect_hash sk_redirect_hash lwt_push_encap ' +
  'lwt_seg6_store_bytes lwt_seg6_adjust_srh lwt_seg6_action rc_repeat rc_keydown skb_cgroup_id get_current_cgroup_id ' +
  'get_local_storage sk_select_reuseport skb_ancestor_cgroup_id sk_lookup_tcp sk_lookup_udp sk_release map_push_elem ' +
  'map_pop_elem map_peek_elem msg_push_data msg_pop_data rc_pointer_rel spin_lock spin_unlock sk_fullsock tcp_sock ' +
  'skb_ecn_set_ce get_listener_sock skc_lookup_tcp tcp_check_syncookie sysctl_get_name sysctl_get_current_value ' +
  'sysctl_get_new_value sysctl_set_new_value strtol strtoul sk_storage_get sk_storage_delete send_signal ' +
  'tcp_gen_syncookie skb_output probe_read_user probe_read_kernel probe_read_user_str probe_read_kernel_str ' +
  'tcp_send_ack send_signal_thread jiffies64 read_branch_records get_ns_current_pid_tgid xdp_output get_netns_cookie ' +
  'get_current_ancestor_cgroup_id sk_assign ktime_get_boot_ns seq_printf seq_write sk_cgroup_id ' +
  'sk_ancestor_cgroup_id ringbuf_output ringbuf_reserve ringbuf_submit ringbuf_discard ringbuf_query csum_level ' +
  'skc_to_tcp6_sock skc_to_tcp_sock skc_to_tcp_timewait_sock skc_to_tcp_request_sock skc_to_udp6_sock ' +
  'get_task_stack load_hdr_opt store_hdr_opt reserve_hdr_opt inode_storage_get inode_storage_delete d_path ' +
  'copy_from_user snprintf_btf seq_printf_btf skb_cgroup_classid redirect_neigh per_cpu_ptr this_cpu_ptr ' +
  'redirect_peer task_storage_get task_storage_delete get_current_task_btf bprm_opts_set ktime_get_coarse_ns ' +
  'ima_inode_hash sock_from_file check_mtu for_each_map_elem snprintf sys_bpf btf_find_by_name_kind sys_close ' +
  'timer_init timer_set_callback timer_start timer_cancel get_func_ip get_attach_cookie task_pt_regs ' +
  'get_branch_snapshot trace_vprintk skc_to_unix_sock kallsyms_lookup_name find_vma loop strncmp get_func_arg ' +
  'get_func_ret get_func_arg_cnt get_retval set_retval xdp_get_buff_len xdp_load_bytes xdp_store_bytes ' +
  'copy_from_user_task skb_set_tstamp ima_file_hash kptr_xchg map_lookup_percpu_elem skc_to_mptcp_sock ' +
  'dynptr_from_mem ringbuf_reserve_dynptr ringbuf_submit_dynptr ringbuf_discard_dynptr dynptr_read dynptr_write ' +
  'dynptr_data tcp_raw_gen_syncookie_ipv4 tcp_raw_gen_syncookie_ipv6 tcp_raw_check_syncookie_ipv4 ' +
  'tcp_raw_check_syncookie_ipv6 ktime_get_tai_ns user_ringbuf_drain cgrp_storage_get cgrp_storage_delete'
).split(' ');

/** A helper's id by its name (without bpf_): other tables of helpers are keyed through this list, not by numbers of their own. */
export function helperId(name: string): number {
  const id = HELPER_NAMES.indexOf(name);
  if (id <= 0) throw new Error(`no BPF helper named ${name}`);
  return id;
}

export function helperName(id: number): string {
  const n = id > 0 ? HELPER_NAMES[id] : undefined;
  return n ? `bpf_${n}` : `helper #${id}`;
}

/**
 * What an XDP filter on the host→guest path needs, and nothing that reads host state:
 * its own maps (1-3; only this device's maps are reachable), the packet (28 csum_diff,
 * 44/54/65 adjust head/meta/tail, 188-190 multi-buffer length/load/store), time (5
 * ktime_get_ns, 125 ktime_get_boot_ns: the issue lists clock reads as filter needs; they
 * reveal no more than the host's uptime) and randomness (7). Left out on purpose:
 * get_smp_processor_id (8, host CPU topology, and meaningless for a program the backend
 * runs through BPF_PROG_TEST_RUN), map_lookup_percpu_elem (per-CPU maps are refused),
 * bpf_loop/for_each_map_elem/timers (callbacks; not needed by a filter).
 */
export const DEFAULT_ALLOWED_HELPERS: readonly number[] = [1, 2, 3, 5, 7, 28, 44, 54, 65, 125, 188, 189, 190];

/**
 * Helpers no device may allow, whatever its configuration: they print into or read the
 * host (trace, perf, probe_read*, current task/cgroup, kernel symbols), leave the device
 * (redirects, tail calls into programs the guest cannot own), or run the bpf syscall.
 */
export const NEVER_ALLOWED_HELPERS: ReadonlyMap<number, string> = new Map([
  [4, 'reads host memory'], [45, 'reads host memory'], [112, 'reads host memory'], [113, 'reads host memory'],
  [114, 'reads host memory'], [115, 'reads host memory'], [148, 'reads host memory'], [191, 'reads host memory'],
  [36, 'writes host memory'],
  [6, 'prints into the host trace buffer'], [177, 'prints into the host trace buffer'],
  [25, 'writes to host perf buffers'], [121, 'writes to host perf buffers'], [22, 'reads host perf counters'],
  [55, 'reads host perf counters'],
  [14, 'reads the current host task'], [15, 'reads the current host task'], [16, 'reads the current host task'],
  [35, 'reads the current host task'], [158, 'reads the current host task'], [120, 'reads the current host task'],
  [80, 'reads host cgroups'], [123, 'reads host cgroups'], [122, 'reads host namespaces'],
  [12, 'jumps to another program'], [23, 'redirects out of the device'], [51, 'redirects out of the device'],
  [152, 'redirects out of the device'], [155, 'redirects out of the device'],
  [69, 'reads the host routing table'], [166, 'runs the bpf syscall'], [168, 'closes host fds'],
  [179, 'reads host kernel symbols'], [109, 'signals host tasks'], [117, 'signals host tasks'],
  [153, 'reads host per-CPU data'], [154, 'reads host per-CPU data'], [42, 'reads host NUMA topology'],
]);

/** Throws OffloadConfigError when an operator-supplied allow-list names a non-helper or a never-allowed helper. */
export function validateAllowList(ids: readonly number[]): Set<number> {
  const out = new Set<number>();
  for (const id of ids) {
    if (!Number.isInteger(id) || id <= 0 || id > 0xffff) throw new OffloadConfigError('not-a-helper', `helper id ${id} is not a helper`, String(id));
    const why = NEVER_ALLOWED_HELPERS.get(id);
    if (why) throw new OffloadConfigError('helper-never-allowed', `helper ${helperName(id)} (${id}) can never be allowed: it ${why}`, String(id));
    out.add(id);
  }
  return out;
}

// The list include/linux/license.h accepts; the kernel calls these "GPL compatible".
const GPL_COMPATIBLE = new Set([
  'GPL', 'GPL v2', 'GPL and additional rights', 'Dual BSD/GPL', 'Dual MIT/GPL', 'Dual MPL/GPL',
]);
export function isGplCompatible(license: string): boolean {
  return GPL_COMPATIBLE.has(license);
}

// ---------------------------------------------------------------------------------------
// Decode: syntax only

export interface DecodedProgram {
  insns: Uint8Array;
  count: number;
  /** call src_reg 0 */
  helperCalls: { index: number; helper: number }[];
  /** call src_reg 1 (bpf-to-bpf): the kernel verifies these. */
  subprogCalls: number[];
  /** call src_reg 2 */
  kfuncCalls: number[];
  /** call with any other src_reg */
  oddCalls: { index: number; src: number }[];
  /** ld_imm64 src_reg 1 (imm = handle) or 2 (imm = handle, second imm = offset) */
  mapRefs: { index: number; src: number; handle: number; offset: number }[];
  /** ld_imm64 with src_reg 3..6 or anything not 0/1/2 */
  pseudoLoads: { index: number; src: number }[];
}

/**
 * Reads the instruction stream for the things policy looks at. Refuses (BAD_REQUEST) only
 * what cannot be read as a program: a length that is not a non-zero multiple of 8 and a
 * malformed ld_imm64 pair. Everything else is the verifier's to judge.
 */
export function decodeProgram(insns: Uint8Array): DecodedProgram {
  const count = insnCount(insns);
  if (count === null) {
    throw new ProtocolError(Status.BAD_REQUEST, 'bad-program-length', `program is ${insns.byteLength} bytes, not a non-zero multiple of 8`);
  }
  const p: DecodedProgram = {
    insns, count, helperCalls: [], subprogCalls: [], kfuncCalls: [], oddCalls: [], mapRefs: [], pseudoLoads: [],
  };
  for (let i = 0; i < count; i++) {
    const ins = decodeInsn(insns, i);
    if (ins.code === Op.CALL) {
      if (ins.src === PseudoCall.HELPER) p.helperCalls.push({ index: i, helper: ins.imm });
      else if (ins.src === PseudoCall.CALL) p.subprogCalls.push(i);
      else if (ins.src === PseudoCall.KFUNC_CALL) p.kfuncCalls.push(i);
      else p.oddCalls.push({ index: i, src: ins.src });
    } else if (ins.code === Op.LD_IMM64) {
      if (i + 1 >= count) {
        throw new ProtocolError(Status.BAD_REQUEST, 'truncated-ld-imm64', `instruction ${i}: ld_imm64 has no second half`, { a: i });
      }
      const hi = decodeInsn(insns, i + 1);
      if (!isLdImm64SecondHalf(hi)) {
        throw new ProtocolError(Status.BAD_REQUEST, 'bad-ld-imm64', `instruction ${i + 1}: malformed second half of ld_imm64`, { a: i + 1 });
      }
      if (ins.src === Pseudo.MAP_FD || ins.src === Pseudo.MAP_VALUE) {
        p.mapRefs.push({ index: i, src: ins.src, handle: ins.imm >>> 0, offset: hi.imm >>> 0 });
      } else if (ins.src !== 0) {
        p.pseudoLoads.push({ index: i, src: ins.src });
      }
      i++;
    }
  }
  return p;
}

// ---------------------------------------------------------------------------------------
// Judge: policy

export interface ProgramPolicy {
  maxInsns: number;
  allowedHelpers: ReadonlySet<number>;
  /** True when handle names a live map of this device. */
  handleExists: (handle: number) => boolean;
}

export interface JudgedProgram {
  decoded: DecodedProgram;
  license: string;
  /** Distinct handles the instructions reference, ascending. */
  usedHandles: number[];
}


/**
 * Applies the device policy; throws ProtocolError naming the first violation. Order: size
 * (cheapest, and a too-large program is not worth reading), license, the declared handle
 * table, then each instruction in program order so the guest hears about the earliest one.
 */
export function judgeProgram(p: DecodedProgram, license: string, declaredHandles: readonly number[],
  policy: ProgramPolicy): JudgedProgram {
  if (p.count > policy.maxInsns) {
    refuse(Status.QUOTA_EXCEEDED, 'quota-exceeded', `program has ${p.count} instructions, over this device's max-prog-insns quota of ${policy.maxInsns}`,
      { a: QuotaId.MAX_PROG_INSNS, b: p.count, c: policy.maxInsns });
  }
  if (!isGplCompatible(license)) {
    refuse(Status.LICENSE_REFUSED, 'license-refused',
      `license '${license.slice(0, 64)}' is not GPL-compatible (accepted: ${[...GPL_COMPATIBLE].join(', ')})`);
  }
  const declared = new Set<number>();
  for (const h of declaredHandles) {
    if (declared.has(h)) refuse(Status.BAD_REQUEST, 'duplicate-map-handle', `map handle ${h} is declared twice`, { a: h });
    if (!policy.handleExists(h)) {
      refuse(Status.BAD_MAP_HANDLE, 'bad-map-handle', `map handle ${h} is not a map of this device`, { a: h, b: NO_INSN });
    }
    declared.add(h);
  }

  const items = instructionChecks(p, { allowedHelpers: policy.allowedHelpers, tailCalls: false });
  const used = new Set<number>();
  for (const m of p.mapRefs) {
    items.push({ index: m.index, check: () => {
      if (!declared.has(m.handle)) {
        const live = policy.handleExists(m.handle);
        refuse(Status.BAD_MAP_HANDLE, live ? 'map-not-declared' : 'bad-map-handle', live
          ? `instruction ${m.index}: map handle ${m.handle} is not in the program's map table`
          : `instruction ${m.index}: map handle ${m.handle} is not a map of this device`, { a: m.handle, b: m.index });
      }
      used.add(m.handle);
    } });
  }
  runInOrder(items);
  return { decoded: p, license, usedHandles: [...used].sort((a, b) => a - b) };
}

/** One check tied to the instruction it is about, so refusals come in program order. */
export type InsnCheck = { index: number; check: () => void };

export function runInOrder(items: InsnCheck[]): void {
  items.sort((x, y) => x.index - y.index);
  for (const it of items) it.check();
}

/**
 * The per-instruction policy both paths share: helpers against the allow-list (bpf_tail_call
 * only where `tailCalls` says: the object path, into the object's own PROG_ARRAY), no kfuncs,
 * no odd call forms, no BTF ksym loads or other pseudo loads. `where` prefixes instruction
 * numbers (the object path names the program).
 */
export function instructionChecks(p: DecodedProgram, o: { allowedHelpers: ReadonlySet<number>; tailCalls: boolean; where?: string }): InsnCheck[] {
  const at = (i: number) => `${o.where ? `${o.where} ` : ''}instruction ${i}`;
  const items: InsnCheck[] = [];
  for (const c of p.helperCalls) {
    items.push({ index: c.index, check: () => {
      const name = helperName(c.helper);
      if (c.helper === Helper.TAIL_CALL) {
        if (o.tailCalls) return;
        refuse(Status.TAIL_CALL_REFUSED, 'tail-call-refused', `${at(c.index)}: tail calls (${name}, ${Helper.TAIL_CALL}) are not allowed on this device`,
          { a: c.index, b: Helper.TAIL_CALL });
      }
      if (!o.allowedHelpers.has(c.helper)) {
        const why = NEVER_ALLOWED_HELPERS.get(c.helper);
        refuse(Status.HELPER_NOT_ALLOWED, 'helper-not-allowed',
          `helper ${name} (${c.helper}) is not allowed on this device${why ? ` (it ${why})` : ''}; ${at(c.index)}`,
          { a: c.helper >>> 0, b: c.index });
      }
    } });
  }
  for (const i of p.kfuncCalls) {
    items.push({ index: i, check: () => refuse(Status.KFUNC_REFUSED, 'kfunc-refused', `${at(i)}: kfunc calls (BPF_PSEUDO_KFUNC_CALL) are not allowed on this device`, { a: i }) });
  }
  for (const c of p.oddCalls) {
    items.push({ index: c.index, check: () => refuse(Status.INSN_REFUSED, 'bad-call', `${at(c.index)}: call with src_reg ${c.src} is not a helper, subprogram or kfunc call`, { a: c.index }) });
  }
  for (const l of p.pseudoLoads) {
    items.push({ index: l.index, check: () => {
      if (l.src === Pseudo.BTF_ID) {
        refuse(Status.KSYM_REFUSED, 'ksym-refused', `${at(l.index)}: BTF ksym loads (ld_imm64 src_reg 3, BPF_PSEUDO_BTF_ID) are not allowed on this device`, { a: l.index });
      }
      const what = l.src === Pseudo.FUNC ? 'callback function pointers (BPF_PSEUDO_FUNC)'
        : l.src === Pseudo.MAP_IDX || l.src === Pseudo.MAP_IDX_VALUE ? 'fd_array map references (BPF_PSEUDO_MAP_IDX*); use handles'
          : `ld_imm64 src_reg ${l.src}`;
      refuse(Status.INSN_REFUSED, l.src === Pseudo.FUNC ? 'callback-refused' : 'pseudo-load-refused', `${at(l.index)}: ${what} are not supported`, { a: l.index });
    } });
  }
  return items;
}

/** A copy of the instructions with each map reference's imm = that handle's host map fd. */
export function rewriteMapRefs(j: JudgedProgram, fdOf: (handle: number) => number): Uint8Array {
  const out = j.decoded.insns.slice();
  for (const m of j.decoded.mapRefs) setInsnImm(out, m.index, fdOf(m.handle));
  return out;
}

/** decode + judge without throwing, for callers that want a result (tests, dry runs). */
export function checkProgram(insns: Uint8Array, license: string, declaredHandles: readonly number[], policy: ProgramPolicy):
  { ok: true; program: JudgedProgram } | { ok: false; error: ProtocolError } {
  try {
    return { ok: true, program: judgeProgram(decodeProgram(insns), license, declaredHandles, policy) };
  } catch (e) {
    if (e instanceof ProtocolError) return { ok: false, error: e };
    throw e;
  }
}
