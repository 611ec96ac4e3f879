import type { HostQueue, HostQueueConfig } from './port.js';
import { eventfdCreate, closeFd } from '../sys/libc.js';

/** A queue with nothing behind it: never readable, and whatever is sent to it is dropped (counted). */
export class NullHostQueue implements HostQueue {
  // An eventfd nobody signals: something epoll can hold that never fires.
  readonly fd = eventfdCreate(true);
  receive(): number { return -1; }
  transmit(): number { return -1; }
  close(): void { closeFd(this.fd); }
}
import { TapQueue } from './tap.js';
import { openXskQueue } from '../net/xsk-paths.js';

/** Opens the worker side of a port queue from its posted configuration. */
export function openHostQueue(cfg: HostQueueConfig): HostQueue {
  switch (cfg.kind) {
    case 'tap':
      return new TapQueue(cfg.fd);
    case 'xsk':
      return openXskQueue(cfg);
    case 'null':
      return new NullHostQueue();
  }
}
