// One offload device under test: `serve --offload --pin-dir` on a port, the TS frontend as the
// guest (one data pair + the reserved pair) with an offload client on the reserved pair, and a
// packet socket on the host side of the port. Tap and xsk offload tests share it, restart included.
import path from 'node:path';
import { startBackend, tempDir, mountPinDir, unmountPinDir, type Backend } from '../backend.js';
import { PacketSocket } from '../packet-socket.js';
import { TestFrontend, type FrontendOptions } from './test-frontend.js';
import { OffloadClient, hostFramesReceived } from './offload-client.js';
import { handOver, type RunAs } from '../unprivileged.js';

export interface OffloadRigOptions {
  /** tempDir tag. */
  tag: string;
  port: 'tap' | 'xsk';
  ifname: string;
  /** Device name (--name). */
  name: string;
  /** Source MAC of the host frames hostToGuest sends. */
  hostMac: string;
  /** First sequence number of the frames this rig's tests send. */
  firstSeq: number;
  /** Runs after every backend start, before the guest connects (e.g. disableIpv6 on a tap). */
  afterStart?: () => void;
  /** `serve --offload --pin-dir` (default); false: a plain device of two data pairs, no offload client. */
  offload?: boolean;
  /** Protocol features the guest negotiates besides the frontend's default set (e.g. the migration ones). */
  protocolFeatures?: bigint;
  /**
   * false: the guest connects as on a migration's destination, negotiated but with nothing
   * started (fe.start() later); default true: rings running.
   */
  start?: boolean;
  /** Frontend options besides the two queue pairs (e.g. protocol features for migration). */
  frontend?: FrontendOptions;
  /** Run serve as this user with only these capabilities (support/unprivileged.ts). */
  runAs?: RunAs;
  /** More `serve` options (e.g. --metrics). */
  extraArgs?: string[];
  /** serve's environment (default: this process's), e.g. VX_OBJECT_LOADER_DELAY_MS for a slow loader. */
  env?: NodeJS.ProcessEnv;
}

export class OffloadRig {
  be!: Backend;
  fe!: TestFrontend;
  /** On the reserved pair; absent without offload. */
  oc!: OffloadClient;
  ps!: PacketSocket;
  /** Next unused frame sequence number. */
  seq: number;
  readonly sock: string;
  readonly pinRoot: string;
  private readonly dir: string;
  private readonly args: string[];

  private constructor(private readonly o: OffloadRigOptions) {
    this.seq = o.firstSeq;
    this.dir = tempDir(o.tag);
    this.sock = path.join(this.dir, 'dev.sock');
    const offload = o.offload ?? true;
    this.pinRoot = offload ? mountPinDir(this.dir) : '';
    // The pin directory belongs to the user serve runs as, as a unit's ExecStartPre makes it.
    if (o.runAs && this.pinRoot) handOver(o.runAs, this.dir, this.pinRoot);
    this.args = ['--socket', this.sock, '--port', `${o.port}:${o.ifname}`, '--name', o.name,
      ...(offload ? ['--queues', '1', '--offload', '--pin-dir', this.pinRoot] : ['--queues', '2']), ...(o.extraArgs ?? [])];
  }

  static async start(o: OffloadRigOptions): Promise<OffloadRig> {
    const rig = new OffloadRig(o);
    try {
      await rig.up();
    } catch (e) {
      await rig.close();
      throw e;
    }
    return rig;
  }

  private async up(): Promise<void> {
    this.be = await startBackend(this.args, { dir: this.dir, runAs: this.o.runAs, env: this.o.env });
    this.o.afterStart?.();
    const start = this.o.start ?? true;
    const protocolFeatures = (this.o.frontend?.protocolFeatures ?? 0n) | (this.o.protocolFeatures ?? 0n);
    this.fe = await TestFrontend.connect(this.sock, { ...this.o.frontend, queuePairs: 2, start, protocolFeatures });
    if (!start) await this.fe.negotiate();
    if (this.o.offload ?? true) this.oc = new OffloadClient(this.fe, 1);
    // After the backend: an xsk port makes its veth anew on every start.
    this.ps = PacketSocket.open(this.o.ifname);
  }

  /**
   * Kills the backend (SIGKILL: no cleanup of its own) and starts it again with the same pins;
   * the guest then reconnects, as QEMU with reconnect-ms does. Killed first: a backend that saw
   * the guest leave would reset the device and drop the offload before it died.
   */
  async restart(): Promise<void> {
    await this.be.stop('SIGKILL');
    this.fe.close();
    this.ps.close();
    await this.up();
  }

  /** Sends n host->guest frames into the port; returns how many the guest received (on any pair). */
  async hostToGuest(n: number): Promise<number> {
    const got = await hostFramesReceived(this.ps, this.fe, this.seq, n, this.o.hostMac);
    this.seq += n;
    return got;
  }

  async close(): Promise<void> {
    this.ps?.close();
    this.fe?.close();
    await this.be?.stop();
    if (this.pinRoot) unmountPinDir(this.pinRoot);
  }
}
