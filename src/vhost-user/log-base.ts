import { VxError } from '../errors.js';
import { SharedMapping, closeFd, fdInfo } from '../sys/libc.js';
import { MAX_GUEST_ADDRESS } from '../memory/guest-memory.js';
import { logBytesFor, type LogInfo } from '../memory/dirty-log.js';

/** Largest log we map: 512 MiB of bits cover 16 TiB of guest-physical addresses. */
export const MAX_LOG_BYTES = 512 * 2 ** 20;
const PAGE = 4096;

export type LogBaseErrorCode = 'log-size' | 'log-offset' | 'log-not-memory-file' | 'log-file-too-small' | 'log-too-small';

/** The frontend's SET_LOG_BASE cannot be used; its description is wrong, so a reconnect does not help. */
export class LogBaseError extends VxError {
  constructor(code: LogBaseErrorCode, message: string) {
    super(code, message);
  }
}

/** The log description of SET_LOG_BASE ("Log description": u64 mmap_size, u64 mmap_offset). */
export interface LogDesc {
  size: number;
  offset: number;
}

/**
 * The dirty log the frontend shares with SET_LOG_BASE, mapped. Checked like a memory region
 * before anything is mapped, because touching a mapping past the end of its file is SIGBUS.
 */
export class LogMapping {
  readonly info: LogInfo;
  private constructor(private readonly mapping: SharedMapping, readonly desc: LogDesc, at: number) {
    this.info = { hostAddress: mapping.address + at, size: desc.size };
  }

  /**
   * Maps the log; takes ownership of fd (closed in every case: the mapping keeps the memory).
   * `memoryEnd` is the end of the highest guest region (0: no memory table yet). The spec: the
   * log "should be large enough to cover all known guest addresses"; QEMU grows the log before it
   * adds memory and shrinks it after, so at this point the current table must fit.
   */
  static map(d: LogDesc, fd: number, memoryEnd: number): LogMapping {
    try {
      if (!(d.size > 0) || d.size > MAX_LOG_BYTES) throw new LogBaseError('log-size', `log size ${d.size} outside 1..${MAX_LOG_BYTES}`);
      if (!(d.offset >= 0) || d.offset > MAX_GUEST_ADDRESS - d.size) throw new LogBaseError('log-offset', `log offset 0x${d.offset.toString(16)} out of range`);
      const need = logBytesFor(memoryEnd);
      if (d.size < need) throw new LogBaseError('log-too-small', `log of ${d.size} bytes covers less than guest memory (${memoryEnd} bytes need ${need})`);
      const info = fdInfo(fd);
      if (info.kind !== 'file') throw new LogBaseError('log-not-memory-file', 'log fd is not a memory file (memfd or shm)');
      if (d.offset + d.size > info.size) throw new LogBaseError('log-file-too-small', `log needs ${d.offset + d.size} bytes of its file, which has ${info.size}`);
      // mmap wants a page-aligned file offset: map from the page holding the log's first byte.
      const start = Math.floor(d.offset / PAGE) * PAGE;
      const mapping = new SharedMapping(fd, d.offset + d.size - start, start);
      return new LogMapping(mapping, d, d.offset - start);
    } finally {
      closeFd(fd);
    }
  }

  /** Callers must have dropped every DirtyLog over this mapping first. */
  unmap(): void {
    this.mapping.unmap();
  }
}
