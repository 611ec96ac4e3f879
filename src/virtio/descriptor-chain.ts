/**
 * One popped descriptor chain, flattened into segments. Allocated once per worker and refilled
 * by SplitQueue.pop(), so the datapath does not allocate per packet. The arrays hold
 * maxSegments entries; only the first `count` are meaningful after a pop.
 *
 * Segments are in chain order: the first `readableCount` are device-readable (driver → device),
 * the rest device-writable. Zero-length descriptors are skipped and never appear here.
 */
export class DescriptorChain {
  readonly maxSegments: number;
  /** Head descriptor index: what goes back in the used ring. -1 before the first pop. */
  head = -1;
  count = 0;
  readableCount = 0;
  readableBytes = 0;
  writableBytes = 0;
  /** Guest-physical address of each segment. */
  readonly gpa: Float64Array;
  /** Our virtual address of each segment (for iovecs handed to the kernel). */
  readonly hostAddress: Float64Array;
  readonly length: Uint32Array;
  /** 1 when the device may write the segment. */
  readonly writable: Uint8Array;
  /** Index into GuestMemory.regions, and the segment's offset inside that region's bytes/view. */
  readonly region: Int32Array;
  readonly offset: Float64Array;

  constructor(maxSegments = 1024) {
    if (!Number.isInteger(maxSegments) || maxSegments < 1 || maxSegments > 65536) {
      throw new RangeError(`maxSegments must be an integer in 1..65536, got ${maxSegments}`);
    }
    this.maxSegments = maxSegments;
    this.gpa = new Float64Array(maxSegments);
    this.hostAddress = new Float64Array(maxSegments);
    this.length = new Uint32Array(maxSegments);
    this.writable = new Uint8Array(maxSegments);
    this.region = new Int32Array(maxSegments);
    this.offset = new Float64Array(maxSegments);
  }

  get totalBytes(): number {
    return this.readableBytes + this.writableBytes;
  }

  /** Index of the first writable segment (== count when there is none). */
  get firstWritable(): number {
    return this.readableCount;
  }

  reset(): void {
    this.head = -1;
    this.count = 0;
    this.readableCount = 0;
    this.readableBytes = 0;
    this.writableBytes = 0;
  }
}
