/**
 * A host attachment as the datapath sees it, one queue per virtio queue pair. Frames move
 * between guest buffers and the host through iovec arrays in native memory (no JS copies).
 */
export interface HostQueue {
  /** Readable when the host has frames for the guest. */
  readonly fd: number;
  /** Reads one frame (vnet header first) into the iovecs; bytes read, or -1 when none is waiting. */
  receive(iovAddress: number, iovCount: number): number;
  /** Sends one frame (vnet header first) from the iovecs; bytes sent, or -1 when the host is full. */
  transmit(iovAddress: number, iovCount: number): number;
  /** Takes the queue out of (false) or back into (true) the host's use. */
  setAttached?(attached: boolean): void;
  /** Releases what the queue itself owns (the port owns the fds of tap and AF_XDP queues). */
  close?(): void;
}

import type { XskQueueConfig } from './xsk.js';
import type { PacketQueueConfig } from './packet-queue.js';
import type { RegionInfo } from '../memory/guest-memory.js';

/** What a worker needs to open its side of a port queue (plain data: posted to workers). */
export type HostQueueConfig = { kind: 'tap'; fd: number; ifname: string } | XskQueueConfig | PacketQueueConfig;

/** The control-plane side of a port. */
export interface Port {
  readonly kind: string;
  readonly ifname: string;
  readonly queuePairs: number;
  queueConfig(pair: number): HostQueueConfig;
  /**
   * Ports whose queues live over guest RAM (AF_XDP): queues open only once memory is attached,
   * open anew for every start of a pair, and are released when the pair stops.
   */
  readonly needsGuestMemory?: boolean;
  /** Returns why frames will be copied (e.g. over the pin limit), or null when they will not. */
  attachMemory?(regions: readonly RegionInfo[]): { bounceReason: string | null };
  detachMemory?(): void;
  releaseQueue?(pair: number): void;
  /**
   * Ports over guest RAM: the queue of the offload device's reserved pair, which gets no
   * guest-RAM queue (offload replies are written by the datapath, not by the kernel).
   */
  reservedQueueConfig?(pair: number): HostQueueConfig;
  /** Checksum and segmentation offloads this port can honour (tap: all; AF_XDP: none). */
  readonly offloads?: boolean;
  setMtu(mtu: number): void;
  /** Guest receive offloads acked (checksum, TSO) and the vnet header length in use. */
  configureOffloads(opts: { vnetHeaderLength: number; csum: boolean; tso4: boolean; tso6: boolean; ecn: boolean }): void;
  /** Takes a queue out of (false) or back into (true) the host's use; frames then spread over the others. */
  setQueueEnabled(pair: number, enabled: boolean): void;
  stats(): { rxPackets: number; txPackets: number; rxBytes: number; txBytes: number; rxDropped: number; txDropped: number };
  close(): void;
}
