import fs from 'node:fs';
import { linkCommand } from './link-command.js';
import { ArgumentError, VxError } from '../errors.js';
import { raw, NativeBuffer, check, closeFd, SysError, lastErrno, Errno, O_RDWR, O_NONBLOCK, O_CLOEXEC, ifNameToIndex } from '../sys/libc.js';
import type { HostQueueConfig, KernelAttach, Port, ProgramSource, TapIo, TapIoMode, TapIoStatus } from './port.js';
import { FdQueue } from './fd-queue.js';
import { linkStats } from './link-stats.js';
import { probeIoUring } from '../sys/io-uring.js';
import { logger } from '../log.js';
import { BpfError } from '../sys/bpf/libbpf.js';
import { hostObjectName } from '../offload/host-names.js';
import { TcTranslateError } from '../offload/tc-translate.js';
import { TapTcAttachment, TcProgram, ZERO_VERDICTS, type TcVerdicts } from './tap-tc-program.js';

let uringProbe: ReturnType<typeof probeIoUring> | null = null;

/** One probe per process: the answer does not change while it runs. */
function cachedProbe(): ReturnType<typeof probeIoUring> {
  uringProbe ??= probeIoUring();
  return uringProbe;
}

/**
 * Which I/O a tap's queues use. 'auto' takes io_uring when a ring can be set up here (it is
 * refused when io_uring_disabled says so, under a seccomp filter without io_uring_setup, on
 * kernels before 5.5, or without liburing 2.3) and says why not otherwise; asking for 'uring'
 * where it cannot be had is an error at start, not a silent fallback.
 */
export function resolveTapIo(mode: TapIoMode, ifname: string, probe: () => ReturnType<typeof probeIoUring> = cachedProbe): TapIoStatus {
  if (mode === 'rw') return { mode: 'rw', reason: 'asked for (--tap-io rw)' };
  const p = probe();
  if (p.ok) return { mode: 'uring', reason: null };
  if (mode === 'uring') throw new VxError('tap-io-unavailable', `${ifname}: --tap-io uring, but io_uring cannot be set up here: ${p.reason}`);
  logger(ifname).warn(`io_uring unavailable (${p.reason}): the tap's frames go through readv/writev, one system call each`);
  return { mode: 'rw', reason: p.reason };
}

const TUNSETIFF = 0x400454ca;
const TUNSETPERSIST = 0x400454cb;
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


/** The interface alias that marks a tap as made by vhost-xdp (so a restarted serve re-adopts it). */
function ownerMark(ifname: string): string {
  return `vhost-xdp tap ${ifname}`;
}

/**
 * Sets the interface alias through rtnetlink (`ip link set … alias`, CAP_NET_ADMIN, which `ip`
 * inherits as an ambient capability) rather than writing /sys/class/net/IF/ifalias: that file
 * is root's 0644, so an unprivileged serve would need CAP_DAC_OVERRIDE to open it.
 */
function setAlias(ifname: string, alias: string): void {
  linkCommand('ip', ['link', 'set', 'dev', ifname, 'alias', alias]);
}

function isOurs(ifname: string): boolean {
  try {
    return fs.readFileSync(`/sys/class/net/${ifname}/ifalias`, 'utf8').trim() === ownerMark(ifname);
  } catch {
    return false;
  }
}

/**
 * A tap with one fd per queue pair (IFF_MULTI_QUEUE when more than one). A tap we create is
 * persistent (TUNSETPERSIST) and marked as ours: a backend that crashes leaves it in place with
 * its ifindex, MAC, addresses, bridge membership, MTU, qdisc and programs, and the restarted
 * backend re-attaches to it. A clean shutdown removes it. A tap that was there and is not ours
 * is attached to and never removed.
 */
export class TapPort implements Port {
  readonly kind = 'tap';
  /** Ours to remove on a clean shutdown: created now, or re-adopted after a crash. */
  readonly created: boolean;
  /** It was ours and survived a previous backend: re-attached, configuration untouched. */
  readonly adopted: boolean;
  private fds: number[] = [];
  /** The I/O its queues use, and why readv/writev when they do. */
  readonly ioStatus: TapIoStatus;
  /** The offloaded program at the tap's tc egress (null: none, or it runs on test-run). */
  private tc: TapTcAttachment | null = null;
  private readonly bpfPrefix: string;

  private constructor(readonly ifname: string, readonly queuePairs: number, bpfPrefix: string, io: TapIoStatus) {
    this.ioStatus = io;
    const exists = interfaceExists(ifname);
    this.adopted = exists && isOurs(ifname);
    this.created = !exists || this.adopted;
    this.bpfPrefix = bpfPrefix;
  }

  /** bpfPrefix: the device's prefix for host BPF object names (offload/host-names.ts). */
  static open(ifname: string, queuePairs: number, opts: { io?: TapIoMode; bpfPrefix?: string } = {}): TapPort {
    // Decided before anything is created: a refused --tap-io uring leaves no tap behind.
    const io = resolveTapIo(opts.io ?? 'auto', ifname);
    const port = new TapPort(ifname, queuePairs, opts.bpfPrefix ?? 'vx', io);
    const fresh = port.created && !port.adopted;
    try {
      for (let q = 0; q < queuePairs; q++) {
        const fd = check(raw.open('/dev/net/tun', O_RDWR | O_NONBLOCK | O_CLOEXEC, 0), 'open', '/dev/net/tun');
        port.fds.push(fd);
        setIfName(ifname);
        ifreq.view.setInt16(16, IFF_TAP | IFF_NO_PI | IFF_VNET_HDR | (queuePairs > 1 ? IFF_MULTI_QUEUE : 0), true);
        if (raw.ioctl(fd, TUNSETIFF, ifreq.address) < 0) {
          const e = lastErrno();
          // The kernel refuses a queue layout other than the one the tap was made with.
          if (e === Errno.EINVAL && q === 0 && !fresh) throw new SysError('ioctl(TUNSETIFF)', e, `${ifname} exists with another queue layout than ${queuePairs} pair(s); delete it or give the same --queues`);
          throw new SysError('ioctl(TUNSETIFF)', e, ifname);
        }
      }
      if (fresh) {
        check(raw.ioctl(port.fds[0]!, TUNSETPERSIST, 1), 'ioctl(TUNSETPERSIST)', ifname);
        setAlias(ifname, ownerMark(ifname));
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
    return { kind: 'tap', fd, ifname: this.ifname, io: this.ioStatus.mode };
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

  /**
   * Runs the offloaded program in the kernel at the tap's tc egress, where host→guest frames
   * pass before tun_net_xmit queues them for our fd (Port.attachInKernel). Returns
   * inKernel false, with the reason in the line, when the program cannot run there (an
   * XDP-only helper, something the translation cannot prove, a verifier refusal of the
   * translation): the caller then has the datapath test-run it, and calls again with null
   * to take away what ran here before. null detaches.
   */
  attachInKernel(source: ProgramSource | null): KernelAttach {
    if (!source) {
      const had = this.tc?.program ?? null;
      this.tc?.clear();
      return { line: had ? `tc egress program ${had.id} removed from ${this.ifname}` : 'no tc egress program', inKernel: false };
    }
    const ifindex = ifNameToIndex(this.ifname);
    let next: TcProgram;
    try {
      next = TcProgram.load(source, { ifindex, name: hostObjectName(this.bpfPrefix, 'tap_tc'), countersName: hostObjectName(this.bpfPrefix, 'tc_verdicts') });
    } catch (e) {
      if (e instanceof TcTranslateError) return { line: e.message, inKernel: false, code: e.code };
      if (e instanceof BpfError && e.op === 'bpf_prog_load') {
        const last = (e.verifierLog ?? '').trim().split('\n').filter((l) => l.trim()).slice(-2).join(' / ');
        return { line: `the kernel verifier refused the tc translation (${e.code}): ${last}`, inKernel: false, code: 'tc-verifier-rejected' };
      }
      throw e;
    }
    try {
      this.tc ??= new TapTcAttachment(ifindex, this.ifname);
      this.tc.set(next);
    } catch (e) {
      next.close();
      throw e;
    }
    return { line: `tc egress program ${next.id} '${next.name}' (guest program translated for tc, ${next.rewrites} context reads rewritten) attached to ${this.ifname} (tcx)`, inKernel: true };
  }

  /** The tc program running the offload, for status (null when none runs in the kernel). */
  get tcProgram(): { id: number; name: string } | null {
    const p = this.tc?.program;
    return p ? { id: p.id, name: p.name } : null;
  }

  /** Verdicts counted in the kernel by the tc programs this port ran (the datapath never sees those frames). */
  kernelVerdicts(): TcVerdicts {
    return this.tc?.verdicts() ?? { ...ZERO_VERDICTS };
  }

  abandon(): void {
    // Our fds keep it alive until the process ends; then it goes, even if close() never runs.
    if (this.created && this.fds.length > 0) raw.ioctl(this.fds[0]!, TUNSETPERSIST, 0);
    // The tc program goes at once: a tap left behind carries no filter nobody reads behind.
    this.tc?.clear();
  }

  /** Clean shutdown: a tap that is ours goes (not persistent any more, its last fd closed). */
  close(): void {
    this.tc?.clear();
    this.tc = null;
    if (this.created && this.fds.length > 0) {
      // Best effort: a tap whose persist flag cannot be cleared stays, which a restart re-adopts.
      raw.ioctl(this.fds[0]!, TUNSETPERSIST, 0);
    }
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
 * header included (the tap reads and writes it). An offloaded program the tap's tc egress cannot
 * run (TapPort.attachInKernel refused it) runs here on each frame the tap hands over, before the
 * guest sees it (setProgram).
 */
export class TapQueue extends FdQueue {
  /** `pollFd`: what the datapath waits on, when not the tap fd itself (UringQueue's eventfd). */
  constructor(fd: number, pollFd = fd) {
    super(pollFd, 'tap', fd);
  }
}
