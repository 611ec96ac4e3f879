// The xsk port's reserved pair sends through a packet queue: frames written from guest buffers
// by iovec, with the vnet header skipped wherever the descriptors split it.
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { NativeBuffer, ifNameToIndex } from '../../src/sys/libc.js';
import { writeU64 } from '../../src/sys/u64.js';
import { PacketQueue } from '../../src/ports/packet-queue.js';
import { CleanupStack, createVethPair, uniqueIfName } from '../support/netdev.js';
import { PacketSocket } from '../support/packet-socket.js';
import { udpFrame, seqOf } from '../support/frames.js';

const HDR = 12;
const cleanup = new CleanupStack();
let q: PacketQueue;
let host: PacketSocket;
const mem = new NativeBuffer(65536);
const iov = new NativeBuffer(4096);

beforeAll(() => {
  const a = uniqueIfName('vxpq');
  const b = uniqueIfName('vxpq');
  createVethPair(a, b);
  cleanup.link(a);
  q = PacketQueue.open({ kind: 'packet', ifname: a, ifindex: ifNameToIndex(a), headerLength: HDR });
  cleanup.push('packet queue', () => q.close());
  host = PacketSocket.open(b);
  cleanup.push('host socket', () => host.close());
});

afterAll(async () => {
  await cleanup.run();
  mem.free();
  iov.free();
});

/** Lays [header][frame] out in `mem` and describes it with iovecs cut at `cuts` (byte offsets). */
function send(frame: Uint8Array, cuts: number[]): number {
  const total = HDR + frame.length;
  mem.bytes.fill(0xee, 0, HDR); // a header the kernel must never see as frame bytes
  mem.bytes.set(frame, HDR);
  const edges = [0, ...cuts, total];
  for (let i = 0; i + 1 < edges.length; i++) {
    writeU64(iov.view, i * 16, mem.address + edges[i]!);
    writeU64(iov.view, i * 16 + 8, edges[i + 1]! - edges[i]!);
  }
  return q.transmit(iov.address, edges.length - 1);
}

describe('packet queue (reserved pair on an xsk port)', () => {
  it('sends the frame after the vnet header, however the descriptors split the header', () => {
    const layouts = [[], [HDR], [5], [5, HDR], [HDR + 3], [1, 2, 3, HDR, HDR + 1]];
    layouts.forEach((cuts, i) => {
      const f = udpFrame(7000 + i, 80 + i);
      expect(send(f, cuts)).toBe(f.length);
      const got = host.recvAll(1, 2000, (g) => seqOf(g) === 7000 + i);
      expect(got.length).toBe(1);
      expect(Buffer.from(got[0]!).equals(Buffer.from(f))).toBe(true);
    });
  });

  it('a chain that is all header is not a frame: nothing is sent', () => {
    writeU64(iov.view, 0, mem.address);
    writeU64(iov.view, 8, HDR);
    host.drain();
    expect(q.transmit(iov.address, 1)).toBe(-1);
    expect(q.transmit(iov.address, 0)).toBe(-1);
    expect(host.recvAll(1, 200).length).toBe(0);
  });

  it('never reads: the socket is not hooked into receive', () => {
    expect(q.receive(iov.address, 1)).toBe(-1);
  });
});
