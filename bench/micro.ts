// `npm run bench -- micro`: single-thread costs of two hot-path building blocks, measured in
// process (no backend, no guest). Moved here from the test suite, which asserts behaviour only;
// the floors the tests used to assert are printed beside each figure as targets.
import { readFileSync } from 'node:fs';
import path from 'node:path';
import { pathToFileURL } from 'node:url';
import { SplitQueue, DescriptorChain } from '../src/virtio/split-queue.js';
import { BpfMap, BpfMapType } from '../src/sys/bpf/maps.js';
import { TestRunner } from '../src/sys/bpf/test-run.js';
import { progLoad, closeBpfFd } from '../src/sys/bpf/programs.js';
import { ComposedProgram } from '../src/offload/compose.js';
import { readBpfObject } from '../src/offload/bpf-object.js';
import { bindMapHandles } from '../src/offload/guest/codec.js';
import { repoRoot } from '../test/support/backend.js';
import { makeMemoryFixture } from '../test/support/memory-fixture.js';
import { DriverQueue, DESC_F_WRITE } from '../test/support/frontend/driver-queue.js';
import { udpFrame } from '../test/support/frames.js';

export interface MicroResult {
  /** SplitQueue pop + pushUsed of 1-segment chains, per second (target > 1e6). */
  splitQueueOpsPerSec: number;
  /** BPF_PROG_TEST_RUN ns per 64-byte frame, best of 3 (target: dropComposed < dropAlone + 100). */
  testRunNsPerFrame: { dropAlone: number; dropComposed: number; passComposed: number; plainRedirect: number };
}

function splitQueueRate(): number {
  const fx = makeMemoryFixture('vq-bench');
  try {
    const size = 256;
    const drv = new DriverQueue(fx.driverMem, 0, size, { eventIdx: false });
    const dev = new SplitQueue(fx.deviceMem, drv.layout, { eventIdx: false, name: 'bench:q0' });
    for (let i = 0; i < size; i++) {
      drv.writeDescriptor(i, { addr: 0x20000 + 2048 * i, len: 1514, flags: DESC_F_WRITE, next: 0 });
      drv.writeAvailRing(i, i);
    }
    const chain = new DescriptorChain();
    let avail = 0;
    const run = (rounds: number): number => {
      let ops = 0;
      for (let r = 0; r < rounds; r++) {
        avail = (avail + size) & 0xffff;
        drv.setAvailIdx(avail);
        while (dev.pop(chain)) {
          dev.pushUsed(chain.head, chain.writableBytes);
          ops++;
        }
        dev.flushUsed();
        dev.needsNotify();
      }
      return ops;
    };
    run(2000); // warm up the JIT
    const t0 = process.hrtime.bigint();
    const ops = run(8000);
    return ops / (Number(process.hrtime.bigint() - t0) / 1e9);
  } finally {
    fx.release();
  }
}

/**
 * Guest alone vs composed (entry + bpf-to-bpf call + verdict mapping) vs the plain redirect,
 * with the xdp_drop / xdp_pass samples (bpf/out, `npm run build`) and their counter maps.
 */
function testRunCosts(): MicroResult['testRunNsPerFrame'] {
  const frame = udpFrame(1, 22);
  const REPEAT = 200_000;
  const perFrame = (fd: number): number => {
    const r = new TestRunner(fd);
    try {
      r.runBytes(frame, { repeat: 10_000 });
      let best = Infinity;
      for (let i = 0; i < 3; i++) best = Math.min(best, r.runBytes(frame, { repeat: REPEAT }).duration);
      return best;
    } finally { r.dispose(); }
  };
  const maps: BpfMap[] = [];
  const progs: ComposedProgram[] = [];
  let alone = -1;
  /** A sample with its maps created; host map fds go where the broker puts them (the ld_imm64 imm). */
  const sample = (name: string): Uint8Array => {
    const o = readBpfObject(readFileSync(path.join(repoRoot(), 'bpf/out', `${name}.o`)));
    const fds = o.maps.map((d) => { const m = BpfMap.create(d.type, d.keySize, d.valueSize, d.maxEntries, { name: d.name.slice(0, 15) }); maps.push(m); return m.fd; });
    return bindMapHandles(o.insns, o.mapRelocations, fds);
  };
  try {
    const xsk = BpfMap.create(BpfMapType.XSKMAP, 4, 4, 4, { name: 'vx_bench_xsk' });
    maps.push(xsk);
    const load = (guest: Uint8Array | null) => { const p = ComposedProgram.load(guest, { xskMapFd: xsk.fd }, 'GPL'); progs.push(p); return p.fd; };
    const drop = sample('xdp_drop');
    alone = progLoad(drop, { license: 'GPL', name: 'vx_bench_alone' });
    return {
      dropAlone: perFrame(alone), dropComposed: perFrame(load(drop)),
      passComposed: perFrame(load(sample('xdp_pass'))), plainRedirect: perFrame(load(null)),
    };
  } finally {
    for (const p of progs) p.close();
    if (alone >= 0) closeBpfFd(alone);
    for (const m of maps) m.close();
  }
}

export function runMicroBench(): MicroResult {
  return { splitQueueOpsPerSec: splitQueueRate(), testRunNsPerFrame: testRunCosts() };
}

if (process.argv[1] && import.meta.url === pathToFileURL(process.argv[1]).href) {
  console.log(JSON.stringify(runMicroBench(), null, 2));
}
