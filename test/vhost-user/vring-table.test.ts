// VringTable's own rules, beside a backend that records what it was asked: what the rings do
// when the backend fails to stop one at a memory change. The dispatcher tests drive the same
// table through a real serve; a worker that does not answer a stop cannot be made there on demand.
import { describe, test, expect, afterEach } from 'vitest';
import { VringTable, VringError } from '../../src/vhost-user/vring-table.js';
import type { VhostUserBackend, VringConfig } from '../../src/vhost-user/backend.js';
import { GuestMemory } from '../../src/memory/guest-memory.js';
import { NativeBuffer, eventfdCreate } from '../../src/sys/libc.js';
import { logger } from '../../src/log.js';

const SIZE = 0x10000;

class RecordingBackend {
  started: VringConfig[] = [];
  /** What stopVring answers next: a position, or an error to throw. */
  stopAnswer: number | Error = 0;
  maxQueuePairs(): number { return 1; }
  startVring(cfg: VringConfig): void { this.started.push(cfg); }
  stopVring(): number {
    if (this.stopAnswer instanceof Error) throw this.stopAnswer;
    return this.stopAnswer;
  }
  updateCallFd(): void {}
}

describe('VringTable', () => {
  const buf = new NativeBuffer(SIZE);
  const memory = new GuestMemory([{ gpa: 0, size: SIZE, uva: 0x7f0000000000, hostAddress: buf.address }]);
  /** Tables made by a test: each owns the kick fds it was given. */
  const tables: VringTable[] = [];
  afterEach(() => { while (tables.length) tables.pop()!.closeFds(); });

  function runningRing(be: RecordingBackend): VringTable {
    const t = new VringTable(be as unknown as VhostUserBackend, logger('vring-table-test'), () => memory);
    tables.push(t);
    t.setNum(0, 256);
    t.setAddr({ index: 0, flags: 0, descUser: 0x7f0000000000, usedUser: 0x7f0000002000, availUser: 0x7f0000001000, logGuest: 0 });
    t.setBase(0, 7);
    const kick = eventfdCreate();
    t.setKick(0, [kick], false);
    expect(be.started.map((c) => c.lastAvailIdx)).toEqual([7]);
    return t;
  }

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
