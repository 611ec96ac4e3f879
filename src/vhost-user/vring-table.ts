import { VxError } from '../errors.js';
import { closeFd } from '../sys/libc.js';
import type { Logger } from '../log.js';
import { MAX_GUEST_ADDRESS, type GuestMemory } from '../memory/guest-memory.js';
import type { VhostUserBackend } from './backend.js';
import { VRING_F_LOG, type VringAddr } from './protocol.js';

export type VringErrorCode =
  | 'bad-vring-index' | 'vring-running' | 'bad-vring-size' | 'bad-vring-base' | 'no-kick-fd' | 'bad-enable-value'
  | 'vring-outside-memory' | 'bad-vring-flags' | 'vring-addr-changed' | 'feature-not-negotiated';

/** A vring request that breaks a ring rule; the frontend broke the protocol, so no reconnect helps. */
export class VringError extends VxError {
  constructor(code: VringErrorCode, message: string, opts: { cause?: unknown } = {}) {
    super(code, message, opts);
  }
}

interface VringState {
  num: number;
  descUser: number;
  availUser: number;
  usedUser: number;
  addrSet: boolean;
  /** VHOST_VRING_F_LOG and log_guest_addr of the last SET_VRING_ADDR. */
  logUsed: boolean;
  logGuestAddr: number;
  base: number;
  kickFd: number;
  callFd: number;
  errFd: number;
  enabled: boolean;
  started: boolean;
  running: boolean;
}

/**
 * A ring as the spec's "Ring states" begin it: stopped, and disabled. "If
 * VHOST_USER_F_PROTOCOL_FEATURES has been negotiated, the ring is initialized in a disabled state
 * and is enabled by VHOST_USER_SET_VRING_ENABLE with parameter 1"; without them it is enabled
 * when it starts (setKick).
 */
function freshVring(): VringState {
  return { num: 0, descUser: 0, availUser: 0, usedUser: 0, addrSet: false, logUsed: false, logGuestAddr: 0, base: 0, kickFd: -1, callFd: -1, errFd: -1, enabled: false, started: false, running: false };
}

/**
 * The device's vrings as the frontend set them up. Owns their kick/call/err fds; runs a ring on
 * the backend once it has everything it needs, and stops it, keeping where it stopped, before
 * anything it runs on changes. `memory` is the guest memory ring addresses resolve in (null: none yet).
 */
export class VringTable {
  private vrings: VringState[];

  constructor(private readonly backend: VhostUserBackend, private readonly log: Logger, private readonly memory: () => GuestMemory | null) {
    this.vrings = Array.from({ length: backend.maxQueuePairs() * 2 }, () => freshVring());
  }

  /** The vring at `index`, or a refusal. The one place an index from the frontend is checked. */
  private vring(index: number): VringState {
    const v = this.vrings[index];
    if (index >= this.vrings.length || v === undefined) throw new VringError('bad-vring-index', `vring index ${index} out of range (device has ${this.vrings.length})`);
    return v;
  }

  /** The index of a running ring, -1 when none runs. */
  firstRunning(): number {
    return this.vrings.findIndex((v) => v.running);
  }

  setNum(index: number, num: number): void {
    const v = this.vring(index);
    if (v.running) throw new VringError('vring-running', `vring ${index} is running`);
    if (num < 1 || num > 32768 || (num & (num - 1)) !== 0) throw new VringError('bad-vring-size', `vring ${index} size ${num} is not a power of two in 1..32768`);
    v.num = num;
  }

  /**
   * SET_VRING_ADDR. On a running ring only the logging fields may change ("To start/stop logging
   * of data/used ring writes, the front-end may send ... VHOST_USER_SET_VRING_ADDR with
   * VHOST_VRING_F_LOG in ring's flags set to 1/0"): the backend applies them between two
   * bursts (vringLogChanged), or, without that hook, the ring restarts from where it stopped.
   */
  setAddr(a: VringAddr): void {
    const { index, flags, descUser: desc, usedUser: used, availUser: avail } = a;
    const v = this.vring(index);
    if ((flags & ~(1 << VRING_F_LOG)) !== 0) throw new VringError('bad-vring-flags', `vring ${index} flags 0x${flags.toString(16)} (only VHOST_VRING_F_LOG is defined)`);
    const logUsed = (flags & (1 << VRING_F_LOG)) !== 0;
    const logGuestAddr = logUsed ? a.logGuest : 0;
    if (logUsed && !(logGuestAddr >= 0 && logGuestAddr + 6 + 8 * 32768 <= MAX_GUEST_ADDRESS)) {
      throw new VringError('bad-vring-flags', `vring ${index} log_guest_addr 0x${logGuestAddr.toString(16)} out of range`);
    }
    if (v.running) {
      if (desc !== v.descUser || used !== v.usedUser || avail !== v.availUser) throw new VringError('vring-addr-changed', `vring ${index} is running; only its logging may change`);
      if (logUsed === v.logUsed && logGuestAddr === v.logGuestAddr) return;
      if (this.backend.vringLogChanged) {
        this.backend.vringLogChanged(index, { logUsed, logGuestAddr });
        v.logUsed = logUsed;
        v.logGuestAddr = logGuestAddr;
        return;
      }
      this.stopRunning(index);
    }
    v.descUser = desc;
    v.usedUser = used;
    v.availUser = avail;
    v.logUsed = logUsed;
    v.logGuestAddr = logGuestAddr;
    v.addrSet = true;
    this.maybeStart(index);
  }

  setBase(index: number, num: number): void {
    const v = this.vring(index);
    if (v.running) throw new VringError('vring-running', `vring ${index} is running`);
    if (num > 0xffff) throw new VringError('bad-vring-base', `vring ${index} base ${num} exceeds 16 bits`);
    v.base = num;
  }

  /** GET_VRING_BASE: stops the ring; returns where the next start resumes. */
  getBase(index: number): number {
    const v = this.vring(index);
    this.backend.vringStopRequested?.(index);
    this.stopRunning(index);
    v.started = false;
    // The spec: after GET_VRING_BASE the ring is stopped; its kick fd is no longer ours to use.
    closeFd(v.kickFd);
    v.kickFd = -1;
    return v.base;
  }

  /**
   * The ring at `index` and the fd its request attached (-1: none), taken out of `fds` only once
   * the index is good: from then on the vring owns it (before, the session closes it with the rest).
   */
  private withFd(index: number, fds: number[]): [VringState, number] {
    const v = this.vring(index);
    return [v, fds.pop() ?? -1];
  }

  /** SET_VRING_KICK. `protocolFeatures`: VHOST_USER_F_PROTOCOL_FEATURES is negotiated. */
  setKick(index: number, fds: number[], protocolFeatures: boolean): void {
    const [v, fd] = this.withFd(index, fds);
    this.stopRunning(index);
    closeFd(v.kickFd);
    v.kickFd = fd;
    if (v.kickFd < 0) throw new VringError('no-kick-fd', `vring ${index}: polling without a kick fd is not supported`);
    v.started = true;
    // "If VHOST_USER_F_PROTOCOL_FEATURES has not been negotiated, the ring starts directly in the enabled state."
    if (!protocolFeatures) this.setEnabled(index, true);
    this.maybeStart(index);
  }

  setCall(index: number, fds: number[]): void {
    const [v, fd] = this.withFd(index, fds);
    // A worker serving the ring may signal the old fd until it has the new one: hand it over
    // first, close the old one after (closed first, a signal in between hits EBADF and kills
    // the worker, or an fd number already reused by something else).
    const old = v.callFd;
    v.callFd = fd;
    try {
      if (v.running) this.backend.updateCallFd(index, fd);
    } finally {
      closeFd(old);
    }
  }

  setErr(index: number, fds: number[]): void {
    const [v, fd] = this.withFd(index, fds);
    closeFd(v.errFd);
    v.errFd = fd;
  }

  /** SET_VRING_ENABLE. `protocolFeatures`: VHOST_USER_F_PROTOCOL_FEATURES is negotiated. */
  setEnable(index: number, enable: number, protocolFeatures: boolean): void {
    this.vring(index); // the index check
    if (!protocolFeatures) throw new VringError('feature-not-negotiated', 'SET_VRING_ENABLE without VHOST_USER_F_PROTOCOL_FEATURES');
    if (enable > 1) throw new VringError('bad-enable-value', `enable value ${enable}`);
    // A started but disabled ring is held stopped: nothing is supplied to the guest, and its
    // transmit buffers wait (the spec would have them taken and discarded).
    if (enable === 0) this.stopRunning(index);
    this.setEnabled(index, enable === 1);
    this.maybeStart(index);
  }

  /** Records whether the frontend has the ring enabled, and tells the backend when that changes. */
  private setEnabled(index: number, enabled: boolean): void {
    const v = this.vrings[index]!;
    if (v.enabled === enabled) return;
    v.enabled = enabled;
    this.backend.vringEnabled?.(index, enabled);
  }

  /** Stops the ring if it runs, keeping where it stopped: the next start resumes there. */
  private stopRunning(index: number): void {
    const v = this.vrings[index]!;
    if (!v.running) return;
    v.base = this.backend.stopVring(index);
    v.running = false;
  }

  private maybeStart(index: number): void {
    const v = this.vrings[index]!;
    const memory = this.memory();
    if (v.running || !v.started || !v.enabled || !v.addrSet || v.num === 0 || !memory) return;
    let cfg;
    try {
      const size = v.num;
      cfg = {
        index, size,
        descGpa: memory.uvaToGpa(v.descUser, 16 * size),
        availGpa: memory.uvaToGpa(v.availUser, 6 + 2 * size),
        usedGpa: memory.uvaToGpa(v.usedUser, 6 + 8 * size),
        lastAvailIdx: v.base, kickFd: v.kickFd, callFd: v.callFd, errFd: v.errFd,
        logUsed: v.logUsed, logGuestAddr: v.logGuestAddr,
      };
    } catch (e) {
      throw new VringError('vring-outside-memory', `vring ${index}: ${(e as Error).message}`, { cause: e });
    }
    this.backend.startVring(cfg);
    v.running = true;
  }

  /** Starts every ring that can start, after a memory change; one that cannot stays stopped and says why. */
  restartAll(): void {
    this.vrings.forEach((_v, i) => {
      try {
        this.maybeStart(i);
      } catch (e) {
        this.log.warn(`vring ${i} not restarted after the memory change: ${(e as Error).message}`);
      }
    });
  }

  stopAll(): void {
    this.vrings.forEach((v, i) => {
      try {
        this.stopRunning(i);
      } catch (e) {
        // Forgotten all the same (the backend forgets it too), but not restartable: where the
        // backend stopped is unknown, and restarting from the last known base would put
        // descriptors the guest already got back on the used ring again. It waits for the
        // frontend's next start (SET_VRING_BASE then SET_VRING_KICK) or a reset.
        this.log.warn(`stopping vring ${i}: ${(e as Error).message}; held stopped until the frontend starts it again`);
        v.running = false;
        v.started = false;
      }
    });
  }

  /** Device reset: every ring stops and starts over, keeping its call and err fds (Session.resetDevice says why). */
  reset(): void {
    this.stopAll();
    this.vrings = this.vrings.map((v) => {
      closeFd(v.kickFd);
      return { ...freshVring(), callFd: v.callFd, errFd: v.errFd };
    });
  }

  /** Closes every ring's fds (the session is closing; rings must be stopped already). */
  closeFds(): void {
    for (const v of this.vrings) {
      closeFd(v.kickFd);
      closeFd(v.callFd);
      closeFd(v.errFd);
      v.kickFd = v.callFd = v.errFd = -1;
    }
  }
}
