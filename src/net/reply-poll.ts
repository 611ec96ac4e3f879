// How long a worker keeps looking at a guest's transmit ring after it delivered frames to it,
// instead of going to sleep until the guest's kick (serve --reply-poll).
//
// Request/response traffic (a ping, an RPC, a TCP ACK) has the guest answer within microseconds
// of a delivery. A worker that sleeps at once pays a wake-up for that answer: the kick's eventfd
// write, then a CPU that went idle waking the worker (46-70 µs for a halted vCPU here). Polling
// for a window catches the answer instead. The window adapts per queue pair, the way the
// kernel's haltpoll governor sizes its guest halt poll: it grows while answers come after it ran
// out but within the bound, shrinks when they come later or not at all. One-way traffic (a
// second delivery before any answer) shrinks it to nothing within a few deliveries, so a pair
// that only receives does not pay for it.
import { SpecError } from '../service/device-spec.js';

/** The bound a worker polls up to unless told otherwise: above the answer time of a polling guest (a few µs) with room for a vCPU's scheduling. */
export const DEFAULT_REPLY_POLL_US = 50;
/** Beyond this a window is a busy-poll (serve --busy-poll says so plainly). */
export const REPLY_POLL_MAX_US = 1000;
/** The first window after evidence that one pays, in µs (or the bound, when smaller). */
export const REPLY_POLL_START_US = 10;

/** 0 (off) or an integer bound in 1..REPLY_POLL_MAX_US µs. */
export function checkReplyPoll(us: number): void {
  if (!Number.isInteger(us) || us < 0 || us > REPLY_POLL_MAX_US) {
    throw new SpecError('bad-reply-poll', `--reply-poll ${us}: 0 (off) or 1..${REPLY_POLL_MAX_US} µs`);
  }
}

/**
 * One queue pair's window. Times are performance.now() milliseconds, passed in, so the caller
 * reads the clock once per burst and the rules can be exercised without one.
 */
export class ReplyPoll {
  /** The current window in µs (0: sleep at once). */
  windowUs = 0;
  /** When the last delivery still waiting for an answer happened (-1: none waits). */
  private deliveredAt = -1;
  /** Until when to poll (0: not polling). */
  private until = 0;

  constructor(readonly boundUs: number) {}

  /** Frames went into the guest at `now`. */
  delivered(now: number): void {
    // Two deliveries with no answer between: this traffic does not answer what it gets.
    if (this.deliveredAt >= 0) this.shrink();
    this.deliveredAt = now;
    this.until = this.windowUs > 0 ? now + this.windowUs / 1000 : 0;
  }

  /** True while an answer is awaited (a transmit burst then says when it came). */
  get awaiting(): boolean {
    return this.deliveredAt >= 0;
  }

  /**
   * The guest transmitted at `now` while an answer was awaited. Returns true when it came inside
   * the window (taken by polling, or by a kick the worker saw while polling, with no sleep).
   */
  answered(now: number): boolean {
    if (this.deliveredAt < 0) return false;
    const inWindow = this.until !== 0 && now <= this.until;
    const afterUs = (now - this.deliveredAt) * 1000;
    // Inside the window: it is right. After it but within the bound: a longer one would have
    // caught it. Later than the bound: no window allowed would have.
    if (!inWindow) {
      if (afterUs <= this.boundUs) this.grow();
      else this.shrink();
    }
    this.deliveredAt = -1;
    this.until = 0;
    return inWindow;
  }

  /** Whether to keep polling at `now`; false from the moment the window ran out. */
  polling(now: number): boolean {
    if (this.until === 0) return false;
    if (now < this.until) return true;
    this.until = 0;
    return false;
  }

  private grow(): void {
    this.windowUs = this.windowUs === 0 ? Math.min(REPLY_POLL_START_US, this.boundUs) : Math.min(this.boundUs, this.windowUs * 2);
  }

  private shrink(): void {
    const w = this.windowUs >> 1;
    this.windowUs = w < Math.min(REPLY_POLL_START_US, this.boundUs) ? 0 : w;
  }
}
