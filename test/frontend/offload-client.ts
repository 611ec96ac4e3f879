// The guest side of the offload protocol over the TS test frontend: requests go out as frames on
// the reserved pair's TX queue, responses come back as frames on its RX queue.
import { setTimeout as sleep } from 'node:timers/promises';
import { OFFLOAD_ETHERTYPE, decodeResponse, encodeClaim, type Response } from '../../src/offload/protocol.js';
import type { TestFrontend } from './test-frontend.js';

const ETH_HLEN = 14;

export function offloadFrame(message: Uint8Array): Uint8Array {
  const f = new Uint8Array(ETH_HLEN + message.length);
  f[12] = OFFLOAD_ETHERTYPE >> 8;
  f[13] = OFFLOAD_ETHERTYPE & 0xff;
  f.set(message, ETH_HLEN);
  return f;
}

export function isOffloadFrame(f: Uint8Array): boolean {
  return f.length >= ETH_HLEN && ((f[12]! << 8) | f[13]!) === OFFLOAD_ETHERTYPE && f.subarray(0, 12).every((b) => b === 0);
}

export class OffloadClient {
  private seq = 1;
  /** Non-offload frames that arrived on the reserved pair (data use before the claim). */
  readonly stray: Uint8Array[] = [];

  /** Poll with setImmediate instead of 1 ms sleeps (benches: lowest latency, burns the core). */
  spin = false;

  constructor(readonly fe: TestFrontend, readonly pair: number) {}

  nextSeq(): number {
    return this.seq++;
  }

  /** Sends one request (built by an encoder from src/offload/protocol.ts) and waits for its response. */
  async call(request: Uint8Array, timeoutMs = 3000): Promise<Response> {
    const seq = new DataView(request.buffer, request.byteOffset).getUint32(8, true);
    await this.fe.transmitLarge(this.pair, offloadFrame(request));
    const deadline = Date.now() + timeoutMs;
    while (Date.now() < deadline) {
      for (const f of this.fe.receive(this.pair)) {
        if (!isOffloadFrame(f)) { this.stray.push(f); continue; }
        const r = decodeResponse(f.subarray(ETH_HLEN));
        if (r.seq === seq) return r;
      }
      if (this.spin) await new Promise((r) => setImmediate(r));
      else await sleep(1);
    }
    throw new Error(`no offload response to seq ${seq} within ${timeoutMs} ms`);
  }

  async claim(maxResponseBytes = 0): Promise<Response> {
    return this.call(encodeClaim(this.nextSeq(), { maxResponseBytes }));
  }
}
