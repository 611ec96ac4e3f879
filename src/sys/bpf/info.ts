import { Errno } from '../errors.js';
import { libbpf, fail, scratch, zeroScratch, SCRATCH_U32, SCRATCH_INFO, SCRATCH_IDS } from './libbpf.js';

// What the kernel says about a program or map fd (bpf_obj_get_info_by_fd), and which programs
// and maps exist kernel-wide (for leak checks and adopting objects).

const fn = {
  obj_get_info_by_fd: libbpf.func('bpf_obj_get_info_by_fd', 'int', ['int', 'intptr_t', 'intptr_t']),
  prog_get_next_id: libbpf.func('bpf_prog_get_next_id', 'int', ['uint32', 'intptr_t']),
  map_get_next_id: libbpf.func('bpf_map_get_next_id', 'int', ['uint32', 'intptr_t']),
  enable_stats: libbpf.func('bpf_enable_stats', 'int', ['int']),
};

const MAX_INFO_MAP_IDS = 512;

export interface BpfProgInfo {
  type: number;
  id: number;
  /** Kernel tag (hash of the instructions), 16 hex digits as bpftool shows it. */
  tag: string;
  name: string;
  jitedProgLen: number;
  xlatedProgLen: number;
  /** ns since boot (CLOCK_BOOTTIME) at load. */
  loadTime: bigint;
  createdByUid: number;
  mapIds: number[];
  ifindex: number;
  gplCompatible: boolean;
  /** Counted only while stats are enabled (enableRunTimeStats / kernel.bpf_stats_enabled). */
  runTimeNs: bigint;
  runCnt: bigint;
  recursionMisses: bigint;
  verifiedInsns: number;
}

export interface BpfMapInfo {
  type: number;
  id: number;
  keySize: number;
  valueSize: number;
  maxEntries: number;
  flags: number;
  name: string;
}

const PROG_INFO_SIZE = 232;
const MAP_INFO_SIZE = 88;

function cString(bytes: Uint8Array, offset: number, max: number): string {
  let end = offset;
  while (end < offset + max && bytes[end] !== 0) end++;
  return Buffer.from(bytes.buffer, bytes.byteOffset + offset, end - offset).toString('latin1');
}

function getInfo(fd: number, size: number, what: string): void {
  scratch.view.setUint32(SCRATCH_U32, size, true);
  const r = fn.obj_get_info_by_fd(fd, scratch.address + SCRATCH_INFO, scratch.address + SCRATCH_U32) as number;
  if (r < 0) fail('bpf_obj_get_info_by_fd', r, `${what} fd ${fd}`);
}

export function progInfo(fd: number): BpfProgInfo {
  const v = scratch.view;
  const b = scratch.bytes;
  const I = SCRATCH_INFO;
  zeroScratch(I, PROG_INFO_SIZE);
  // Ask for the map ids in the same call: nr_map_ids@52, map_ids@56 (pointer).
  v.setUint32(I + 52, MAX_INFO_MAP_IDS, true);
  v.setBigUint64(I + 56, BigInt(scratch.address + SCRATCH_IDS), true);
  getInfo(fd, PROG_INFO_SIZE, 'prog');
  const nrMaps = v.getUint32(I + 52, true);
  const mapIds: number[] = [];
  for (let i = 0; i < Math.min(nrMaps, MAX_INFO_MAP_IDS); i++) mapIds.push(v.getUint32(SCRATCH_IDS + 4 * i, true));
  return {
    type: v.getUint32(I + 0, true),
    id: v.getUint32(I + 4, true),
    tag: Buffer.from(b.subarray(I + 8, I + 16)).toString('hex'),
    jitedProgLen: v.getUint32(I + 16, true),
    xlatedProgLen: v.getUint32(I + 20, true),
    loadTime: v.getBigUint64(I + 40, true),
    createdByUid: v.getUint32(I + 48, true),
    mapIds,
    name: cString(b, I + 64, 16),
    ifindex: v.getUint32(I + 80, true),
    gplCompatible: (v.getUint32(I + 84, true) & 1) !== 0,
    runTimeNs: v.getBigUint64(I + 192, true),
    runCnt: v.getBigUint64(I + 200, true),
    recursionMisses: v.getBigUint64(I + 208, true),
    verifiedInsns: v.getUint32(I + 216, true),
  };
}

export function mapInfo(fd: number): BpfMapInfo {
  const v = scratch.view;
  const I = SCRATCH_INFO;
  zeroScratch(I, MAP_INFO_SIZE);
  getInfo(fd, MAP_INFO_SIZE, 'map');
  return {
    type: v.getUint32(I + 0, true),
    id: v.getUint32(I + 4, true),
    keySize: v.getUint32(I + 8, true),
    valueSize: v.getUint32(I + 12, true),
    maxEntries: v.getUint32(I + 16, true),
    flags: v.getUint32(I + 20, true),
    name: cString(scratch.bytes, I + 24, 16),
  };
}

/**
 * Turns on run_cnt/run_time_ns accounting for all programs while the returned fd stays
 * open (BPF_ENABLE_STATS); close it with closeBpfFd to turn accounting back off.
 */
export function enableRunTimeStats(): number {
  const fd = fn.enable_stats(0) as number;
  if (fd < 0) fail('bpf_enable_stats', fd);
  return fd;
}

// Kernel-wide ids

function nextId(f: (start: number, out: number) => unknown, op: string, start: number): number | null {
  const r = f(start, scratch.address + SCRATCH_U32) as number;
  if (r === -Errno.ENOENT) return null;
  if (r < 0) fail(op, r);
  return scratch.view.getUint32(SCRATCH_U32, true);
}

/** The next program id after start (0 = first); null when there is none. */
export function progGetNextId(start: number): number | null {
  return nextId(fn.prog_get_next_id, 'bpf_prog_get_next_id', start);
}

export function mapGetNextId(start: number): number | null {
  return nextId(fn.map_get_next_id, 'bpf_map_get_next_id', start);
}

export function listProgIds(): number[] {
  const ids: number[] = [];
  for (let id = progGetNextId(0); id !== null; id = progGetNextId(id)) ids.push(id);
  return ids;
}

export function listMapIds(): number[] {
  const ids: number[] = [];
  for (let id = mapGetNextId(0); id !== null; id = mapGetNextId(id)) ids.push(id);
  return ids;
}

/**
 * How many programs and maps exist in the whole kernel right now. Other processes load
 * objects too, so leak checks should compare id sets (listProgIds/listMapIds) or counts
 * taken around code that is the only loader.
 */
export function countKernelObjects(): { progs: number; maps: number } {
  return { progs: listProgIds().length, maps: listMapIds().length };
}
