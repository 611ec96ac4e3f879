import type { HostQueue } from './host-queue.js';
import type { HostQueueConfig } from './port.js';
import { TapQueue } from './tap.js';
import { PacketQueue } from './packet-queue.js';
import { XskQueue } from './xsk-queue.js';

/** Opens the worker side of a port queue from its posted configuration. */
export function openHostQueue(cfg: HostQueueConfig): HostQueue {
  switch (cfg.kind) {
    case 'tap':
      return new TapQueue(cfg.fd);
    case 'xsk':
      return new XskQueue(cfg);
    case 'packet':
      return PacketQueue.open(cfg);
  }
}
