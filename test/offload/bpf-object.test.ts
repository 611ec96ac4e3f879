import { describe, it, expect, beforeAll, afterAll } from 'vitest';
import { execFileSync } from 'node:child_process';
import { mkdtempSync, readFileSync, readdirSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { readBpfObject, BpfObjectError, type BpfObjectProgram } from '../../src/offload/bpf-object.js';
import { BpfError } from '../../src/sys/bpf/libbpf.js';
import { BpfMap, BpfMapType } from '../../src/sys/bpf/maps.js';
import { progLoad, closeBpfFd } from '../../src/sys/bpf/programs.js';
import { decodeInsn, BPF_PSEUDO_MAP_FD, BPF_PSEUDO_KFUNC_CALL } from '../../src/sys/bpf/insns.js';
import { TestRunner } from '../../src/sys/bpf/test-run.js';
import { XDP_DROP, XDP_PASS, XDP_TX } from '../../src/sys/bpf/xdp.js';
import { progInfo, mapInfo, listProgIds, listMapIds } from '../../src/sys/bpf/info.js';

const ROOT = fileURLToPath(new URL('../..', import.meta.url));
const OUT = join(ROOT, 'bpf/out');
const obj = (name: string) => new Uint8Array(readFileSync(join(OUT, `${name}.o`)));

const createdProgIds = new Set<number>();
const createdMapIds = new Set<number>();

/** Creates the program's maps, patches their fds into its ld_imm64s and loads it. */
function loadWithMaps(p: BpfObjectProgram): { fd: number; maps: BpfMap[] } {
  const maps = p.maps.map((d) => {
    const m = BpfMap.create(d.type, d.keySize, d.valueSize, d.maxEntries, { flags: d.flags, name: d.name.slice(0, 15) });
    createdMapIds.add(mapInfo(m.fd).id);
    return m;
  });
  const insns = p.insns.slice();
  const v = new DataView(insns.buffer);
  for (const r of p.mapRelocations) v.setInt32(r.insnIndex * 8 + 4, maps[r.mapIndex]!.fd, true);
  try {
    const fd = progLoad(insns, { license: p.license, name: 'vx_obj' });
    createdProgIds.add(progInfo(fd).id);
    return { fd, maps };
  } catch (e) {
    for (const m of maps) m.close();
    throw e;
  }
}

function release(r: { fd: number; maps: BpfMap[] }): void {
  closeBpfFd(r.fd);
  for (const m of r.maps) m.close();
}

const u32 = (n: number) => { const b = new Uint8Array(4); new DataView(b.buffer).setUint32(0, n, true); return b; };
const readU64 = (b: Uint8Array | null) => Number(new DataView(b!.buffer, b!.byteOffset).getBigUint64(0, true));

beforeAll(() => {
  execFileSync('bash', [join(ROOT, 'scripts/build-bpf.sh')], { stdio: 'pipe' });
});

describe('samples', () => {
  it('every built kernel-path sample parses, with the GPL license and the xdp section', () => {
    // The object path's samples (*_obj*) are for libbpf; the realistic one (global data, tail
    // call, two programs) is beyond this reader (the kernel path's) by design.
    expect(() => readBpfObject(new Uint8Array(readFileSync(join(OUT, 'xdp_filter_obj.o'))))).toThrow(BpfObjectError);
    const names = readdirSync(OUT).filter((f) => f.endsWith('.o') && !/_obj/.test(f));
    expect(names.length).toBeGreaterThanOrEqual(15);
    for (const n of names) {
      const p = readBpfObject(new Uint8Array(readFileSync(join(OUT, n))));
      expect(p.section, n).toBe('xdp');
      expect(p.license, n).toBe('GPL');
      expect(p.insns.byteLength % 8, n).toBe(0);
      for (const r of p.mapRelocations) {
        const i = decodeInsn(p.insns, r.insnIndex);
        expect(i.code).toBe(0x18);
        expect(i.src).toBe(BPF_PSEUDO_MAP_FD);
        expect(i.imm).toBe(r.mapIndex);
      }
    }
  });

  it("xdp_drop: one ARRAY map 'drop_count' (u32 -> u64, 1 entry) referenced by the ld_imm64 at insn 4", () => {
    const p = readBpfObject(obj('xdp_drop'), 'xdp');
    expect(p.maps).toEqual([{ name: 'drop_count', type: BpfMapType.ARRAY, keySize: 4, valueSize: 8, maxEntries: 1, flags: 0 }]);
    expect(p.mapRelocations).toEqual([{ insnIndex: 4, mapIndex: 0 }]);
    expect(p.externCalls).toEqual([]);
    expect(decodeInsn(p.insns, 4)).toMatchObject({ code: 0x18, dst: 1, src: BPF_PSEUDO_MAP_FD, imm: 0 });
  });

  it('map definitions of the other samples come out of BTF as declared', () => {
    expect(readBpfObject(obj('xdp_blocklist')).maps).toEqual([
      { name: 'blocklist', type: BpfMapType.HASH, keySize: 4, valueSize: 8, maxEntries: 1024, flags: 0 }]);
    expect(readBpfObject(obj('bad_percpu_map')).maps[0]!.type).toBe(BpfMapType.PERCPU_ARRAY);
    expect(readBpfObject(obj('bad_redirect_map')).maps[0]).toMatchObject({ type: BpfMapType.DEVMAP, keySize: 4, valueSize: 4, maxEntries: 4 });
    expect(readBpfObject(obj('bad_tail_call')).maps[0]).toMatchObject({ type: BpfMapType.PROG_ARRAY, keySize: 4, valueSize: 4, maxEntries: 4 });
    expect(readBpfObject(obj('bad_perf_event')).maps[0]).toMatchObject({ type: BpfMapType.PERF_EVENT_ARRAY, keySize: 4, valueSize: 4, maxEntries: 64 });
  });

  it('forbidden samples carry the helper or feature the broker must refuse', () => {
    const helpers = (name: string) => {
      const p = readBpfObject(obj(name));
      const out: number[] = [];
      for (let i = 0; i < p.insns.byteLength / 8; i++) {
        const x = decodeInsn(p.insns, i);
        if (x.code === 0x85 && x.src === 0) out.push(x.imm);
      }
      return out;
    };
    expect(helpers('bad_trace_printk')).toContain(6);
    expect(helpers('bad_perf_event')).toContain(25);
    expect(helpers('bad_probe_read')).toContain(113);
    expect(helpers('bad_fib_lookup')).toContain(69);
    expect(helpers('bad_redirect')).toContain(23);
    expect(helpers('bad_redirect_map')).toContain(51);
    expect(helpers('bad_tail_call')).toContain(12);
    expect(helpers('bad_get_current')).toContain(14);
    const k = readBpfObject(obj('bad_kfunc'));
    expect(k.externCalls).toEqual([{ insnIndex: 4, symbol: 'bpf_xdp_metadata_rx_timestamp' }]);
    expect(decodeInsn(k.insns, 4)).toMatchObject({ code: 0x85, src: BPF_PSEUDO_KFUNC_CALL, imm: 0 });
    expect(readBpfObject(obj('big_prog')).insns.byteLength / 8).toBeGreaterThan(4096);
  });
});

describe('loading parsed samples into the kernel', () => {
  it('xdp_drop with a real map fd substituted loads; test run returns XDP_DROP and counts in the map', () => {
    const r = loadWithMaps(readBpfObject(obj('xdp_drop')));
    const tr = new TestRunner(r.fd);
    try {
      expect(tr.runBytes(new Uint8Array(64)).retval).toBe(XDP_DROP);
      expect(tr.runBytes(new Uint8Array(64), { repeat: 4 }).retval).toBe(XDP_DROP);
      expect(readU64(r.maps[0]!.lookup(u32(0)))).toBe(5);
    } finally { tr.dispose(); release(r); }
  });

  it('xdp_tx swaps the MAC addresses and returns XDP_TX; xdp_pass passes and counts', () => {
    const tx = loadWithMaps(readBpfObject(obj('xdp_tx')));
    const pass = loadWithMaps(readBpfObject(obj('xdp_pass')));
    const t1 = new TestRunner(tx.fd);
    const t2 = new TestRunner(pass.fd);
    try {
      const frame = new Uint8Array(64);
      frame.set([1, 2, 3, 4, 5, 6], 0);
      frame.set([7, 8, 9, 10, 11, 12], 6);
      const out = t1.runBytes(frame);
      expect(out.retval).toBe(XDP_TX);
      expect([...out.data.subarray(0, 12)]).toEqual([7, 8, 9, 10, 11, 12, 1, 2, 3, 4, 5, 6]);
      expect(readU64(tx.maps[0]!.lookup(u32(0)))).toBe(1);
      expect(t2.runBytes(frame).retval).toBe(XDP_PASS);
      expect(readU64(pass.maps[0]!.lookup(u32(0)))).toBe(1);
    } finally { t1.dispose(); t2.dispose(); release(tx); release(pass); }
  });

  it('xdp_blocklist drops IPv4 frames from listed sources only and counts hits', () => {
    const r = loadWithMaps(readBpfObject(obj('xdp_blocklist')));
    const tr = new TestRunner(r.fd);
    try {
      const frame = (src: number[]) => {
        const f = new Uint8Array(64);
        f[12] = 0x08; f[13] = 0x00; // IPv4
        f[14] = 0x45;
        f.set(src, 14 + 12);
        return f;
      };
      r.maps[0]!.update(new Uint8Array([10, 0, 0, 66]), new Uint8Array(8));
      expect(tr.runBytes(frame([10, 0, 0, 66])).retval).toBe(XDP_DROP);
      expect(tr.runBytes(frame([10, 0, 0, 67])).retval).toBe(XDP_PASS);
      const arp = frame([10, 0, 0, 66]); arp[13] = 0x06;
      expect(tr.runBytes(arp).retval).toBe(XDP_PASS);
      expect(readU64(r.maps[0]!.lookup(new Uint8Array([10, 0, 0, 66])))).toBe(1);
    } finally { tr.dispose(); release(r); }
  });

  it('big_prog (> 4096 instructions) is still accepted by the host verifier', () => {
    const r = loadWithMaps(readBpfObject(obj('big_prog')));
    try {
      expect(progInfo(r.fd).xlatedProgLen / 8).toBeGreaterThan(4096);
    } finally { release(r); }
  });

  it('the host verifier accepts most forbidden samples, so refusing them is the broker allow-list\'s job', () => {
    // Helpers XDP has been allowed for years: nothing but the broker stands between a guest and them.
    for (const n of ['bad_trace_printk', 'bad_perf_event', 'bad_fib_lookup', 'bad_redirect',
      'bad_redirect_map', 'bad_tail_call', 'bad_percpu_map']) {
      const r = loadWithMaps(readBpfObject(obj(n)));
      release(r);
    }
  });

  it('bad_get_current is not reliably stopped by the host verifier, so the allow-list must refuse it', () => {
    // Older kernels reject bpf_get_current_pid_tgid for XDP; 6.x kernels with the helper in
    // the base set (this host, 6.18) accept it. Either way nothing may be left behind.
    let outcome = 'accepted';
    try {
      release(loadWithMaps(readBpfObject(obj('bad_get_current'))));
    } catch (e) {
      expect(e).toBeInstanceOf(BpfError);
      expect((e as BpfError).verifierLog).toMatch(/get_current_pid_tgid|unknown func/);
      outcome = 'rejected';
    }
    console.log(`host verifier ${outcome} bpf_get_current_pid_tgid in XDP`);
  });

  afterAll(async () => {
    // Every object made here must be gone (freed after an RCU grace period).
    for (let i = 0; i < 50; i++) {
      const progs = new Set(listProgIds());
      const maps = new Set(listMapIds());
      if (![...createdProgIds].some((id) => progs.has(id)) && ![...createdMapIds].some((id) => maps.has(id))) return;
      await new Promise((r) => setTimeout(r, 100));
    }
    throw new Error('kernel objects created by bpf-object tests are still alive');
  });
});

describe('refusals', () => {
  let dir = '';
  beforeAll(() => { dir = mkdtempSync(join(tmpdir(), 'vx-bpfobj-')); });
  afterAll(() => { rmSync(dir, { recursive: true, force: true }); });

  const build = (name: string, src: string): Uint8Array => {
    writeFileSync(join(dir, `${name}.c`), src);
    execFileSync('clang', ['-O2', '-g', '-target', 'bpf', '-I/usr/include/x86_64-linux-gnu', '-c',
      join(dir, `${name}.c`), '-o', join(dir, `${name}.o`)], { stdio: 'pipe' });
    return new Uint8Array(readFileSync(join(dir, `${name}.o`)));
  };

  it('a program with a bpf-to-bpf call is refused, naming the subprogram', () => {
    const o = build('subprog', `
      #include <linux/bpf.h>
      #include <bpf/bpf_helpers.h>
      __attribute__((noinline)) int helper(struct xdp_md *ctx) { return ctx->data_end - ctx->data > 100 ? XDP_DROP : XDP_PASS; }
      SEC("xdp") int prog(struct xdp_md *ctx) { return helper(ctx); }
      char _license[] SEC("license") = "GPL";`);
    expect(() => readBpfObject(o)).toThrow(/bpf-to-bpf call/);
  });

  it('global data relocations are refused', () => {
    const o = build('global', `
      #include <linux/bpf.h>
      #include <bpf/bpf_helpers.h>
      volatile int verdict = XDP_PASS;
      SEC("xdp") int prog(struct xdp_md *ctx) { return verdict; }
      char _license[] SEC("license") = "GPL";`);
    expect(() => readBpfObject(o)).toThrow(/only \.maps references are supported/);
  });

  it('a missing section, a missing license or a non-BPF ELF is refused by name', () => {
    expect(() => readBpfObject(obj('xdp_drop'), 'tc')).toThrow(/no section 'tc'/);
    expect(() => readBpfObject(obj('xdp_drop'), 'license')).toThrow(/not a program section/);
    const nolic = build('nolic', `
      #include <linux/bpf.h>
      #include <bpf/bpf_helpers.h>
      SEC("xdp") int prog(struct xdp_md *ctx) { return XDP_PASS; }`);
    expect(() => readBpfObject(nolic)).toThrow(/no 'license' section/);
    const host = new Uint8Array(readFileSync('/bin/true'));
    expect(() => readBpfObject(host)).toThrow(/not EM_BPF/);
    expect(() => readBpfObject(new Uint8Array(0))).toThrow(BpfObjectError);
  });
});

describe('untrusted input', () => {
  // A small deterministic PRNG so a failure can be replayed.
  function rng(seed: number) {
    let s = seed >>> 0;
    return () => { s = (s * 1664525 + 1013904223) >>> 0; return s / 0x100000000; };
  }
  const expectClean = (b: Uint8Array, what: string) => {
    try { readBpfObject(b); } catch (e) {
      if (!(e instanceof BpfObjectError)) throw new Error(`${what}: ${String(e)}`);
    }
  };

  it('every truncation of every sample either parses or throws BpfObjectError', () => {
    const t0 = Date.now();
    for (const n of ['xdp_drop', 'xdp_blocklist', 'bad_kfunc']) {
      const b = obj(n);
      for (let len = 0; len < b.byteLength; len += n === 'xdp_drop' ? 1 : 7) expectClean(b.subarray(0, len), `${n}[0..${len})`);
    }
    expect(Date.now() - t0).toBeLessThan(20_000);
  });

  it('random byte flips (bounded run) never crash, hang or throw anything but BpfObjectError', () => {
    const rand = rng(12345);
    const samples = ['xdp_drop', 'xdp_tx', 'xdp_blocklist', 'bad_tail_call'].map(obj);
    const t0 = Date.now();
    let parsed = 0;
    let iterations = 0;
    for (; iterations < 4000 && Date.now() - t0 < 15_000; iterations++) {
      const b = samples[iterations % samples.length]!.slice();
      const flips = 1 + Math.floor(rand() * 8);
      for (let k = 0; k < flips; k++) {
        const at = Math.floor(rand() * b.byteLength);
        b[at] = rand() < 0.5 ? Math.floor(rand() * 256) : b[at]! ^ (1 << Math.floor(rand() * 8));
      }
      try { readBpfObject(b); parsed++; } catch (e) {
        if (!(e instanceof BpfObjectError)) throw new Error(`iteration ${iterations}: ${String(e)}`);
      }
    }
    // Flips in debug sections leave the program readable: both outcomes must occur.
    expect(parsed).toBeGreaterThan(0);
    expect(parsed).toBeLessThan(iterations);
  });

  it('hostile header fields (huge offsets and counts) are refused without large allocations', () => {
    const b = obj('xdp_drop').slice();
    const v = new DataView(b.buffer);
    const mut = (f: (v: DataView) => void) => { const c = b.slice(); f(new DataView(c.buffer)); return c; };
    expect(() => readBpfObject(mut((x) => x.setBigUint64(40, 0xffffffffffffn, true)))).toThrow(BpfObjectError);
    expect(() => readBpfObject(mut((x) => x.setUint16(60, 0xffff, true)))).toThrow(BpfObjectError);
    expect(() => readBpfObject(mut((x) => x.setUint16(62, 0xfffe, true)))).toThrow(BpfObjectError);
    // Every section header's size field set to something absurd, one at a time.
    const shoff = Number(v.getBigUint64(40, true));
    const shnum = v.getUint16(60, true);
    for (let i = 1; i < shnum; i++) {
      expectClean(mut((x) => x.setBigUint64(shoff + i * 64 + 32, 0x7fffffffn, true)), `section ${i} size`);
      expectClean(mut((x) => x.setUint32(shoff + i * 64 + 40, 0xffffffff, true)), `section ${i} link`);
    }
  });
});
