import path from 'node:path';
import fs from 'node:fs';
import { loadavg } from 'node:os';
import { spawnManaged, type ManagedProcess } from '../test/support/processes.js';
import { CLI, tempDir } from '../test/support/backend.js';
import { TestFrontend, DEFAULT_FEATURES } from '../test/support/frontend/test-frontend.js';
import { addAddress, disableIpv6, freeTestSubnet, getMac, readLinkStats, run, uniqueIfName } from '../test/support/netdev.js';
import { ipToBytes, macToBytes } from '../test/support/packet-socket.js';
import { bit } from '../src/vhost-user/protocol.js';
import { NetFeature as F } from '../src/net/features.js';
import { callControl } from '../src/control/control-client.js';
import { pinSelf } from './pin-self.js';
import { GUEST_MAC } from './reference-dpdk.js';

/**
 * Guest->host 64 KiB GSO frames (issue 18): the TS frontend acks CSUM and HOST_TSO4 and sends
 * TCPv4 frames of ~64 KiB, each behind a virtio-net header asking for segmentation (NEEDS_CSUM,
 * GSO_TCPV4, gso_size = MSS); `serve --port tap:` hands header and frame to the tap in one
 * writev, and the host kernel takes each as one GSO skb. The frames are addressed to the tap's
 * own MAC and IPv4 address (a TCP port nobody listens on), so each goes up the host stack to
 * TCP, which answers with a RST the guest drains: the host stack, not a drop at the tap, is
 * where they end. Counted by the tap's receive counters (bytes of Ethernet frames as the guest
 * sent them, before segmentation).
 *
 * No DPDK reference: the TS frontend against testpmd (net_vhost with tso=1 <-io-> net_tap with
 * `port config 1 tx_offload tcp_tso on` from a --cmdline-file) negotiated HOST_TSO4 and the vhost
 * PMD received the frames, but the tap PMD counted every one TX-dropped (DPDK 22.11, tried here);
 * and where it works, the tap PMD's software GSO cuts each frame into MSS-sized writes before the
 * kernel sees it, a different path from one GSO skb. The row is reported, not compared.
 */

export const GSO_PINNING = 'backend (all threads): taskset -c 1; TS frontend (this process, busy-polling its rings): core 0';
const MSS = 1448;
const SEGMENTS = 45;
/** Frames in flight: enough to keep the backend busy between the frontend's refills. */
const IN_FLIGHT = 64;
const VNET_HDR = 12;

export interface GsoResult {
  gbps: number;
  framesPerSec: number;
  frameLen: number;
  mss: number;
  /** Frames the backend refused or the tap would not take during the window (txErrors + txDropped): 0 when all is well. */
  refused: number;
  seconds: number;
  loadAvg1: number;
  pinning: string;
}

function onesSum(b: Uint8Array, from: number, to: number, sum = 0): number {
  for (let i = from; i + 1 < to; i += 2) sum += (b[i]! << 8) | b[i + 1]!;
  if ((to - from) & 1) sum += b[to - 1]! << 8;
  while (sum > 0xffff) sum = (sum & 0xffff) + (sum >>> 16);
  return sum;
}

/**
 * virtio-net header + Ethernet + IPv4 + TCP (ACK|PSH) + MSS * SEGMENTS bytes, the TCP checksum
 * field holding the pseudo-header sum as CHECKSUM_PARTIAL wants it (the host finishes it per segment).
 */
export function gsoFrame(o: { dstMac: string; srcMac: string; srcIp: string; dstIp: string; mss: number; segments: number }): Uint8Array {
  const payload = o.mss * o.segments;
  const ipLen = 20 + 20 + payload;
  if (ipLen > 0xffff) throw new RangeError(`${o.segments} segments of ${o.mss} do not fit one IPv4 packet`);
  const b = new Uint8Array(VNET_HDR + 14 + ipLen);
  const v = new DataView(b.buffer);
  b[0] = 1; // VIRTIO_NET_HDR_F_NEEDS_CSUM
  b[1] = 1; // VIRTIO_NET_HDR_GSO_TCPV4
  v.setUint16(2, 14 + 20 + 20, true); // hdr_len: Ethernet + IP + TCP headers
  v.setUint16(4, o.mss, true); // gso_size
  v.setUint16(6, 14 + 20, true); // csum_start: the TCP header
  v.setUint16(8, 16, true); // csum_offset: TCP checksum field
  v.setUint16(10, 0, true); // num_buffers (unused on TX)
  const e = VNET_HDR;
  b.set(macToBytes(o.dstMac), e);
  b.set(macToBytes(o.srcMac), e + 6);
  v.setUint16(e + 12, 0x0800);
  const ip = e + 14;
  b[ip] = 0x45;
  v.setUint16(ip + 2, ipLen);
  v.setUint16(ip + 6, 0x4000); // DF, as TCP sends
  b[ip + 8] = 64;
  b[ip + 9] = 6;
  b.set(ipToBytes(o.srcIp), ip + 12);
  b.set(ipToBytes(o.dstIp), ip + 16);
  v.setUint16(ip + 10, ~onesSum(b, ip, ip + 20) & 0xffff);
  const tcp = ip + 20;
  v.setUint16(tcp, 40000);
  v.setUint16(tcp + 2, 9); // discard: nobody listens, the host answers RST
  v.setUint32(tcp + 4, 1);
  v.setUint32(tcp + 8, 1);
  b[tcp + 12] = 5 << 4;
  b[tcp + 13] = 0x18; // ACK | PSH
  v.setUint16(tcp + 14, 65535);
  // Pseudo-header sum (src, dst, proto, TCP length), not complemented: the partial checksum.
  let sum = onesSum(b, ip + 12, ip + 20) + 6 + (20 + payload);
  while (sum > 0xffff) sum = (sum & 0xffff) + (sum >>> 16);
  v.setUint16(tcp + 16, sum);
  return b;
}

/** One window of `seconds`: a fresh serve and frontend, frames kept in flight, tap counters read before and after. */
export async function runGsoBench(seconds: number): Promise<GsoResult> {
  const loadAvg1 = Math.round(loadavg()[0]! * 100) / 100;
  const dir = tempDir('gsobench');
  const sock = path.join(dir, 'dev.sock');
  const ctl = path.join(dir, 'ctl.sock');
  const tap = uniqueIfName('vxgs');
  let be: ManagedProcess | null = null;
  let fe: TestFrontend | null = null;
  let unpin: (() => void) | null = null;
  try {
    be = spawnManaged('taskset', ['-c', '1', process.execPath, CLI, 'serve', '--socket', sock, '--port', `tap:${tap}`, '--control', ctl, '--name', 'gso', '--log-level', 'warn'], { name: 'vhost-xdp' });
    await be.waitForLine(/^vhost-xdp ready:/, 15_000);
    disableIpv6(tap);
    const net = freeTestSubnet(19);
    addAddress(tap, `${net.host}/24`);
    fe = await TestFrontend.connect(sock, { queueSize: 256, memBytes: 32 << 20, features: DEFAULT_FEATURES | bit(F.HOST_TSO4) });
    if ((fe.features & bit(F.HOST_TSO4)) === 0n) throw new Error('the backend did not offer HOST_TSO4 on a tap port');
    const frame = gsoFrame({ dstMac: getMac(tap), srcMac: GUEST_MAC, srcIp: net.guest, dstIp: net.host, mss: MSS, segments: SEGMENTS });
    // The host must know the guest's MAC to send its RSTs without an ARP round trip per window.
    run(['ip', 'neigh', 'replace', net.guest, 'lladdr', GUEST_MAC, 'dev', tap, 'nud', 'permanent']);
    const bufs = Array.from({ length: IN_FLIGHT }, () => {
      const gpa = fe!.alloc(frame.length);
      fe!.mem.slice(gpa, frame.length).set(frame);
      return { segs: [{ gpa, len: frame.length }], token: { gpa } };
    });
    const front = fe;
    const counters = async () => (await callControl(ctl, 'stats', { name: 'gso' }) as Array<{ total: Record<string, number> }>)[0]!.total;
    unpin = pinSelf('0');
    let free = [...bufs];
    const pump = (): void => {
      const done = new Set(front.takeTxDone(0));
      if (done.size) free.push(...bufs.filter((x) => done.has(x.token)));
      if (free.length) free = free.slice(front.postTx(0, free));
      front.drainRx(0);
    };
    const runFor = async (ms: number): Promise<void> => {
      const end = Date.now() + ms;
      // Busy-polls like a guest driver under load; yields now and then so timers and I/O run.
      while (Date.now() < end) {
        for (let i = 0; i < 200; i++) pump();
        await new Promise((r) => setImmediate(r));
      }
    };
    await runFor(1000);
    const c0 = await counters();
    const s0 = readLinkStats(tap);
    const t0 = process.hrtime.bigint();
    await runFor(seconds * 1000);
    const s1 = readLinkStats(tap);
    const dt = Number(process.hrtime.bigint() - t0) / 1e9;
    const c1 = await counters();
    unpin();
    unpin = null;
    const frameLen = frame.length - VNET_HDR;
    return {
      gbps: Math.round(((s1.rxBytes - s0.rxBytes) * 8) / dt / 1e6) / 1000,
      framesPerSec: Math.round((s1.rxPackets - s0.rxPackets) / dt),
      frameLen, mss: MSS, refused: c1.txErrors! + c1.txDropped! - c0.txErrors! - c0.txDropped!, seconds: Math.round(dt * 100) / 100, loadAvg1, pinning: GSO_PINNING,
    };
  } finally {
    unpin?.();
    fe?.close();
    await be?.stop('SIGTERM', 5000);
    fs.rmSync(dir, { recursive: true, force: true });
  }
}
