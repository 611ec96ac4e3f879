// One offload device under test: `serve --offload --pin-dir` on a port, the TS frontend as the
// guest (one data pair + the reserved pair) with an offload client on the reserved pair, and a
// packet socket on the host side of the port. Tap and xsk offload tests share it, restart included.
import path from 'node:path';
import { startBackend, tempDir, mountPinDir, unmountPinDir, type Backend } from '../backend.js';
import { PacketSocket } from '../packet-socket.js';
import { TestFrontend, type FrontendOptions } from './test-frontend.js';
import { OffloadClient, hostFramesReceived } from './offload-client.js';

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
  /** Frontend options besides the two queue pairs (e.g. protocol features for migration). */
  frontend?: FrontendOptions;
}

export class OffloadRig {
  be!: Backend;
  fe!: TestFrontend;
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
    this.pinRoot = mountPinDir(this.dir);
    this.args = ['--socket', this.sock, '--port', `${o.port}:${o.ifname}`, '--queues', '1', '--offload', '--pin-dir', this.pinRoot, '--name', o.name];
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
    this.be = await startBackend(this.args, { dir: this.dir });
    this.o.afterStart?.();
    this.fe = await TestFrontend.connect(this.sock, { ...this.o.frontend, queuePairs: 2 });
    this.oc = new OffloadClient(this.fe, 1);
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
    unmountPinDir(this.pinRoot);
  }
}
