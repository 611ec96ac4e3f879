// The guest side of the offload protocol over the TS test frontend: requests go out as frames on
// the reserved pair's TX queue, responses come back as frames on its RX queue.
import { setTimeout as sleep } from 'node:timers/promises';
import fs from 'node:fs';
import path from 'node:path';
import {
  OFFLOAD_ETHERTYPE, Status, statusName, bindMapHandles, decodeResponse, decodeMapCreateBody, encodeClaim, encodeMapCreate,
  encodeProgSet, encodeElemLookup, encodeObjLoad, objectUploadRequests, decodeObjLoadBody, type Response,
} from '../../../src/offload/guest/codec.js';
import { readBpfObject } from '../../../src/offload/bpf-object.js';
import { repoRoot } from '../backend.js';
import type { PacketSocket } from '../packet-socket.js';
import { udpFrame, seqOf, GUEST_MAC } from '../frames.js';
import type { TestFrontend } from './test-frontend.js';

const ETH_HLEN = 14;

export function offloadFrame(message: Uint8Array): Uint8Array {
  const f = new Uint8Array(ETH_HLEN + message.length);
  f[12] = OFFLOAD_ETHERTYPE >> 8;
  f[13] = OFFLOAD_ETHERTYPE & 0xff;
  f.set(message, ETH_HLEN);
  return f;
}

export function isOffloadFrame(f: Uint8Array): boolean {
  return f.length >= ETH_HLEN && ((f[12]! << 8) | f[13]!) === OFFLOAD_ETHERTYPE && f.subarray(0, 12).every((b) => b === 0);
}

export class OffloadClient {
  private seq = 1;
  /** Non-offload frames that arrived on the reserved pair (data use before the claim). */
  readonly stray: Uint8Array[] = [];

  /** Poll with setImmediate instead of 1 ms sleeps (benches: lowest latency, burns the core). */
  spin = false;

  constructor(readonly fe: TestFrontend, readonly pair: number) {}

  nextSeq(): number {
    return this.seq++;
  }

  /** Sends one request (built by an encoder from src/offload/protocol.ts) and waits for its response. */
  async call(request: Uint8Array, timeoutMs = 3000): Promise<Response> {
    const seq = new DataView(request.buffer, request.byteOffset).getUint32(8, true);
    await this.fe.transmitLarge(this.pair, offloadFrame(request));
    const deadline = Date.now() + timeoutMs;
    while (Date.now() < deadline) {
      for (const f of this.fe.receive(this.pair)) {
        if (!isOffloadFrame(f)) { this.stray.push(f); continue; }
        const r = decodeResponse(f.subarray(ETH_HLEN));
        if (r.seq === seq) return r;
      }
      if (this.spin) await new Promise((r) => setImmediate(r));
      else await sleep(1);
    }
    throw new Error(`no offload response to seq ${seq} within ${timeoutMs} ms`);
  }

  async claim(maxResponseBytes = 0): Promise<Response> {
    return this.call(encodeClaim(this.nextSeq(), { maxResponseBytes }));
  }
}

/** A response's status must be OK; otherwise throws with the status name and the host's reason. */
export function requireOk(r: Response): Response {
  if (r.status !== Status.OK) throw new Error(`offload request failed: ${statusName(r.status)}: ${r.reason}`);
  return r;
}

/**
 * Offloads a clang-built sample the way a guest driver would: creates each of its maps on the
 * host, binds the program's map references to the handles it got, sends PROG_SET. Returns the
 * handles, in the object's map order; throws on any refusal. The program is named after the
 * sample and the maps as in the object, unless `names` says otherwise (the kernel's names, for
 * telling a test's objects from other runs').
 */
export async function offloadSample(oc: OffloadClient, name: string, names: { prog?: string; mapPrefix?: string } = {}): Promise<number[]> {
  const obj = readBpfObject(new Uint8Array(fs.readFileSync(path.join(repoRoot(), 'bpf/out', `${name}.o`))));
  const handles: number[] = [];
  for (const m of obj.maps) {
    const mapName = `${names.mapPrefix ?? ''}${m.name}`.slice(0, 15);
    const created = requireOk(await oc.call(encodeMapCreate(oc.nextSeq(), { type: m.type, keySize: m.keySize, valueSize: m.valueSize, maxEntries: m.maxEntries, name: mapName })));
    handles.push(decodeMapCreateBody(created.body).handle);
  }
  requireOk(await oc.call(encodeProgSet(oc.nextSeq(), { license: obj.license, insns: bindMapHandles(obj.insns, obj.mapRelocations, handles), mapHandles: handles, name: names.prog ?? name })));
  return handles;
}

/** ELEM_LOOKUP of a u64 value (a sample's counter) through the offload protocol; throws on a refusal. */
export async function lookupU64(oc: OffloadClient, handle: number, key: Uint8Array = new Uint8Array(4)): Promise<number> {
  const r = requireOk(await oc.call(encodeElemLookup(oc.nextSeq(), handle, key)));
  return Number(new DataView(r.body.buffer, r.body.byteOffset).getBigUint64(0, true));
}

/**
 * Sends n host->guest frames (sequence numbers first..first+n-1) into the host interface and
 * counts how many of them the guest received on the given pairs after `settleMs`.
 */
export async function hostFramesReceived(ps: PacketSocket, fe: TestFrontend, first: number, n: number, srcMac: string,
                                         pairs: readonly number[] = [0, 1], settleMs = 300): Promise<number> {
  // Frames the offloaded program drops at the tap's tc egress come back as ENOBUFS (NET_XMIT_DROP).
  for (let i = 0; i < n; i++) ps.send(udpFrame(first + i, 60, 4000 + (i % 8), srcMac, GUEST_MAC), { dropOk: true });
  await sleep(settleMs);
  let got = 0;
  for (const p of pairs) for (const f of fe.receive(p)) if ((seqOf(f) ?? -1) >= first && (seqOf(f) ?? -1) < first + n) got++;
  return got;
}

/** A sample object's bytes (bpf/out/NAME.o). */
export function sampleObject(name: string): Uint8Array {
  return new Uint8Array(fs.readFileSync(path.join(repoRoot(), 'bpf/out', `${name}.o`)));
}

/**
 * The object path as `vxdp load` drives it: OBJ_BEGIN, OBJ_CHUNKs of at most `chunk` bytes
 * (each must be OK), then OBJ_LOAD; returns OBJ_LOAD's response (refusals included).
 */
export async function uploadAndLoad(oc: OffloadClient, object: Uint8Array, o: { name?: string; prog?: string; chunk?: number } = {}): Promise<Response> {
  for (const req of objectUploadRequests(object, () => oc.nextSeq(), o.name ?? '', o.chunk)) requireOk(await oc.call(req));
  return oc.call(encodeObjLoad(oc.nextSeq(), o.prog ?? ''), 15_000);
}

/** uploadAndLoad that must succeed: the OBJ_LOAD body. */
export async function loadObject(oc: OffloadClient, object: Uint8Array, o: { name?: string; prog?: string; chunk?: number } = {}) {
  return decodeObjLoadBody(requireOk(await uploadAndLoad(oc, object, o)).body);
}

/**
 * xdp_filter_obj.o with its `const volatile` config patched (the 'VXCF' marker in .rodata, then
 * u16 drop_sport, u16 enabled), as a loader sets a skeleton's rodata before load.
 */
export function filterObjectWithConfig(dropSport: number, enabled = true): Uint8Array {
  const o = sampleObject('xdp_filter_obj').slice();
  const at = Buffer.from(o.buffer, o.byteOffset, o.byteLength).indexOf(Buffer.from('VXCF', 'latin1'));
  if (at < 0) throw new Error('xdp_filter_obj.o: config marker not found');
  const v = new DataView(o.buffer, o.byteOffset);
  v.setUint16(at + 4, dropSport, true);
  v.setUint16(at + 6, enabled ? 1 : 0, true);
  return o;
}

/** Sum over CPUs of a per-CPU u64 value (possible_cpus slots of 8 bytes, CPU 0 first). */
export function sumPerCpuU64(value: Uint8Array): number {
  let n = 0;
  const v = new DataView(value.buffer, value.byteOffset, value.byteLength);
  for (let o = 0; o + 8 <= value.byteLength; o += 8) n += Number(v.getBigUint64(o, true));
  return n;
}
