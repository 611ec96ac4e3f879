// Round-trip latency through something that bounces frames back (a guest in testpmd macswap):
// UDP frames sent at a fixed rate on a packet socket, each echo timed by the kernel's receive
// timestamp (SO_TIMESTAMPNS) against the CLOCK_REALTIME read just before its send. The kernel
// stamps a frame as it arrives, so how soon the pinger itself gets the CPU back (it shares a
// core with a busy-polling guest in the benches) stays out of the figure.
//
// Run as a script (`node pinger.js IFNAME SRC_MAC DST_MAC RATE SECONDS [WARMUP_SECONDS]`) it prints one JSON line
// with the result; Pinger.run() spawns it pinned to one CPU.
import koffi from 'koffi';
import { writeFileSync } from 'node:fs';
import path from 'node:path';
import { pathToFileURL } from 'node:url';
import { raw, NativeBuffer, Epoll, EPOLLIN, Errno, SysError, lastErrno, check } from '../../src/sys/libc.js';
import { openPacketSocket, ETH_P_ALL_BE, SLL_SIZE } from '../../src/sys/packet-socket.js';
import { buildUdpFrame } from './packet-socket.js';
import { spawnManaged } from './processes.js';
import { repoRoot } from './backend.js';

// The built script, also when a test imports this file from its TypeScript source (`npm test` builds first).
const SELF = path.join(repoRoot(), 'dist/test/support/pinger.js');
const SOL_SOCKET = 1;
/** SO_TIMESTAMPNS_OLD: a struct timespec of 64-bit fields on x86_64, as SCM_TIMESTAMPNS. */
const SO_TIMESTAMPNS = 35;
const MSG_DONTWAIT = 0x40;
const PACKET_OUTGOING = 4;
const CLOCK_REALTIME = 0;
/** Payload: magic, run id, sequence number. */
const MAGIC = 0x7678_6c74; // 'vxlt'
const PAYLOAD = 18;
/** An echo later than this after the last send counts as lost. */
const GRACE_MS = 500;

const clockGettime = koffi.load('libc.so.6').func('clock_gettime', 'int', ['int', 'intptr_t']) as (clk: number, ts: number) => number;

export interface PingOptions {
  ifname: string;
  /** Source MAC of the pings (the host side) and destination (the bouncer). */
  srcMac: string;
  dstMac: string;
  /** Pings per second (one at a time on a fixed schedule, whether or not the last came back). */
  rate: number;
  seconds: number;
  /**
   * Pings sent first, at the same rate, and not counted (default 0). In the same process on
   * purpose: the pinger's own JIT compiles and first GCs then happen before the counted pings,
   * on its core, where the busy-polling guest runs.
   */
  warmupSeconds?: number;
}

export interface PingResult {
  sent: number;
  /** Echoes received (each sequence number counted once). */
  received: number;
  lost: number;
  /** Round trips in microseconds. */
  p50Us: number;
  p99Us: number;
  maxUs: number;
  meanUs: number;
}

/** Percentile by nearest rank of an ascending list (0 when empty). */
export function percentile(sorted: readonly number[], p: number): number {
  if (sorted.length === 0) return 0;
  return sorted[Math.min(sorted.length - 1, Math.max(0, Math.ceil((p / 100) * sorted.length) - 1))]!;
}

export class Pinger {
  /** Pings from a process pinned to `cpu`; resolves with the result when the run is over. */
  static async run(opts: PingOptions, cpu: number): Promise<PingResult> {
    const warm = opts.warmupSeconds ?? 0;
    const proc = spawnManaged('taskset', ['-c', String(cpu), process.execPath, SELF, opts.ifname, opts.srcMac, opts.dstMac, String(opts.rate), String(opts.seconds), String(warm)], { name: 'pinger' });
    try {
      const m = await proc.waitForLine(/^\{.*"sent".*\}$/, (warm + opts.seconds + 10) * 1000);
      return JSON.parse(m[0]) as PingResult;
    } finally {
      await proc.stop('SIGTERM', 2000);
    }
  }
}

function pingMain(o: PingOptions): PingResult {
  const ifindex = raw.if_nametoindex(o.ifname);
  if (ifindex === 0) throw new SysError('if_nametoindex', lastErrno(), o.ifname);
  const fd = openPacketSocket(ifindex, o.ifname, { protocolBE: ETH_P_ALL_BE });
  // Layout: [0,20) sockaddr_ll, [64,120) msghdr, [128,144) iovec, [256,512) control, [1024,1040) timespec, [2048, 4096) frame.
  const m = new NativeBuffer(4096);
  const v = m.view;
  v.setInt32(0, 1, true);
  check(raw.setsockopt(fd, SOL_SOCKET, SO_TIMESTAMPNS, m.address, 4), 'setsockopt(SO_TIMESTAMPNS)', o.ifname);
  const epoll = new Epoll(4);
  epoll.add(fd, EPOLLIN, 1);
  const runId = (process.pid * 2654435761) >>> 0;
  const template = buildUdpFrame({
    srcMac: o.srcMac, dstMac: o.dstMac, srcIp: '198.19.255.1', dstIp: '198.19.255.2', srcPort: 7, dstPort: 7,
    payload: new Uint8Array(PAYLOAD), udpChecksum: false,
  });
  const payloadAt = 42; // Ethernet + IPv4 + UDP headers
  const now = (): number => {
    clockGettime(CLOCK_REALTIME, m.address + 1024);
    return Number(v.getBigInt64(1024, true)) * 1e9 + Number(v.getBigInt64(1032, true));
  };
  // Warm-up pings come first; only those from `counted` on are results.
  const counted = Math.max(0, Math.round(o.rate * (o.warmupSeconds ?? 0)));
  const total = counted + Math.max(1, Math.round(o.rate * o.seconds));
  const sentAt = new Float64Array(total);
  const rtt = new Float64Array(total).fill(-1);
  const send = (seq: number): void => {
    const f = m.bytes.subarray(2048, 2048 + template.length);
    f.set(template);
    const pv = new DataView(f.buffer, f.byteOffset + payloadAt, PAYLOAD);
    pv.setUint32(0, MAGIC);
    pv.setUint32(4, runId);
    pv.setUint32(8, seq);
    sentAt[seq] = now();
    const n = raw.write(fd, m.address + 2048, template.length);
    if (n !== template.length) sentAt[seq] = -1; // not sent (queue full): neither a loss nor a sample
  };
  const drain = (): void => {
    for (;;) {
      v.setBigUint64(128, BigInt(m.address + 2048), true); // iov_base
      v.setBigUint64(136, 2048n, true); // iov_len
      v.setBigUint64(64, BigInt(m.address), true); // msg_name
      v.setUint32(72, SLL_SIZE, true);
      v.setBigUint64(80, BigInt(m.address + 128), true); // msg_iov
      v.setBigUint64(88, 1n, true); // msg_iovlen
      v.setBigUint64(96, BigInt(m.address + 256), true); // msg_control
      v.setBigUint64(104, 256n, true); // msg_controllen
      v.setInt32(112, 0, true);
      const n = raw.recvmsg(fd, m.address + 64, MSG_DONTWAIT);
      if (n < 0) {
        const e = lastErrno();
        if (e === Errno.EAGAIN || e === Errno.EINTR) return;
        throw new SysError('recvmsg(AF_PACKET)', e, o.ifname);
      }
      if (v.getUint8(10) === PACKET_OUTGOING || n < payloadAt + 12) continue; // our own pings, seen leaving
      const pv = new DataView(m.bytes.buffer, m.bytes.byteOffset + 2048 + payloadAt, 12);
      if (pv.getUint32(0) !== MAGIC || pv.getUint32(4) !== runId) continue;
      const seq = pv.getUint32(8);
      if (seq >= total || sentAt[seq]! <= 0 || rtt[seq]! >= 0) continue;
      // Walk the control messages for SCM_TIMESTAMPNS (cmsghdr: u64 len, i32 level, i32 type, data).
      const clen = Number(v.getBigUint64(104, true));
      let at: number | null = null;
      for (let c = 0; c + 16 <= clen;) {
        const len = Number(v.getBigUint64(256 + c, true));
        if (len < 16) break;
        if (v.getInt32(256 + c + 8, true) === SOL_SOCKET && v.getInt32(256 + c + 12, true) === SO_TIMESTAMPNS) {
          at = Number(v.getBigInt64(256 + c + 16, true)) * 1e9 + Number(v.getBigInt64(256 + c + 24, true));
          break;
        }
        c += (len + 7) & ~7;
      }
      rtt[seq] = (at ?? now()) - sentAt[seq]!;
    }
  };
  const t0 = now();
  const interval = 1e9 / o.rate;
  for (let seq = 0; seq < total; seq++) {
    // Sleep until this ping's slot, taking echoes as they come (rounded up to epoll's
    // millisecond: a ping may leave late, never in a busy loop that would steal the core).
    for (let left = t0 + seq * interval - now(); left > 0; left = t0 + seq * interval - now()) {
      epoll.wait(Math.ceil(left / 1e6), () => undefined);
      drain();
    }
    send(seq);
    drain();
  }
  const end = now() + GRACE_MS * 1e6;
  for (let left = end - now(); left > 0; left = end - now()) {
    epoll.wait(Math.max(1, Math.floor(left / 1e6)), () => undefined);
    drain();
  }
  epoll.close();
  raw.close(fd);
  m.free();
  // PINGER_DUMP=file: every ping's round trip in us, in sending order (-1: lost or not sent), for histograms.
  const dump = process.env.PINGER_DUMP;
  if (dump) writeFileSync(dump, JSON.stringify({ t0Ns: t0, counted, sentAtNs: Array.from(sentAt, (x) => x - t0), rttUs: Array.from(rtt, (x) => (x >= 0 ? Math.round(x / 10) / 100 : -1)) }));
  const us = Array.from(rtt.subarray(counted)).filter((x) => x >= 0).map((x) => x / 1000).sort((a, b) => a - b);
  const sent = Array.from(sentAt.subarray(counted)).filter((x) => x > 0).length;
  const r2 = (x: number): number => Math.round(x * 100) / 100;
  return {
    sent, received: us.length, lost: sent - us.length,
    p50Us: r2(percentile(us, 50)), p99Us: r2(percentile(us, 99)), maxUs: r2(us.at(-1) ?? 0),
    meanUs: r2(us.length ? us.reduce((a, b) => a + b, 0) / us.length : 0),
  };
}

if (process.argv[1] && import.meta.url === pathToFileURL(process.argv[1]).href) {
  const [ifname, srcMac, dstMac, rate, seconds, warm = '0'] = process.argv.slice(2);
  if (!ifname || !srcMac || !dstMac || !(Number(rate) > 0) || !(Number(seconds) > 0) || !(Number(warm) >= 0)) {
    process.stderr.write('usage: pinger IFNAME SRC_MAC DST_MAC RATE SECONDS [WARMUP_SECONDS]\n');
    process.exit(2);
  }
  process.stdout.write(`${JSON.stringify(pingMain({ ifname, srcMac, dstMac, rate: Number(rate), seconds: Number(seconds), warmupSeconds: Number(warm) }))}\n`);
}
