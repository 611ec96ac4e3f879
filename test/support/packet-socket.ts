import koffi from 'koffi';
import { raw, NativeBuffer, Epoll, EPOLLIN, O_CLOEXEC, SysError, Errno, check, lastErrno } from '../../src/sys/libc.js';
import { openPacketSocket, ETH_P_ALL_BE, SLL_SIZE } from '../../src/sys/packet-socket.js';

/**
 * AF_PACKET raw socket bound to one interface: the test's view of what the host kernel
 * sees on a tap or veth, and a way to inject frames there. Blocking with a bounded timeout
 * is fine here (test process, main thread).
 */

const MSG_DONTWAIT = 0x40;
const MSG_TRUNC = 0x20;
const O_RDONLY = 0;
const CLONE_NEWNET = 0x40000000;

/** sll_pkttype values (linux/if_packet.h). */
export const PacketType = { HOST: 0, BROADCAST: 1, MULTICAST: 2, OTHERHOST: 3, OUTGOING: 4 } as const;

// setns is not in src/sys/libc.ts (the datapath never needs it); tests need it only to
// create a socket inside a namespace they made.
const setns = koffi.load('libc.so.6').func('setns', 'int', ['int', 'int']) as (fd: number, nstype: number) => number;

const FRAME_MAX = 65536;

export interface OpenOptions {
  /** Name of a namespace under /var/run/netns (ip netns add) that owns the interface. */
  netns?: string;
  /** Also return frames this host sent on the interface (PACKET_OUTGOING). Default false. */
  includeOutgoing?: boolean;
}

export interface ReceivedFrame {
  frame: Uint8Array;
  pktType: number;
  /** Frame was longer than the receive buffer and got cut. */
  truncated: boolean;
}

function withNetns<T>(netns: string | undefined, fn: () => T): T {
  if (!netns) return fn();
  const self = check(raw.open('/proc/thread-self/ns/net', O_RDONLY | O_CLOEXEC, 0), 'open(own netns)');
  try {
    const target = check(raw.open(`/var/run/netns/${netns}`, O_RDONLY | O_CLOEXEC, 0), 'open(netns)', netns);
    try {
      check(setns(target, CLONE_NEWNET), 'setns', netns);
      try {
        return fn();
      } finally {
        // Must succeed, or every later socket of this test process lands in the wrong namespace.
        if (setns(self, CLONE_NEWNET) < 0) throw new SysError('setns(back)', lastErrno());
      }
    } finally {
      raw.close(target);
    }
  } finally {
    raw.close(self);
  }
}

export class PacketSocket {
  readonly fd: number;
  readonly ifname: string;
  readonly ifindex: number;
  includeOutgoing: boolean;
  private readonly mem: NativeBuffer;
  private readonly epoll: Epoll;
  private closed = false;

  private constructor(fd: number, ifname: string, ifindex: number, includeOutgoing: boolean) {
    this.fd = fd;
    this.ifname = ifname;
    this.ifindex = ifindex;
    this.includeOutgoing = includeOutgoing;
    // Layout: [0,20) sockaddr_ll, [64,120) msghdr, [128,144) iovec, [4096, 4096+FRAME_MAX) frame.
    this.mem = new NativeBuffer(4096 + FRAME_MAX);
    this.epoll = new Epoll(4);
    this.epoll.add(fd, EPOLLIN, 1);
  }

  static open(ifname: string, opts: OpenOptions = {}): PacketSocket {
    return withNetns(opts.netns, () => {
      const ifindex = raw.if_nametoindex(ifname);
      if (ifindex === 0) throw new SysError('if_nametoindex', lastErrno(), ifname);
      const fd = openPacketSocket(ifindex, ifname, { protocolBE: ETH_P_ALL_BE });
      return new PacketSocket(fd, ifname, ifindex, opts.includeOutgoing ?? false);
    });
  }

  /**
   * Sends one frame; true when the kernel took it. ENOBUFS is the kernel's NET_XMIT_DROP: the
   * frame was dropped on its way out (a full tap queue, or a tc egress program: the tap port's
   * offload fast path drops there). By default it is retried like EAGAIN; with dropOk the drop
   * is the expected outcome and send returns false (a retry would send a second copy).
   */
  send(frame: Uint8Array, opts: { dropOk?: boolean } = {}): boolean {
    if (frame.length > FRAME_MAX) throw new RangeError(`frame of ${frame.length} bytes exceeds ${FRAME_MAX}`);
    const buf = this.mem.bytes.subarray(4096, 4096 + frame.length);
    buf.set(frame);
    // The socket is non-blocking; a full device queue shows as EAGAIN/ENOBUFS: wait a little.
    for (let attempt = 0; ; attempt++) {
      const n = raw.write(this.fd, this.mem.address + 4096, frame.length);
      if (n === frame.length) return true;
      const e = lastErrno();
      if (n < 0 && e === Errno.ENOBUFS && opts.dropOk) return false;
      if (n < 0 && (e === Errno.EAGAIN || e === Errno.ENOBUFS) && attempt < 100) {
        this.epoll.wait(1, () => undefined);
        continue;
      }
      if (n < 0) throw new SysError('write(AF_PACKET)', e, this.ifname);
      throw new Error(`short write on ${this.ifname}: ${n} of ${frame.length}`);
    }
  }

  /** One frame (with its packet type), or null when none arrived within timeoutMs. */
  recvFrame(timeoutMs: number): ReceivedFrame | null {
    const deadline = Date.now() + timeoutMs;
    const m = this.mem;
    const v = m.view;
    for (;;) {
      v.setBigUint64(128, BigInt(m.address + 4096), true); // iov_base
      v.setBigUint64(136, BigInt(FRAME_MAX), true); // iov_len
      v.setBigUint64(64, BigInt(m.address), true); // msg_name
      v.setUint32(72, SLL_SIZE, true); // msg_namelen
      v.setBigUint64(80, BigInt(m.address + 128), true); // msg_iov
      v.setBigUint64(88, 1n, true); // msg_iovlen
      v.setBigUint64(96, 0n, true); // msg_control
      v.setBigUint64(104, 0n, true); // msg_controllen
      v.setInt32(112, 0, true); // msg_flags
      const n = raw.recvmsg(this.fd, m.address + 64, MSG_DONTWAIT | MSG_TRUNC);
      if (n >= 0) {
        const pktType = v.getUint8(10);
        if (pktType === PacketType.OUTGOING && !this.includeOutgoing) continue;
        const len = Math.min(n, FRAME_MAX);
        return { frame: m.bytes.slice(4096, 4096 + len), pktType, truncated: n > FRAME_MAX };
      }
      const e = lastErrno();
      if (e !== Errno.EAGAIN && e !== Errno.EINTR) throw new SysError('recvmsg(AF_PACKET)', e, this.ifname);
      const left = deadline - Date.now();
      if (left <= 0) return null;
      this.epoll.wait(Math.min(left, 1000), () => undefined);
    }
  }

  recv(timeoutMs: number): Uint8Array | null {
    return this.recvFrame(timeoutMs)?.frame ?? null;
  }

  /**
   * Collects up to `count` frames accepted by `filter` within timeoutMs overall (others are
   * discarded). Returns what it got, possibly fewer.
   */
  recvAll(count: number, timeoutMs: number, filter?: (frame: Uint8Array) => boolean): Uint8Array[] {
    const out: Uint8Array[] = [];
    const deadline = Date.now() + timeoutMs;
    while (out.length < count) {
      const left = deadline - Date.now();
      if (left <= 0) break;
      const f = this.recv(left);
      if (!f) break;
      if (!filter || filter(f)) out.push(f);
    }
    return out;
  }

  /** Discards everything already queued. Returns how many frames were dropped. */
  drain(): number {
    let n = 0;
    while (this.recvFrame(0)) n++;
    return n;
  }

  close(): void {
    if (this.closed) return;
    this.closed = true;
    this.epoll.close();
    raw.close(this.fd);
    this.mem.free();
  }
}

// ---------------------------------------------------------------------------------------
// Frames

export function macToBytes(mac: string): Uint8Array {
  const parts = mac.split(':');
  if (parts.length !== 6) throw new Error(`bad MAC ${mac}`);
  return Uint8Array.from(parts.map((p) => {
    const v = parseInt(p, 16);
    if (!/^[0-9a-fA-F]{1,2}$/.test(p) || Number.isNaN(v)) throw new Error(`bad MAC ${mac}`);
    return v;
  }));
}

export function bytesToMac(b: Uint8Array, off = 0): string {
  return Array.from(b.subarray(off, off + 6), (x) => x.toString(16).padStart(2, '0')).join(':');
}

export function ipToBytes(ip: string): Uint8Array {
  const parts = ip.split('.').map(Number);
  if (parts.length !== 4 || parts.some((p) => !Number.isInteger(p) || p < 0 || p > 255)) throw new Error(`bad IPv4 ${ip}`);
  return Uint8Array.from(parts);
}

export function bytesToIp(b: Uint8Array, off = 0): string {
  return `${b[off]}.${b[off + 1]}.${b[off + 2]}.${b[off + 3]}`;
}

/** RFC 1071 ones'-complement sum folded to 16 bits (not inverted). */
function onesSum(b: Uint8Array, start: number, end: number, initial = 0): number {
  let sum = initial;
  for (let i = start; i + 1 < end; i += 2) sum += (b[i]! << 8) | b[i + 1]!;
  if ((end - start) & 1) sum += b[end - 1]! << 8;
  while (sum > 0xffff) sum = (sum & 0xffff) + (sum >>> 16);
  return sum;
}

export function ipv4HeaderChecksum(header: Uint8Array): number {
  return ~onesSum(header, 0, header.length) & 0xffff;
}

export interface UdpFrameSpec {
  srcMac: string;
  dstMac: string;
  srcIp: string;
  dstIp: string;
  srcPort: number;
  dstPort: number;
  payload: Uint8Array;
  ttl?: number;
  ipId?: number;
  /** Fill in the UDP checksum (default true; false leaves 0 = "none", as DPDK txonly does). */
  udpChecksum?: boolean;
  /** Zero-pad the Ethernet frame to at least this length (default 60, the Ethernet minimum without FCS). */
  minFrameLen?: number;
}

const ETH_HLEN = 14;
const IP_HLEN = 20;
const UDP_HLEN = 8;

/** Ethernet + IPv4 (no options, valid header checksum) + UDP frame. */
export function buildUdpFrame(s: UdpFrameSpec): Uint8Array {
  const ipLen = IP_HLEN + UDP_HLEN + s.payload.length;
  if (ipLen > 0xffff) throw new RangeError('UDP payload too large for IPv4');
  const frameLen = Math.max(ETH_HLEN + ipLen, s.minFrameLen ?? 60);
  const f = new Uint8Array(frameLen);
  const v = new DataView(f.buffer);
  f.set(macToBytes(s.dstMac), 0);
  f.set(macToBytes(s.srcMac), 6);
  v.setUint16(12, 0x0800);
  const ip = ETH_HLEN;
  f[ip] = 0x45;
  v.setUint16(ip + 2, ipLen);
  v.setUint16(ip + 4, s.ipId ?? 0);
  f[ip + 8] = s.ttl ?? 64;
  f[ip + 9] = 17;
  f.set(ipToBytes(s.srcIp), ip + 12);
  f.set(ipToBytes(s.dstIp), ip + 16);
  v.setUint16(ip + 10, ipv4HeaderChecksum(f.subarray(ip, ip + IP_HLEN)));
  const udp = ip + IP_HLEN;
  v.setUint16(udp, s.srcPort);
  v.setUint16(udp + 2, s.dstPort);
  v.setUint16(udp + 4, UDP_HLEN + s.payload.length);
  f.set(s.payload, udp + UDP_HLEN);
  if (s.udpChecksum ?? true) {
    const c = udpChecksum(f, ip, udp, UDP_HLEN + s.payload.length);
    v.setUint16(udp + 6, c === 0 ? 0xffff : c);
  }
  return f;
}

function udpChecksum(f: Uint8Array, ip: number, udp: number, udpLen: number): number {
  // Pseudo-header: src, dst, zero+proto, UDP length.
  let sum = onesSum(f, ip + 12, ip + 20);
  sum += 17 + udpLen;
  const saved = [f[udp + 6]!, f[udp + 7]!];
  f[udp + 6] = 0;
  f[udp + 7] = 0;
  sum = onesSum(f, udp, udp + udpLen, sum);
  f[udp + 6] = saved[0]!;
  f[udp + 7] = saved[1]!;
  return ~sum & 0xffff;
}

export interface ParsedUdpFrame {
  dstMac: string;
  srcMac: string;
  srcIp: string;
  dstIp: string;
  srcPort: number;
  dstPort: number;
  ttl: number;
  ipId: number;
  ipChecksumOk: boolean;
  /** true when the checksum field is 0 (not used) or verifies. */
  udpChecksumOk: boolean;
  payload: Uint8Array;
  /** Bytes after the IP packet (Ethernet padding). */
  trailerLen: number;
}

/** Parses Ethernet/IPv4/UDP; null for anything else or anything inconsistent (every length checked). */
export function parseUdpFrame(f: Uint8Array): ParsedUdpFrame | null {
  if (f.length < ETH_HLEN + IP_HLEN + UDP_HLEN) return null;
  const v = new DataView(f.buffer, f.byteOffset, f.byteLength);
  if (v.getUint16(12) !== 0x0800) return null;
  const ip = ETH_HLEN;
  if (f[ip]! >> 4 !== 4) return null;
  const ihl = (f[ip]! & 0x0f) * 4;
  if (ihl < IP_HLEN) return null;
  const totLen = v.getUint16(ip + 2);
  if (totLen < ihl + UDP_HLEN || ip + totLen > f.length) return null;
  if (f[ip + 9] !== 17) return null;
  if ((v.getUint16(ip + 6) & 0x3fff) !== 0) return null; // fragments are not ours
  const udp = ip + ihl;
  const udpLen = v.getUint16(udp + 4);
  if (udpLen < UDP_HLEN || udp + udpLen > ip + totLen) return null;
  const udpCk = v.getUint16(udp + 6);
  return {
    dstMac: bytesToMac(f, 0),
    srcMac: bytesToMac(f, 6),
    srcIp: bytesToIp(f, ip + 12),
    dstIp: bytesToIp(f, ip + 16),
    srcPort: v.getUint16(udp),
    dstPort: v.getUint16(udp + 2),
    ttl: f[ip + 8]!,
    ipId: v.getUint16(ip + 4),
    ipChecksumOk: onesSum(f, ip, ip + ihl) === 0xffff,
    udpChecksumOk: udpCk === 0 || (udpChecksum(f, ip, udp, udpLen) || 0xffff) === udpCk,
    payload: f.slice(udp + UDP_HLEN, udp + udpLen),
    trailerLen: f.length - (ip + totLen),
  };
}

// ---------------------------------------------------------------------------------------
// Recognisable payloads

const PATTERN_MAGIC = 0x56585450; // 'VXTP'

/** Payload of `len` bytes (≥ 8): magic, sequence number, then bytes derived from both. */
export function patternPayload(seq: number, len: number): Uint8Array {
  if (len < 8) throw new RangeError('pattern payload needs at least 8 bytes');
  const p = new Uint8Array(len);
  const v = new DataView(p.buffer);
  v.setUint32(0, PATTERN_MAGIC);
  v.setUint32(4, seq >>> 0);
  for (let i = 8; i < len; i++) p[i] = (seq * 31 + i * 7) & 0xff;
  return p;
}

/** Sequence number of a payload made by patternPayload, or null if any byte differs. */
export function checkPatternPayload(p: Uint8Array): number | null {
  if (p.length < 8) return null;
  const v = new DataView(p.buffer, p.byteOffset, p.byteLength);
  if (v.getUint32(0) !== PATTERN_MAGIC) return null;
  const seq = v.getUint32(4);
  for (let i = 8; i < p.length; i++) if (p[i] !== ((seq * 31 + i * 7) & 0xff)) return null;
  return seq;
}
