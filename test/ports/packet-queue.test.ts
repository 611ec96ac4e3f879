// The xsk port's reserved pair sends through a packet queue: frames written from guest buffers
// by iovec, with the vnet header skipped wherever the descriptors split it.
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { NativeBuffer, ifNameToIndex } from '../../src/sys/libc.js';
import { GuestMemory } from '../../src/memory/guest-memory.js';
import { DescriptorChain } from '../../src/virtio/descriptor-chain.js';
import { PacketQueue } from '../../src/ports/packet-queue.js';
import { RxFrames, TX_DROPPED, TX_SENT } from '../../src/ports/host-queue.js';
import { CleanupStack, createVethPair, uniqueIfName } from '../support/netdev.js';
import { PacketSocket } from '../support/packet-socket.js';
import { udpFrame, seqOf } from '../support/frames.js';

const HDR = 12;
const cleanup = new CleanupStack();
let q: PacketQueue;
let host: PacketSocket;
const mem = new NativeBuffer(65536);
/** The buffer as guest memory (gpa 0), and a chain the test lays out by hand as pop() would. */
const guest = new GuestMemory([{ gpa: 0, size: 65536, uva: mem.address, hostAddress: mem.address }]);
const chain = new DescriptorChain(64);

beforeAll(() => {
  const a = uniqueIfName('vxpq');
  const b = uniqueIfName('vxpq');
  createVethPair(a, b);
  cleanup.link(a);
  q = PacketQueue.open({ kind: 'packet', ifname: a, ifindex: ifNameToIndex(a), headerLength: HDR });
  cleanup.push('packet queue', () => q.close());
  q.start('tx', guest, { headerLength: HDR, mergeable: false, maxFrame: HDR + 1518 });
  host = PacketSocket.open(b);
  cleanup.push('host socket', () => host.close());
});

afterAll(async () => {
  await cleanup.run();
  mem.free();
});

/** Describes [0, total) of `mem` as a device-readable chain cut at `cuts` (byte offsets). */
function chainOver(total: number, cuts: number[]): DescriptorChain {
  const edges = [0, ...cuts, total];
  chain.reset();
  for (let i = 0; i + 1 < edges.length; i++) {
    chain.region[i] = 0;
    chain.offset[i] = edges[i]!;
    chain.gpa[i] = edges[i]!;
    chain.length[i] = edges[i + 1]! - edges[i]!;
  }
  chain.head = 0;
  chain.count = chain.readableCount = edges.length - 1;
  chain.readableBytes = total;
  return chain;
}

/** Lays [header][frame] out in `mem` as a chain cut at `cuts` and posts it. */
function send(frame: Uint8Array, cuts: number[]): number {
  mem.bytes.fill(0xee, 0, HDR); // a header the kernel must never see as frame bytes
  mem.bytes.set(frame, HDR);
  return q.postTx(0, chainOver(HDR + frame.length, cuts));
}

describe('packet queue (reserved pair on an xsk port)', () => {
  it('sends the frame after the vnet header, however the descriptors split the header', () => {
    const layouts = [[], [HDR], [5], [5, HDR], [HDR + 3], [1, 2, 3, HDR, HDR + 1]];
    layouts.forEach((cuts, i) => {
      const f = udpFrame(7000 + i, 80 + i);
      expect(send(f, cuts)).toBe(TX_SENT);
      const got = host.recvAll(1, 2000, (g) => seqOf(g) === 7000 + i);
      expect(got.length).toBe(1);
      expect(Buffer.from(got[0]!).equals(Buffer.from(f))).toBe(true);
    });
  });

  it('a chain that is all header is not a frame: nothing is sent', () => {
    host.drain();
    expect(q.postTx(0, chainOver(HDR, []))).toBe(TX_DROPPED);
    expect(q.postTx(0, chainOver(HDR, [5]))).toBe(TX_DROPPED);
    expect(host.recvAll(1, 200).length).toBe(0);
  });

  it('never reads: the socket is not hooked into receive', () => {
    const rxChain = chainOver(2048, []);
    rxChain.readableCount = 0;
    rxChain.readableBytes = 0;
    rxChain.writableBytes = 2048;
    q.start('rx', guest, { headerLength: HDR, mergeable: false, maxFrame: HDR + 1518 });
    expect(q.postRx(7, rxChain)).toBe(true);
    const frames = new RxFrames(4);
    expect(q.collectRx(4, frames)).toBe(0);
    expect(frames.hostEmpty).toBe(true);
    q.cancelRx();
  });
});
