// Shared by the offload broker tests: a tiny guest driving a broker through real requests,
// the sample objects, a test frame, and leak accounting (this process's bpf fds, kernel ids).

import { expect } from 'vitest';
import { readFileSync, readdirSync, readlinkSync } from 'node:fs';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import type { OffloadBroker } from '../../src/offload/broker.js';
import * as P from '../../src/offload/guest/codec.js';
import { Status } from '../../src/offload/guest/codec.js';
import { readBpfObject, type BpfObjectProgram } from '../../src/offload/bpf-object.js';
import { closeBpfFd, progGetFdById } from '../../src/sys/bpf/programs.js';
import { listProgIds, progInfo } from '../../src/sys/bpf/info.js';
import { libbpf, BpfError } from '../../src/sys/bpf/libbpf.js';
import { BpfObject } from '../../src/sys/bpf/object.js';
import { NativeBuffer, raw, closeFd, lastErrno, SysError } from '../../src/sys/libc.js';

export const ROOT = fileURLToPath(new URL('../..', import.meta.url));
export const obj = (name: string): BpfObjectProgram =>
  readBpfObject(new Uint8Array(readFileSync(join(ROOT, 'bpf/out', `${name}.o`))));

// --- leak accounting: a process's bpf fds, and every kernel id a broker ever reported --
/** Open bpf fds (maps, programs, links) of this process, or of process `pid`. */
export function ownBpfFds(pid: number | 'self' = 'self'): number {
  let n = 0;
  for (const fd of readdirSync(`/proc/${pid}/fd`)) {
    try {
      if (readlinkSync(`/proc/${pid}/fd/${fd}`).startsWith('anon_inode:bpf-')) n++;
    } catch { /* closed meanwhile */ }
  }
  return n;
}
const iter = {
  attach: libbpf.func('bpf_program__attach_iter', 'intptr_t', ['intptr_t', 'intptr_t']),
  linkFd: libbpf.func('bpf_link__fd', 'int', ['intptr_t']),
  destroy: libbpf.func('bpf_link__destroy', 'int', ['intptr_t']),
  create: libbpf.func('bpf_iter_create', 'int', ['int']),
};
const MAP_RECORD = 20; // test/support/bpf/map_names.c: { u32 id; char name[16] }

/**
 * [id, name] of every map in the kernel, read through a bpf_map iterator (see map_names.c for
 * why not by id). Everything it makes (object, link, iterator fd, buffer) goes before it returns.
 */
export function kernelMapNames(): [number, string][] {
  const o = BpfObject.openMem(new Uint8Array(readFileSync(join(ROOT, 'bpf/out/support/map_names.o'))), 'map_names');
  let link = 0;
  let fd = -1;
  const buf = new NativeBuffer(1 << 16);
  try {
    o.load();
    link = iter.attach(o.programs()[0]!.ptr, 0) as number;
    if (link === 0) throw new BpfError('bpf_program__attach_iter', lastErrno(), 'map_names');
    fd = iter.create(iter.linkFd(link) as number) as number;
    if (fd < 0) throw new BpfError('bpf_iter_create', -fd, 'map_names');
    const chunks: Buffer[] = [];
    for (;;) {
      const n = raw.read(fd, buf.address, buf.size) as number;
      if (n < 0) throw new SysError('read(bpf_map iterator)', lastErrno());
      if (n === 0) break;
      chunks.push(Buffer.from(buf.bytes.subarray(0, n)));
    }
    const all = Buffer.concat(chunks);
    const out: [number, string][] = [];
    for (let at = 0; at + MAP_RECORD <= all.length; at += MAP_RECORD) {
      const name = all.subarray(at + 4, at + MAP_RECORD);
      const end = name.indexOf(0);
      out.push([all.readUInt32LE(at), name.subarray(0, end < 0 ? name.length : end).toString('latin1')]);
    }
    return out;
  } finally {
    closeFd(fd);
    if (link !== 0) iter.destroy(link);
    o.close();
    buf.free();
  }
}

/**
 * Kernel maps and programs alive now whose names pass the tests, whoever holds them (other runs
 * load objects too). Maps come from the iterator; programs are opened by id, which is only a
 * reference (no user reference, nothing runs when it goes), one at a time and closed at once.
 */
export function namedKernelObjects(mapName: (n: string) => boolean, progName: (n: string) => boolean): { maps: number[]; progs: number[] } {
  const maps = kernelMapNames().filter(([, n]) => mapName(n)).map(([id]) => id);
  const progs = listProgIds().filter((id) => {
    let fd: number;
    try { fd = progGetFdById(id); } catch { return false; }
    try { return progName(progInfo(fd).name); } finally { closeBpfFd(fd); }
  });
  return { maps, progs };
}
export type KernelObjectKind = 'map' | 'prog';
/**
 * Whether a kernel object with this id is alive now. Maps are looked for through the iterator,
 * never opened by id: the fd would be a user reference, and closing the last one of a
 * PROG_ARRAY empties it under a program still tail-calling through it.
 */
export function existsNow(kind: KernelObjectKind, id: number): boolean {
  if (kind === 'map') return kernelMapNames().some(([m]) => m === id);
  let fd: number;
  try { fd = progGetFdById(id); } catch { return false; }
  closeBpfFd(fd);
  return true;
}
export const sleepMs = (ms: number) => Atomics.wait(new Int32Array(new SharedArrayBuffer(4)), 0, 0, ms);
/**
 * True once no object has this id. A program drops its map references only after an RCU
 * grace period, so a map a freed program used may outlive the program by a few ms.
 */
export function gone(kind: KernelObjectKind, id: number, waitMs = 2000): boolean {
  for (let waited = 0; ; waited += 10) {
    if (!existsNow(kind, id)) return true;
    if (waited >= waitMs) return false;
    sleepMs(10);
  }
}

// --- a tiny guest: sequence numbers, decoding, and the response's seq/command checked ---
export class Guest {
  seq = 1;
  constructor(readonly b: OffloadBroker) {}
  send(encode: (seq: number) => Uint8Array): P.Response {
    const seq = this.seq++;
    const req = encode(seq);
    const r = P.decodeResponse(this.b.handle(req));
    expect(r.seq).toBe(seq);
    expect(r.command).toBe(P.readHeader(req)!.command);
    return r;
  }
  ok(encode: (seq: number) => Uint8Array): P.Response {
    const r = this.send(encode);
    if (r.status !== Status.OK) throw new Error(`expected OK, got ${P.statusName(r.status)}: ${r.reason}`);
    return r;
  }
  claim(maxResponseBytes = 0): P.Caps {
    return P.decodeCapsBody(this.ok((s) => P.encodeClaim(s, { maxResponseBytes })).body);
  }
  createMap(m: Omit<P.MapCreateRequest, 'flags' | 'name'> & Partial<P.MapCreateRequest>): number {
    return P.decodeMapCreateBody(this.ok((s) => P.encodeMapCreate(s, m)).body).handle;
  }
  /** Creates the object's maps and offloads its program; returns the handles. */
  offload(o: BpfObjectProgram): number[] {
    const handles = o.maps.map((m) => this.createMap(m));
    this.ok((s) => P.encodeProgSet(s, { license: o.license, insns: P.bindMapHandles(o.insns, o.mapRelocations, handles), mapHandles: handles, name: 'vx_test' }));
    return handles;
  }
}

export const u32 = (n: number) => { const b = new Uint8Array(4); new DataView(b.buffer).setUint32(0, n, true); return b; };
export const u64 = (n: number) => { const b = new Uint8Array(8); new DataView(b.buffer).setBigUint64(0, BigInt(n), true); return b; };
export const readU64 = (b: Uint8Array) => Number(new DataView(b.buffer, b.byteOffset).getBigUint64(0, true));
export const readU32 = (b: Uint8Array, off = 0) => new DataView(b.buffer, b.byteOffset).getUint32(off, true);

export function frame(srcIp = [10, 0, 0, 1]): Uint8Array {
  const f = new Uint8Array(64);
  f.set([2, 0, 0, 0, 0, 1, 2, 0, 0, 0, 0, 2, 0x08, 0x00], 0);
  f[14] = 0x45;
  f.set(srcIp, 26);
  return f;
}
