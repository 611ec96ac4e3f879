// The object loader's child process (docs/offload-protocol.md §8): libbpf parses, relocates
// and loads one guest-supplied ELF object here, never in the serving process. Spawned per
// OBJ_LOAD by loader.ts with a timeout and resource limits; a crash or a hang costs only this
// process, and the kernel objects it made die with its fds unless it handed them over.
//
//   argv:   <object name> <verifier log bytes> <device name prefix>
//   stdin:  the object (already bounded and pre-checked by the parent)
//   fd 3:   a unix stream socket; the maps' fds, then the programs' fds, go back over it
//           (SCM_RIGHTS, at most MAX_FDS_PER_MESSAGE per message, one data byte each)
//   stdout: one JSON document (ChildReport), the last thing written; exit status 0
//
// It trusts nothing it reads but has nothing to defend: the parent judges everything it reports.

import { readFileSync, writeSync } from 'node:fs';
import { BpfObject, readLogBuffer, silenceLibbpf } from '../../sys/bpf/object.js';
import { BpfError } from '../../sys/bpf/libbpf.js';
import { NativeBuffer } from '../../sys/libc.js';
import { UnixSocket, MAX_FDS_PER_MESSAGE } from '../../sys/unix-socket.js';
import { hostObjectName } from '../host-names.js';
import type { ChildReport } from './report.js';

const BPF_PROG_TYPE_XDP = 6;
const BPF_XDP = 37;
const FD_SOCKET = 3;
const MAX_STDIN_BYTES = 64 * 1024 * 1024;

function report(r: ChildReport): never {
  writeSync(1, JSON.stringify(r));
  process.exit(0);
}

function main(): void {
  const name = process.argv[2] ?? '';
  const logBytes = Math.min(Math.max(Number(process.argv[3]) || 65536, 4096), 1 << 24);
  const prefix = /^[A-Za-z0-9_]{1,6}$/.test(process.argv[4] ?? '') ? process.argv[4]! : '';
  const bytes = readFileSync(0);
  // Tests only: a deterministically slow loader (the parent passes the variable through when set).
  const delay = Math.min(Number(process.env.VX_OBJECT_LOADER_DELAY_MS) || 0, 60_000);
  if (delay > 0) Atomics.wait(new Int32Array(new SharedArrayBuffer(4)), 0, 0, delay);
  if (bytes.byteLength > MAX_STDIN_BYTES) report({ ok: false, stage: 'input', errno: 0, reason: 'object too large' });
  silenceLibbpf();
  let obj: BpfObject;
  try {
    obj = BpfObject.openMem(bytes, name);
  } catch (e) {
    report({ ok: false, stage: 'open', errno: e instanceof BpfError ? e.errno : 0, reason: (e as Error).message });
  }
  const progs = obj.programs();
  const maps = obj.maps();
  for (const p of progs) {
    // Only XDP programs (SEC("xdp")): no frags, no sleepable, no other attach type.
    if (p.type !== BPF_PROG_TYPE_XDP || (p.attachType !== 0 && p.attachType !== BPF_XDP) || p.flags !== 0 || !p.autoload) {
      report({ ok: false, stage: 'program-type', errno: 0, program: p.name,
        reason: `program '${p.name}' in section '${p.section}' is not a plain XDP program (type ${p.type}, attach ${p.attachType}, flags ${p.flags})` });
    }
  }
  // A map definition's `pinning` would make libbpf reuse or create a pin under bpffs.
  for (const m of maps) obj.clearPinPath(m);
  // The kernel objects carry the device's prefix as the kernel path's do (host-names.ts), so
  // `bpftool prog/map show` tells whose they are; the report keeps libbpf's (the guest's) names.
  // Where libbpf's name cannot be replaced safely it stays (the host checks against the kernel's).
  const named = <T extends { name: string }>(x: T, set: (x: T, name: string) => boolean): string => {
    if (!prefix) return x.name;
    const k = hostObjectName(prefix, x.name);
    return set(x, k) ? k : x.name;
  };
  const kernelNames = {
    maps: maps.map((m) => named(m, (x, k) => obj.setMapKernelName(x, k))),
    programs: progs.map((p) => named(p, (x, k) => obj.setKernelName(x, k))),
  };
  const logs = progs.map(() => new NativeBuffer(logBytes));
  progs.forEach((p, i) => obj.setLogBuf(p, logs[i]!));
  try {
    obj.load();
  } catch (e) {
    const errno = e instanceof BpfError ? e.errno : 0;
    const failed = progs.findIndex((_, i) => logs[i]!.bytes[0] !== 0);
    report({ ok: false, stage: 'load', errno, reason: (e as Error).message,
      ...(failed >= 0 ? { program: progs[failed]!.name, log: readLogBuffer(logs[failed]!) } : {}) });
  }
  const mapFds = maps.map((m) => obj.mapFd(m));
  const progFds = progs.map((p) => obj.programFd(p));
  const out: ChildReport = {
    ok: true,
    maps: maps.map((m, i) => ({
      name: m.name, type: m.type, keySize: m.keySize, valueSize: m.valueSize, maxEntries: m.maxEntries, flags: m.flags,
      internal: m.internal, childFd: mapFds[i]!, kernelName: kernelNames.maps[i]!,
    })),
    programs: progs.map((p, i) => ({
      name: p.name, section: p.section, insns: Buffer.from(obj.insns(p)).toString('base64'), kernelName: kernelNames.programs[i]!,
    })),
  };
  const sock = new UnixSocket(FD_SOCKET);
  const fds = [...mapFds, ...progFds];
  for (let i = 0; i < fds.length; i += MAX_FDS_PER_MESSAGE) sock.send(new Uint8Array([0x46]), fds.slice(i, i + MAX_FDS_PER_MESSAGE));
  // Tests only: the objects exist in the kernel and their fds are on the way, the report is not
  // (a load cancelled now must still leave nothing behind).
  const hold = Math.min(Number(process.env.VX_OBJECT_LOADER_HOLD_MS) || 0, 60_000);
  if (hold > 0) Atomics.wait(new Int32Array(new SharedArrayBuffer(4)), 0, 0, hold);
  report(out);
}

main();
