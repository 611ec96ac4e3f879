// A SAVE whose state is not ready when SET_DEVICE_STATE_FD comes (the backend waits for a
// guest's OBJ_LOAD first): StateTransfer writes nothing, and gives no EOF, until the state
// resolves; a rejection closes the pipe empty and CHECK reports the rejection's code; a CHECK
// before the state is ready reports transfer-incomplete and the late state is ignored. Over
// real pipes, in this process.
import { describe, test, expect } from 'vitest';
import fs from 'node:fs';
import { pipe, closeFd, O_NONBLOCK } from '../../src/sys/libc.js';
import { StateTransfer, TransferDirection, PHASE_STOPPED, type TransferRecord } from '../../src/vhost-user/device-state.js';
import { VxError } from '../../src/errors.js';
import { waitUntil } from '../support/processes.js';

/** Whether the (non-blocking) read end has anything, bytes or EOF, to read now (a byte read is consumed). */
function readable(fd: number): boolean {
  try {
    fs.readSync(fd, Buffer.alloc(1), 0, 1, null);
    return true;
  } catch (e) {
    if ((e as NodeJS.ErrnoException).code === 'EAGAIN') return false;
    throw e;
  }
}

/** A deferred SAVE over a fresh pipe: the transfer, the frontend's read end, the record once done, and the state's resolvers. */
function deferredSave() {
  const [r, w] = pipe(O_NONBLOCK);
  let resolve!: (b: Uint8Array) => void;
  let reject!: (e: unknown) => void;
  const state = new Promise<Uint8Array>((res, rej) => { resolve = res; reject = rej; });
  const done: TransferRecord[] = [];
  const t = StateTransfer.begin(TransferDirection.SAVE, PHASE_STOPPED, w, { state: () => state, apply: () => undefined, onDone: (x) => done.push(x) });
  return { t, r, done, resolve, reject };
}

describe('a SAVE whose state comes later', () => {
  test('nothing is written before the state resolves; then all of it and the EOF', async () => {
    const s = deferredSave();
    try {
      await new Promise((res) => setTimeout(res, 100));
      expect(s.done).toEqual([]);
      expect(readable(s.r)).toBe(false);
      s.resolve(new Uint8Array([1, 2, 3, 4, 5]));
      await waitUntil(() => s.done.length === 1, 3000, 'the transfer done');
      expect(s.done[0]).toMatchObject({ direction: 'save', ok: true, bytes: 5 });
      // Written and closed by the backend: the bytes, then EOF.
      expect([...fs.readFileSync(s.r)]).toEqual([1, 2, 3, 4, 5]);
      expect(s.t.finish()).toMatchObject({ ok: true });
    } finally {
      closeFd(s.r);
    }
  });

  test('a rejected state closes the pipe empty; the record (and CHECK) carry its code', async () => {
    const s = deferredSave();
    try {
      s.reject(new VxError('state-load-pending', 'still loading'));
      await waitUntil(() => s.done.length === 1, 3000, 'the transfer done');
      expect(s.done[0]).toMatchObject({ direction: 'save', ok: false, code: 'state-load-pending', bytes: 0 });
      expect(fs.readFileSync(s.r).length).toBe(0);
      expect(s.t.finish()).toMatchObject({ ok: false, code: 'state-load-pending' });
    } finally {
      closeFd(s.r);
    }
  });

  test('CHECK before the state is ready: transfer-incomplete, the pipe closed; the late state is ignored', async () => {
    const s = deferredSave();
    try {
      expect(s.t.finish()).toMatchObject({ ok: false, code: 'transfer-incomplete' });
      expect(fs.readFileSync(s.r).length).toBe(0);
      s.resolve(new Uint8Array([9]));
      await new Promise((res) => setTimeout(res, 50));
      expect(s.done.length).toBe(1);
    } finally {
      closeFd(s.r);
    }
  });
});
