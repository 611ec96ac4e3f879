// Little-endian cursors over offload messages. The Reader takes untrusted bytes (a private
// copy of a guest request, or a response on the guest side): every read checks that its bytes
// are present before consuming them, and every count is checked against the bytes present
// before it sizes anything (undici's parser rule: limits before buffering). A failure is a
// ProtocolError with status BAD_REQUEST, never an out-of-range read. The Writer is the
// growable encoder both codecs share.

import { ProtocolError } from './errors.js';

/** Status.BAD_REQUEST (protocol.ts imports this file, so the number is spelled here). */
const BAD_REQUEST = 1;

export function malformed(code: string, reason: string): never {
  throw new ProtocolError(BAD_REQUEST, code, reason);
}

export class Reader {
  private readonly v: DataView;
  private off = 0;
  constructor(readonly bytes: Uint8Array, private readonly what: string) {
    this.v = new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
  }
  get remaining(): number { return this.bytes.byteLength - this.off; }
  need(n: number, field: string): void {
    if (!Number.isSafeInteger(n) || n < 0 || n > this.remaining) {
      malformed('truncated', `${this.what}: ${field} needs ${n} bytes, ${this.remaining} left`);
    }
  }
  /**
   * Checks that `count` items of `unit` bytes can still be present, before the count sizes an
   * allocation or a loop; `code` and `reason` name the field's own rule.
   */
  fits(count: number, unit: number, field: string, code = 'count-exceeds-payload', reason?: string): void {
    if (count > this.remaining / unit) {
      malformed(code, reason ?? `${this.what}: ${field} ${count} exceeds the payload (${this.remaining} bytes left)`);
    }
  }
  u16(field: string): number { this.need(2, field); const x = this.v.getUint16(this.off, true); this.off += 2; return x; }
  u32(field: string): number { this.need(4, field); const x = this.v.getUint32(this.off, true); this.off += 4; return x; }
  u64(field: string): number {
    this.need(8, field);
    const lo = this.v.getUint32(this.off, true);
    const hi = this.v.getUint32(this.off + 4, true);
    this.off += 8;
    return hi * 0x100000000 + lo;
  }
  /** `count` u32s, the count checked against the bytes present first. */
  u32s(count: number, field: string, code?: string, reason?: string): number[] {
    this.fits(count, 4, field, code, reason);
    const out: number[] = [];
    for (let i = 0; i < count; i++) out.push(this.u32(field));
    return out;
  }
  /** A view (not a copy: the caller already holds a private copy of the message). */
  take(n: number, field: string): Uint8Array {
    this.need(n, field);
    const out = this.bytes.subarray(this.off, this.off + n);
    this.off += n;
    return out;
  }
  rest(): Uint8Array { return this.take(this.remaining, 'rest'); }
  end(): void {
    if (this.remaining !== 0) malformed('trailing-bytes', `${this.what}: ${this.remaining} unexpected trailing bytes`);
  }
}

export class Writer {
  private buf: Uint8Array;
  private v: DataView;
  private off = 0;
  constructor(initial = 256) {
    this.buf = new Uint8Array(Math.max(1, initial));
    this.v = new DataView(this.buf.buffer);
  }
  private room(n: number): void {
    if (this.off + n <= this.buf.byteLength) return;
    let size = this.buf.byteLength * 2;
    while (size < this.off + n) size *= 2;
    const b = new Uint8Array(size);
    b.set(this.buf.subarray(0, this.off));
    this.buf = b;
    this.v = new DataView(b.buffer);
  }
  u16(x: number): this { this.room(2); this.v.setUint16(this.off, x, true); this.off += 2; return this; }
  u32(x: number): this { this.room(4); this.v.setUint32(this.off, x >>> 0, true); this.off += 4; return this; }
  u64(x: number): this {
    this.room(8);
    this.v.setUint32(this.off, x % 0x100000000, true);
    this.v.setUint32(this.off + 4, Math.floor(x / 0x100000000), true);
    this.off += 8;
    return this;
  }
  bytes(b: Uint8Array): this { this.room(b.byteLength); this.buf.set(b, this.off); this.off += b.byteLength; return this; }
  finish(): Uint8Array { return this.buf.subarray(0, this.off); }
}

const utf8 = new TextEncoder();
const utf8d = new TextDecoder('utf-8', { fatal: false });

export function encodeUtf8(s: string): Uint8Array { return utf8.encode(s); }
/** Lossy: reasons, licenses and logs are text for people; invalid sequences become U+FFFD. */
export function decodeUtf8(b: Uint8Array): string { return utf8d.decode(b); }

/** UTF-8 cut at maxBytes on a character boundary (keeps the head). */
export function boundedUtf8(s: string, maxBytes: number): Uint8Array {
  const b = utf8.encode(s);
  if (b.byteLength <= maxBytes) return b;
  let end = maxBytes;
  while (end > 0 && (b[end]! & 0xc0) === 0x80) end--;
  return b.subarray(0, end);
}

/** UTF-8 cut to its last maxBytes on a character boundary (keeps the tail: a log's end says why). */
export function tailUtf8(s: string, maxBytes: number): Uint8Array {
  const b = utf8.encode(s);
  if (b.byteLength <= maxBytes) return b;
  let start = b.byteLength - maxBytes;
  while (start < b.byteLength && (b[start]! & 0xc0) === 0x80) start++;
  return b.subarray(start);
}
