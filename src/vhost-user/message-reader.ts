import { VxError } from '../errors.js';
import { closeFd } from '../sys/libc.js';
import type { UnixSocket } from '../sys/unix-socket.js';
import { HEADER_SIZE, MAX_PAYLOAD, decodeHeader, requestName, type Header } from './protocol.js';

export interface Message {
  header: Header;
  /** A copy of the payload (never a view into a socket buffer). */
  payload: Uint8Array;
  /** fds that arrived with the header; the receiver owns them. */
  fds: number[];
}

/**
 * The byte stream from the frontend cannot be framed any more ('oversized-message',
 * 'fds-in-payload'): the connection is closed. A frontend that sent this once would send it
 * again, so a reconnect does not help.
 */
export class ProtocolError extends VxError {
  constructor(code: 'oversized-message' | 'fds-in-payload', message: string) {
    super(code, message);
  }
}

/**
 * Reassembles messages from a non-blocking stream socket: header first (fds arrive with it),
 * then exactly `size` payload bytes. The size limit is enforced before anything is buffered.
 */
export class MessageReader {
  private readonly headerBuf = new Uint8Array(HEADER_SIZE);
  private headerGot = 0;
  private header: Header | null = null;
  private payload = new Uint8Array(0);
  private payloadGot = 0;
  private fds: number[] = [];

  constructor(private readonly socket: UnixSocket) {}

  /**
   * Returns the next whole message, null when more bytes are needed, or 'closed' at EOF.
   * Throws ProtocolError for an oversized or malformed header (the connection is unusable).
   */
  next(): Message | null | 'closed' {
    while (this.header === null) {
      const r = this.socket.recv(this.headerBuf, this.headerGot, HEADER_SIZE - this.headerGot);
      this.fds.push(...r.fds);
      if (r.n === 0) return 'closed';
      if (r.n < 0) return null;
      this.headerGot += r.n;
      if (this.headerGot < HEADER_SIZE) continue;
      const h = decodeHeader(this.headerBuf);
      if (h.size > MAX_PAYLOAD) {
        this.dropFds();
        throw new ProtocolError('oversized-message', `${requestName(h.request)} announces ${h.size} payload bytes (limit ${MAX_PAYLOAD})`);
      }
      this.header = h;
      this.payload = new Uint8Array(h.size);
      this.payloadGot = 0;
    }
    while (this.payloadGot < this.header.size) {
      const r = this.socket.recv(this.payload, this.payloadGot, this.header.size - this.payloadGot);
      if (r.fds.length > 0) {
        for (const fd of r.fds) closeFd(fd);
        this.dropFds();
        throw new ProtocolError('fds-in-payload', `fds sent inside the payload of ${requestName(this.header.request)}`);
      }
      if (r.n === 0) return 'closed';
      if (r.n < 0) return null;
      this.payloadGot += r.n;
    }
    const msg: Message = { header: this.header, payload: this.payload, fds: this.fds };
    this.header = null;
    this.headerGot = 0;
    this.fds = [];
    return msg;
  }

  /** Closes fds of a half-read message (on disconnect). */
  dropFds(): void {
    for (const fd of this.fds) closeFd(fd);
    this.fds = [];
  }
}
