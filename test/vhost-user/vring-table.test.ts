// VringTable's own rules, beside a backend that records what it was asked: what the rings do
// when the backend fails to stop one at a memory change, and the spec's ring states (stopped,
// started but disabled, started and enabled) in the order the backend hears of them. The
// dispatcher tests drive the same table through a real serve; a worker that does not answer a
// stop cannot be made there on demand, nor can the order of calls inside one request be seen.
import { describe, test, expect, afterEach } from 'vitest';
import { VringTable, VringError } from '../../src/vhost-user/vring-table.js';
import type { VhostUserBackend, VringConfig } from '../../src/vhost-user/backend.js';
import { GuestMemory } from '../../src/memory/guest-memory.js';
import { NativeBuffer, eventfdCreate } from '../../src/sys/libc.js';
import { logger } from '../../src/log.js';

const SIZE = 0x10000;

class RecordingBackend {
  started: VringConfig[] = [];
  /** Every start, stop and enable change, in order. */
  events: string[] = [];
  /** What stopVring answers next: a position, or an error to throw. */
  stopAnswer: number | Error = 0;
  maxQueuePairs(): number { return 1; }
  startVring(cfg: VringConfig): void {
    this.started.push(cfg);
    this.events.push(`start ${cfg.index}`);
  }
  stopVring(index: number): number {
    this.events.push(`stop ${index}`);
    if (this.stopAnswer instanceof Error) throw this.stopAnswer;
    return this.stopAnswer;
  }
  vringEnabled(index: number, enabled: boolean): void { this.events.push(`${enabled ? 'enabled' : 'disabled'} ${index}`); }
  updateCallFd(): void {}
}

describe('VringTable', () => {
  const buf = new NativeBuffer(SIZE);
  const memory = new GuestMemory([{ gpa: 0, size: SIZE, uva: 0x7f0000000000, hostAddress: buf.address }]);
  /** Tables made by a test: each owns the kick fds it was given. */
  const tables: VringTable[] = [];
  afterEach(() => { while (tables.length) tables.pop()!.closeFds(); });

  /** Ring 0 with its size, addresses and base set, not yet kicked. */
  function readyRing(be: RecordingBackend): VringTable {
    const t = new VringTable(be as unknown as VhostUserBackend, logger('vring-table-test'), () => memory);
    tables.push(t);
    t.setNum(0, 256);
    t.setAddr({ index: 0, flags: 0, descUser: 0x7f0000000000, usedUser: 0x7f0000002000, availUser: 0x7f0000001000, logGuest: 0 });
    t.setBase(0, 7);
    return t;
  }

  /** Ring 0 started without protocol features (so enabled by its kick). */
  function runningRing(be: RecordingBackend): VringTable {
    const t = readyRing(be);
    t.setKick(0, [eventfdCreate()], false);
    expect(be.started.map((c) => c.lastAvailIdx)).toEqual([7]);
    return t;
  }

  test('protocol features negotiated: a kicked ring is started but disabled and does not run until SET_VRING_ENABLE 1; the backend hears of the enable before the start', () => {
    const be = new RecordingBackend();
    const t = readyRing(be);
    t.setKick(0, [eventfdCreate()], true);
    expect(be.events).toEqual([]);
    expect(t.firstRunning()).toBe(-1);
    t.setEnable(0, 1, true);
    t.setEnable(0, 1, true); // told once
    expect(be.events).toEqual(['enabled 0', 'start 0']);
  });

  test('protocol features negotiated: an enable before the kick is kept, and the kick then runs the ring', () => {
    const be = new RecordingBackend();
    const t = readyRing(be);
    t.setEnable(0, 1, true);
    expect(be.events).toEqual(['enabled 0']);
    t.setKick(0, [eventfdCreate()], true);
    expect(be.events).toEqual(['enabled 0', 'start 0']);
  });

  test('no protocol features: the kick enables and starts the ring, and SET_VRING_ENABLE is refused with feature-not-negotiated', () => {
    const be = new RecordingBackend();
    const t = runningRing(be);
    expect(be.events).toEqual(['enabled 0', 'start 0']);
    let err: unknown;
    try { t.setEnable(0, 0, false); } catch (e) { err = e; }
    expect((err as VringError).code).toBe('feature-not-negotiated');
    expect(t.firstRunning()).toBe(0);
  });

  test('SET_VRING_ENABLE 0 stops the ring before the backend hears it is disabled; 1 runs it again from where it stopped', () => {
    const be = new RecordingBackend();
    const t = readyRing(be);
    t.setKick(0, [eventfdCreate()], true);
    t.setEnable(0, 1, true);
    be.stopAnswer = 9;
    t.setEnable(0, 0, true);
    expect(t.firstRunning()).toBe(-1);
    t.setEnable(0, 1, true);
    expect(be.events).toEqual(['enabled 0', 'start 0', 'stop 0', 'disabled 0', 'enabled 0', 'start 0']);
    expect(be.started.map((c) => c.lastAvailIdx)).toEqual([7, 9]);
  });

  test('a device reset leaves every ring disabled again: with protocol features the next kick does not run it', () => {
    const be = new RecordingBackend();
    const t = readyRing(be);
    t.setKick(0, [eventfdCreate()], true);
    t.setEnable(0, 1, true);
    t.reset();
    t.setNum(0, 256);
    t.setAddr({ index: 0, flags: 0, descUser: 0x7f0000000000, usedUser: 0x7f0000002000, availUser: 0x7f0000001000, logGuest: 0 });
    t.setKick(0, [eventfdCreate()], true);
    expect(be.events).toEqual(['enabled 0', 'start 0', 'stop 0']);
    expect(t.firstRunning()).toBe(-1);
  });

  test('a ring the backend stopped resumes where the backend said it stopped after a memory change', () => {
    const be = new RecordingBackend();
    const t = runningRing(be);
    be.stopAnswer = 42;
    t.stopAll();
    t.restartAll();
    expect(be.started.map((c) => c.lastAvailIdx)).toEqual([7, 42]);
  });

  test('a ring the backend failed to stop is not restarted from a stale position; the frontend\'s next start runs it', () => {
    const be = new RecordingBackend();
    const t = runningRing(be);
    be.stopAnswer = new Error('worker did not answer');
    t.stopAll();
    t.restartAll();
    // Restarted at 7 it would hand the guest back descriptors it already got.
    expect(be.started).toHaveLength(1);
    expect(t.firstRunning()).toBe(-1);
    // QEMU's vhost_virtqueue_start: SET_VRING_BASE, then SET_VRING_KICK.
    t.setBase(0, 50);
    const kick = eventfdCreate();
    t.setKick(0, [kick], false);
    expect(be.started.map((c) => c.lastAvailIdx)).toEqual([7, 50]);
    expect(t.firstRunning()).toBe(0);
  });

  test('an index beyond the device\'s rings is refused with bad-vring-index', () => {
    const t = new VringTable(new RecordingBackend() as unknown as VhostUserBackend, logger('vring-table-test'), () => memory);
    let err: unknown;
    try { t.setNum(2, 256); } catch (e) { err = e; }
    expect(err).toBeInstanceOf(VringError);
    expect((err as VringError).code).toBe('bad-vring-index');
  });
});
