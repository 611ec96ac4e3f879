import type { XskQueueConfig } from './xsk-queue.js';
import type { PacketQueueConfig } from './packet-queue.js';
import type { RegionInfo } from '../memory/guest-memory.js';

/** How a tap queue moves frames: io_uring (guest→host writes batched per burst) or one readv/writev per frame. */
export type TapIo = 'uring' | 'rw';
/** `serve --tap-io` and a device spec's tapIo: io_uring, readv/writev, or io_uring where this host allows it. */
export type TapIoMode = TapIo | 'auto';
export const TAP_IO_MODES: readonly TapIoMode[] = ['auto', 'uring', 'rw'];
/** The I/O a tap's queues use, and why readv/writev when they do (asked for, or why io_uring could not be had). */
export type TapIoStatus = { mode: 'uring'; reason: null } | { mode: 'rw'; reason: string };

/** An offloaded program as a port attaches it: its instructions and the license the kernel checks helpers against. */
export type ProgramSource = { code: Uint8Array; license: string };
/** What Port.attachInKernel did: the log line, whether the kernel runs it, and the rule that refused it (when not). */
export type KernelAttach = { line: string; inKernel: boolean; code?: string };

/** What a worker needs to open its side of a port queue (plain data: posted to workers; ports/open-queue.ts opens it as a HostQueue). */
export type HostQueueConfig = { kind: 'tap'; fd: number; ifname: string; io: TapIo } | XskQueueConfig | PacketQueueConfig;

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
  /**
   * Attaching an offloaded program is a port method (DESIGN.md decision 7). A port that runs it
   * in the kernel (xsk: natively at the ingress of its veth end) attaches it here, or the plain
   * setup again for null; returns a line for the log and throws when it could not attach it
   * (what was attached stays). A port without it (tap) tries attachInKernel, and has its queues
   * test-run what that refuses per frame (HostQueue.setProgram).
   */
  attachProgram?(source: ProgramSource | null, warn: (message: string) => void): string;
  /**
   * A port that can run the program in the kernel for some programs only (tap: translated for
   * its tc egress). inKernel false: it does not run it (the line says why, `code` names the
   * rule); the datapath test-runs it instead. null removes what runs in the kernel.
   */
  attachInKernel?(source: ProgramSource | null): KernelAttach;
  /** Verdicts counted in the kernel by the program attachInKernel runs (the datapath never sees those frames). */
  kernelVerdicts?(): { pass: number; drop: number; tx: number; aborted: number };
  /** Checksum and segmentation offloads this port can honour (tap: all; AF_XDP: none). */
  readonly offloads?: boolean;
  setMtu(mtu: number): void;
  /** Guest receive offloads acked (checksum, TSO) and the vnet header length in use. */
  configureOffloads(opts: { vnetHeaderLength: number; csum: boolean; tso4: boolean; tso6: boolean; ecn: boolean }): void;
  /** Takes a queue out of (false) or back into (true) the host's use; frames then spread over the others. */
  setQueueEnabled(pair: number, enabled: boolean): void;
  stats(): { rxPackets: number; txPackets: number; rxBytes: number; txBytes: number; rxDropped: number; txDropped: number };
  close(): void;
  /**
   * The process is going away on purpose (SIGTERM/SIGINT), however the orderly close ends:
   * make sure what we created goes with it, synchronously and without waiting for the
   * datapath (a persistent tap stops being persistent and goes when our fds close; a veth is
   * deleted only at the last resort, `final`, since its sockets may still be in use).
   */
  abandon?(final: boolean): void;
}
