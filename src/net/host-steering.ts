import type { Logger } from '../log.js';
import type { Port } from '../ports/port.js';

/**
 * Which of a device's queue pairs the host sends frames to. A port spreads host traffic over
 * all its queues (a multiqueue tap hashes flows across its queue files, the xsk port's host end
 * across its transmit queues), but a guest serves only the pairs it enabled: a 1-vCPU Linux
 * guest on a 2-pair device uses pair 0 alone, and QEMU sends SET_VRING_ENABLE 0 for the other
 * pair's rings. Frames hashed to a queue nobody reads were lost (half the flows, measured), so
 * a pair takes host traffic only while the frontend has its receive ring enabled and nothing
 * holds it out. Its transmit ring is not consulted: a queue out of the host's use still takes
 * the guest's frames (a tap queue file accepts writes while detached).
 *
 * Pair 0 always takes it: "vhost-user-net has historically automatically enabled the first
 * queue pair" (vhost-user.rst, Multiple queue support), and frames for a guest that is away
 * wait there, as they always did.
 */
export class HostSteering {
  private readonly rxEnabled = new Set<number>();
  private readonly held = new Set<number>();
  private readonly steered: boolean[];

  constructor(private readonly port: Port, pairs: number, private readonly log: Logger) {
    this.steered = Array.from({ length: pairs }, () => true);
    // A port opens every queue in use; the others wait for the frontend.
    for (let p = 1; p < pairs; p++) this.apply(p, false);
  }

  /** The frontend enabled or disabled ring `index` (VhostUserBackend.vringEnabled). */
  ringEnabled(index: number, enabled: boolean): void {
    if (index % 2 !== 0) return;
    if (enabled) this.rxEnabled.add(index >> 1);
    else this.rxEnabled.delete(index >> 1);
    this.update(index >> 1, enabled ? 'enabled by the frontend' : 'disabled by the frontend');
  }

  /**
   * Holds a pair out of the host's use whatever its rings say (the xsk port's reserved pair has
   * no AF_XDP socket; a tap's carries only offload messages while the guest claims it), or lets it go.
   */
  hold(pair: number, held: boolean, why: string): void {
    if (held) this.held.add(pair);
    else this.held.delete(pair);
    this.update(pair, why);
  }

  /** The session reset or ended: every ring counts as disabled again. */
  reset(): void {
    this.rxEnabled.clear();
    for (let p = 1; p < this.steered.length; p++) this.update(p, 'the session reset');
  }

  /** The pairs the host sends to, ascending. */
  get pairs(): number[] {
    return this.steered.flatMap((on, p) => (on ? [p] : []));
  }

  private update(pair: number, why: string): void {
    if (pair <= 0 || pair >= this.steered.length) return;
    const want = this.rxEnabled.has(pair) && !this.held.has(pair);
    if (want === this.steered[pair]) return;
    if (this.apply(pair, want)) this.log.info(`host traffic goes to pair(s) ${this.pairs.join(',')}: pair ${pair} ${why}`);
  }

  /** True when the port took it; on failure the pair stays as it was, and the next change tries again. */
  private apply(pair: number, on: boolean): boolean {
    try {
      this.port.setQueueEnabled(pair, on);
      this.steered[pair] = on;
      return true;
    } catch (e) {
      this.log.warn(`pair ${pair}: could not ${on ? 'give host traffic to' : 'take host traffic from'} its queue: ${(e as Error).message}`);
      return false;
    }
  }
}
