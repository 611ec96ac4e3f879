// A kernel-speed host-side packet generator for floods into a veth: BPF_PROG_TEST_RUN in
// live-frames mode with a program that returns XDP_TX, so every run sends the frame out of
// the given interface through its ndo_xdp_xmit (what xdp-trafficgen does; its own loader
// needs tracepoint BTF this kernel lacks). trafgen goes through a socket, an skb and the
// qdisc layer per frame and tops out near 0.2 Mpps on a shared core here; this path makes
// no skb on the sending side, so the receiving end is what a measurement sees.
//
// Run as a script (`node xdp-flood.js IFNAME HEXFRAME`) it floods until SIGINT/SIGTERM;
// XdpFlood.start() spawns it pinned to one CPU.
import { pathToFileURL, fileURLToPath } from 'node:url';
import { BpfError } from '../../src/sys/bpf/libbpf.js';
import { progLoad, closeBpfFd, BpfProgType } from '../../src/sys/bpf/programs.js';
import { encodeInsns } from '../../src/sys/bpf/insns.js';
import { TestRunner } from '../../src/sys/bpf/test-run.js';
import { XDP_TX } from '../../src/sys/bpf/xdp.js';
import { Errno } from '../../src/sys/errors.js';
import { ifNameToIndex, NativeBuffer } from '../../src/sys/libc.js';
import { spawnManaged, type ManagedProcess } from './processes.js';

const SELF = fileURLToPath(import.meta.url);
/**
 * Frames per test-run call: 2^30, minutes of flood, so one call lasts the whole flood (a
 * signal ends it, EINTR). Each call sets up the kernel's live-frame state (a page pool) and
 * swaps the program into the XDP dispatcher and out again, which waits for RCU grace periods:
 * with 2M frames per call the generator's core sat idle about a fifth of the time.
 */
const REPEAT = 2 ** 30;

export class XdpFlood {
  private constructor(private readonly proc: ManagedProcess) {}

  /**
   * Floods `ifname` with `frame` from a process pinned to `cpu`. The receiving side of the
   * veth must have NAPI (an XDP program or GRO on), or the kernel drops the frames at xmit.
   */
  static async start(ifname: string, frame: Uint8Array, cpu: number): Promise<XdpFlood> {
    const hex = Buffer.from(frame).toString('hex');
    const proc = spawnManaged('taskset', ['-c', String(cpu), process.execPath, SELF, ifname, hex], { name: 'xdp-flood' });
    await proc.waitForLine(/^flooding /, 10_000);
    return new XdpFlood(proc);
  }

  /**
   * Stops the flood. It reports no count: its one test-run call is interrupted, and the kernel
   * says nothing about an interrupted call's frames; count at the receiving end.
   */
  async stop(): Promise<void> {
    await this.proc.stop('SIGINT', 5000);
  }
}

function floodMain(ifname: string, hex: string): void {
  const frame = Buffer.from(hex, 'hex');
  if (frame.length < 14 || frame.length > 3000) throw new RangeError(`frame of ${frame.length} bytes`);
  const ifindex = ifNameToIndex(ifname);
  const prog = progLoad(encodeInsns([{ code: 0xb7, dst: 0, imm: XDP_TX }, { code: 0x95 }]),
    { type: BpfProgType.XDP, license: 'GPL', name: 'vx_flood' });
  const runner = new TestRunner(prog);
  const buf = new NativeBuffer(4096);
  buf.bytes.set(frame, 0);
  let stopping = false;
  process.on('SIGINT', () => { stopping = true; });
  process.on('SIGTERM', () => { stopping = true; });
  process.stdout.write(`flooding ${ifname} (ifindex ${ifindex}) with ${frame.length}-byte frames\n`);
  // Each call blocks for REPEAT frames; yield to the event loop between calls so signals land.
  const step = (): void => {
    if (stopping) {
      runner.dispose();
      buf.free();
      closeBpfFd(prog);
      return;
    }
    try {
      runner.runLive(buf.address, frame.length, ifindex, REPEAT);
    } catch (e) {
      if (!(e instanceof BpfError && e.errno === Errno.EINTR)) throw e;
    }
    setImmediate(step);
  };
  step();
}

if (process.argv[1] && import.meta.url === pathToFileURL(process.argv[1]).href) {
  const [ifname, hex] = process.argv.slice(2);
  if (!ifname || !hex) {
    process.stderr.write('usage: xdp-flood IFNAME HEXFRAME\n');
    process.exit(2);
  }
  floodMain(ifname, hex);
}
