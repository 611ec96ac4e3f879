import fs from 'node:fs';
import { ArgumentError, VxError } from '../errors.js';
import { spawnSync } from 'node:child_process';
import { linkCommand } from './link-command.js';
import { SysError, Errno, ifNameToIndex } from '../sys/libc.js';
import {
  XskSocket, XDP_UMEM_UNALIGNED_CHUNK_FLAG, XDP_COPY, XDP_USE_NEED_WAKEUP, XDP_SHARED_UMEM,
  XDP_PACKET_HEADROOM, type XskStatistics,
} from '../sys/xsk.js';
import { BpfMap, BpfMapType } from '../sys/bpf/maps.js';
import { BpfError } from '../sys/bpf/libbpf.js';
import { progLoad, closeBpfFd } from '../sys/bpf/programs.js';
import { xdpAttach, xdpDetach, XDP_FLAGS_DRV_MODE, XDP_FLAGS_UPDATE_IF_NOEXIST, XDP_FLAGS_REPLACE, XDP_PASS } from '../sys/bpf/xdp.js';
import { encodeInsns, redirectToQueueSocket, returnImm } from '../sys/bpf/insns.js';
import type { RegionInfo } from '../memory/guest-memory.js';
import type { XskQueueConfig, XskUmemInfo } from './xsk-queue.js';
import { linkStats } from './link-stats.js';
import { ComposedProgram } from '../offload/compose.js';
import { hostObjectName } from '../offload/host-names.js';
import { progInfo } from '../sys/bpf/info.js';
import type { Port, ProgramSource } from './port.js';
import { GuestUmem, PAGE, DEFAULT_PIN_LIMIT, umemChunkSize, minPinLimit, checkPinLimit, type PinLimitChange } from './xsk-umem.js';
import type { PacketQueueConfig } from './packet-queue.js';

const IFNAMSIZ = 16;
/** Ethernet header + one VLAN tag: the largest frame at a given MTU. */
const L2_OVERHEAD = 18;
/** Private bounce chunks per queue and direction when none is given. */
const DEFAULT_BOUNCE_CHUNKS = 64;

export interface XskPortOptions {
  /** Name of the backend-owned veth end (default: derived from ifname). */
  peerName?: string;
  /** MTU of both veth ends; decides the largest frame a guest buffer must hold (default 1500). */
  mtu?: number;
  /** Pinned-memory quota for this device's UMEM in bytes (default 4 GiB). Over it: bounce-only. */
  pinLimitBytes?: number;
  /** Entries of each AF_XDP ring (default 2048). */
  ringSize?: number;
  /** Private bounce chunks per direction and pair (default 64). */
  bounceChunks?: number;
  /** Prefix of the names of the BPF objects this port loads (offload/host-names.ts; default 'vx'). */
  bpfPrefix?: string;
}

// ---------------------------------------------------------------------------------------
// The redirect program

/**
 * return bpf_redirect_map(&xskmap, ctx->rx_queue_index, XDP_PASS): every frame of a queue
 * goes to that queue's socket; a queue without one passes to the (address-less) peer stack.
 */
export function redirectProgramInsns(xskMapFd: number): Uint8Array {
  return encodeInsns(redirectToQueueSocket(1, xskMapFd, XDP_PASS));
}

// ---------------------------------------------------------------------------------------
// Link setup (control path: iproute2 is clearer than rtnetlink by hand)

function ip(args: string[]): void {
  linkCommand('ip', args);
}

function linkExists(name: string): boolean {
  return fs.existsSync(`/sys/class/net/${name}`);
}



/** The interface alias that marks a peer as made by vhost-xdp for `ifname`. */
function ownerMark(ifname: string): string {
  return `vhost-xdp xsk peer of ${ifname}`;
}

/** Receive queues of a link (a veth pair made for N pairs has N). */
function rxQueueCount(name: string): number {
  try {
    return fs.readdirSync(`/sys/class/net/${name}/queues`).filter((q) => q.startsWith('rx-')).length;
  } catch {
    return 0;
  }
}

function isOurLeftover(ifname: string, peer: string): boolean {
  try {
    return fs.readFileSync(`/sys/class/net/${peer}/ifalias`, 'utf8').trim() === ownerMark(ifname);
  } catch {
    return false;
  }
}

/** Where an offloaded program goes on this port's veth. */
interface XskOffloadTarget {
  xskMapFd: number;
  peerIfindex: number;
  /** The plain redirect program (no guest program offloaded). */
  redirectFd: number;
  hostIfindex: number;
  /** A bare XDP_PASS for the host end, attached while a guest program is offloaded (setBounceReceive). */
  hostPassFd: number;
}

/**
 * veth hands XDP_TX frames (an offloaded program's bounces) to its peer only when the peer runs
 * XDP itself (GRO-only NAPI takes them into its ring and never delivers them: measured on
 * 6.18). But any program on the host end, even a bare XDP_PASS, sends every frame the guest
 * transmits through veth's XDP receive path, which copies it into a fresh page because AF_XDP
 * copy-mode frames lack XDP headroom: guest-to-host throughput measured 0.49 Mpps with it and
 * 0.70 without. So the host end runs XDP_PASS only while a guest program (which may bounce) is
 * offloaded. A program someone else put on the host end is left alone: it enables the path too.
 */
function setBounceReceive(t: XskOffloadTarget, on: boolean): void {
  try {
    if (on) xdpAttach(t.hostIfindex, t.hostPassFd, XDP_FLAGS_DRV_MODE | XDP_FLAGS_UPDATE_IF_NOEXIST);
    else xdpDetach(t.hostIfindex, XDP_FLAGS_DRV_MODE | XDP_FLAGS_REPLACE, t.hostPassFd);
  } catch (e) {
    // EBUSY: another program is attached (attach); EEXIST: the attached one is not ours (detach).
    if (!(e instanceof BpfError && (e.errno === Errno.EBUSY || e.errno === Errno.EEXIST))) throw e;
  }
}

export function defaultPeerName(ifname: string): string {
  const base = ifname.length < IFNAMSIZ - 1 ? ifname : ifname.slice(0, IFNAMSIZ - 2);
  const peer = `${base}x`;
  return peer === ifname ? `${base}y` : peer;
}

// ---------------------------------------------------------------------------------------
// The port

interface PairSocket { sock: XskSocket; txSock: XskSocket; cfg: XskQueueConfig; enabled: boolean }

/**
 * `--port xsk:IFNAME`: a veth pair whose IFNAME end belongs to the host's users and whose peer
 * belongs to the backend: an XDP program on the peer redirects each receive queue to the AF_XDP
 * socket of the same queue pair, and the sockets share one UMEM laid over guest RAM.
 *
 * Lifecycle: create() builds the link and program; attachMemory() (per memory table) builds
 * the UMEM view; queueConfig(pair) opens that pair's socket (registering/pinning the UMEM with
 * the first one); releaseQueue(pair) closes it — after which the kernel can no longer write
 * into guest buffers it was given; detachMemory() closes every socket and the UMEM view.
 */
export class XskPort implements Port {
  readonly kind = 'xsk';
  readonly needsGuestMemory = true;
  readonly offloads = false;
  readonly created = true;
  readonly peer: string;
  private pinLimit: number;
  private readonly peerIfindex: number;
  private readonly ringSize: number;
  private readonly bounceChunks: number;
  private mtu: number;
  /** The guest's vnet header length, for the reserved pair's packet queue. */
  private headerLength = 12;
  private readonly xskMap: BpfMap;
  private readonly redirectFd: number;
  private readonly bpfPrefix: string;
  /** The offloaded guest program composed with the redirect, while one is attached. */
  private composed: ComposedProgram | null = null;
  private umem: GuestUmem | null = null;
  private readonly sockets = new Map<number, PairSocket>();
  private disabled = new Set<number>();
  private closed = false;
  /** Bytes the kernel holds pinned for this device's UMEM right now. */
  pinnedBytes = 0;
  /** The pair survived a previous backend and was re-attached (its host end untouched). */
  adopted = false;

  private constructor(readonly ifname: string, readonly queuePairs: number, opts: XskPortOptions,
    peer: string, peerIfindex: number, xskMap: BpfMap, redirectFd: number, private readonly hostPassFd: number) {
    this.peer = peer;
    this.peerIfindex = peerIfindex;
    this.xskMap = xskMap;
    this.redirectFd = redirectFd;
    this.ringSize = opts.ringSize ?? 2048;
    this.bounceChunks = opts.bounceChunks ?? DEFAULT_BOUNCE_CHUNKS;
    // create() checked it before making the link.
    this.pinLimit = opts.pinLimitBytes ?? DEFAULT_PIN_LIMIT;
    this.mtu = opts.mtu ?? 1500;
    this.bpfPrefix = opts.bpfPrefix ?? 'vx';
  }

  /** The name of a BPF object this port loads: the device's prefix, then what it is for. */
  private bpfName(role: string): string {
    return hostObjectName(this.bpfPrefix, role);
  }

  static create(ifname: string, queuePairs: number, opts: XskPortOptions = {}): XskPort {
    if (!/^[A-Za-z0-9_.-]{1,15}$/.test(ifname)) throw new ArgumentError(`xsk port: interface name '${ifname}'`);
    if (!Number.isInteger(queuePairs) || queuePairs < 1 || queuePairs > 256) throw new ArgumentError(`xsk port: ${queuePairs} queue pairs`);
    const ring = opts.ringSize ?? 2048;
    if (ring < 64 || ring > 32768 || (ring & (ring - 1)) !== 0) throw new ArgumentError(`xsk port: ring size ${ring}`);
    // Before the link exists: a refused limit leaves nothing to clean up.
    checkPinLimit(opts.pinLimitBytes ?? DEFAULT_PIN_LIMIT, queuePairs, opts.bounceChunks ?? DEFAULT_BOUNCE_CHUNKS);
    const peer = opts.peerName ?? defaultPeerName(ifname);
    let adopted = false;
    if (linkExists(ifname)) {
      // A pair left by a backend that was killed carries our mark on its peer: re-adopt it, so
      // the host end keeps its ifindex, MAC, addresses, bridge membership, MTU and programs.
      // One with another queue count cannot serve this device: made anew. Anything else is
      // not ours to touch.
      if (!isOurLeftover(ifname, peer)) throw new SysError('xsk port', Errno.EEXIST, `${ifname} already exists and is not a veth pair vhost-xdp made`);
      if (rxQueueCount(peer) === queuePairs) adopted = true;
      else spawnSync('ip', ['link', 'delete', ifname]);
    }
    const n = String(queuePairs);
    const mtu = String(opts.mtu ?? 1500);
    if (!adopted) {
      ip(['link', 'add', ifname, 'numtxqueues', n, 'numrxqueues', n, 'mtu', mtu, 'type', 'veth',
        'peer', 'name', peer, 'numtxqueues', n, 'numrxqueues', n, 'mtu', mtu]);
    }
    let map: BpfMap | null = null;
    let prog = -1;
    let pass = -1;
    try {
      // The peer has no addresses; with no IPv6 link-local address either it emits nothing the
      // host would take for guest traffic (no DAD, router or MLD solicitations). Set through
      // rtnetlink before the link comes up: the disable_ipv6 sysctl is root's file in /proc/sys,
      // out of reach of an unprivileged serve (docs/least-privilege.md).
      if (!adopted) ip(['link', 'set', 'dev', peer, 'addrgenmode', 'none']);
      const peerIfindex = ifNameToIndex(peer);
      map = BpfMap.create(BpfMapType.XSKMAP, 4, 4, queuePairs, { name: hostObjectName(opts.bpfPrefix ?? 'vx', 'xskmap') });
      prog = progLoad(redirectProgramInsns(map.fd), { license: 'GPL', name: hostObjectName(opts.bpfPrefix ?? 'vx', 'xsk_redir') });
      xdpAttach(peerIfindex, prog, XDP_FLAGS_DRV_MODE);
      pass = progLoad(encodeInsns(returnImm(XDP_PASS)), { license: 'GPL', name: hostObjectName(opts.bpfPrefix ?? 'vx', 'hostpass') });
      // Host frames must reach the guest with complete checksums: AF_XDP copies bytes and has no
      // way to say "checksum partial", so the host end computes them in software.
      spawnSync('ethtool', ['-K', ifname, 'tx', 'off'], { timeout: 10_000 });
      ip(['link', 'set', 'dev', peer, 'alias', ownerMark(ifname)]);
      ip(['link', 'set', 'dev', peer, 'up']);
      // The host end is the operator's once it exists: a re-adopted one stays as they left it.
      if (!adopted) ip(['link', 'set', 'dev', ifname, 'up']);
      const port = new XskPort(ifname, queuePairs, opts, peer, peerIfindex, map, prog, pass);
      port.adopted = adopted;
      return port;
    } catch (e) {
      if (prog >= 0) closeBpfFd(prog);
      if (pass >= 0) closeBpfFd(pass);
      map?.close();
      if (!adopted) spawnSync('ip', ['link', 'delete', ifname]);
      throw e;
    }
  }

  /** The XSKMAP fd (key = queue pair, value = socket fd) the composed program redirects into. */
  get xskMapFd(): number { return this.xskMap.fd; }
  get peerIndex(): number { return this.peerIfindex; }
  private get offloadTarget(): XskOffloadTarget {
    return { xskMapFd: this.xskMap.fd, peerIfindex: this.peerIfindex, redirectFd: this.redirectFd, hostIfindex: ifNameToIndex(this.ifname), hostPassFd: this.hostPassFd };
  }

  /**
   * The guest program runs in the kernel at the veth's ingress, composed with the redirect to
   * this device's sockets (one XDP program: offload/compose.ts); nothing runs per frame in
   * JavaScript. Null puts the plain redirect back.
   */
  attachProgram(source: ProgramSource | null, warn: (message: string) => void): string {
    const t = this.offloadTarget;
    let next: ComposedProgram | null = null;
    try {
      if (source) next = ComposedProgram.load(source.code, { xskMapFd: t.xskMapFd, name: this.bpfName('xsk_guest'), abortedName: this.bpfName('aborted') }, source.license);
      xdpAttach(t.peerIfindex, next ? next.fd : t.redirectFd, XDP_FLAGS_DRV_MODE);
    } catch (e) {
      next?.close();
      throw e;
    }
    // The attached program holds its own reference: the previous one can go.
    this.composed?.close();
    this.composed = next;
    try {
      setBounceReceive(t, next !== null);
    } catch (e) {
      warn(`host end of the veth: ${(e as Error).message} (XDP_TX bounces may not reach the host)`);
    }
    return next ? `composed program ${next.id} (guest program + AF_XDP redirect) attached natively` : 'plain AF_XDP redirect attached';
  }
  get umemInfo(): XskUmemInfo | null { return this.umem?.info ?? null; }

  /** The program attached at the veth's ingress: the composed one (guest program + redirect) while an offload runs, else the plain redirect. */
  get attachedProgram(): { id: number; name: string; composed: boolean } {
    if (this.composed) return { id: this.composed.id, name: this.bpfName('xsk_guest'), composed: true };
    const info = progInfo(this.redirectFd);
    return { id: info.id, name: info.name, composed: false };
  }

  /** The pinned-memory quota of this device's UMEM in bytes. */
  get pinLimitBytes(): number { return this.pinLimit; }
  /** The smallest limit setPinLimit accepts (the bounce-only UMEM). */
  get minPinLimitBytes(): number { return minPinLimit(this.queuePairs, this.bounceChunks); }

  /** Returns bytes when it can be this port's pin limit; else throws a RangeError saying why. */
  checkPinLimit(bytes: number): number { return checkPinLimit(bytes, this.queuePairs, this.bounceChunks); }

  /**
   * Changes the pin limit. It is checked when a memory table builds the UMEM, so memory a
   * running guest has pinned stays pinned (taking it away would stop its datapath) and a raised
   * limit does not turn a bounce-only UMEM into a zero-copy one before the next memory table.
   */
  setPinLimit(bytes: number): PinLimitChange {
    this.pinLimit = this.checkPinLimit(bytes);
    const warnings: string[] = [];
    // The current UMEM counts even before its first socket pins it: that socket will.
    const held = Math.max(this.pinnedBytes, this.umem?.info.length ?? 0);
    if (held > bytes) {
      warnings.push(`pin limit ${bytes} is below what is pinned now (${held} bytes): it stays pinned; the limit takes effect at the next memory table (the guest falls back to bounce-only then)`);
    } else if (this.umem?.info.mode === 'bounce' && this.umem.info.length < bytes) {
      warnings.push('the UMEM is bounce-only now; the new limit takes effect at the next memory table (the guest reconnects or sends a new one)');
    }
    return { limit: this.pinLimit, pinned: this.pinnedBytes, warnings };
  }

  /** Largest frame a guest RX buffer must hold (past the vnet header) to receive without a copy. */
  get maxFrame(): number { return this.mtu + L2_OVERHEAD; }

  /**
   * Builds the UMEM view for a new memory table (closing the sockets of the previous one). The
   * datapath must have stopped every ring first. Over the pin limit, the UMEM holds only the
   * bounce chunks and every frame is copied (counted).
   */
  attachMemory(regions: readonly RegionInfo[]): XskUmemInfo {
    this.detachMemory();
    const perPair = 2 * this.bounceChunks;
    this.umem = GuestUmem.create(regions, {
      maxFrame: this.maxFrame, bounceBytes: this.queuePairs * perPair * umemChunkSize(this.maxFrame), pinLimitBytes: this.pinLimit,
    });
    return this.umem.info;
  }

  /** Closes every socket (the kernel unpins the UMEM) and drops the UMEM view. */
  detachMemory(): void {
    for (const pair of [...this.sockets.keys()]) this.releaseQueue(pair);
    this.umem?.release();
    this.umem = null;
  }

  /**
   * Opens (or returns) the AF_XDP socket of a pair, bound to the same queue of the peer, and
   * publishes it in the XSKMAP. The first socket registers the UMEM (the pin); the others
   * share it (XDP_SHARED_UMEM), each with its own fill and completion rings.
   */
  queueConfig(pair: number): XskQueueConfig {
    if (this.closed) throw new Error(`${this.ifname}: port closed`);
    const open = this.sockets.get(pair);
    if (open) return open.cfg;
    if (!(Number.isInteger(pair) && pair >= 0 && pair < this.queuePairs)) throw new Error(`${this.ifname}: no queue pair ${pair}`);
    const umem = this.umem;
    if (!umem) throw new Error(`${this.ifname}: no guest memory attached yet (the UMEM is per memory table)`);
    const info = umem.info;
    const sock = XskSocket.create();
    let txSock: XskSocket | null = null;
    try {
      const sizes = { fill: this.ringSize, completion: this.ringSize, rx: this.ringSize };
      const share = this.sockets.values().next().value as PairSocket | undefined;
      if (!share) {
        sock.registerUmem({ address: info.address, length: info.length, chunkSize: info.chunkSize, headroom: info.headroom, flags: XDP_UMEM_UNALIGNED_CHUNK_FLAG });
      }
      sock.setRingSizes(sizes);
      const rxRings = sock.mapRings(sizes);
      // veth has no zero-copy driver support: copy mode, where only the TX side needs a syscall.
      if (share) sock.bind(this.peerIfindex, pair, XDP_SHARED_UMEM, share.sock.fd);
      else sock.bind(this.peerIfindex, pair, XDP_COPY | XDP_USE_NEED_WAKEUP);
      // Same device and queue as `sock`: the kernel shares its pool (fill and completion rings).
      txSock = XskSocket.create();
      txSock.setRingSizes({ tx: this.ringSize });
      const txRings = txSock.mapRings({ tx: this.ringSize });
      // One wakeup per burst instead of one per 32 frames.
      const txBudget = txSock.setTxBudget(this.ringSize);
      txSock.bind(this.peerIfindex, pair, XDP_SHARED_UMEM, sock.fd);
      const chunksBefore = pair * 2 * this.bounceChunks;
      const cfg: XskQueueConfig = {
        kind: 'xsk', ifname: this.peer, ifindex: this.peerIfindex, queueId: pair, fd: sock.fd, txFd: txSock.fd, txBudget,
        rings: { fill: rxRings.fill, completion: rxRings.completion, rx: rxRings.rx, tx: txRings.tx }, umem: info,
        rxBounce: { offset: chunksBefore * info.chunkSize, count: this.bounceChunks },
        txBounce: { offset: (chunksBefore + this.bounceChunks) * info.chunkSize, count: this.bounceChunks },
      };
      const entry: PairSocket = { sock, txSock, cfg, enabled: !this.disabled.has(pair) };
      if (entry.enabled) this.publish(pair, sock.fd);
      this.sockets.set(pair, entry);
      if (!share) this.pinnedBytes = info.length;
      return cfg;
    } catch (e) {
      txSock?.close();
      sock.close();
      throw e;
    }
  }

  /**
   * The offload device's reserved pair: guest frames sent on it leave through a packet socket on
   * the peer (transmit only; host traffic is steered away from this pair, see setQueueEnabled).
   */
  reservedQueueConfig(pair: number): PacketQueueConfig {
    if (this.closed) throw new Error(`${this.ifname}: port closed`);
    if (!(Number.isInteger(pair) && pair >= 0 && pair < this.queuePairs)) throw new Error(`${this.ifname}: no queue pair ${pair}`);
    return { kind: 'packet', ifname: this.peer, ifindex: this.peerIfindex, headerLength: this.headerLength };
  }

  private publish(pair: number, fd: number): void {
    const k = new Uint8Array(4);
    new DataView(k.buffer).setUint32(0, pair, true);
    const v = new Uint8Array(4);
    new DataView(v.buffer).setUint32(0, fd, true);
    this.xskMap.update(k, v);
  }

  private unpublish(pair: number): void {
    const k = new Uint8Array(4);
    new DataView(k.buffer).setUint32(0, pair, true);
    this.xskMap.delete(k);
  }

  /**
   * Closes a pair's socket. Closing waits for in-flight receive paths (synchronize_net in
   * xsk_release), so once this returns the kernel writes nothing more into the guest buffers
   * that pair posted: call it after the worker stopped the pair's rings and before telling
   * the frontend the ring is stopped.
   */
  releaseQueue(pair: number): void {
    const e = this.sockets.get(pair);
    if (!e) return;
    this.sockets.delete(pair);
    e.txSock.close();
    e.sock.close();
    if (this.sockets.size === 0) this.pinnedBytes = 0;
  }

  /** The pair's kernel counters: receive ones from its RX socket, transmit ones from its TX socket. */
  statistics(pair: number): XskStatistics | null {
    const e = this.sockets.get(pair);
    if (!e) return null;
    const rx = e.sock.statistics();
    const tx = e.txSock.statistics();
    return { ...rx, txInvalidDescs: tx.txInvalidDescs, txRingEmptyDescs: tx.txRingEmptyDescs };
  }

  setMtu(mtu: number): void {
    if (!Number.isInteger(mtu) || mtu < 68 || mtu + L2_OVERHEAD + XDP_PACKET_HEADROOM > PAGE) {
      throw new VxError('bad-mtu', `xsk port: MTU ${mtu} (AF_XDP copy mode without multi-buffer takes up to ${PAGE - XDP_PACKET_HEADROOM - L2_OVERHEAD})`);
    }
    ip(['link', 'set', 'dev', this.peer, 'mtu', String(mtu)]);
    ip(['link', 'set', 'dev', this.ifname, 'mtu', String(mtu)]);
    // The chunk geometry follows at the next attachMemory; until then larger frames are dropped
    // by the kernel (never written past a buffer).
    this.mtu = mtu;
  }

  /** AF_XDP carries plain frames: no checksum or segmentation offload can be honoured. */
  configureOffloads(o: { vnetHeaderLength: number; csum: boolean; tso4: boolean; tso6: boolean; ecn: boolean }): void {
    if (o.csum || o.tso4 || o.tso6) {
      throw new SysError('xsk port', Errno.EOPNOTSUPP, 'checksum/TSO offloads cannot be honoured over AF_XDP; do not offer them on an xsk port');
    }
    this.headerLength = o.vnetHeaderLength;
  }

  /**
   * A disabled pair's socket leaves the XSKMAP (its queue's frames fall to the peer stack),
   * and the host side transmits on as many queues as are enabled, so host traffic steers to the
   * enabled ones (guests enable a prefix of their pairs).
   */
  setQueueEnabled(pair: number, enabled: boolean): void {
    if (!(Number.isInteger(pair) && pair >= 0 && pair < this.queuePairs)) return;
    if (enabled) this.disabled.delete(pair);
    else this.disabled.add(pair);
    const e = this.sockets.get(pair);
    if (e && e.enabled !== enabled) {
      if (enabled) this.publish(pair, e.sock.fd);
      else this.unpublish(pair);
      e.enabled = enabled;
    }
    if (this.queuePairs > 1) {
      const active = Math.max(1, this.queuePairs - this.disabled.size);
      linkCommand('ethtool', ['-L', this.ifname, 'tx', String(active)]);
    }
  }

  stats() {
    return linkStats(this.ifname);
  }

  /** Last resort of a shutdown that ran out of time: the pair we made must not outlive us. */
  abandon(final: boolean): void {
    if (final && !this.closed) spawnSync('ip', ['link', 'delete', this.ifname], { timeout: 2000 });
  }

  close(): void {
    if (this.closed) return;
    this.closed = true;
    this.detachMemory();
    try {
      xdpDetach(this.peerIfindex, XDP_FLAGS_DRV_MODE);
    } catch {
      // The link may already be gone.
    }
    this.composed?.close();
    this.composed = null;
    closeBpfFd(this.redirectFd);
    closeBpfFd(this.hostPassFd);
    this.xskMap.close();
    spawnSync('ip', ['link', 'delete', this.ifname], { timeout: 10_000 });
  }
}
