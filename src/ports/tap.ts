import fs from 'node:fs';
import { ArgumentError } from '../errors.js';
import { raw, NativeBuffer, check, closeFd, SysError, lastErrno, Errno, O_RDWR, O_NONBLOCK, O_CLOEXEC } from '../sys/libc.js';
import type { HostQueueConfig, Port } from './port.js';
import { FdQueue } from './fd-queue.js';
import { linkStats } from './link-stats.js';

const TUNSETIFF = 0x400454ca;
const TUNSETOFFLOAD = 0x400454d0;
const TUNSETVNETHDRSZ = 0x400454d8;
const TUNSETQUEUE = 0x400454d9;
const IFF_ATTACH_QUEUE = 0x0200;
const IFF_DETACH_QUEUE = 0x0400;
const IFF_TAP = 0x0002;
const IFF_NO_PI = 0x1000;
const IFF_VNET_HDR = 0x4000;
const IFF_MULTI_QUEUE = 0x0100;
const TUN_F_CSUM = 0x01;
const TUN_F_TSO4 = 0x02;
const TUN_F_TSO6 = 0x04;
const TUN_F_TSO_ECN = 0x08;
const SIOCGIFFLAGS = 0x8913;
const SIOCSIFFLAGS = 0x8914;
const SIOCSIFMTU = 0x8922;
const IFF_UP = 0x1;
const AF_INET = 2;
const SOCK_DGRAM = 2;

const IFNAMSIZ = 16;
const ifreq = new NativeBuffer(4096);

function setIfName(name: string): void {
  const b = Buffer.from(name, 'utf8');
  if (b.length === 0 || b.length >= IFNAMSIZ) throw new ArgumentError(`ifreq: interface name '${name}' must be 1..15 bytes`);
  ifreq.bytes.fill(0, 0, 40);
  ifreq.bytes.set(b, 0);
}

/** ioctl on a throwaway AF_INET socket, for interface flags and MTU. */
function ifIoctl(req: number, name: string, fill: (v: DataView) => void): DataView {
  const s = check(raw.socket(AF_INET, SOCK_DGRAM | O_CLOEXEC, 0), 'socket');
  try {
    setIfName(name);
    fill(ifreq.view);
    check(raw.ioctl(s, req, ifreq.address), 'ioctl', `${name} 0x${req.toString(16)}`);
    return ifreq.view;
  } finally {
    raw.close(s);
  }
}

export function interfaceExists(name: string): boolean {
  return fs.existsSync(`/sys/class/net/${name}`);
}

export function setLinkUp(name: string, up: boolean): void {
  const flags = ifIoctl(SIOCGIFFLAGS, name, () => {}).getInt16(16, true);
  ifIoctl(SIOCSIFFLAGS, name, (v) => v.setInt16(16, up ? flags | IFF_UP : flags & ~IFF_UP, true));
}

export function setInterfaceMtu(name: string, mtu: number): void {
  ifIoctl(SIOCSIFMTU, name, (v) => v.setInt32(16, mtu, true));
}


/**
 * A tap with one fd per queue pair (IFF_MULTI_QUEUE when more than one). A tap we created goes
 * away when its last fd closes; a persistent tap that already existed is left in place.
 */
export class TapPort implements Port {
  readonly kind = 'tap';
  readonly created: boolean;
  private fds: number[] = [];

  private constructor(readonly ifname: string, readonly queuePairs: number) {
    this.created = !interfaceExists(ifname);
  }

  static open(ifname: string, queuePairs: number): TapPort {
    const port = new TapPort(ifname, queuePairs);
    try {
      for (let q = 0; q < queuePairs; q++) {
        const fd = check(raw.open('/dev/net/tun', O_RDWR | O_NONBLOCK | O_CLOEXEC, 0), 'open', '/dev/net/tun');
        port.fds.push(fd);
        setIfName(ifname);
        ifreq.view.setInt16(16, IFF_TAP | IFF_NO_PI | IFF_VNET_HDR | (queuePairs > 1 ? IFF_MULTI_QUEUE : 0), true);
        check(raw.ioctl(fd, TUNSETIFF, ifreq.address), 'ioctl(TUNSETIFF)', ifname);
      }
      port.setVnetHeaderLength(12);
      setLinkUp(ifname, true);
    } catch (e) {
      port.close();
      throw e;
    }
    return port;
  }

  private setVnetHeaderLength(len: number): void {
    ifreq.view.setInt32(0, len, true);
    for (const fd of this.fds) check(raw.ioctl(fd, TUNSETVNETHDRSZ, ifreq.address), 'ioctl(TUNSETVNETHDRSZ)', this.ifname);
  }

  queueConfig(pair: number): HostQueueConfig {
    const fd = this.fds[pair];
    if (fd === undefined) throw new Error(`${this.ifname}: no tap queue ${pair}`);
    return { kind: 'tap', fd, ifname: this.ifname };
  }

  setMtu(mtu: number): void {
    setInterfaceMtu(this.ifname, mtu);
  }

  configureOffloads(o: { vnetHeaderLength: number; csum: boolean; tso4: boolean; tso6: boolean; ecn: boolean }): void {
    this.setVnetHeaderLength(o.vnetHeaderLength);
    // TSO without checksum offload is meaningless to the tap (it refuses it).
    let flags = 0;
    if (o.csum) {
      flags |= TUN_F_CSUM;
      if (o.tso4) flags |= TUN_F_TSO4;
      if (o.tso6) flags |= TUN_F_TSO6;
      if (o.ecn && (o.tso4 || o.tso6)) flags |= TUN_F_TSO_ECN;
    }
    for (const fd of this.fds) check(raw.ioctl(fd, TUNSETOFFLOAD, flags), 'ioctl(TUNSETOFFLOAD)', this.ifname);
  }

  setQueueEnabled(pair: number, enabled: boolean): void {
    const fd = this.fds[pair];
    if (fd === undefined || this.queuePairs < 2) return;
    setTapQueueAttached(fd, enabled);
  }

  stats() {
    return linkStats(this.ifname);
  }

  close(): void {
    for (const fd of this.fds) closeFd(fd);
    this.fds = [];
  }
}

/** Detaches a multiqueue tap's queue from the host (its frames spread over the others) or re-attaches it. */
export function setTapQueueAttached(fd: number, attached: boolean): void {
  const q = new NativeBuffer(4096);
  try {
    q.view.setInt16(16, attached ? IFF_ATTACH_QUEUE : IFF_DETACH_QUEUE, true);
    const r = raw.ioctl(fd, TUNSETQUEUE, q.address);
    // EINVAL: the queue is already in that state (or the tap is single-queue).
    if (r < 0 && lastErrno() !== Errno.EINVAL) throw new SysError('ioctl(TUNSETQUEUE)', lastErrno());
  } finally {
    q.free();
  }
}

/**
 * Worker side of one tap queue: readv/writev straight between the tap and guest buffers, vnet
 * header included (the tap reads and writes it). An offloaded program runs on each frame the
 * tap hands over before the guest sees it (setProgram): a tap has no kernel hook there.
 */
export class TapQueue extends FdQueue {
  constructor(fd: number) {
    super(fd, 'tap');
  }

  setAttached(attached: boolean): void {
    setTapQueueAttached(this.fd, attached);
  }
}
