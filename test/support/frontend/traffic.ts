import { expect } from 'vitest';
import type { TestFrontend } from './test-frontend.js';
import type { PacketSocket } from '../packet-socket.js';
import { hostFramesReceived } from './offload-client.js';
import { udpFrame, seqOf } from '../frames.js';

/**
 * 20 frames each way between the test frontend (the guest, sending on pair 0) and the host side
 * of its port; host frames are counted on `pairs` (a multiqueue tap spreads them).
 */
export async function expectTraffic(fe: TestFrontend, ps: PacketSocket, first: number, pairs: readonly number[] = [0]): Promise<void> {
  const frames = Array.from({ length: 20 }, (_, i) => udpFrame(first + i, 200 + i));
  fe.transmit(0, frames);
  const got = ps.recvAll(frames.length, 3000, (f) => { const s = seqOf(f); return s !== null && s >= first && s < first + frames.length; });
  expect(got.length).toBe(frames.length);
  expect(await hostFramesReceived(ps, fe, first + 100, 20, '52:54:00:c0:c0:c0', pairs)).toBe(20);
}
