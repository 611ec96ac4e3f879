// `node dist/bench/tap-io-count.js --io uring|rw --dir tx|rx --frames N [--size 64]`: drives one tap
// queue in process (no guest, no backend) the way the datapath does, for counting what a frame
// costs independently of the machine's load: run it under `valgrind --tool=callgrind` twice with
// different --frames and divide the difference in instructions by the difference in frames
// (startup cancels out). It also prints the process's CPU time per frame (user and system,
// getrusage), which does not depend on load as wall-clock throughput does.
//
// tx: bursts of 64 one-segment chains ([vnet header][frame]) posted, flushed, collected.
// rx: 128 receive buffers posted; a generator (trafgen, started here on the other core) floods
//     the tap; the loop sleeps in epoll on the queue's fd and collects bursts of up to 64,
//     re-posting each buffer as it comes back.
import { writeFileSync, rmSync } from 'node:fs';
import { resourceUsage } from 'node:process';
import { NativeBuffer, Epoll, EPOLLIN } from '../src/sys/libc.js';
import { GuestMemory } from '../src/memory/guest-memory.js';
import { DescriptorChain } from '../src/virtio/descriptor-chain.js';
import { TapPort } from '../src/ports/tap.js';
import { openHostQueue } from '../src/ports/open-queue.js';
import { RxFrames, TX_POSTED } from '../src/ports/host-queue.js';
import { disableIpv6, uniqueIfName } from '../test/support/netdev.js';
import { udpFrame, GUEST_MAC, HOST_MAC } from '../test/support/frames.js';
import { startTrafgen, trafgenConfig } from './reference-dpdk.js';

const args = process.argv.slice(2);
const opt = (name: string, d: string): string => {
  const i = args.indexOf(name);
  return i >= 0 && args[i + 1] ? args[i + 1]! : d;
};
const io = opt('--io', 'uring') as 'uring' | 'rw';
const dir = opt('--dir', 'tx');
const frames = Number(opt('--frames', '100000'));
const size = Number(opt('--size', '64'));
const HDR = 12;
const BURST = 64;
const BUF = 2048;

const tap = uniqueIfName('vxio');
const port = TapPort.open(tap, 1, { io });
disableIpv6(tap);
const cfg = port.queueConfig(0) as { kind: 'tap'; fd: number; ifname: string; io: 'uring' | 'rw' };
const q = openHostQueue(cfg);
const memSize = 1 << 20;
const mem = new NativeBuffer(memSize);
const guest = new GuestMemory([{ gpa: 0, size: memSize, uva: mem.address, hostAddress: mem.address }]);
const format = { headerLength: HDR, mergeable: false, maxFrame: HDR + 1518 };
const chain = new DescriptorChain(8);

/** One segment at [at, at+len) as pop() would lay it out. */
function oneSegment(head: number, at: number, len: number, writable: boolean): DescriptorChain {
  chain.reset();
  chain.region[0] = 0;
  chain.offset[0] = at;
  chain.gpa[0] = at;
  chain.length[0] = len;
  chain.head = head;
  chain.count = 1;
  chain.readableCount = writable ? 0 : 1;
  chain.readableBytes = writable ? 0 : len;
  chain.writableBytes = writable ? len : 0;
  return chain;
}

let done = 0;
let cfgPath = '';
let gen: ReturnType<typeof startTrafgen> | null = null;
const ru0 = resourceUsage();
const t0 = process.hrtime.bigint();
if (dir === 'tx') {
  q.start('tx', guest, format);
  const frame = udpFrame(1, size, 1000, GUEST_MAC, '02:00:00:00:00:99');
  for (let s = 0; s < BURST; s++) mem.bytes.set(frame, s * BUF + HDR);
  const cookies = new Int32Array(256);
  while (done < frames) {
    for (let s = 0; s < BURST; s++) if (q.postTx(s, oneSegment(s, s * BUF, HDR + frame.length, false)) !== TX_POSTED) done++;
    q.flushTx();
    done += q.collectTx(cookies.length, cookies);
  }
} else {
  q.start('rx', guest, format);
  const out = new RxFrames(BURST);
  const epoll = new Epoll(4);
  epoll.add(q.fd, EPOLLIN, 1);
  let next = 0;
  const post = (): void => {
    while (q.wantsRx()) {
      const slot = next++ & 127;
      q.postRx(slot, oneSegment(slot, slot * BUF, BUF, true));
    }
  };
  post();
  cfgPath = `/tmp/vxio-${process.pid}.trafgen`;
  writeFileSync(cfgPath, trafgenConfig(udpFrame(2, size, 2000, HOST_MAC, GUEST_MAC)));
  gen = startTrafgen(tap, cfgPath, 0);
  while (done < frames) {
    const n = q.collectRx(BURST, out);
    done += n;
    post();
    if (n === 0 || out.hostEmpty) epoll.wait(100, () => {});
  }
  epoll.close();
}
const ns = Number(process.hrtime.bigint() - t0);
const ru1 = resourceUsage();
console.log(JSON.stringify({
  io, dir, size, frames: done,
  userUsPerFrame: +((ru1.userCPUTime - ru0.userCPUTime) / done).toFixed(3),
  systemUsPerFrame: +((ru1.systemCPUTime - ru0.systemCPUTime) / done).toFixed(3),
  wallNsPerFrame: Math.round(ns / done),
}));
if (gen) await gen.stop('SIGINT', 3000);
if (cfgPath) rmSync(cfgPath, { force: true });
q.close?.();
port.close();
mem.free();
