/**
 * One popped descriptor chain, flattened into segments. Allocated once per worker and refilled
 * by SplitQueue.pop(), so the datapath does not allocate per packet. The arrays hold
 * maxSegments entries; only the first `count` are meaningful after a pop.
 *
 * Segments are in chain order: the first `readableCount` are device-readable (driver → device),
 * the rest device-writable. Zero-length descriptors are skipped and never appear here.
 * A segment's host address is its region's plus its offset (ChainCursor.hostAddress): pop()
 * fills only what the datapath reads, once per descriptor of every frame.
 */
export class DescriptorChain {
  readonly maxSegments: number;
  /** Head descriptor index: what goes back in the used ring. -1 before the first pop. */
  head = -1;
  count = 0;
  readableCount = 0;
  readableBytes = 0;
  writableBytes = 0;
  /** Guest-physical address of each segment (the dirty log marks by it). */
  readonly gpa: Float64Array;
  readonly length: Uint32Array;
  /** Index into GuestMemory.regions, and the segment's offset inside that region's bytes/view. */
  readonly region: Int32Array;
  readonly offset: Float64Array;

  constructor(maxSegments = 1024) {
    if (!Number.isInteger(maxSegments) || maxSegments < 1 || maxSegments > 65536) {
      throw new RangeError(`maxSegments must be an integer in 1..65536, got ${maxSegments}`);
    }
    this.maxSegments = maxSegments;
    this.gpa = new Float64Array(maxSegments);
    this.length = new Uint32Array(maxSegments);
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
