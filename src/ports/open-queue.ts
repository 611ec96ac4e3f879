import type { HostQueue } from './host-queue.js';
import type { HostQueueConfig } from './port.js';
import { TapQueue } from './tap.js';
import { PacketQueue } from './packet-queue.js';
import { XskQueue } from './xsk-queue.js';
import { UringQueue } from './uring-queue.js';
import { logger } from '../log.js';

/**
 * A tap queue over io_uring when the port chose it (it probed the host at start), else readv/writev.
 * A ring this thread cannot set up after all (a limit on locked memory or rings, say) falls back
 * with a line in the log: the frames still flow, one system call each.
 */
function openTapQueue(fd: number, ifname: string, io: 'uring' | 'rw'): HostQueue {
  if (io === 'uring') {
    try {
      return UringQueue.open(fd);
    } catch (e) {
      logger(ifname).warn(`io_uring ring refused on this worker (${(e as Error).message}): this queue uses readv/writev`);
    }
  }
  return new TapQueue(fd);
}

/** Opens the worker side of a port queue from its posted configuration. */
export function openHostQueue(cfg: HostQueueConfig): HostQueue {
  switch (cfg.kind) {
    case 'tap':
      return openTapQueue(cfg.fd, cfg.ifname, cfg.io);
    case 'xsk':
      return new XskQueue(cfg);
    case 'packet':
      return PacketQueue.open(cfg);
  }
}
