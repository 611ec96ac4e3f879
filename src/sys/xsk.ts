import koffi from 'koffi';
import { readU64, writeU64 } from './u64.js';
import { fullFence } from './fence.js';
import { SOCK_RAW, SOCK_CLOEXEC, raw, NativeBuffer, SharedMapping, SysError, lastErrno, Errno, MAP_FAILED, PROT_READ, PROT_WRITE, MAP_SHARED } from './libc.js';

// AF_XDP sockets (linux/if_xdp.h) through koffi: socket setup, the UMEM, the four mmap'd rings.
// Pointers travel as numbers, as in libc.ts. Loaded per module instance, so worker threads can
// use the rings and kick the socket without going back to the main thread.
const lib = koffi.load('libc.so.6');
const fn = {
  sendto: lib.func('sendto', 'intptr_t', ['int', 'intptr_t', 'size_t', 'int', 'intptr_t', 'uint32']),
  recvfrom: lib.func('recvfrom', 'intptr_t', ['int', 'intptr_t', 'size_t', 'int', 'intptr_t', 'intptr_t']),
  poll: lib.func('poll', 'int', ['intptr_t', 'ulong', 'int']),
  // mremap is variadic (new_address only with MREMAP_FIXED): declare the 5-argument form.
  mremap: lib.func('mremap', 'intptr_t', ['intptr_t', 'size_t', 'size_t', 'int', '...']),
};

export const AF_XDP = 44;
export const SOL_XDP = 283;

export const XDP_MMAP_OFFSETS = 1;
export const XDP_RX_RING = 2;
export const XDP_TX_RING = 3;
export const XDP_UMEM_REG = 4;
export const XDP_UMEM_FILL_RING = 5;
export const XDP_UMEM_COMPLETION_RING = 6;
export const XDP_STATISTICS = 7;
/** Linux 6.17+: frames one TX wakeup may send in copy mode (default 32, at most the TX ring size). */
export const XDP_MAX_TX_SKB_BUDGET = 9;
/** Copy mode's frames per TX wakeup where XDP_MAX_TX_SKB_BUDGET is unknown. */
export const DEFAULT_TX_SKB_BUDGET = 32;

/** sockaddr_xdp.sxdp_flags */
export const XDP_SHARED_UMEM = 1 << 0;
export const XDP_COPY = 1 << 1;
export const XDP_ZEROCOPY = 1 << 2;
export const XDP_USE_NEED_WAKEUP = 1 << 3;

/** xdp_umem_reg.flags */
export const XDP_UMEM_UNALIGNED_CHUNK_FLAG = 1 << 0;
/** Ring flags word: the kernel needs a syscall to make progress. */
export const XDP_RING_NEED_WAKEUP = 1 << 0;

export const XDP_PGOFF_RX_RING = 0;
export const XDP_PGOFF_TX_RING = 0x80000000;
export const XDP_UMEM_PGOFF_FILL_RING = 0x100000000;
export const XDP_UMEM_PGOFF_COMPLETION_RING = 0x180000000;

/** The kernel reserves this much before every received frame (XDP_PACKET_HEADROOM). */
export const XDP_PACKET_HEADROOM = 256;
/** Smallest chunk the kernel accepts (XDP_UMEM_MIN_CHUNK_SIZE). */
export const XDP_UMEM_MIN_CHUNK_SIZE = 2048;
/** In unaligned mode, RX addresses carry the data offset in their top 16 bits. */
export const XSK_UNALIGNED_BUF_OFFSET_SHIFT = 48;
/** The same split within the address's high u32: base bits 32..47 below it, the offset above. */
const OFFSET_SHIFT_HIGH_WORD = XSK_UNALIGNED_BUF_OFFSET_SHIFT - 32;

const MSG_DONTWAIT = 0x40;
const MREMAP_MAYMOVE = 1;
const MREMAP_FIXED = 2;
const POLLIN = 1;

// Scratch for control-path structs (sockaddr_xdp, xdp_umem_reg, offsets, stats, pollfd).
const scratch = new NativeBuffer(4096);

/** For short sleeps in bind (a queue being released by the kernel). */
const BIND_WAIT = new Int32Array(new SharedArrayBuffer(4));

function sysFail(call: string, detail?: string): never {
  throw new SysError(call, lastErrno(), detail);
}

/** Where one ring's parts live inside its mmap (from XDP_MMAP_OFFSETS). */
export interface RingOffsets { producer: number; consumer: number; desc: number; flags: number }

/**
 * One mapped ring as plain data, so a worker thread of the same process can build ring objects
 * over the mapping that the control thread owns.
 */
export interface RingLayout {
  /** Address of the mmap. */
  address: number;
  /** Bytes mapped. */
  mapLength: number;
  /** Entries (power of two). */
  entries: number;
  offsets: RingOffsets;
}

export interface SocketRingLayouts { fill: RingLayout; completion: RingLayout; rx: RingLayout; tx: RingLayout }

/**
 * The index half of a ring. Producer and consumer are free-running u32 counters in the mapped
 * header; "cached" copies avoid touching the shared cache line on every entry (as libxdp does).
 */
abstract class Ring {
  readonly entries: number;
  readonly mask: number;
  // The kernel's u32 indexes, read and kept as int32 (same bits): as uint32 they pass 2^31
  // after 2^31 entries, V8 then holds them as doubles, and each `& mask` costs about 3x.
  protected readonly prod: Int32Array;
  protected readonly cons: Int32Array;
  protected readonly flagsWord: Uint32Array;
  protected readonly view: DataView;
  protected readonly descOffset: number;
  /**
   * The entries as u32 words (the kernel places them 64-byte aligned). Per-frame ring stores
   * and loads go through this typed array, not the DataView: a DataView access re-checks its
   * buffer on every call, and the u64 fields split into two words anyway.
   */
  protected readonly words: Uint32Array;
  /** Our view of the two indexes; the other side's is re-read only when the view runs out. */
  protected cachedProd: number;
  protected cachedCons: number;

  constructor(layout: RingLayout, entrySize: number) {
    const { address, mapLength, entries, offsets } = layout;
    if (entries < 1 || (entries & (entries - 1)) !== 0) throw new RangeError(`ring size ${entries} is not a power of two`);
    if (offsets.desc + entries * entrySize > mapLength) throw new RangeError('ring descriptors outside the mapping');
    // SAFETY: the ring mapping is owned by an XskSocket that outlives every ring object made
    // over it (the port closes sockets only after the datapath dropped its rings).
    const ab = koffi.view(address, mapLength);
    this.prod = new Int32Array(ab, offsets.producer, 1);
    this.cons = new Int32Array(ab, offsets.consumer, 1);
    this.flagsWord = new Uint32Array(ab, offsets.flags, 1);
    this.view = new DataView(ab);
    this.descOffset = offsets.desc;
    this.words = new Uint32Array(ab, offsets.desc, (entries * entrySize) >>> 2);
    this.entries = entries;
    this.mask = entries - 1;
    this.cachedProd = this.prod[0]!;
    this.cachedCons = this.cons[0]!;
  }

  /** XDP_RING_NEED_WAKEUP is set (read after a fence: it follows our index store). */
  needWakeup(): boolean {
    fullFence();
    return (this.flagsWord[0]! & XDP_RING_NEED_WAKEUP) !== 0;
  }
}

/** A ring we fill (fill, TX): reserve slots, write them, submit (store-release of producer). */
abstract class ProducerRing extends Ring {

  /** Free slots; reads the kernel's consumer only when the cached view says fewer than `want`. */
  free(want = 1): number {
    // `| 0`, not `>>> 0`: the difference is at most `entries`, and an int32 keeps V8 in integer arithmetic.
    let n = this.entries - ((this.cachedProd - this.cachedCons) | 0);
    if (n >= want) return n;
    this.cachedCons = this.cons[0]!;
    n = this.entries - ((this.cachedProd - this.cachedCons) | 0);
    return n;
  }

  /** Index (free-running) of the next slot reserve() hands out. */
  get nextIndex(): number { return this.cachedProd; }

  /** Reserves n slots starting at nextIndex; false (nothing reserved) when fewer are free. */
  reserve(n: number): boolean {
    if (this.free(n) < n) return false;
    this.cachedProd = (this.cachedProd + n) | 0;
    return true;
  }

  /**
   * Publishes every reserved slot. The entry stores precede this store in program order and
   * x86 keeps stores in order (TSO), so it is a store-release without a fence.
   */
  submit(): void {
    this.prod[0] = this.cachedProd;
  }

  /** Entries submitted but not yet consumed by the kernel (reads the consumer). */
  outstanding(): number {
    this.cachedCons = this.cons[0]!;
    return (this.cachedProd - this.cachedCons) >>> 0;
  }
}

/** A ring the kernel fills (RX, completion): peek entries, read them, release. */
abstract class ConsumerRing extends Ring {

  /**
   * Up to max entries ready from nextIndex on. Reading the producer before the entries is a
   * load-acquire on x86 (loads are not reordered with older loads).
   */
  peek(max: number): number {
    let n = (this.cachedProd - this.cachedCons) >>> 0;
    if (n === 0) {
      this.cachedProd = this.prod[0]!;
      n = (this.cachedProd - this.cachedCons) >>> 0;
    }
    return n < max ? n : max;
  }

  get nextIndex(): number { return this.cachedCons; }

  /** Gives n entries back to the kernel; our loads of them precede this store (TSO). */
  release(n: number): void {
    this.cachedCons = (this.cachedCons + n) | 0;
    this.cons[0] = this.cachedCons;
  }
}


/** Fill ring: UMEM addresses the kernel may receive into. */
export class FillRing extends ProducerRing {
  constructor(layout: RingLayout) { super(layout, 8); }
  /** Writes slot `index` (from nextIndex of a successful reserve). */
  set(index: number, addr: number): void {
    writeU64(this.view, this.descOffset + 8 * (index & this.mask), addr);
  }
}

/** Completion ring: UMEM addresses of transmitted frames. */
export class CompletionRing extends ConsumerRing {
  constructor(layout: RingLayout) { super(layout, 8); }
  addr(index: number): number {
    const i = (index & this.mask) << 1;
    return this.words[i]! + this.words[i + 1]! * 4294967296;
  }
}

/** RX ring: struct xdp_desc { u64 addr; u32 len; u32 options }. */
export class RxRing extends ConsumerRing {
  constructor(layout: RingLayout) { super(layout, 16); }
  /**
   * The buffer's base address. In unaligned mode the kernel reports base | data offset << 48,
   * which as one double would lose the low bits of the base (offsets >= 256 put the value above
   * 2^56): the two are read apart.
   */
  base(index: number): number {
    const o = this.descOffset + 16 * (index & this.mask);
    return this.view.getUint32(o, true) + (this.view.getUint32(o + 4, true) & ((1 << OFFSET_SHIFT_HIGH_WORD) - 1)) * 4294967296;
  }
  /** The data offset of an unaligned-mode address (bits 48..63). */
  offset(index: number): number {
    return this.view.getUint32(this.descOffset + 16 * (index & this.mask) + 4, true) >>> OFFSET_SHIFT_HIGH_WORD;
  }
  len(index: number): number {
    return this.view.getUint32(this.descOffset + 16 * (index & this.mask) + 8, true);
  }
}

/** TX ring: struct xdp_desc, written by us. */
export class TxRing extends ProducerRing {
  constructor(layout: RingLayout) { super(layout, 16); }
  /** Writes the next slot and reserves it; the caller checked free() first. */
  push(addr: number, len: number): void {
    const w = this.words;
    const i = (this.cachedProd & this.mask) << 2;
    // The low word by truncation (`>>> 0`), the high one exactly (addr < 2^53): see writeU64.
    const lo = addr >>> 0;
    w[i] = lo;
    w[i + 1] = (addr - lo) / 4294967296;
    w[i + 2] = len;
    w[i + 3] = 0;
    this.cachedProd = (this.cachedProd + 1) | 0;
  }
}


export interface UmemRegistration {
  address: number;
  length: number;
  chunkSize: number;
  /** Extra headroom before XDP_PACKET_HEADROOM in every chunk. */
  headroom: number;
  flags: number;
}

export interface XskStatistics {
  rxDropped: number; rxInvalidDescs: number; txInvalidDescs: number;
  rxRingFull: number; rxFillRingEmptyDescs: number; txRingEmptyDescs: number;
}

/**
 * One AF_XDP socket and the rings it mapped. Setup order (kernel rule): UMEM (or shared UMEM
 * at bind), ring sizes, mmap, bind. close() unmaps the rings and closes the fd; the kernel
 * unpins the UMEM when its last socket is gone.
 */
export class XskSocket {
  readonly fd: number;
  private maps: SharedMapping[] = [];
  private closed = false;
  layouts: Partial<SocketRingLayouts> = {};

  private constructor(fd: number) {
    this.fd = fd;
  }

  static create(): XskSocket {
    const fd = raw.socket(AF_XDP, SOCK_RAW | SOCK_CLOEXEC, 0);
    if (fd < 0) sysFail('socket(AF_XDP)');
    return new XskSocket(fd);
  }

  private setInt(opt: number, value: number, what: string): void {
    scratch.view.setUint32(0, value, true);
    if (raw.setsockopt(this.fd, SOL_XDP, opt, scratch.address, 4) < 0) sysFail(`setsockopt(${what})`, String(value));
  }

  /**
   * XDP_UMEM_REG. struct xdp_umem_reg on 6.x: addr@0 len@8 chunk_size@16 headroom@20 flags@24
   * tx_metadata_len@28; 32 bytes (the kernel takes the v1 24-byte and v2 layouts too).
   */
  registerUmem(r: UmemRegistration): void {
    const v = scratch.view;
    scratch.bytes.fill(0, 0, 32);
    writeU64(v, 0, r.address);
    writeU64(v, 8, r.length);
    v.setUint32(16, r.chunkSize, true);
    v.setUint32(20, r.headroom, true);
    v.setUint32(24, r.flags, true);
    if (raw.setsockopt(this.fd, SOL_XDP, XDP_UMEM_REG, scratch.address, 32) < 0) {
      sysFail('setsockopt(XDP_UMEM_REG)', `0x${r.address.toString(16)}+${r.length} chunk ${r.chunkSize} headroom ${r.headroom}`);
    }
  }

  /** Ring sizes (powers of two). A socket sharing another's UMEM still sets its own fill/completion. */
  setRingSizes(s: { fill?: number; completion?: number; rx?: number; tx?: number }): void {
    if (s.fill) this.setInt(XDP_UMEM_FILL_RING, s.fill, 'XDP_UMEM_FILL_RING');
    if (s.completion) this.setInt(XDP_UMEM_COMPLETION_RING, s.completion, 'XDP_UMEM_COMPLETION_RING');
    if (s.rx) this.setInt(XDP_RX_RING, s.rx, 'XDP_RX_RING');
    if (s.tx) this.setInt(XDP_TX_RING, s.tx, 'XDP_TX_RING');
  }

  /**
   * Lets one TX wakeup send up to `budget` frames (copy mode); returns the budget in effect,
   * the kernel's default where the option is unknown (before 6.17). Needs the TX ring set.
   */
  setTxBudget(budget: number): number {
    scratch.view.setUint32(0, budget, true);
    if (raw.setsockopt(this.fd, SOL_XDP, XDP_MAX_TX_SKB_BUDGET, scratch.address, 4) === 0) return budget;
    if (lastErrno() === Errno.ENOPROTOOPT) return DEFAULT_TX_SKB_BUDGET;
    sysFail('setsockopt(XDP_MAX_TX_SKB_BUDGET)', String(budget));
  }

  /** XDP_MMAP_OFFSETS: four struct xdp_ring_offset {producer, consumer, desc, flags} (u64 each). */
  mmapOffsets(): { rx: RingOffsets; tx: RingOffsets; fill: RingOffsets; completion: RingOffsets } {
    const v = scratch.view;
    scratch.bytes.fill(0, 0, 136);
    v.setUint32(128, 128, true);
    if (raw.getsockopt(this.fd, SOL_XDP, XDP_MMAP_OFFSETS, scratch.address, scratch.address + 128) < 0) {
      sysFail('getsockopt(XDP_MMAP_OFFSETS)');
    }
    if (v.getUint32(128, true) !== 128) throw new SysError('getsockopt(XDP_MMAP_OFFSETS)', Errno.EINVAL, `unexpected length ${v.getUint32(128, true)}`);
    const ring = (i: number): RingOffsets => ({
      producer: readU64(v, i * 32), consumer: readU64(v, i * 32 + 8), desc: readU64(v, i * 32 + 16), flags: readU64(v, i * 32 + 24),
    });
    return { rx: ring(0), tx: ring(1), fill: ring(2), completion: ring(3) };
  }

  /** Maps the rings whose sizes were set; records their layouts in `layouts`. */
  mapRings(sizes: { fill?: number; completion?: number; rx?: number; tx?: number }): SocketRingLayouts {
    const off = this.mmapOffsets();
    const map = (entries: number | undefined, o: RingOffsets, entrySize: number, pgoff: number): RingLayout | undefined => {
      if (!entries) return undefined;
      const length = o.desc + entries * entrySize;
      const m = new SharedMapping(this.fd, length, pgoff, { populate: true, what: 'xsk ring' });
      this.maps.push(m);
      return { address: m.address, mapLength: length, entries, offsets: o };
    };
    const l = this.layouts;
    l.fill = map(sizes.fill, off.fill, 8, XDP_UMEM_PGOFF_FILL_RING) ?? l.fill;
    l.completion = map(sizes.completion, off.completion, 8, XDP_UMEM_PGOFF_COMPLETION_RING) ?? l.completion;
    l.rx = map(sizes.rx, off.rx, 16, XDP_PGOFF_RX_RING) ?? l.rx;
    l.tx = map(sizes.tx, off.tx, 16, XDP_PGOFF_TX_RING) ?? l.tx;
    return l as SocketRingLayouts;
  }

  /** bind: struct sockaddr_xdp { u16 family; u16 flags; u32 ifindex; u32 queue_id; u32 shared_umem_fd }. */
  bind(ifindex: number, queueId: number, flags: number, sharedUmemFd = 0): void {
    const v = scratch.view;
    scratch.bytes.fill(0, 0, 16);
    v.setUint16(0, AF_XDP, true);
    v.setUint16(2, flags, true);
    v.setUint32(4, ifindex, true);
    v.setUint32(8, queueId, true);
    v.setUint32(12, sharedUmemFd, true);
    // A socket closed on this queue just before (a pair reopened) releases the queue from a
    // kernel work item (xp_release_deferred): until it ran, bind says EBUSY. Wait a little for it.
    for (let waited = 0; raw.bind(this.fd, scratch.address, 16) < 0; waited += 5) {
      if (lastErrno() !== Errno.EBUSY || waited >= 500) sysFail('bind(AF_XDP)', `ifindex ${ifindex} queue ${queueId} flags 0x${flags.toString(16)}`);
      Atomics.wait(BIND_WAIT, 0, 0, 5);
    }
  }

  statistics(): XskStatistics {
    const v = scratch.view;
    scratch.bytes.fill(0, 0, 64);
    v.setUint32(56, 48, true);
    if (raw.getsockopt(this.fd, SOL_XDP, XDP_STATISTICS, scratch.address, scratch.address + 56) < 0) sysFail('getsockopt(XDP_STATISTICS)');
    return {
      rxDropped: readU64(v, 0), rxInvalidDescs: readU64(v, 8), txInvalidDescs: readU64(v, 16),
      rxRingFull: readU64(v, 24), rxFillRingEmptyDescs: readU64(v, 32), txRingEmptyDescs: readU64(v, 40),
    };
  }

  close(): void {
    if (this.closed) return;
    this.closed = true;
    for (const m of this.maps) m.unmap();
    this.maps = [];
    raw.close(this.fd);
  }
}

/**
 * Asks the kernel to transmit what the TX ring holds (copy mode transmits only inside this
 * syscall). Returns false when the kernel could not take everything now (EAGAIN/EBUSY/ENOBUFS:
 * call again); throws for real errors (e.g. ENETDOWN, ENXIO).
 */
export function kickTx(fd: number): boolean {
  if (fn.sendto(fd, 0, 0, MSG_DONTWAIT, 0, 0) >= 0) return true;
  const e = lastErrno();
  if (e === Errno.EAGAIN || e === Errno.EBUSY || e === Errno.ENOBUFS || e === Errno.EINTR) return false;
  throw new SysError('sendto(AF_XDP)', e);
}

/** Wakes the kernel's RX side (needed only with need_wakeup on zero-copy drivers). */
export function kickRx(fd: number): void {
  if (fn.recvfrom(fd, 0, 0, MSG_DONTWAIT, 0, 0) < 0) {
    const e = lastErrno();
    if (e !== Errno.EAGAIN && e !== Errno.EINTR) throw new SysError('recvfrom(AF_XDP)', e);
  }
}

/** poll(2) for POLLIN on one fd; true when readable within timeoutMs. */
export function pollReadable(fd: number, timeoutMs: number): boolean {
  const v = scratch.view;
  v.setInt32(64, fd, true);
  v.setInt16(68, POLLIN, true);
  v.setInt16(70, 0, true);
  const r = fn.poll(scratch.address + 64, 1, timeoutMs);
  if (r < 0) {
    if (lastErrno() === Errno.EINTR) return false;
    sysFail('poll');
  }
  return r > 0 && (v.getInt16(70, true) & POLLIN) !== 0;
}

/** Maps `length` bytes of `fd` from `offset` at exactly `dest` (MAP_SHARED | MAP_FIXED over our reservation). */
export function mapFileAt(fd: number, offset: number, length: number, dest: number): void {
  const MAP_FIXED = 0x10;
  const r = raw.mmap(dest, length, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_FIXED, fd, offset);
  if (r === MAP_FAILED) sysFail('mmap', `fd ${fd} offset ${offset} +${length} -> 0x${dest.toString(16)}`);
  if (r !== dest) throw new SysError('mmap', Errno.EFAULT, `landed at 0x${r.toString(16)}, wanted 0x${dest.toString(16)}`);
}

/**
 * A second virtual mapping of the pages of an existing MAP_SHARED mapping, placed at `dest`
 * (mremap with old_size 0). The pages are the same (a memfd's), only the address differs.
 */
export function remapSharedAt(source: number, length: number, dest: number): void {
  const r = fn.mremap(source, 0, length, MREMAP_MAYMOVE | MREMAP_FIXED, 'intptr_t', dest) as number;
  if (r === MAP_FAILED) sysFail('mremap', `0x${source.toString(16)}+${length} -> 0x${dest.toString(16)}`);
  if (r !== dest) throw new SysError('mremap', Errno.EFAULT, `landed at 0x${r.toString(16)}, wanted 0x${dest.toString(16)}`);
}
