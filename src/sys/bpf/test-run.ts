import { NativeBuffer } from '../libc.js';
import { libbpf, fail } from './libbpf.js';

// BPF_PROG_TEST_RUN: running a loaded program on frames in memory (the tap port's offload path
// and tests), and the live-frames mode used as a kernel-speed packet generator.

const fn = {
  prog_test_run_opts: libbpf.func('bpf_prog_test_run_opts', 'int', ['int', 'intptr_t']),
};

// struct bpf_test_run_opts (libbpf 1.1), 80 bytes.
const TR_SIZE = 80;
const TR_DATA_IN = 8, TR_DATA_OUT = 16, TR_SIZE_IN = 24, TR_SIZE_OUT = 28;
const TR_CTX_IN = 32, TR_CTX_SIZE_IN = 48;
const TR_RETVAL = 56, TR_REPEAT = 60, TR_DURATION = 64, TR_FLAGS = 68, TR_BATCH_SIZE = 76;
/** BPF_F_TEST_XDP_LIVE_FRAMES: frames the program redirects or bounces really leave (5.18+). */
const BPF_F_TEST_XDP_LIVE_FRAMES = 1 << 1;
/** struct xdp_md as test-run context: data@0 data_end@4 data_meta@8 ingress_ifindex@12 rx_queue_index@16 egress_ifindex@20. */
const XDP_MD_SIZE = 24;
/** Where runLive keeps its xdp_md, inside the opts buffer past the struct. */
const CTX_OFF = 2048;

/**
 * Runs one program through BPF_PROG_TEST_RUN with a preallocated opts struct, for the
 * datapath: run() takes native addresses (e.g. inside mapped guest RAM), allocates nothing
 * and returns the program's return value. The kernel copies data_in before running and
 * copies the result out afterwards, so dataOut may equal dataIn to rewrite a frame in place.
 */
export class TestRunner {
  readonly progFd: number;
  private readonly opts: NativeBuffer;
  private readonly view: DataView;
  private readonly address: number;
  private bounce: NativeBuffer | null = null;

  constructor(progFd: number) {
    this.progFd = progFd;
    this.opts = new NativeBuffer(4096);
    this.view = this.opts.view;
    this.address = this.opts.address;
    this.view.setBigUint64(0, BigInt(TR_SIZE), true);
  }

  /**
   * Runs on [dataIn, dataIn+lenIn) and writes at most outCap bytes of the result to dataOut
   * (0 = discard). Returns the program's verdict; outLength/duration describe the run.
   * Throws BpfError: ENOSPC when the result is larger than outCap (the truncated result is
   * still written), EINVAL for frames the kernel refuses (e.g. shorter than 14 bytes).
   */
  run(dataIn: number, lenIn: number, dataOut: number, outCap: number, repeat = 1): number {
    const v = this.view;
    this.setPointer(TR_DATA_IN, dataIn);
    this.setPointer(TR_DATA_OUT, dataOut);
    v.setUint32(TR_SIZE_IN, lenIn, true);
    v.setUint32(TR_SIZE_OUT, dataOut === 0 ? 0 : outCap, true);
    v.setInt32(TR_REPEAT, repeat, true);
    const r = fn.prog_test_run_opts(this.progFd, this.address) as number;
    if (r < 0) fail('bpf_prog_test_run_opts', r, `${lenIn} bytes in`);
    return v.getUint32(TR_RETVAL, true);
  }

  /** Two u32 halves instead of setBigUint64: no BigInt per packet. */
  private setPointer(off: number, address: number): void {
    this.view.setUint32(off, address % 0x100000000, true);
    this.view.setUint32(off + 4, Math.floor(address / 0x100000000), true);
  }

  /** Verdict of the last run; still valid after an ENOSPC throw (the program did run). */
  get retval(): number { return this.view.getUint32(TR_RETVAL, true); }
  /** Length of the frame the last run produced (after any head/tail adjustment). */
  get outLength(): number { return this.view.getUint32(TR_SIZE_OUT, true); }
  /** Average ns per repetition of the last run, as measured by the kernel. */
  get duration(): number { return this.view.getUint32(TR_DURATION, true); }

  /** Convenience for control paths and tests: copies through a native bounce buffer. */
  runBytes(data: Uint8Array, opts: { outCap?: number; repeat?: number } = {}):
    { retval: number; data: Uint8Array; duration: number } {
    const outCap = opts.outCap ?? Math.max(4096, data.byteLength);
    const need = data.byteLength + outCap;
    if (!this.bounce || this.bounce.size < need) {
      this.bounce?.free();
      this.bounce = new NativeBuffer(Math.ceil(need / 4096) * 4096);
    }
    const b = this.bounce;
    b.bytes.set(data, 0);
    const retval = this.run(b.address, data.byteLength, b.address + data.byteLength, outCap, opts.repeat ?? 1);
    const outLen = Math.min(this.outLength, outCap);
    const out = b.bytes.slice(data.byteLength, data.byteLength + outLen);
    return { retval, data: out, duration: this.duration };
  }

  /**
   * Live-frames mode: runs the program `repeat` times on copies of the frame as if it arrived
   * on (ifindex, queue), and what it returns is carried out for real: XDP_TX sends the frame
   * out of ifindex through its driver's ndo_xdp_xmit, XDP_REDIRECT follows the redirect. This
   * is a kernel-speed packet generator (what xdp-trafficgen does). Frames go in batches of
   * `batchSize` (the kernel's default is 64). Returns the number of frames run.
   */
  runLive(frame: number, frameLen: number, ifindex: number, repeat: number, opts: { queue?: number; batchSize?: number } = {}): number {
    const v = this.view;
    for (let i = 0; i < XDP_MD_SIZE; i += 4) v.setUint32(CTX_OFF + i, 0, true);
    v.setUint32(CTX_OFF + 4, frameLen, true); // data_end must equal the frame length
    v.setUint32(CTX_OFF + 12, ifindex, true);
    v.setUint32(CTX_OFF + 16, opts.queue ?? 0, true);
    this.setPointer(TR_DATA_IN, frame);
    this.setPointer(TR_DATA_OUT, 0);
    v.setUint32(TR_SIZE_IN, frameLen, true);
    v.setUint32(TR_SIZE_OUT, 0, true);
    this.setPointer(TR_CTX_IN, this.address + CTX_OFF);
    v.setUint32(TR_CTX_SIZE_IN, XDP_MD_SIZE, true);
    v.setInt32(TR_REPEAT, repeat, true);
    v.setUint32(TR_FLAGS, BPF_F_TEST_XDP_LIVE_FRAMES, true);
    v.setUint32(TR_BATCH_SIZE, opts.batchSize ?? 0, true);
    try {
      const r = fn.prog_test_run_opts(this.progFd, this.address) as number;
      if (r < 0) fail('bpf_prog_test_run_opts (live frames)', r, `${frameLen} bytes on ifindex ${ifindex}`);
    } finally {
      // run() leaves these alone; put the struct back the way it expects.
      this.setPointer(TR_CTX_IN, 0);
      v.setUint32(TR_CTX_SIZE_IN, 0, true);
      v.setUint32(TR_FLAGS, 0, true);
      v.setUint32(TR_BATCH_SIZE, 0, true);
    }
    return repeat;
  }

  /** Frees the opts struct (not the program fd). */
  dispose(): void {
    this.opts.free();
    this.bounce?.free();
    this.bounce = null;
  }
}
