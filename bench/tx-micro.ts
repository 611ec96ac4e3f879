// Guest → host per-frame cost of the one TX path (TxPath over SplitQueue into a real port
// queue), in process: no vhost-user, no guest, no DPDK. Made to be run under
//   valgrind --tool=callgrind node --single-threaded --expose-gc dist/bench/tx-micro.js tap|xsk FRAMES
// twice with different FRAMES: the difference in instructions over the difference in frames is
// the per-frame user-space cost (JS, koffi's call path, libc), whatever else the machine is
// doing. The kernel's share of writev/sendto is not counted (callgrind sees user space only).
//
// The "guest" keeps its TX ring full of one-descriptor chains (vnet header + 64-byte frame in
// one buffer, as Linux and DPDK's virtio-user lay out small frames), EVENT_IDX negotiated, and
// the path is called as the worker calls it under a flood: process(TX_BURST, true) until the ring
// has been drained FRAMES times over. Descriptors and avail entries are written once (slot s
// always holds head s), so the driver's own work per frame is one index store.
import { pathToFileURL } from 'node:url';
import { GuestMemory } from '../src/memory/guest-memory.js';
import { SharedMapping, closeFd, memfdCreate } from '../src/sys/libc.js';
import { SplitQueue } from '../src/virtio/split-queue.js';
import { TxPath } from '../src/net/tx-path.js';
import { TX_BURST, type PathContext } from '../src/net/queue-path.js';
import { C, COUNTERS } from '../src/net/stats.js';
import type { FrameFormat } from '../src/net/frame-format.js';
import type { HostQueue } from '../src/ports/host-queue.js';
import { TapPort, TapQueue } from '../src/ports/tap.js';
import { XskPort } from '../src/ports/xsk.js';
import { XskQueue } from '../src/ports/xsk-queue.js';
import { DriverQueue } from '../test/support/frontend/driver-queue.js';
import { udpFrame } from '../test/support/frames.js';

const MiB = 1 << 20;
const HDR = 12;
const QSIZE = 256;
const RING_GPA = 0x200000;
const BUF_GPA = 0x10000;
const FORMAT: FrameFormat = { eventIdx: true, headerLength: HDR, mergeable: false, maxFrame: HDR + 1518, txOffloads: 0 };

export interface TxMicroResult { port: string; frames: number; seconds: number; sent: number; errors: number }

export function runTxMicro(kind: 'tap' | 'xsk', frames: number, warmup = 200_000, frameLen = 64): TxMicroResult {
  const size = 4 * MiB;
  const fd = memfdCreate('tx-micro-guest', size);
  const a = new SharedMapping(fd, size, 0);
  const b = new SharedMapping(fd, size, 0);
  // fd given: the UMEM maps the file once more (mmap MAP_FIXED, which valgrind allows; not mremap).
  const region = { gpa: 0, size, uva: a.address, hostAddress: b.address, fd, fileOffset: 0 };
  const drvMem = new GuestMemory([{ gpa: 0, size, uva: a.address, hostAddress: a.address }]);
  const devMem = new GuestMemory([region]);
  const ifname = `vxm${process.pid % 100000}`;
  let close = (): void => {};
  try {
    let host: HostQueue;
    if (kind === 'tap') {
      const port = TapPort.open(ifname, 1);
      close = () => port.close();
      host = new TapQueue((port.queueConfig(0) as { fd: number }).fd);
    } else {
      const port = XskPort.create(ifname, 1, { ringSize: 512 });
      close = () => port.close();
      port.attachMemory([region]);
      host = new XskQueue(port.queueConfig(0) as ConstructorParameters<typeof XskQueue>[0]);
    }
    const drv = new DriverQueue(drvMem, RING_GPA, QSIZE, { eventIdx: true });
    const frame = udpFrame(1, frameLen - 42);
    const drvRegion = drvMem.regions[0]!;
    for (let i = 0; i < QSIZE; i++) {
      const gpa = BUF_GPA + 2048 * i;
      drvRegion.bytes.fill(0, gpa, gpa + HDR);
      drvRegion.bytes.set(frame, gpa + HDR);
      drv.writeDescriptor(i, { addr: gpa, len: HDR + frame.length, flags: 0, next: 0 });
      drv.writeAvailRing(i, i);
    }
    const stats = new Float64Array(COUNTERS.length);
    const ctx: PathContext = { name: 'tx-micro', stats, pair: 0, onBroken: (_i, why) => { throw new Error(`ring broken: ${why}`); } };
    const q = new SplitQueue(devMem, drv.layout, { eventIdx: true, name: 'tx-micro:q1' });
    const tx = new TxPath(q, 1, -1, ctx, host, devMem, FORMAT);
    let avail = 0;
    const run = (n: number): void => {
      let used = drv.readUsedIdx();
      let total = 0;
      while (total < n) {
        // Keep the ring full: everything the device gave back is made available again.
        const room = QSIZE - ((avail - used) & 0xffff);
        const add = Math.min(room, n - total - ((avail - used) & 0xffff));
        if (add > 0) {
          avail = (avail + add) & 0xffff;
          drv.setAvailIdx(avail);
        }
        tx.process(TX_BURST, true);
        const u = drv.readUsedIdx();
        total += (u - used) & 0xffff;
        used = u;
      }
    };
    run(warmup); // warm up the JIT
    // A full collection now (with --expose-gc) so that one does not land inside the measured run.
    (globalThis as { gc?: () => void }).gc?.();
    const t0 = process.hrtime.bigint();
    run(frames);
    const seconds = Number(process.hrtime.bigint() - t0) / 1e9;
    return {
      port: kind, frames, seconds,
      sent: stats[C.txPackets]!,
      errors: stats[C.txErrFrame]! + stats[C.txErrHost]! + stats[C.txDropHostBusy]! + stats[C.txDropRefused]! + stats[C.txDropOversize]!,
    };
  } finally {
    close();
    a.unmap();
    b.unmap();
    closeFd(fd);
  }
}

if (process.argv[1] && import.meta.url === pathToFileURL(process.argv[1]).href) {
  const kind = process.argv[2] === 'xsk' ? 'xsk' : 'tap';
  const frames = Number(process.argv[3] ?? 200_000);
  const r = runTxMicro(kind, frames);
  console.log(JSON.stringify({ ...r, nsPerFrame: (r.seconds * 1e9) / frames }));
}
