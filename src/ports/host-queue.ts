import type { HostQueue, HostQueueConfig } from './port.js';
import { TapQueue } from './tap.js';
import { PacketQueue } from './packet-queue.js';
import { openXskQueue } from '../net/xsk-paths.js';

/** Opens the worker side of a port queue from its posted configuration. */
export function openHostQueue(cfg: HostQueueConfig): HostQueue {
  switch (cfg.kind) {
    case 'tap':
      return new TapQueue(cfg.fd);
    case 'xsk':
      return openXskQueue(cfg);
    case 'packet':
      return PacketQueue.open(cfg);
  }
}
