// Kernel-speed host-side packet generators, both BPF_PROG_TEST_RUN of a tiny program with a
// large repeat count from a process pinned to one core; trafgen goes through a socket, an skb
// and the qdisc layer per frame and tops out near 0.2-0.5 Mpps on a shared core here.
//
// - 'xdp' (XdpFlood): live-frames mode with a program that returns XDP_TX, so every run sends
//   the frame out of the interface through its ndo_xdp_xmit (what xdp-trafficgen does; its own
//   loader needs tracepoint BTF this kernel lacks). No skb on the sending side, so the receiving
//   end is what a measurement sees. ndo_xdp_xmit never passes tc egress.
// - 'tc-egress' (TcEgressFlood): a SCHED_CLS program whose every run calls
//   bpf_clone_redirect(skb, ifindex, 0): a clone of the test skb goes to the interface's
//   dev_queue_xmit, so it passes the tc egress hook (tcx programs: a tap's offloaded guest
//   program), the qdisc and the driver's xmit (a tap's fd) exactly as host traffic does. Seen
//   on this kernel (6.18): the helper returns 0 when the clone went on to the device (a tap with
//   a full queue still drops it there and counts tx_dropped), 1 (NET_XMIT_DROP) when tc egress
//   dropped it, and a tap's transmit counters move only for clones that got past tc egress.
//
// Run as a script (`node xdp-flood.js xdp|tc-egress IFNAME HEXFRAME`) it floods until
// SIGINT/SIGTERM; start() spawns it pinned to one CPU.
import path from 'node:path';
import { pathToFileURL } from 'node:url';
import { VxError } from '../../src/errors.js';
import { BpfError } from '../../src/sys/bpf/libbpf.js';
import { progLoad, closeBpfFd, BpfProgType } from '../../src/sys/bpf/programs.js';
import { encodeInsns, Op, Helper } from '../../src/sys/bpf/insns.js';
import { TestRunner } from '../../src/sys/bpf/test-run.js';
import { XDP_TX } from '../../src/sys/bpf/xdp.js';
import { Errno } from '../../src/sys/errors.js';
import { ifNameToIndex, NativeBuffer } from '../../src/sys/libc.js';
import { spawnManaged, type ManagedProcess } from './processes.js';
import { repoRoot } from './backend.js';

// The built script, also when a test imports this file from its TypeScript source (`npm test` builds first).
const SELF = path.join(repoRoot(), 'dist/test/support/xdp-flood.js');
/**
 * Live-frames frames per test-run call: 2^30, minutes of flood, so one call lasts the whole
 * flood (a signal ends it, EINTR). Each live-frames call sets up the kernel's live-frame state (a page
 * pool) and swaps the program into the XDP dispatcher and out again, which waits for RCU grace
 * periods: with 2M frames per call the generator's core sat idle about a fifth of the time.
 */
const REPEAT = 2 ** 30;
/**
 * tc-egress frames per call: about 0.1 s of flood here. A call costs one skb, so nothing is
 * gained by longer ones, and a signal that lands while the process runs JavaScript between
 * calls (it interrupts no call) is still seen within one call.
 */
const TC_REPEAT = 2 ** 18;

export type FloodPath = 'xdp' | 'tc-egress';
const PATHS: readonly FloodPath[] = ['xdp', 'tc-egress'];

/** What a flood child says once it floods: the path it took and, for a fallback, why. */
const READY = /^flooding \S+ \(ifindex \d+, (xdp|tc-egress)(?:; ([^)]*))?\)/;

async function spawnFlood(path: FloodPath, ifname: string, frame: Uint8Array, cpu: number): Promise<{ proc: ManagedProcess; path: FloodPath; fallback: string | null }> {
  const hex = Buffer.from(frame).toString('hex');
  const proc = spawnManaged('taskset', ['-c', String(cpu), process.execPath, SELF, path, ifname, hex], { name: `${path}-flood` });
  const m = await proc.waitForLine(READY, 10_000);
  return { proc, path: m[1] as FloodPath, fallback: m[2] ?? null };
}

/**
 * A running flood. Stopping it reports no count: its one test-run call is interrupted, and the
 * kernel says nothing about an interrupted call's frames; count where the frames arrive.
 */
class KernelFlood {
  /** The path the frames take: an XdpFlood whose live frames the kernel refused floods through tc egress. */
  readonly path: FloodPath;
  /** Why the flood is not on the path asked for (the kernel's answer), or null. */
  readonly fallback: string | null;
  private readonly proc: ManagedProcess;

  protected constructor(started: { proc: ManagedProcess; path: FloodPath; fallback: string | null }) {
    this.proc = started.proc;
    this.path = started.path;
    this.fallback = started.fallback;
  }

  /** For bench output: which generator ran, and why when it is not the one asked for. */
  describe(): string {
    const what = this.path === 'xdp' ? 'live-frames XDP flood' : 'test-run bpf_clone_redirect through tc egress';
    return this.fallback ? `${what} (${this.fallback})` : what;
  }

  async stop(): Promise<void> {
    await this.proc.stop('SIGINT', 5000);
  }
}

export class XdpFlood extends KernelFlood {
  /**
   * Floods `ifname` with `frame` from a process pinned to `cpu`. The receiving side of the
   * veth must have NAPI (an XDP program or GRO on), or the kernel drops the frames at xmit.
   * Where the kernel refuses live frames (EPERM on some builds here, as it refuses freplace:
   * both swap program text in place), the flood transmits skb clones through the interface's
   * dev_queue_xmit instead: the frames still arrive at the veth's peer and its XDP, each at the
   * cost of an skb; `path` and `fallback` say so, for the bench to print.
   */
  static async start(ifname: string, frame: Uint8Array, cpu: number): Promise<XdpFlood> {
    return new XdpFlood(await spawnFlood('xdp', ifname, frame, cpu));
  }
}

export class TcEgressFlood extends KernelFlood {
  /**
   * Transmits `frame` (a whole Ethernet frame) on `ifname` from a process pinned to `cpu`,
   * through tc egress: what a tcx egress program drops costs only this process's core.
   */
  static async start(ifname: string, frame: Uint8Array, cpu: number): Promise<TcEgressFlood> {
    return new TcEgressFlood(await spawnFlood('tc-egress', ifname, frame, cpu));
  }
}

/** The generator program for `path`: XDP_TX, or SCHED_CLS returning bpf_clone_redirect's result. */
function loadGenerator(path: FloodPath, ifindex: number): number {
  if (path === 'xdp') {
    return progLoad(encodeInsns([{ code: Op.MOV64_IMM, dst: 0, imm: XDP_TX }, { code: Op.EXIT }]),
      { type: BpfProgType.XDP, license: 'GPL', name: 'vx_flood' });
  }
  // r1 is the skb already; flags 0: the target's transmit path, not its receive path.
  return progLoad(encodeInsns([
    { code: Op.MOV64_IMM, dst: 2, imm: ifindex },
    { code: Op.MOV64_IMM, dst: 3, imm: 0 },
    { code: Op.CALL, imm: Helper.CLONE_REDIRECT },
    { code: Op.EXIT },
  ]), { type: BpfProgType.SCHED_CLS, license: 'GPL', name: 'vx_tc_flood' });
}

function floodMain(path: FloodPath, ifname: string, hex: string): void {
  const frame = Buffer.from(hex, 'hex');
  if (frame.length < 14 || frame.length > 3000) throw new RangeError(`frame of ${frame.length} bytes`);
  const ifindex = ifNameToIndex(ifname);
  let prog = loadGenerator(path, ifindex);
  let runner = new TestRunner(prog);
  const buf = new NativeBuffer(4096);
  buf.bytes.set(frame, 0);
  let fallback = '';
  if (path === 'xdp') {
    // One live frame first: a refusal shows now, not as a child that died after saying it floods.
    try {
      runner.runLive(buf.address, frame.length, ifindex, 1);
    } catch (e) {
      if (!(e instanceof BpfError) || ![Errno.EPERM, Errno.EOPNOTSUPP, Errno.EINVAL].includes(e.errno)) throw e;
      fallback = `; live frames refused: ${e.code}`;
      runner.dispose();
      closeBpfFd(prog);
      path = 'tc-egress';
      prog = loadGenerator(path, ifindex);
      runner = new TestRunner(prog);
    }
  }
  if (path === 'tc-egress') {
    // One frame first: a refused redirect (no such device, device down) shows as the helper's
    // negative return, which the flood itself would hide behind 2^30 silent failures.
    const r = runner.run(buf.address, frame.length, 0, 0, 1) | 0;
    if (r < 0) throw new VxError('flood-redirect-refused', `bpf_clone_redirect to ${ifname} (ifindex ${ifindex}) returned ${r}`);
  }
  let stopping = false;
  process.on('SIGINT', () => { stopping = true; });
  process.on('SIGTERM', () => { stopping = true; });
  process.stdout.write(`flooding ${ifname} (ifindex ${ifindex}, ${path}${fallback}) with ${frame.length}-byte frames\n`);
  // Each call blocks for REPEAT frames; yield to the event loop between calls so signals land.
  const step = (): void => {
    if (stopping) {
      runner.dispose();
      buf.free();
      closeBpfFd(prog);
      return;
    }
    try {
      if (path === 'xdp') runner.runLive(buf.address, frame.length, ifindex, REPEAT);
      else runner.run(buf.address, frame.length, 0, 0, TC_REPEAT);
    } catch (e) {
      if (!(e instanceof BpfError && e.errno === Errno.EINTR)) throw e;
      // The signal's JS handler runs from the loop's poll phase. The first call is made while
      // the ES module is evaluated, itself from a poll-phase callback, and an immediate queued
      // there runs in the same turn, before that poll: the flood went straight back in and
      // only SIGKILL ended it. A timer comes due only after a poll.
      setTimeout(step, 1);
      return;
    }
    setImmediate(step);
  };
  step();
}

if (process.argv[1] && import.meta.url === pathToFileURL(process.argv[1]).href) {
  const [path, ifname, hex] = process.argv.slice(2);
  if (!PATHS.includes(path as FloodPath) || !ifname || !hex) {
    process.stderr.write(`usage: xdp-flood ${PATHS.join('|')} IFNAME HEXFRAME\n`);
    process.exit(2);
  }
  floodMain(path as FloodPath, ifname, hex);
}
