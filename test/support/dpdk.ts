import { existsSync, readFileSync, readdirSync, rmSync } from 'node:fs';
import { ManagedProcess, spawnManaged } from './processes.js';

/**
 * Drives DPDK 22.11 `dpdk-testpmd` as an independent vhost-user peer for tests and benches.
 *
 * Findings this module relies on (checked on this machine):
 * - Drivers: testpmd is a shared build whose EAL loads every PMD in its default plugin
 *   directory (/usr/lib/x86_64-linux-gnu/dpdk/pmds-23.0) by itself, so no `-d` flags are
 *   needed. startTestpmd only checks that the drivers a vdev names are present there, to fail
 *   with a clear message instead of "No probed ethernet devices".
 * - Without `--stats-period`, a non-interactive testpmd exits at once when stdin is not a
 *   terminal; with it, testpmd starts forwarding on its own and prints port statistics every
 *   period until SIGINT, then prints the final forward statistics and exits ("Bye...").
 *   We run non-interactive and stop with SIGINT.
 * - Hugepage files (/dev/hugepages/<prefix>map_*) and the runtime dir (/var/run/dpdk/<prefix>)
 *   stay after a clean exit; stop() removes them.
 * - Lcores: EAL takes a main lcore (prints stats, otherwise sleeps) plus forwarding lcores.
 *   With `cores: '0,1'` and `mainLcore: 0` the forwarding loop busy-polls on core 1. Two
 *   instances on a 2-core machine are pinned crosswise (A: main 0 / forwarding 1, B: main 1 /
 *   forwarding 0) so each busy-poller owns a core and the mostly idle mains share.
 *
 * The txonly frame (captured from a net_tap port): Ethernet dst = peer MAC (02:00:00:00:00:00
 * unless --eth-peer), src = port MAC, type 0x0800; IPv4 with IHL 5, TOS 0, id 0, no flags,
 * TTL 64, proto UDP, valid header checksum, 198.18.0.1 -> 198.18.0.2 (--tx-ip); UDP 9 -> 9
 * (--tx-udp), checksum 0; the payload is whatever the mbuf held (zeros from fresh hugepages;
 * txonly never writes it). Frame length = txpkts (default 64, no FCS).
 *
 * Seeing payloads of frames testpmd *receives*: `set verbose 1` needs interactive mode and
 * prints only addresses, type, length and ptype, never payload bytes. The robust way is a
 * second port on the `net_pcap` PMD: forward mode `io`, vdevs [virtio-user, pcapVdev(0, files)]
 * (port 0 RX -> port 1 TX, one file per queue), and readPcap() after stop() (the PMD flushes
 * on close). Every frame testpmd received is then checked byte for byte, independently of the
 * host->guest path being tested; RX counts are in stats()/stop().forward[0].rxPackets. Only
 * inject bounded traffic this way (a pcap port writes ~100 MB/s at full rate).
 * (Alternative: `mac` forwarding bounces frames back to the tap with the src MAC rewritten to
 * the port's MAC, seen on the host with PacketSocket; that needs both directions working.)
 */

export const PMD_DIR = '/usr/lib/x86_64-linux-gnu/dpdk/pmds-23.0';
export const TESTPMD = '/usr/bin/dpdk-testpmd';
const HUGEPAGE_DIR = '/dev/hugepages';
const RUNTIME_DIR = '/var/run/dpdk';

export type ForwardMode = 'txonly' | 'rxonly' | 'io' | 'mac' | 'macswap' | 'flowgen' | 'icmpecho' | '5tswap';

export interface TestpmdOptions {
  /** --vdev arguments, e.g. `net_virtio_user0,path=/tmp/x.sock,queues=2,queue_size=256`. */
  vdevs: string[];
  forwardMode: ForwardMode;
  /** RX and TX queues per port (--rxq/--txq). Default 1. */
  queues?: number;
  /** Frame length for txonly (--txpkts), bytes without FCS. Default 64. */
  txpkts?: number;
  burst?: number;
  /** EAL lcore list (-l). Default '0,1'. */
  cores?: string;
  /** EAL main lcore; forwarding uses the other listed lcores. Default: the first listed. */
  mainLcore?: number;
  /** Forwarding lcores (--nb-cores). Default: all non-main lcores, at most one per stream. */
  nbCores?: number;
  /** Seconds between stats prints; required for non-interactive runs. Default 1. */
  statsPeriod?: number;
  /** Unique per running instance; default made from pid and a counter. */
  filePrefix?: string;
  /** Hugepage memory in MiB (-m). Default 256, so two instances fit in 1024 x 2 MiB. */
  memoryMb?: number;
  /** --total-num-mbufs. Default 16384 (testpmd's own default is >150k and needs >300 MiB). */
  totalMbufs?: number;
  /** Default: on when a vdev is net_virtio_user (else "Too many memory regions"). */
  singleFileSegments?: boolean;
  /** MAC the port sends to in txonly/mac modes, per port: [port0, port1, ...]. */
  ethPeers?: string[];
  /** txonly source/destination IPv4. */
  txIp?: [string, string];
  /** txonly UDP source/destination port. */
  txUdp?: [number, number];
  txonlyMultiFlow?: boolean;
  rxd?: number;
  txd?: number;
  /** 'loop' forwards a port back to itself; default testpmd 'paired'. */
  portTopology?: 'paired' | 'chained' | 'loop';
  extraEal?: string[];
  extraApp?: string[];
  /** Label for logs. */
  name?: string;
  /** Time allowed until forwarding starts. Default 20 s. */
  startTimeoutMs?: number;
  echo?: boolean;
}

/** One port's numbers from the latest periodic "NIC statistics" block. */
export interface PortStats {
  port: number;
  rxPackets: number;
  rxMissed: number;
  rxBytes: number;
  rxErrors: number;
  rxNombuf: number;
  txPackets: number;
  txErrors: number;
  txBytes: number;
  rxPps: number;
  txPps: number;
}

/** Final per-port "Forward statistics" printed at stop. */
export interface ForwardStats {
  port: number;
  rxPackets: number;
  rxDropped: number;
  txPackets: number;
  /** Frames the PMD did not accept for transmission (ring full). */
  txDropped: number;
}

export interface TestpmdResult {
  code: number | null;
  signal: string | null;
  forward: ForwardStats[];
  /** Last periodic NIC stats seen before exit. */
  lastStats: PortStats[];
}

let prefixCounter = 0;

/** Verifies hugepages are reserved and hugetlbfs is mounted (bootstrap sets both up). */
export function ensureHugepages(minPages = 1024): void {
  const nr = Number(readFileSync('/proc/sys/vm/nr_hugepages', 'utf8').trim());
  const meminfo = readFileSync('/proc/meminfo', 'utf8');
  const size = /Hugepagesize:\s+(\d+) kB/.exec(meminfo)?.[1];
  if (size !== '2048') throw new Error(`DPDK harness expects 2 MiB hugepages, default size is ${size} kB`);
  if (nr < minPages) {
    throw new Error(
      `only ${nr} hugepages reserved, need ${minPages}: run scripts/bootstrap.sh or ` +
        `"echo ${minPages} > /proc/sys/vm/nr_hugepages"`,
    );
  }
  const mounts = readFileSync('/proc/mounts', 'utf8').split('\n');
  if (!mounts.some((l) => l.split(' ')[1] === HUGEPAGE_DIR && l.split(' ')[2] === 'hugetlbfs')) {
    throw new Error(`hugetlbfs is not mounted on ${HUGEPAGE_DIR}: run scripts/bootstrap.sh or "mount -t hugetlbfs nodev ${HUGEPAGE_DIR}"`);
  }
}

/** Free 2 MiB hugepages right now (for assertions and error messages). */
export function freeHugepages(): number {
  const m = /HugePages_Free:\s+(\d+)/.exec(readFileSync('/proc/meminfo', 'utf8'));
  return m ? Number(m[1]) : 0;
}

const driverFor: Record<string, string> = {
  net_virtio_user: 'librte_net_virtio.so',
  net_vhost: 'librte_net_vhost.so',
  net_tap: 'librte_net_tap.so',
  net_af_xdp: 'librte_net_af_xdp.so',
  net_pcap: 'librte_net_pcap.so',
  net_null: 'librte_net_null.so',
  net_ring: 'librte_net_ring.so',
  net_af_packet: 'librte_net_af_packet.so',
};

function checkDrivers(vdevs: readonly string[]): void {
  for (const want of ['librte_mempool_ring.so', 'librte_bus_vdev.so']) {
    if (!existsSync(`${PMD_DIR}/${want}`)) throw new Error(`DPDK driver ${want} missing in ${PMD_DIR} (install librte-* packages per ENV-FACTS.md)`);
  }
  for (const v of vdevs) {
    const kind = /^(net_[a-z_]+?)\d*(,|$)/.exec(v)?.[1];
    const lib = kind ? driverFor[kind] : undefined;
    if (lib && !existsSync(`${PMD_DIR}/${lib}`)) throw new Error(`DPDK driver ${lib} for ${kind} missing in ${PMD_DIR}`);
  }
}

/** Hugepage files and runtime dir of one prefix; matches `<prefix>map_` exactly so p1 never touches p10. */
export function dpdkLeftovers(prefix: string): string[] {
  const out: string[] = [];
  try {
    for (const f of readdirSync(HUGEPAGE_DIR)) if (f.startsWith(`${prefix}map_`)) out.push(`${HUGEPAGE_DIR}/${f}`);
  } catch {
    /* no hugetlbfs: nothing to leak */
  }
  if (existsSync(`${RUNTIME_DIR}/${prefix}`)) out.push(`${RUNTIME_DIR}/${prefix}`);
  return out;
}

export function removeDpdkLeftovers(prefix: string): void {
  for (const p of dpdkLeftovers(prefix)) rmSync(p, { recursive: true, force: true });
}

const OUR_PREFIX = /^vx(\d+)x\d+/;

/**
 * Removes hugepage files and runtime dirs left by testpmds this harness started in test
 * processes that no longer exist (prefix vx<pid>x<n>, pid dead). Without this, each
 * crashed run would pin 128 hugepages until reboot. Returns the prefixes removed.
 */
export function sweepStaleDpdkLeftovers(): string[] {
  const prefixes = new Set<string>();
  const consider = (name: string): void => {
    const m = OUR_PREFIX.exec(name);
    if (m && !existsSync(`/proc/${m[1]}`)) prefixes.add(m[0]);
  };
  for (const dir of [HUGEPAGE_DIR, RUNTIME_DIR]) {
    try {
      for (const f of readdirSync(dir)) consider(f);
    } catch {
      /* absent */
    }
  }
  for (const p of prefixes) removeDpdkLeftovers(p);
  return [...prefixes];
}

const livePrefixes = new Set<string>();
let exitSweepInstalled = false;

function registerLivePrefix(prefix: string): void {
  livePrefixes.add(prefix);
  if (exitSweepInstalled) return;
  exitSweepInstalled = true;
  // Runs after processes.ts has SIGKILLed the testpmds (its hook was registered first).
  // Unlinking files a dying process still maps is fine: the pages return when it is gone.
  process.on('exit', () => {
    for (const p of livePrefixes) removeDpdkLeftovers(p);
  });
}

/** A vdev string for a pcap port that writes every frame it transmits to `file`; one file per TX queue. */
export function pcapVdev(index: number, files: string[]): string {
  return `net_pcap${index},${files.map((f) => `tx_pcap=${f}`).join(',')}`;
}

/** Frames of a classic pcap file (either byte order, micro- or nanosecond variant). */
export function readPcap(file: string): Uint8Array[] {
  const b = readFileSync(file);
  if (b.length < 24) return [];
  const magic = b.readUInt32LE(0);
  let le: boolean;
  if (magic === 0xa1b2c3d4 || magic === 0xa1b23c4d) le = true;
  else if (magic === 0xd4c3b2a1 || magic === 0x4d3cb2a1) le = false;
  else throw new Error(`${file}: not a pcap file`);
  const out: Uint8Array[] = [];
  let off = 24;
  while (off + 16 <= b.length) {
    const incl = le ? b.readUInt32LE(off + 8) : b.readUInt32BE(off + 8);
    off += 16;
    if (off + incl > b.length) break; // truncated tail (writer killed mid-record)
    out.push(new Uint8Array(b.subarray(off, off + incl)));
    off += incl;
  }
  return out;
}

export interface TxonlyFrameExpect {
  /** Expected whole frame length (txpkts). */
  frameLen?: number;
  srcMac?: string;
  dstMac?: string;
  srcIp?: string;
  dstIp?: string;
  srcPort?: number;
  dstPort?: number;
  /** Also require the payload to be all zeros (true for a fresh txonly-only mempool). */
  zeroPayload?: boolean;
}

/**
 * True when `f` is a frame DPDK 22.11 txonly builds (see the header comment): exact header
 * fields, valid IPv4 checksum, consistent lengths. Addresses default to testpmd's defaults.
 */
export function isTxonlyFrame(f: Uint8Array, e: TxonlyFrameExpect = {}): boolean {
  if (f.length < 42) return false;
  if (e.frameLen !== undefined && f.length !== e.frameLen) return false;
  const v = new DataView(f.buffer, f.byteOffset, f.byteLength);
  const mac = (o: number): string => Array.from(f.subarray(o, o + 6), (x) => x.toString(16).padStart(2, '0')).join(':');
  if (e.dstMac !== undefined && mac(0) !== e.dstMac.toLowerCase()) return false;
  if (e.srcMac !== undefined && mac(6) !== e.srcMac.toLowerCase()) return false;
  if (v.getUint16(12) !== 0x0800) return false;
  if (f[14] !== 0x45 || f[15] !== 0) return false;
  const totLen = v.getUint16(16);
  if (totLen !== f.length - 14) return false;
  if (v.getUint16(18) !== 0 || v.getUint16(20) !== 0 || f[22] !== 64 || f[23] !== 17) return false;
  let sum = 0;
  for (let i = 14; i < 34; i += 2) sum += v.getUint16(i);
  while (sum > 0xffff) sum = (sum & 0xffff) + (sum >>> 16);
  if (sum !== 0xffff) return false;
  const ip = (o: number): string => `${f[o]}.${f[o + 1]}.${f[o + 2]}.${f[o + 3]}`;
  if (ip(26) !== (e.srcIp ?? '198.18.0.1') || ip(30) !== (e.dstIp ?? '198.18.0.2')) return false;
  if (v.getUint16(34) !== (e.srcPort ?? 9) || v.getUint16(36) !== (e.dstPort ?? 9)) return false;
  if (v.getUint16(38) !== totLen - 20 || v.getUint16(40) !== 0) return false;
  if (e.zeroPayload) for (let i = 42; i < f.length; i++) if (f[i] !== 0) return false;
  return true;
}

function num(s: string | undefined): number {
  return s === undefined ? 0 : Number(s);
}

// eslint-disable-next-line no-control-regex
const ANSI = /\x1b\[[0-9;]*[A-Za-z]/g;

/** A running testpmd. Create with startTestpmd(). */
export class Testpmd {
  readonly proc: ManagedProcess;
  readonly filePrefix: string;
  readonly args: string[];
  /** Port MAC addresses as printed at startup ("Port N: MAC"). */
  readonly portMacs = new Map<number, string>();
  /** Completed stats snapshots (one per stats period), newest last; bounded. */
  readonly history: { at: number; ports: PortStats[] }[] = [];
  private current: Map<number, PortStats> | null = null;
  private currentPort = -1;
  private readonly forward = new Map<number, ForwardStats>();
  private inForward = -1;
  private stopped: Promise<TestpmdResult> | null = null;

  constructor(args: string[], filePrefix: string, name: string, echo?: boolean) {
    this.args = args;
    this.filePrefix = filePrefix;
    this.proc = spawnManaged(TESTPMD, args, { name, echo, keepLines: 3000 });
    this.proc.onLine((l) => this.parse(l.replace(ANSI, '')));
    // A test that dies without stop() must not leak hugepage files.
    registerLivePrefix(filePrefix);
    void this.proc.exited.then(() => {
      removeDpdkLeftovers(filePrefix);
      livePrefixes.delete(filePrefix);
    });
  }

  private parse(line: string): void {
    let m: RegExpExecArray | null;
    if ((m = /^Port (\d+): ([0-9A-Fa-f:]{17})\s*$/.exec(line))) {
      this.portMacs.set(Number(m[1]), m[2]!.toLowerCase());
      return;
    }
    if (/^Port statistics =+/.test(line)) {
      this.flushSnapshot();
      this.current = new Map();
      return;
    }
    if ((m = /#+ NIC statistics for port (\d+)/.exec(line))) {
      this.current ??= new Map();
      this.currentPort = Number(m[1]);
      this.current.set(this.currentPort, {
        port: this.currentPort, rxPackets: 0, rxMissed: 0, rxBytes: 0, rxErrors: 0, rxNombuf: 0,
        txPackets: 0, txErrors: 0, txBytes: 0, rxPps: 0, txPps: 0,
      });
      return;
    }
    if ((m = /-+ Forward statistics for port (\d+)/.exec(line))) {
      this.flushSnapshot();
      this.inForward = Number(m[1]);
      this.forward.set(this.inForward, { port: this.inForward, rxPackets: 0, rxDropped: 0, txPackets: 0, txDropped: 0 });
      return;
    }
    if (this.inForward >= 0) {
      const fs = this.forward.get(this.inForward)!;
      if ((m = /RX-packets:\s*(\d+)\s+RX-dropped:\s*(\d+)/.exec(line))) {
        fs.rxPackets = num(m[1]);
        fs.rxDropped = num(m[2]);
      } else if ((m = /TX-packets:\s*(\d+)\s+TX-dropped:\s*(\d+)/.exec(line))) {
        fs.txPackets = num(m[1]);
        fs.txDropped = num(m[2]);
        this.inForward = -1;
      }
      return;
    }
    const cur = this.current?.get(this.currentPort);
    if (!cur) return;
    if ((m = /RX-packets:\s*(\d+)\s+RX-missed:\s*(\d+)\s+RX-bytes:\s*(\d+)/.exec(line))) {
      cur.rxPackets = num(m[1]);
      cur.rxMissed = num(m[2]);
      cur.rxBytes = num(m[3]);
    } else if ((m = /RX-errors:\s*(\d+)/.exec(line))) cur.rxErrors = num(m[1]);
    else if ((m = /RX-nombuf:\s*(\d+)/.exec(line))) cur.rxNombuf = num(m[1]);
    else if ((m = /TX-packets:\s*(\d+)\s+TX-errors:\s*(\d+)\s+TX-bytes:\s*(\d+)/.exec(line))) {
      cur.txPackets = num(m[1]);
      cur.txErrors = num(m[2]);
      cur.txBytes = num(m[3]);
    } else if ((m = /Rx-pps:\s*(\d+)/.exec(line))) cur.rxPps = num(m[1]);
    else if ((m = /Tx-pps:\s*(\d+)/.exec(line))) {
      cur.txPps = num(m[1]);
    } else if (/^\s*#{20,}\s*$/.test(line)) {
      // End of this port's block; the snapshot is complete once the last port closed.
      this.currentPort = -1;
      if (this.current && [...this.current.values()].length >= Math.max(1, this.portMacs.size)) this.flushSnapshot();
    }
  }

  private flushSnapshot(): void {
    if (this.current && this.current.size > 0) {
      this.history.push({ at: Date.now(), ports: [...this.current.values()].sort((a, b) => a.port - b.port) });
      if (this.history.length > 600) this.history.shift();
    }
    this.current = null;
    this.currentPort = -1;
  }

  /** Latest complete periodic stats (empty before the first period has passed). */
  stats(): PortStats[] {
    return this.history.at(-1)?.ports ?? [];
  }

  port(n: number): PortStats | undefined {
    return this.stats().find((p) => p.port === n);
  }

  /**
   * Waits until pred holds on a fresh stats snapshot (checked as each period completes).
   * Rejects on timeout or exit, with the output tail.
   */
  waitForStats(pred: (ports: PortStats[]) => boolean, timeoutMs: number): Promise<PortStats[]> {
    const latest = this.stats();
    if (latest.length > 0 && pred(latest)) return Promise.resolve(latest);
    return new Promise((resolve, reject) => {
      let seen = this.history.length;
      const deadline = Date.now() + timeoutMs;
      const timer = setInterval(() => {
        if (this.history.length !== seen) {
          seen = this.history.length;
          const s = this.stats();
          if (pred(s)) {
            clearInterval(timer);
            resolve(s);
            return;
          }
        }
        if (!this.proc.running || Date.now() > deadline) {
          clearInterval(timer);
          reject(new Error(`testpmd ${this.filePrefix}: stats condition not met (${this.proc.running ? 'timeout' : 'exited'}); last: ${JSON.stringify(this.stats())}\n${this.proc.tail(30)}`));
        }
      }, 50);
    });
  }

  /**
   * Stops forwarding with SIGINT (testpmd then prints final forward stats and closes ports),
   * SIGKILL after graceMs, and removes its hugepage files and runtime dir. Idempotent.
   */
  stop(graceMs = 10_000): Promise<TestpmdResult> {
    this.stopped ??= (async () => {
      const st = await this.proc.stop('SIGINT', graceMs);
      removeDpdkLeftovers(this.filePrefix);
      this.flushSnapshot();
      return {
        code: st.code,
        signal: st.signal,
        forward: [...this.forward.values()].sort((a, b) => a.port - b.port),
        lastStats: this.stats(),
      };
    })();
    return this.stopped;
  }
}

/** Builds the argv (without the binary) for the given options. */
export function testpmdArgs(opts: TestpmdOptions, filePrefix: string): string[] {
  const cores = opts.cores ?? '0,1';
  const eal: string[] = ['-l', cores, '--no-pci', `--file-prefix=${filePrefix}`, '-m', String(opts.memoryMb ?? 256)];
  if (opts.mainLcore !== undefined) eal.push('--main-lcore', String(opts.mainLcore));
  const sfs = opts.singleFileSegments ?? opts.vdevs.some((v) => v.startsWith('net_virtio_user'));
  if (sfs) eal.push('--single-file-segments');
  for (const v of opts.vdevs) eal.push('--vdev', v);
  if (opts.extraEal) eal.push(...opts.extraEal);

  const q = opts.queues ?? 1;
  const app: string[] = [
    `--stats-period=${opts.statsPeriod ?? 1}`,
    `--forward-mode=${opts.forwardMode}`,
    `--rxq=${q}`,
    `--txq=${q}`,
    `--total-num-mbufs=${opts.totalMbufs ?? 16384}`,
  ];
  if (opts.nbCores !== undefined) app.push(`--nb-cores=${opts.nbCores}`);
  if (opts.txpkts !== undefined) app.push(`--txpkts=${opts.txpkts}`);
  if (opts.burst !== undefined) app.push(`--burst=${opts.burst}`);
  if (opts.rxd !== undefined) app.push(`--rxd=${opts.rxd}`);
  if (opts.txd !== undefined) app.push(`--txd=${opts.txd}`);
  if (opts.portTopology) app.push(`--port-topology=${opts.portTopology}`);
  opts.ethPeers?.forEach((mac, i) => app.push(`--eth-peer=${i},${mac}`));
  if (opts.txIp) app.push(`--tx-ip=${opts.txIp[0]},${opts.txIp[1]}`);
  if (opts.txUdp) app.push(`--tx-udp=${opts.txUdp[0]},${opts.txUdp[1]}`);
  if (opts.txonlyMultiFlow) app.push('--txonly-multi-flow');
  if (opts.extraApp) app.push(...opts.extraApp);
  return [...eal, '--', ...app];
}

export function uniqueFilePrefix(tag = 'vx'): string {
  return `${tag}${process.pid}x${prefixCounter++}`;
}

/**
 * Starts testpmd and resolves once forwarding runs (the "<mode> packet forwarding - ports=" line).
 * Fails fast (with the output tail) if testpmd exits first, e.g. when virtio-user cannot
 * connect because the backend socket is not listening yet.
 */
export async function startTestpmd(opts: TestpmdOptions): Promise<Testpmd> {
  ensureHugepages();
  checkDrivers(opts.vdevs);
  sweepStaleDpdkLeftovers();
  const prefix = opts.filePrefix ?? uniqueFilePrefix();
  removeDpdkLeftovers(prefix); // stale files of a killed run with the same prefix
  const args = testpmdArgs(opts, prefix);
  const pmd = new Testpmd(args, prefix, opts.name ?? `testpmd:${prefix}`, opts.echo);
  try {
    await pmd.proc.waitForLine(/packet forwarding - ports=\d+/, opts.startTimeoutMs ?? 20_000);
  } catch (e) {
    await pmd.stop(2000);
    const hint = freeHugepages() < (opts.memoryMb ?? 256) / 2 ? ` (only ${freeHugepages()} hugepages free)` : '';
    throw new Error(`testpmd failed to start${hint}: ${TESTPMD} ${args.join(' ')}\n${(e as Error).message}`);
  }
  return pmd;
}
