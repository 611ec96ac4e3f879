import { describe, it, expect, beforeAll, afterAll } from 'vitest';
import { execFileSync } from 'node:child_process';
import { mkdtempSync, readFileSync, rmSync, rmdirSync, unlinkSync, existsSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { Worker } from 'node:worker_threads';
import koffi from 'koffi';
import { BpfError } from '../../src/sys/bpf/libbpf.js';
import { BpfMap, BpfMapType, BPF_ANY, BPF_NOEXIST, BPF_EXIST, mapGetFdById } from '../../src/sys/bpf/maps.js';
import { progLoad, progLoadWithLog, progGetFdById, closeBpfFd, BpfProgType } from '../../src/sys/bpf/programs.js';
import { BPF_PSEUDO_MAP_FD, encodeInsns, type BpfInsn } from '../../src/sys/bpf/insns.js';
import { TestRunner } from '../../src/sys/bpf/test-run.js';
import { xdpAttach, xdpDetach, xdpQuery, XDP_DROP, XDP_PASS, XDP_TX, XDP_FLAGS_DRV_MODE, XDP_FLAGS_SKB_MODE, XDP_FLAGS_REPLACE, XDP_FLAGS_UPDATE_IF_NOEXIST, XDP_ATTACHED_DRV, XDP_ATTACHED_NONE } from '../../src/sys/bpf/xdp.js';
import { objPin, objGet } from '../../src/sys/bpf/pins.js';
import { progInfo, mapInfo, listProgIds, listMapIds, countKernelObjects } from '../../src/sys/bpf/info.js';
import { NativeBuffer } from '../../src/sys/libc.js';

const ROOT = fileURLToPath(new URL('../..', import.meta.url));

// --- instruction helpers (test-local; the broker composes its own) -------------------------
const mov64Imm = (dst: number, imm: number): BpfInsn => ({ code: 0xb7, dst, imm });
const mov64Reg = (dst: number, src: number): BpfInsn => ({ code: 0xbf, dst, src });
const add64Imm = (dst: number, imm: number): BpfInsn => ({ code: 0x07, dst, imm });
const stxW = (dst: number, src: number, off: number): BpfInsn => ({ code: 0x63, dst, src, off });
const stxB = (dst: number, src: number, off: number): BpfInsn => ({ code: 0x73, dst, src, off });
const ldxW = (dst: number, src: number, off: number): BpfInsn => ({ code: 0x61, dst, src, off });
const atomicAddDw = (dst: number, src: number, off: number): BpfInsn => ({ code: 0xdb, dst, src, off });
const jeqImm = (dst: number, imm: number, off: number): BpfInsn => ({ code: 0x15, dst, imm, off });
const jgtReg = (dst: number, src: number, off: number): BpfInsn => ({ code: 0x2d, dst, src, off });
const call = (helper: number): BpfInsn => ({ code: 0x85, imm: helper });
const exit = (): BpfInsn => ({ code: 0x95 });
const ldMapFd = (dst: number, fd: number): BpfInsn[] => [
  { code: 0x18, dst, src: BPF_PSEUDO_MAP_FD, imm: fd }, { code: 0 },
];

/** Counts every run in map[0] (u64), then returns verdict. */
function countingProg(mapFd: number, verdict: number): Uint8Array {
  return encodeInsns([
    mov64Imm(1, 0), stxW(10, 1, -4), mov64Reg(2, 10), add64Imm(2, -4),
    ...ldMapFd(1, mapFd), call(1 /* map_lookup_elem */), jeqImm(0, 0, 2),
    mov64Imm(1, 1), atomicAddDw(0, 1, 0),
    mov64Imm(0, verdict), exit(),
  ]);
}

/** Overwrites the first byte with 0xff when the frame has an Ethernet header; returns TX. */
const rewriteProg = encodeInsns([
  ldxW(2, 1, 0), ldxW(3, 1, 4), mov64Reg(4, 2), add64Imm(4, 14), jgtReg(4, 3, 4),
  mov64Imm(5, 0xff), stxB(2, 5, 0), mov64Imm(0, XDP_TX), exit(),
  mov64Imm(0, XDP_PASS), exit(),
]);

const u32 = (n: number) => { const b = new Uint8Array(4); new DataView(b.buffer).setUint32(0, n, true); return b; };
const u64 = (n: number) => { const b = new Uint8Array(8); new DataView(b.buffer).setBigUint64(0, BigInt(n), true); return b; };
const readU64 = (b: Uint8Array | null) => Number(new DataView(b!.buffer, b!.byteOffset).getBigUint64(0, true));

// Every kernel object this file creates is recorded by id so the leak check can prove each
// one is gone, whatever other processes on the machine load meanwhile.
const createdProgIds = new Set<number>();
const createdMapIds = new Set<number>();
const openFds = new Set<number>();
const openMaps = new Set<BpfMap>();

function newMap(type: number, k: number, v: number, n: number, name?: string): BpfMap {
  const m = BpfMap.create(type, k, v, n, name ? { name } : {});
  openMaps.add(m);
  createdMapIds.add(mapInfo(m.fd).id);
  return m;
}
function closeMap(m: BpfMap): void { m.close(); openMaps.delete(m); }
function load(insns: Uint8Array, name = 'vx_test'): number {
  const fd = progLoad(insns, { license: 'GPL', name });
  openFds.add(fd);
  createdProgIds.add(progInfo(fd).id);
  return fd;
}
function closeProg(fd: number): void { closeBpfFd(fd); openFds.delete(fd); }

let countsBefore: { progs: number; maps: number };
beforeAll(() => { countsBefore = countKernelObjects(); });
afterAll(() => {
  for (const m of openMaps) m.close();
  for (const fd of openFds) closeBpfFd(fd);
});

describe('map element operations', () => {
  it('ARRAY: update/lookup round-trip, NOEXIST is EEXIST, delete is EINVAL, keys walk in order', () => {
    const m = newMap(BpfMapType.ARRAY, 4, 8, 4, 'vx_arr');
    try {
      expect(readU64(m.lookup(u32(2)))).toBe(0); // arrays are zero-filled and never absent
      m.update(u32(2), u64(1234));
      expect(readU64(m.lookup(u32(2)))).toBe(1234);
      expect(() => m.update(u32(2), u64(1), BPF_NOEXIST)).toThrow(expect.objectContaining({ code: 'EEXIST' }));
      m.update(u32(2), u64(7), BPF_EXIST);
      expect(readU64(m.lookup(u32(2)))).toBe(7);
      expect(m.lookup(u32(4))).toBeNull(); // past max_entries reads as absent
      expect(() => m.delete(u32(1))).toThrow(expect.objectContaining({ code: 'EINVAL', errno: 22 }));
      const keys = [...m.keys()].map((k) => new DataView(k.buffer).getUint32(0, true));
      expect(keys).toEqual([0, 1, 2, 3]);
      expect(m.nextKey(u32(3))).toBeNull();
    } finally { closeMap(m); }
  });

  it('HASH: NOEXIST/EXIST/ANY semantics, delete of an absent key reports false, get_next_key visits all', () => {
    const m = newMap(BpfMapType.HASH, 4, 8, 16, 'vx_hash');
    try {
      expect(m.lookup(u32(9))).toBeNull();
      expect(() => m.update(u32(9), u64(1), BPF_EXIST)).toThrow(expect.objectContaining({ code: 'ENOENT' }));
      m.update(u32(9), u64(1), BPF_NOEXIST);
      expect(() => m.update(u32(9), u64(2), BPF_NOEXIST)).toThrow(BpfError);
      m.update(u32(9), u64(3), BPF_ANY);
      expect(readU64(m.lookup(u32(9)))).toBe(3);
      for (let i = 0; i < 5; i++) m.update(u32(100 + i), u64(i));
      const seen = new Set([...m.keys()].map((k) => new DataView(k.buffer).getUint32(0, true)));
      expect(seen).toEqual(new Set([9, 100, 101, 102, 103, 104]));
      expect(m.delete(u32(9))).toBe(true);
      expect(m.delete(u32(9))).toBe(false);
      const out = new Uint8Array(8);
      expect(m.lookup(u32(100), out)).toBe(out);
      // A full map refuses new keys with E2BIG.
      for (let i = 0; i < 11; i++) m.update(u32(200 + i), u64(i));
      expect(() => m.update(u32(999), u64(0))).toThrow(expect.objectContaining({ code: 'E2BIG' }));
    } finally { closeMap(m); }
  });

  it('buffers of the wrong size are refused before the kernel can overrun them', () => {
    const m = newMap(BpfMapType.HASH, 4, 8, 4);
    try {
      expect(() => m.lookup(new Uint8Array(2))).toThrow(expect.objectContaining({ code: 'bad-key-size' }));
      expect(() => m.lookup(u32(1), new Uint8Array(4))).toThrow(expect.objectContaining({ code: 'bad-value-size' }));
      expect(() => m.update(u32(1), new Uint8Array(9))).toThrow(expect.objectContaining({ code: 'bad-value-size' }));
      expect(() => m.lookupBatch(null, new Uint8Array(4), new Uint8Array(16), 2)).toThrow(expect.objectContaining({ code: 'short-keys-buffer' }));
      expect(() => m.updateBatch(new Uint8Array(8), new Uint8Array(8), 2)).toThrow(expect.objectContaining({ code: 'short-values-buffer' }));
    } finally { closeMap(m); }
  });

  it('batch update/lookup/delete move many HASH elements per call; ARRAY lookup_batch pages with a cursor', () => {
    const n = 64;
    const m = newMap(BpfMapType.HASH, 4, 8, 128, 'vx_batch');
    const a = newMap(BpfMapType.ARRAY, 4, 8, 10, 'vx_abatch');
    try {
      const keys = new Uint8Array(n * 4);
      const vals = new Uint8Array(n * 8);
      const kv = new DataView(keys.buffer);
      const vv = new DataView(vals.buffer);
      for (let i = 0; i < n; i++) { kv.setUint32(i * 4, 1000 + i, true); vv.setBigUint64(i * 8, BigInt(i * 3), true); }
      expect(m.updateBatch(keys, vals, n)).toBe(n);
      expect(readU64(m.lookup(u32(1010)))).toBe(30);

      const outK = new Uint8Array(n * 4);
      const outV = new Uint8Array(n * 8);
      const got = new Map<number, number>();
      let cursor: Uint8Array | null = null;
      for (let pages = 0; pages < 100; pages++) {
        const chunkK = outK.subarray(0, 16 * 4);
        const chunkV = outV.subarray(0, 16 * 8);
        const r: { count: number; next: Uint8Array | null } = m.lookupBatch(cursor, chunkK, chunkV, 16);
        for (let i = 0; i < r.count; i++) {
          got.set(new DataView(chunkK.buffer).getUint32(i * 4, true), Number(new DataView(chunkV.buffer).getBigUint64(i * 8, true)));
        }
        if (!r.next) break;
        cursor = r.next;
      }
      expect(got.size).toBe(n);
      expect(got.get(1063)).toBe(189);

      expect(m.deleteBatch(keys, n / 2)).toBe(n / 2);
      expect(m.lookup(u32(1000))).toBeNull();
      expect(readU64(m.lookup(u32(1000 + n / 2)))).toBe((n / 2) * 3);
      expect(() => m.deleteBatch(keys, 1)).toThrow(expect.objectContaining({ code: 'ENOENT' }));

      const ak = new Uint8Array(10 * 4);
      const av = new Uint8Array(10 * 8);
      for (let i = 0; i < 10; i++) { new DataView(ak.buffer).setUint32(i * 4, i, true); new DataView(av.buffer).setBigUint64(i * 8, BigInt(i + 1), true); }
      expect(a.updateBatch(ak, av, 10)).toBe(10);
      const first = a.lookupBatch(null, new Uint8Array(6 * 4), new Uint8Array(6 * 8), 6);
      expect(first.count).toBe(6);
      expect(first.next).not.toBeNull();
      const rest = a.lookupBatch(first.next, new Uint8Array(6 * 4), new Uint8Array(6 * 8), 6);
      expect(rest.count).toBe(4);
      expect(rest.next).toBeNull();
    } finally { closeMap(m); closeMap(a); }
  });

  it('map info reports the geometry the map was created with', () => {
    const m = newMap(BpfMapType.HASH, 4, 16, 33, 'vx_info');
    try {
      const i = mapInfo(m.fd);
      expect(i).toMatchObject({ type: BpfMapType.HASH, keySize: 4, valueSize: 16, maxEntries: 33, name: 'vx_info' });
      expect(i.id).toBeGreaterThan(0);
      const again = mapGetFdById(i.id);
      try {
        const m2 = BpfMap.fromFd(again);
        expect(m2.maxEntries).toBe(33);
      } finally { closeBpfFd(again); }
    } finally { closeMap(m); }
  });
});

describe('program load and test run', () => {
  it('a raw "r0 = XDP_DROP; exit" program loads and test-runs to XDP_DROP with the frame unchanged', () => {
    const fd = load(encodeInsns([mov64Imm(0, XDP_DROP), exit()]), 'vx_drop');
    const tr = new TestRunner(fd);
    try {
      const frame = new Uint8Array(64).map((_, i) => i);
      const r = tr.runBytes(frame);
      expect(r.retval).toBe(XDP_DROP);
      expect(r.data).toEqual(frame);
      const info = progInfo(fd);
      expect(info.type).toBe(BpfProgType.XDP);
      expect(info.name).toBe('vx_drop');
      expect(info.tag).toMatch(/^[0-9a-f]{16}$/);
      expect(info.gplCompatible).toBe(true);
      expect(info.xlatedProgLen).toBe(16);
    } finally { tr.dispose(); closeProg(fd); }
  });

  it('a BPF_PSEUDO_MAP_FD ld_imm64 binds the map: each test run increments it, prog info lists the map', () => {
    const m = newMap(BpfMapType.ARRAY, 4, 8, 1, 'vx_cnt');
    const fd = load(countingProg(m.fd, XDP_PASS), 'vx_count');
    const tr = new TestRunner(fd);
    try {
      expect(tr.runBytes(new Uint8Array(64)).retval).toBe(XDP_PASS);
      expect(tr.runBytes(new Uint8Array(64), { repeat: 10 }).retval).toBe(XDP_PASS);
      expect(readU64(m.lookup(u32(0)))).toBe(11);
      expect(progInfo(fd).mapIds).toEqual([mapInfo(m.fd).id]);
    } finally { tr.dispose(); closeProg(fd); closeMap(m); }
  });

  it('a rejected program throws BpfError with errno and the verifier log; the log is bounded', () => {
    // exit without setting r0: the verifier says R0 !read_ok.
    const bad = encodeInsns([exit()]);
    let err: unknown;
    try { progLoad(bad, { license: 'GPL', name: 'vx_bad' }); } catch (e) { err = e; }
    expect(err).toBeInstanceOf(BpfError);
    const be = err as BpfError;
    expect(be.code).toBe('EACCES');
    expect(be.verifierLog).toMatch(/R0 !read_ok/);

    // A long log kept to 256 bytes still names the error (kernels >= 6.4 keep the tail).
    const longBad = encodeInsns([...Array.from({ length: 200 }, () => mov64Imm(1, 1)), exit()]);
    let e2: BpfError | undefined;
    try { progLoadWithLog(longBad, { license: 'GPL', logSize: 256 }); } catch (e) { e2 = e as BpfError; }
    expect(e2).toBeInstanceOf(BpfError);
    expect(e2!.verifierLog!.length).toBeGreaterThan(0);
    expect(e2!.verifierLog!.length).toBeLessThan(256);

    expect(() => progLoad(new Uint8Array(12), { license: 'GPL' })).toThrow(expect.objectContaining({ code: 'bad-insns-length' }));
    expect(() => progLoad(encodeInsns([exit()]), { license: 'GPL', name: 'bad name!' })).toThrow(expect.objectContaining({ code: 'bad-object-name' }));
  });

  it('progLoadWithLog with logLevel 1 returns the log of a successful load', () => {
    const r = progLoadWithLog(encodeInsns([mov64Imm(0, XDP_PASS), exit()]), { license: 'GPL', logLevel: 1 });
    openFds.add(r.fd);
    createdProgIds.add(progInfo(r.fd).id);
    expect(r.log).toMatch(/processed 2 insns/);
    closeProg(r.fd);
  });

  it('the native-address test run rewrites a frame in place in native memory and reports its length', () => {
    const fd = load(rewriteProg, 'vx_rewrite');
    const tr = new TestRunner(fd);
    const mem = new NativeBuffer(4096);
    try {
      mem.bytes.fill(0x11, 0, 64);
      expect(tr.run(mem.address, 64, mem.address, 64)).toBe(XDP_TX);
      expect(tr.outLength).toBe(64);
      expect(mem.bytes[0]).toBe(0xff);
      expect(mem.bytes[1]).toBe(0x11);
      // Output to a separate region leaves the input alone.
      mem.bytes[0] = 0x22;
      expect(tr.run(mem.address, 64, mem.address + 1024, 128)).toBe(XDP_TX);
      expect(mem.bytes[0]).toBe(0x22);
      expect(mem.bytes[1024]).toBe(0xff);
      // Runt frames are refused by the kernel, not silently passed.
      expect(() => tr.run(mem.address, 8, mem.address, 64)).toThrow(BpfError);
    } finally { mem.free(); tr.dispose(); closeProg(fd); }
  });

  it('fast test run on a 64-byte frame costs a bounded number of ns per call', () => {
    const m = newMap(BpfMapType.ARRAY, 4, 8, 1);
    const fd = load(countingProg(m.fd, XDP_DROP), 'vx_bench');
    const tr = new TestRunner(fd);
    const mem = new NativeBuffer(4096);
    try {
      const n = 50_000;
      for (let i = 0; i < 2000; i++) tr.run(mem.address, 64, mem.address, 64);
      const t0 = process.hrtime.bigint();
      for (let i = 0; i < n; i++) tr.run(mem.address, 64, mem.address, 64);
      const ns = Number(process.hrtime.bigint() - t0) / n;
      console.log(`bpf_prog_test_run_opts via TestRunner.run, 64-byte frame: ${ns.toFixed(0)} ns/call`);
      expect(readU64(m.lookup(u32(0)))).toBe(n + 2000);
      expect(ns).toBeLessThan(20_000);
    } finally { mem.free(); tr.dispose(); closeProg(fd); closeMap(m); }
  });
});

// --- pinning ------------------------------------------------------------------------------
function bpffsAt(path: string): boolean {
  return readFileSync('/proc/mounts', 'utf8').split('\n').some((l) => l.split(' ')[1] === path && l.split(' ')[2] === 'bpf');
}

describe('pinning', () => {
  let dir = '';
  let mountedHere = false;
  beforeAll(() => {
    // Use /sys/fs/bpf when it is bpffs; otherwise mount a private bpffs instance on a temp
    // dir, so other users of /sys/fs/bpf on this machine are never disturbed.
    if (bpffsAt('/sys/fs/bpf')) {
      dir = mkdtempSync('/sys/fs/bpf/vx-test-');
    } else {
      dir = mkdtempSync(join(tmpdir(), 'vx-bpffs-'));
      execFileSync('mount', ['-t', 'bpf', 'bpf', dir]);
      mountedHere = true;
    }
  });
  afterAll(() => {
    if (!dir) return;
    if (mountedHere) {
      try { execFileSync('umount', [dir]); } finally { rmdirSync(dir); }
    } else {
      rmSync(dir, { recursive: true, force: true });
    }
  });

  it('a pinned map and program outlive their fds and objGet returns the same objects', () => {
    const m = newMap(BpfMapType.HASH, 4, 8, 8, 'vx_pin');
    const fd = load(countingProg(m.fd, XDP_DROP), 'vx_pinprog');
    const mapPath = join(dir, 'map');
    const progPath = join(dir, 'prog');
    const mapId = mapInfo(m.fd).id;
    const progId = progInfo(fd).id;
    try {
      m.update(u32(5), u64(55));
      objPin(m.fd, mapPath);
      objPin(fd, progPath);
      closeMap(m);
      closeProg(fd);
      expect(() => objPin(0, join(dir, 'nope'))).toThrow(BpfError);
      const m2 = BpfMap.fromFd(objGet(mapPath));
      openMaps.add(m2);
      const p2 = objGet(progPath);
      openFds.add(p2);
      expect(mapInfo(m2.fd).id).toBe(mapId);
      expect(progInfo(p2).id).toBe(progId);
      expect(readU64(m2.lookup(u32(5)))).toBe(55);
      closeMap(m2);
      closeProg(p2);
      expect(() => objGet(join(dir, 'missing'))).toThrow(expect.objectContaining({ code: 'ENOENT' }));
    } finally {
      for (const p of [mapPath, progPath]) if (existsSync(p)) unlinkSync(p);
    }
  });
});

// --- XDP attach on a veth pair inside a namespace of our own ------------------------------
const libc = koffi.load('libc.so.6');
const setns = libc.func('setns', 'int', ['int', 'int']);
const openFile = libc.func('open', 'int', ['str', 'int']);
const closeFile = libc.func('close', 'int', ['int']);
const CLONE_NEWNET = 0x40000000;

/** Runs fn with this thread (the one making the libbpf calls) inside netns `ns`. */
function inNetns<T>(ns: string, fn: () => T): T {
  const self = openFile('/proc/self/ns/net', 0);
  const target = openFile(`/run/netns/${ns}`, 0);
  if (self < 0 || target < 0) throw new Error('cannot open netns files');
  try {
    if (setns(target, CLONE_NEWNET) !== 0) throw new Error(`setns ${ns} failed`);
    try { return fn(); } finally {
      if (setns(self, CLONE_NEWNET) !== 0) throw new Error('setns back failed');
    }
  } finally { closeFile(self); closeFile(target); }
}

describe('XDP attach', () => {
  // Two namespaces of our own joined by a veth pair: va in nsA sends, vb in nsB carries XDP.
  const nsA = `vxbpfa${process.pid}`;
  const nsB = `vxbpfb${process.pid}`;
  const ipIn = (ns: string, ...a: string[]) => execFileSync('ip', ['-n', ns, ...a], { stdio: 'pipe' }).toString();
  const ping = (count: number) => execFileSync('ip',
    ['netns', 'exec', nsA, 'ping', '-c', String(count), '-i', '0.2', '-W', '1', '10.77.0.2'], { stdio: 'pipe' });
  const ifindexIn = (ns: string, dev: string) => Number(ipIn(ns, '-j', 'link', 'show', dev).match(/"ifindex":(\d+)/)![1]);
  beforeAll(() => {
    execFileSync('ip', ['netns', 'add', nsA]);
    execFileSync('ip', ['netns', 'add', nsB]);
    ipIn(nsA, 'link', 'add', 'va', 'type', 'veth', 'peer', 'name', 'vb', 'netns', nsB);
    ipIn(nsA, 'addr', 'add', '10.77.0.1/24', 'dev', 'va');
    ipIn(nsB, 'addr', 'add', '10.77.0.2/24', 'dev', 'vb');
    ipIn(nsA, 'link', 'set', 'va', 'up');
    ipIn(nsB, 'link', 'set', 'vb', 'up');
  });
  afterAll(() => {
    for (const ns of [nsA, nsB]) {
      try { execFileSync('ip', ['netns', 'del', ns], { stdio: 'pipe' }); } catch { /* not created */ }
    }
  });

  it('attach/query/replace/detach by ifindex; a native XDP_DROP program drops veth traffic and counts it', () => {
    const m = newMap(BpfMapType.ARRAY, 4, 8, 1, 'vx_xdpcnt');
    const dropFd = load(countingProg(m.fd, XDP_DROP), 'vx_xdpdrop');
    const passFd = load(encodeInsns([mov64Imm(0, XDP_PASS), exit()]), 'vx_xdppass');
    const dropId = progInfo(dropFd).id;
    const passId = progInfo(passFd).id;
    try {
      ping(1); // the path works before any program is attached
      const vb = ifindexIn(nsB, 'vb');
      inNetns(nsB, () => {
        expect(xdpQuery(vb).attachMode).toBe(XDP_ATTACHED_NONE);
        xdpAttach(vb, dropFd, XDP_FLAGS_DRV_MODE);
        const q = xdpQuery(vb);
        expect(q.attachMode).toBe(XDP_ATTACHED_DRV);
        expect(q.drvProgId).toBe(dropId);
        expect(q.progId).toBe(dropId);
        expect(() => xdpAttach(vb, passFd, XDP_FLAGS_DRV_MODE | XDP_FLAGS_UPDATE_IF_NOEXIST)).toThrow(expect.objectContaining({ code: 'EBUSY' }));
        expect(() => xdpAttach(vb, passFd, XDP_FLAGS_DRV_MODE | XDP_FLAGS_REPLACE, passFd)).toThrow(expect.objectContaining({ code: 'EEXIST' }));
      });
      expect(() => ping(3)).toThrow();
      expect(readU64(m.lookup(u32(0)))).toBeGreaterThanOrEqual(3);
      inNetns(nsB, () => {
        xdpAttach(vb, passFd, XDP_FLAGS_DRV_MODE | XDP_FLAGS_REPLACE, dropFd);
        expect(xdpQuery(vb).drvProgId).toBe(passId);
      });
      ping(1);
      inNetns(nsB, () => {
        xdpDetach(vb, XDP_FLAGS_DRV_MODE);
        expect(xdpQuery(vb).attachMode).toBe(XDP_ATTACHED_NONE);
      });
      // Generic (skb) mode on the other end.
      const va = ifindexIn(nsA, 'va');
      inNetns(nsA, () => {
        xdpAttach(va, passFd, XDP_FLAGS_SKB_MODE);
        expect(xdpQuery(va).skbProgId).toBe(passId);
        xdpDetach(va, XDP_FLAGS_SKB_MODE);
        expect(xdpQuery(va).skbProgId).toBe(0);
      });
    } finally {
      closeProg(dropFd);
      closeProg(passFd);
      closeMap(m);
    }
  });
});

// --- worker threads -----------------------------------------------------------------------
describe('worker threads', () => {
  it('the bindings load and work inside a worker thread', async () => {
    // Node 20 cannot run TypeScript in a worker, so bundle the module with the esbuild that
    // vitest already ships; koffi stays external and resolves from this project.
    const esbuild = await import('esbuild');
    const out = mkdtempSync(join(tmpdir(), 'vx-worker-'));
    try {
      const koffiPath = join(ROOT, 'node_modules/koffi/index.js');
      const src = `
        import { parentPort } from 'node:worker_threads';
        import { BpfMap, BpfMapType } from ${JSON.stringify(join(ROOT, 'src/sys/bpf/maps.ts'))};
        import { progLoad, closeBpfFd } from ${JSON.stringify(join(ROOT, 'src/sys/bpf/programs.ts'))};
        import { TestRunner } from ${JSON.stringify(join(ROOT, 'src/sys/bpf/test-run.ts'))};
        import { progInfo, mapInfo } from ${JSON.stringify(join(ROOT, 'src/sys/bpf/info.ts'))};
        const m = BpfMap.create(BpfMapType.ARRAY, 4, 8, 1);
        const ins = new Uint8Array(16); ins[0] = 0xb7; ins[4] = 1; ins[8] = 0x95;
        const fd = progLoad(ins, { license: 'GPL' });
        const tr = new TestRunner(fd);
        const r = tr.runBytes(new Uint8Array(64)).retval;
        const ids = { prog: progInfo(fd).id, map: mapInfo(m.fd).id };
        tr.dispose(); closeBpfFd(fd); m.close();
        parentPort.postMessage({ r, ids });`;
      await esbuild.build({
        stdin: { contents: src, resolveDir: ROOT, loader: 'ts' },
        bundle: true, platform: 'node', format: 'esm', outfile: join(out, 'w.mjs'), logLevel: 'silent',
        plugins: [{
          name: 'koffi-external',
          setup(build) { build.onResolve({ filter: /^koffi$/ }, () => ({ path: koffiPath, external: true })); },
        }],
      });
      const result = await new Promise<{ r: number; ids: { prog: number; map: number } }>((resolve, reject) => {
        const w = new Worker(join(out, 'w.mjs'));
        w.once('message', resolve);
        w.once('error', reject);
        w.once('exit', (c) => { if (c !== 0) reject(new Error(`worker exit ${c}`)); });
      });
      expect(result.r).toBe(XDP_DROP);
      createdProgIds.add(result.ids.prog);
      createdMapIds.add(result.ids.map);
    } finally { rmSync(out, { recursive: true, force: true }); }
  });
});

describe('leak check', () => {
  it('every program and map this file created is gone from the kernel once its fds are closed', async () => {
    expect(openFds.size).toBe(0);
    expect(openMaps.size).toBe(0);
    // The kernel frees programs and maps after an RCU grace period: poll briefly.
    let leakedProgs: number[] = [];
    let leakedMaps: number[] = [];
    for (let i = 0; i < 50; i++) {
      const progs = new Set(listProgIds());
      const maps = new Set(listMapIds());
      leakedProgs = [...createdProgIds].filter((id) => progs.has(id));
      leakedMaps = [...createdMapIds].filter((id) => maps.has(id));
      if (leakedProgs.length === 0 && leakedMaps.length === 0) break;
      await new Promise((r) => setTimeout(r, 100));
    }
    expect(createdProgIds.size).toBeGreaterThan(5);
    expect(leakedProgs).toEqual([]);
    expect(leakedMaps).toEqual([]);
    for (const id of createdProgIds) expect(() => progGetFdById(id)).toThrow(expect.objectContaining({ code: 'ENOENT' }));
    const after = countKernelObjects();
    console.log(`kernel objects before ${JSON.stringify(countsBefore)} after ${JSON.stringify(after)}`);
  });
});

