import { describe, it, expect, beforeAll, afterAll } from 'vitest';
import { execFileSync } from 'node:child_process';
import { readFileSync } from 'node:fs';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import koffi from 'koffi';
import { BpfError } from '../../src/sys/bpf/libbpf.js';
import { BpfMap, BpfMapType } from '../../src/sys/bpf/maps.js';
import { progLoad, closeBpfFd, progGetFdById } from '../../src/sys/bpf/programs.js';
import { encodeInsns, BPF_PSEUDO_CALL, BPF_PSEUDO_MAP_FD, type BpfInsn } from '../../src/sys/bpf/insns.js';
import { TestRunner } from '../../src/sys/bpf/test-run.js';
import { xdpAttach, xdpDetach, xdpQuery, XDP_DROP, XDP_TX, XDP_REDIRECT, XDP_FLAGS_DRV_MODE, XDP_FLAGS_REPLACE, XDP_ATTACHED_DRV } from '../../src/sys/bpf/xdp.js';
import { mapInfo, progInfo, listProgIds, listMapIds } from '../../src/sys/bpf/info.js';
import { NativeBuffer, raw, check, SysError, lastErrno } from '../../src/sys/libc.js';
import { readBpfObject } from '../../src/offload/bpf-object.js';
import {
  composeXdp, plainRedirect, ComposedProgram, ComposeError, checkGuestBlock, ENTRY_INSNS,
} from '../../src/offload/compose.js';
import {
  CleanupStack, createNetns, createVethPair, uniqueIfName, uniqueNetnsName, getMac, run, linkExists, netnsExists, vethXdpCounters,
} from '../support/netdev.js';
import { PacketSocket, bytesToMac } from '../support/packet-socket.js';
import { udpFrame, seqOf } from '../support/frames.js';

const ROOT = fileURLToPath(new URL('../..', import.meta.url));

// ---------------------------------------------------------------------------------------
// Tracking: every kernel object this file creates is recorded by id, so the final check
// proves each one is gone whatever other processes load meanwhile.

const createdProgIds = new Set<number>();
const createdMapIds = new Set<number>();
const cleanup = new CleanupStack();

function track<T extends { fd: number }>(p: T & { close(): void }): T {
  cleanup.push(`close fd ${p.fd}`, () => p.close());
  return p;
}

function newMap(type: number, k: number, v: number, n: number, name: string): BpfMap {
  const m = track(BpfMap.create(type, k, v, n, { name }));
  createdMapIds.add(mapInfo(m.fd).id);
  return m;
}

function loadComposed(guest: Uint8Array | null, xskMapFd: number, license = 'GPL'): ComposedProgram {
  const p = track(ComposedProgram.load(guest, { xskMapFd }, license));
  createdProgIds.add(p.id);
  const aid = p.abortedMapId();
  if (aid !== null) createdMapIds.add(aid);
  return p;
}

interface Guest { insns: Uint8Array; license: string; maps: Map<string, BpfMap> }

/** A sample from bpf/out with its maps created and their fds relocated into the ld_imm64s, as the broker does. */
function loadSample(name: string): Guest {
  const o = readBpfObject(readFileSync(join(ROOT, 'bpf/out', `${name}.o`)));
  const maps = o.maps.map((d) => newMap(d.type, d.keySize, d.valueSize, d.maxEntries, d.name.slice(0, 15)));
  const insns = o.insns.slice();
  const v = new DataView(insns.buffer);
  for (const r of o.mapRelocations) v.setInt32(r.insnIndex * 8 + 4, maps[r.mapIndex]!.fd, true);
  return { insns, license: o.license, maps: new Map(o.maps.map((d, i) => [d.name, maps[i]!])) };
}

const u32 = (n: number) => { const b = new Uint8Array(4); new DataView(b.buffer).setUint32(0, n, true); return b; };
const readU64 = (m: BpfMap, key: Uint8Array) => {
  const b = m.lookup(key);
  return b ? Number(new DataView(b.buffer, b.byteOffset).getBigUint64(0, true)) : 0;
};

// Raw-instruction helpers for guests the samples cannot express.
const mov64Imm = (dst: number, imm: number): BpfInsn => ({ code: 0xb7, dst, imm });
const mov64Reg = (dst: number, src: number): BpfInsn => ({ code: 0xbf, dst, src });
const lsh64Imm = (dst: number, imm: number): BpfInsn => ({ code: 0x67, dst, imm });
const or64Imm = (dst: number, imm: number): BpfInsn => ({ code: 0x47, dst, imm });
const stDw = (dst: number, off: number, imm: number): BpfInsn => ({ code: 0x7a, dst, off, imm });
const ldxB = (dst: number, src: number, off: number): BpfInsn => ({ code: 0x71, dst, src, off });
const ldxW = (dst: number, src: number, off: number): BpfInsn => ({ code: 0x61, dst, src, off });
const jgtReg = (dst: number, src: number, off: number): BpfInsn => ({ code: 0x2d, dst, src, off });
const ja = (off: number): BpfInsn => ({ code: 0x05, off });
const atomicAddDw = (dst: number, src: number, off: number): BpfInsn => ({ code: 0xdb, dst, src, off });
const callSub = (rel: number): BpfInsn => ({ code: 0x85, src: BPF_PSEUDO_CALL, imm: rel });
const exit = (): BpfInsn => ({ code: 0x95 });
const ldMapValue = (dst: number, fd: number): BpfInsn[] => [{ code: 0x18, dst, src: 2, imm: fd }, { code: 0 }];
const ldMapFd = (dst: number, fd: number): BpfInsn[] => [{ code: 0x18, dst, src: BPF_PSEUDO_MAP_FD, imm: fd }, { code: 0 }];
const returns = (verdict: number) => encodeInsns([mov64Imm(0, verdict), exit()]);

/** 64-byte Ethernet/IPv4/UDP frame from 198.18.0.1. */
const FRAME = udpFrame(1, 22);

// ---------------------------------------------------------------------------------------
// Minimal AF_XDP socket (copy mode, UMEM over anonymous memory, fill + RX rings), enough to
// give an XSKMAP slot a real socket and to see frames arrive. The port's own xsk code is a
// separate module; this stays test-local on purpose.

const libc = koffi.load('libc.so.6');
const setsockopt = libc.func('setsockopt', 'int', ['int', 'int', 'int', 'intptr_t', 'uint32']) as
  (fd: number, level: number, name: number, val: number, len: number) => number;
const getsockopt = libc.func('getsockopt', 'int', ['int', 'int', 'int', 'intptr_t', 'intptr_t']) as
  (fd: number, level: number, name: number, val: number, lenp: number) => number;

const AF_XDP = 44, SOCK_RAW = 3, SOCK_CLOEXEC = 0o2000000, SOL_XDP = 283;
const XDP_MMAP_OFFSETS = 1, XDP_RX_RING = 2, XDP_UMEM_REG = 4, XDP_UMEM_FILL_RING = 5, XDP_UMEM_COMPLETION_RING = 6;
const XDP_COPY = 1 << 1;
const PGOFF_RX = 0, PGOFF_FILL = 0x100000000;
const RING = 64, CHUNK = 2048, UMEM_SIZE = RING * CHUNK;

class Ring {
  readonly map: number;
  readonly size: number;
  readonly view: DataView;
  constructor(fd: number, pgoff: number, readonly off: { producer: number; consumer: number; desc: number }, entry: number) {
    this.size = off.desc + RING * entry;
    this.map = raw.mmap(0, this.size, 3, 1 /* MAP_SHARED */, fd, pgoff);
    if (this.map === -1) throw new SysError('mmap(xsk ring)', lastErrno());
    this.view = new DataView(koffi.view(this.map, this.size));
  }
  get producer(): number { return this.view.getUint32(this.off.producer, true); }
  set producer(v: number) { this.view.setUint32(this.off.producer, v >>> 0, true); }
  get consumer(): number { return this.view.getUint32(this.off.consumer, true); }
  set consumer(v: number) { this.view.setUint32(this.off.consumer, v >>> 0, true); }
  unmap(): void { raw.munmap(this.map, this.size); }
}

class XskSocket {
  readonly fd: number;
  readonly umem: NativeBuffer;
  private fill: Ring | null = null;
  private rx: Ring | null = null;

  constructor(ifindex: number, queue: number) {
    this.fd = check(raw.socket(AF_XDP, SOCK_RAW | SOCK_CLOEXEC, 0), 'socket(AF_XDP)');
    this.umem = new NativeBuffer(UMEM_SIZE);
    const s = new NativeBuffer(4096);
    try {
      const v = s.view;
      // struct xdp_umem_reg: addr, len, chunk_size, headroom, flags, tx_metadata_len
      v.setBigUint64(0, BigInt(this.umem.address), true);
      v.setBigUint64(8, BigInt(UMEM_SIZE), true);
      v.setUint32(16, CHUNK, true);
      check(setsockopt(this.fd, SOL_XDP, XDP_UMEM_REG, s.address, 32), 'XDP_UMEM_REG');
      v.setUint32(0, RING, true);
      for (const opt of [XDP_UMEM_FILL_RING, XDP_UMEM_COMPLETION_RING, XDP_RX_RING]) {
        check(setsockopt(this.fd, SOL_XDP, opt, s.address, 4), `setsockopt(SOL_XDP, ${opt})`);
      }
      v.setUint32(256, 128, true);
      check(getsockopt(this.fd, SOL_XDP, XDP_MMAP_OFFSETS, s.address, s.address + 256), 'XDP_MMAP_OFFSETS');
      // struct xdp_mmap_offsets: rx, tx, fr, cr; each { producer, consumer, desc, flags } u64
      const ring = (base: number) => ({
        producer: Number(v.getBigUint64(base, true)), consumer: Number(v.getBigUint64(base + 8, true)),
        desc: Number(v.getBigUint64(base + 16, true)),
      });
      this.rx = new Ring(this.fd, PGOFF_RX, ring(0), 16);
      this.fill = new Ring(this.fd, PGOFF_FILL, ring(64), 8);
      // struct sockaddr_xdp: family, flags, ifindex, queue_id, shared_umem_fd
      s.bytes.fill(0, 0, 16);
      v.setUint16(0, AF_XDP, true);
      v.setUint16(2, XDP_COPY, true);
      v.setUint32(4, ifindex, true);
      v.setUint32(8, queue, true);
      check(raw.bind(this.fd, s.address, 16), 'bind(AF_XDP)');
    } catch (e) {
      this.close();
      throw e;
    } finally {
      s.free();
    }
  }

  /** Hands every chunk to the kernel for receiving. */
  fillAll(): void {
    const f = this.fill!;
    const start = f.producer;
    for (let i = 0; i < RING; i++) f.view.setBigUint64(f.off.desc + ((start + i) % RING) * 8, BigInt(i * CHUNK), true);
    f.producer = start + RING;
  }

  /** Frames the kernel has put on the RX ring and we have not consumed. */
  get rxPending(): number { return (this.rx!.producer - this.rx!.consumer) >>> 0; }

  /** Consumes every pending RX descriptor; returns the frames' bytes. */
  takeRx(): Uint8Array[] {
    const r = this.rx!;
    const out: Uint8Array[] = [];
    let c = r.consumer;
    const p = r.producer;
    for (; c !== p; c = (c + 1) >>> 0) {
      const d = r.off.desc + (c % RING) * 16;
      const addr = Number(r.view.getBigUint64(d, true));
      const len = r.view.getUint32(d + 8, true);
      // Bounds-check what the kernel handed back before reading UMEM.
      if (addr + len > UMEM_SIZE) throw new Error(`RX descriptor ${addr}+${len} outside UMEM`);
      out.push(this.umem.bytes.slice(addr, addr + len));
    }
    r.consumer = c;
    return out;
  }

  close(): void {
    this.rx?.unmap();
    this.fill?.unmap();
    this.rx = this.fill = null;
    raw.close(this.fd);
    this.umem.free();
  }
}

async function waitFor(cond: () => boolean, ms: number): Promise<boolean> {
  const end = Date.now() + ms;
  while (Date.now() < end) {
    if (cond()) return true;
    await new Promise((r) => setTimeout(r, 10));
  }
  return cond();
}


// ---------------------------------------------------------------------------------------

const ns = uniqueNetnsName('vxcmp');
const hostEnd = uniqueIfName('vxcA');   // the backend-owned end: XDP + AF_XDP live here
const peerEnd = uniqueIfName('vxcB');   // the host side, inside the test namespace
let hostIfindex = 0;
let xsk: BpfMap;
let sock: XskSocket;

beforeAll(() => {
  execFileSync('bash', [join(ROOT, 'scripts/build-bpf.sh')], { stdio: 'pipe' });
  createNetns(ns);
  cleanup.netns(ns);
  createVethPair(hostEnd, peerEnd, { netns: ns });
  cleanup.link(hostEnd);
  // XDP_TX on the backend end puts frames on the peer's XDP ring. With GRO alone on the
  // peer (which also enables its NAPI) the frames vanish on this kernel although the
  // sender counts them as xdp_tx without errors; with an XDP program on the peer they
  // arrive. The program goes away with the link.
  run(['ip', '-n', ns, 'link', 'set', 'dev', peerEnd, 'xdpdrv', 'obj', join(ROOT, 'bpf/out/xdp_pass.o'), 'sec', 'xdp']);
  hostIfindex = Number(readFileSync(`/sys/class/net/${hostEnd}/ifindex`, 'utf8'));
  xsk = newMap(BpfMapType.XSKMAP, 4, 4, 4, 'vx_xsk');
  sock = new XskSocket(hostIfindex, 0);
  cleanup.push('close AF_XDP socket', () => sock.close());
});

afterAll(async () => {
  try { xdpDetach(hostIfindex, XDP_FLAGS_DRV_MODE); } catch { /* nothing attached */ }
  const errs = await cleanup.run();
  expect(errs).toEqual([]);
});

describe('composeXdp layout', () => {
  it('places the guest unchanged after a fixed entry block', () => {
    const guest = returns(XDP_DROP);
    const out = composeXdp(guest, { xskMapFd: 3, abortedMapFd: 4 });
    expect(out.byteLength).toBe((ENTRY_INSNS + 2) * 8);
    expect(out.subarray(ENTRY_INSNS * 8)).toEqual(guest);
    // insn 1 is the subprogram call; its target is the guest's first instruction.
    const v = new DataView(out.buffer);
    expect(v.getUint8(8)).toBe(0x85);
    expect(v.getUint8(9) >> 4).toBe(BPF_PSEUDO_CALL);
    expect(1 + v.getInt32(12, true) + 1).toBe(ENTRY_INSNS);
  });

  it('builds the plain redirect as bpf_redirect_map(xskmap, rx_queue_index, XDP_DROP) with the map fd in its ld_imm64', () => {
    const insns = plainRedirect({ xskMapFd: 7 });
    const v = new DataView(insns.buffer);
    expect(insns.byteLength / 8).toBe(6);
    expect([v.getUint8(0), v.getInt16(2, true)]).toEqual([0x61, 16]);        // r2 = ctx->rx_queue_index
    expect([v.getUint8(8), v.getUint8(9) >> 4, v.getInt32(12, true)]).toEqual([0x18, BPF_PSEUDO_MAP_FD, 7]);
    expect([v.getUint8(24), v.getInt32(28, true)]).toEqual([0xb7, XDP_DROP]); // empty slot → drop
    expect([v.getUint8(32), v.getInt32(36, true)]).toEqual([0x85, 51]);
  });

  it('refuses guest jumps, calls and callback references that leave the guest block', () => {
    const cases: [BpfInsn[], Partial<ComposeError>][] = [
      [[callSub(-3), mov64Imm(0, 1), exit()], { code: 'compose-call-outside', insn: 0, target: -2 }],
      [[ja(5), mov64Imm(0, 1), exit()], { code: 'compose-jump-outside', insn: 0, target: 6 }],
      [[{ code: 0x06, imm: -2 }, mov64Imm(0, 1), exit()], { code: 'compose-jump-outside', insn: 0, target: -1 }],    // gotol
      [[{ code: 0x18, src: 4, imm: 50 }, { code: 0 }, mov64Imm(0, 1), exit()], { code: 'compose-callback-outside', insn: 0, target: 51 }],
      [[ja(1), ...ldMapFd(1, 3), mov64Imm(0, 1), exit()], { code: 'compose-target-mid-ld-imm64', insn: 0, target: 2 }],
      [[mov64Imm(0, 1), exit(), { code: 0x18 }], { code: 'compose-truncated-ld-imm64', insn: 2 }],
    ];
    const composeError = (fn: () => unknown): ComposeError => {
      try { fn(); } catch (e) { expect(e).toBeInstanceOf(ComposeError); return e as ComposeError; }
      throw new Error('expected a ComposeError');
    };
    for (const [insns, want] of cases) {
      expect(composeError(() => composeXdp(encodeInsns(insns), { xskMapFd: 3, abortedMapFd: 4 }))).toMatchObject(want);
    }
    expect(composeError(() => checkGuestBlock(new Uint8Array(12))).code).toBe('compose-bad-length');
    expect(() => composeXdp(returns(1), { xskMapFd: -1, abortedMapFd: 4 })).toThrow(RangeError);
  });
});

describe('composed samples through BPF_PROG_TEST_RUN', () => {
  const runs: Record<string, number> = {};
  let runner: TestRunner | null = null;
  const verdict = (fd: number, frame = FRAME): { retval: number; data: Uint8Array } => {
    runner?.dispose();
    runner = new TestRunner(fd);
    const r = runner.runBytes(frame);
    return { retval: r.retval, data: r.data };
  };
  afterAll(() => runner?.dispose());

  it('maps each sample verdict with an empty XSKMAP slot: DROP 1, TX 3, PASS → slot default DROP 1', () => {
    const drop = loadSample('xdp_drop');
    const pDrop = loadComposed(drop.insns, xsk.fd, drop.license);
    expect(verdict(pDrop.fd).retval).toBe(XDP_DROP);
    // The guest's own map keeps counting through the composed program.
    expect(readU64(drop.maps.get('drop_count')!, u32(0))).toBe(1);

    const tx = loadSample('xdp_tx');
    const pTx = loadComposed(tx.insns, xsk.fd, tx.license);
    const t = verdict(pTx.fd);
    expect(t.retval).toBe(XDP_TX);
    // The guest (a subprogram) really ran on the packet: MACs swapped.
    expect(bytesToMac(t.data, 0)).toBe(bytesToMac(FRAME, 6));
    expect(readU64(tx.maps.get('tx_count')!, u32(0))).toBe(1);

    const pass = loadSample('xdp_pass');
    const pPass = loadComposed(pass.insns, xsk.fd, pass.license);
    expect(verdict(pPass.fd).retval).toBe(XDP_DROP);
    expect(readU64(pass.maps.get('pass_count')!, u32(0))).toBe(1);

    for (const p of [pDrop, pTx, pPass]) expect(p.abortedCount()).toBe(0);
    runs.samples = 3;
  });

  it('sends PASS to the queue socket (XDP_REDIRECT 4) once its XSKMAP slot holds an AF_XDP socket', () => {
    const plain = loadComposed(null, xsk.fd);
    const bl = loadSample('xdp_blocklist');
    const pBl = loadComposed(bl.insns, xsk.fd, bl.license);
    const pass = loadSample('xdp_pass');
    const pPass = loadComposed(pass.insns, xsk.fd, pass.license);
    // A socket in slot 1 does not serve queue 0 (test runs arrive on rx queue 0).
    xsk.update(u32(1), u32(sock.fd));
    expect(verdict(plain.fd).retval).toBe(XDP_DROP);
    expect(verdict(pPass.fd).retval).toBe(XDP_DROP);
    xsk.update(u32(0), u32(sock.fd));
    try {
      expect(verdict(plain.fd).retval).toBe(XDP_REDIRECT);
      expect(verdict(pPass.fd).retval).toBe(XDP_REDIRECT);
      // Blocklist: a source not listed passes (→ socket), a listed one is dropped and counted.
      expect(verdict(pBl.fd).retval).toBe(XDP_REDIRECT);
      const blocklist = bl.maps.get('blocklist')!;
      blocklist.update(Uint8Array.from([198, 18, 0, 1]), new Uint8Array(8));
      expect(verdict(pBl.fd).retval).toBe(XDP_DROP);
      expect(verdict(pBl.fd).retval).toBe(XDP_DROP);
      expect(readU64(blocklist, Uint8Array.from([198, 18, 0, 1]))).toBe(2);
      // A runt frame takes the guest's bounds-check branch (ctx packet pointers in a subprogram).
      expect(verdict(pBl.fd, FRAME.subarray(0, 14)).retval).toBe(XDP_REDIRECT);
      expect(pBl.abortedCount()).toBe(0);
    } finally {
      xsk.delete(u32(0));
      xsk.delete(u32(1));
    }
  });

  it('counts XDP_ABORTED and unknown verdicts as aborted and drops them; the low 32 bits are the verdict', () => {
    const cases: [Uint8Array, number, boolean][] = [
      [returns(0), XDP_DROP, true],
      [returns(7), XDP_DROP, true],
      [returns(XDP_REDIRECT), XDP_DROP, true],     // a guest cannot pick a redirect target
      [returns(-1), XDP_DROP, true],
      // r0 = (1 << 32) | XDP_TX: the kernel reads u32 verdicts, so this is TX, not aborted.
      [encodeInsns([mov64Imm(0, 1), lsh64Imm(0, 32), or64Imm(0, XDP_TX), exit()]), XDP_TX, false],
    ];
    for (const [guest, want, aborted] of cases) {
      const p = loadComposed(guest, xsk.fd);
      expect(verdict(p.fd).retval).toBe(want);
      expect(verdict(p.fd).retval).toBe(want);
      expect(p.abortedCount()).toBe(aborted ? 2 : 0);
      p.close();
    }
  });

  it('keeps guest bpf-to-bpf calls and ld_imm64 offsets valid after placement', () => {
    const counter = newMap(BpfMapType.ARRAY, 4, 8, 1, 'vx_cnt');
    // main: r6 = ctx; call first_byte(ctx); map value += 1 (ld_imm64 after the call);
    //       call verdict(); return r0.  first_byte reads data[0] through ctx packet pointers.
    const guest = encodeInsns([
      /* 0 */ mov64Reg(6, 1),
      /* 1 */ callSub(7),                        // → 9 first_byte
      /* 2 */ ...ldMapValue(1, counter.fd),
      /* 4 */ mov64Imm(2, 1),
      /* 5 */ atomicAddDw(1, 2, 0),
      /* 6 */ callSub(9),                        // → 16 verdict
      /* 7 */ ja(0),
      /* 8 */ exit(),
      /* 9 first_byte */ ldxW(2, 1, 0), ldxW(3, 1, 4), mov64Reg(4, 2), { code: 0x07, dst: 4, imm: 1 },
      /* 13 */ jgtReg(4, 3, 1),
      /* 14 */ ldxB(0, 2, 0),
      /* 15 */ exit(),
      /* 16 verdict */ mov64Imm(0, XDP_TX), exit(),
    ]);
    expect(checkGuestBlock(guest)).toBe(18);
    const p = loadComposed(guest, xsk.fd);
    expect(verdict(p.fd).retval).toBe(XDP_TX);
    expect(readU64(counter, u32(0))).toBe(1);
  });

  it('lets the guest move the packet head (bpf_xdp_adjust_head in the subprogram) before the entry reads ctx', () => {
    const guest = encodeInsns([
      mov64Imm(2, 14), { code: 0x85, imm: 44 /* xdp_adjust_head */ },
      { code: 0x55, dst: 0, imm: 0, off: 2 },   // if r0 != 0 → DROP
      mov64Imm(0, XDP_TX), exit(),
      mov64Imm(0, XDP_DROP), exit(),
    ]);
    const p = loadComposed(guest, xsk.fd);
    const r = verdict(p.fd);
    expect(r.retval).toBe(XDP_TX);
    expect(r.data).toEqual(FRAME.subarray(14));
  });

  it('leaves the guest the full 512-byte stack (the entry uses none)', () => {
    const deep: BpfInsn[] = [];
    for (let off = -512; off < 0; off += 8) deep.push(stDw(10, off, 0));
    deep.push(mov64Imm(0, XDP_DROP), exit());
    const p = loadComposed(encodeInsns(deep), xsk.fd);
    expect(verdict(p.fd).retval).toBe(XDP_DROP);
    expect(progInfo(p.fd).id).toBe(p.id);
  });

  it('costs one call frame: a guest using all 8 frames alone is refused once composed', () => {
    // Chain of `frames` frames: main → s1 → … → s(frames-1), each a call + exit.
    const chain = (frames: number): Uint8Array => {
      const insns: BpfInsn[] = [];
      for (let f = 0; f < frames - 1; f++) insns.push(callSub(1), exit());
      insns.push(mov64Imm(0, XDP_DROP), exit());
      return encodeInsns(insns);
    };
    const alone = progLoad(chain(8), { license: 'GPL', name: 'vx_chain8' });
    createdProgIds.add(progInfo(alone).id);
    closeBpfFd(alone);
    const p7 = loadComposed(chain(7), xsk.fd);
    expect(verdict(p7.fd).retval).toBe(XDP_DROP);
    let err: unknown;
    try { loadComposed(chain(8), xsk.fd); } catch (e) { err = e; }
    expect(err).toBeInstanceOf(BpfError);
    expect((err as BpfError).verifierLog).toMatch(/call stack of 9 frames is too deep/);
  });
});

describe('composed program attached natively on a veth end', () => {
  async function sendFromPeer(count: number, firstSeq: number): Promise<Uint8Array[]> {
    const ps = PacketSocket.open(peerEnd, { netns: ns });
    try {
      const peerMac = getMac(peerEnd, ns);
      const hostMac = getMac(hostEnd);
      const frames = Array.from({ length: count }, (_, i) => udpFrame(firstSeq + i, 22, 1000, peerMac, hostMac));
      for (const f of frames) ps.send(f);
      return frames;
    } finally {
      ps.close();
    }
  }

  it('drops frames sent from the peer namespace in the kernel (veth xdp_drops and the guest counter rise)', async () => {
    const drop = loadSample('xdp_drop');
    const p = loadComposed(drop.insns, xsk.fd);
    xsk.update(u32(0), u32(sock.fd));
    sock.fillAll();
    xdpAttach(hostIfindex, p.fd, XDP_FLAGS_DRV_MODE);
    const q = xdpQuery(hostIfindex);
    expect(q.attachMode).toBe(XDP_ATTACHED_DRV);
    expect(q.drvProgId).toBe(p.id);
    const before = vethXdpCounters(hostEnd);
    await sendFromPeer(32, 0);
    const counter = drop.maps.get('drop_count')!;
    expect(await waitFor(() => readU64(counter, u32(0)) >= 32, 2000)).toBe(true);
    const after = vethXdpCounters(hostEnd);
    expect(after.xdp_drops! - before.xdp_drops!).toBe(readU64(counter, u32(0)));
    expect(sock.rxPending).toBe(0);
    expect(p.abortedCount()).toBe(0);
  });

  it('delivers PASS frames to the queue 0 AF_XDP socket, byte for byte', async () => {
    const pass = loadSample('xdp_pass');
    const p = loadComposed(pass.insns, xsk.fd);
    // Swap atomically, as the port does when the guest replaces its program.
    const oldFd = progGetFdById(xdpQuery(hostIfindex).drvProgId);
    try { xdpAttach(hostIfindex, p.fd, XDP_FLAGS_DRV_MODE | XDP_FLAGS_REPLACE, oldFd); } finally { closeBpfFd(oldFd); }
    const before = vethXdpCounters(hostEnd);
    const sent = await sendFromPeer(16, 100);
    expect(await waitFor(() => sock.rxPending >= 16, 2000)).toBe(true);
    const got = sock.takeRx();
    expect(got.length).toBe(16);
    expect(got.map(seqOf)).toEqual(sent.map(seqOf));
    expect(got[0]).toEqual(sent[0]);
    expect(readU64(pass.maps.get('pass_count')!, u32(0))).toBe(16);
    expect(vethXdpCounters(hostEnd).xdp_redirect! - before.xdp_redirect!).toBe(16);
  });

  it('bounces TX frames back out to the peer with the guest rewrite applied', async () => {
    const tx = loadSample('xdp_tx');
    const p = loadComposed(tx.insns, xsk.fd);
    xdpAttach(hostIfindex, p.fd, XDP_FLAGS_DRV_MODE);
    const ps = PacketSocket.open(peerEnd, { netns: ns });
    try {
      ps.drain();
      const sent = await sendFromPeer(8, 200);
      const back = ps.recvAll(8, 2000, (f) => seqOf(f) !== null && seqOf(f)! >= 200);
      expect(back.map(seqOf)).toEqual(sent.map(seqOf));
      // Source and destination MACs swapped by the guest program.
      expect(bytesToMac(back[0]!, 0)).toBe(bytesToMac(sent[0]!, 6));
    } finally {
      ps.close();
    }
    expect(sock.rxPending).toBe(0);
  });

  it('plain redirect (no offloaded program) sends every frame to the socket', async () => {
    const p = loadComposed(null, xsk.fd);
    xdpAttach(hostIfindex, p.fd, XDP_FLAGS_DRV_MODE);
    await sendFromPeer(8, 300);   // the fill ring still holds 48 of the chunks given earlier
    expect(await waitFor(() => sock.rxPending >= 8, 2000)).toBe(true);
    expect(sock.takeRx().map(seqOf)).toEqual([300, 301, 302, 303, 304, 305, 306, 307]);
    xdpDetach(hostIfindex, XDP_FLAGS_DRV_MODE);
    expect(xdpQuery(hostIfindex).attachMode).toBe(0);
  });
});

describe('cleanup', () => {
  it('leaves no program, map, link or namespace behind (checked by id)', async () => {
    const errs = await cleanup.run();
    expect(errs).toEqual([]);
    const alive = (created: Set<number>, ids: () => number[]) => {
      const now = new Set(ids());
      return [...created].filter((id) => now.has(id));
    };
    // Objects held by a deleted device are released by its unregister work: allow a moment.
    await waitFor(() => alive(createdProgIds, listProgIds).length === 0 && alive(createdMapIds, listMapIds).length === 0, 3000);
    expect(alive(createdProgIds, listProgIds)).toEqual([]);
    expect(alive(createdMapIds, listMapIds)).toEqual([]);
    expect(createdProgIds.size).toBeGreaterThan(10);
    expect(linkExists(hostEnd)).toBe(false);
    expect(netnsExists(ns)).toBe(false);
  });
});
