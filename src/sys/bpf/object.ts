import koffi from 'koffi';
import { VxError } from '../../errors.js';
import { NativeBuffer, raw } from '../libc.js';
import { libbpf, BpfError, checkObjName } from './libbpf.js';
import { BPF_INSN_SIZE } from './insns.js';

// libbpf's object API (bpf_object__open_mem, __load, program and map iteration): what turns a
// clang-built ELF object into kernel maps and programs, relocated. Only the object loader's
// child process uses this (src/offload/object-loader/child.ts): libbpf parses untrusted ELF
// here, so it runs where a crash or a hang costs nothing but that process.

const fn = {
  open_mem: libbpf.func('bpf_object__open_mem', 'intptr_t', ['void *', 'size_t', 'intptr_t']),
  load: libbpf.func('bpf_object__load', 'int', ['intptr_t']),
  close: libbpf.func('bpf_object__close', 'void', ['intptr_t']),
  next_program: libbpf.func('bpf_object__next_program', 'intptr_t', ['intptr_t', 'intptr_t']),
  next_map: libbpf.func('bpf_object__next_map', 'intptr_t', ['intptr_t', 'intptr_t']),
  object_btf: libbpf.func('bpf_object__btf', 'intptr_t', ['intptr_t']),
  btf_fd: libbpf.func('btf__fd', 'int', ['intptr_t']),
  prog_name: libbpf.func('bpf_program__name', 'str', ['intptr_t']),
  prog_name_ptr: libbpf.func('bpf_program__name', 'intptr_t', ['intptr_t']),
  prog_section: libbpf.func('bpf_program__section_name', 'str', ['intptr_t']),
  prog_type: libbpf.func('bpf_program__type', 'int', ['intptr_t']),
  prog_attach_type: libbpf.func('bpf_program__expected_attach_type', 'int', ['intptr_t']),
  prog_flags: libbpf.func('bpf_program__flags', 'uint32', ['intptr_t']),
  prog_autoload: libbpf.func('bpf_program__autoload', 'bool', ['intptr_t']),
  prog_fd: libbpf.func('bpf_program__fd', 'int', ['intptr_t']),
  prog_insns: libbpf.func('bpf_program__insns', 'intptr_t', ['intptr_t']),
  prog_insn_cnt: libbpf.func('bpf_program__insn_cnt', 'size_t', ['intptr_t']),
  prog_set_log_buf: libbpf.func('bpf_program__set_log_buf', 'int', ['intptr_t', 'intptr_t', 'size_t']),
  map_name: libbpf.func('bpf_map__name', 'str', ['intptr_t']),
  map_name_ptr: libbpf.func('bpf_map__name', 'intptr_t', ['intptr_t']),
  map_type: libbpf.func('bpf_map__type', 'int', ['intptr_t']),
  map_key_size: libbpf.func('bpf_map__key_size', 'uint32', ['intptr_t']),
  map_value_size: libbpf.func('bpf_map__value_size', 'uint32', ['intptr_t']),
  map_max_entries: libbpf.func('bpf_map__max_entries', 'uint32', ['intptr_t']),
  map_flags: libbpf.func('bpf_map__map_flags', 'uint32', ['intptr_t']),
  map_is_internal: libbpf.func('bpf_map__is_internal', 'bool', ['intptr_t']),
  map_fd: libbpf.func('bpf_map__fd', 'int', ['intptr_t']),
  map_set_pin_path: libbpf.func('bpf_map__set_pin_path', 'int', ['intptr_t', 'intptr_t']),
  set_print: libbpf.func('libbpf_set_print', 'intptr_t', ['intptr_t']),
};

export interface ObjectProgramHandle { ptr: number; name: string; section: string; type: number; attachType: number; flags: number; autoload: boolean }
export interface ObjectMapHandle { ptr: number; name: string; type: number; keySize: number; valueSize: number; maxEntries: number; flags: number; internal: boolean }

// libbpf 1.1 has no setter for the names it passes to the kernel (a program's is its C
// function's, a map's its variable's or, for global data, `<object>.rodata`): the same in every
// guest, so `bpftool` could not tell whose they are. Where libbpf keeps the name pointer:
// `char *name` is the first field of struct bpf_program and the second (after
// `struct bpf_object *obj`) of struct bpf_map, from libbpf 0.x through 1.x.
const PROGRAM_NAME_OFFSET = 0;
const MAP_NAME_OFFSET = 8;

/**
 * Points libbpf's name field at a copy of `name`, once the layout is proven: the pointer at
 * `offset` must be the one libbpf's own accessor returns, else nothing is written (false). The
 * copy is strdup()ed because libbpf free()s the name with the object; the old string is left
 * alone (the loader child is short-lived, and nothing may still point at it).
 */
function replaceName(obj: number, offset: number, accessor: (x: number) => number, name: string): boolean {
  checkObjName('bpf kernel name', name);
  // SAFETY: reads and writes one pointer inside a struct libbpf allocated and still owns;
  // the accessor check below proves the field is where we write before anything is written.
  const field = new DataView(koffi.view(obj + offset, 8));
  const current = Number(field.getBigUint64(0, true));
  if (current === 0 || current !== accessor(obj)) return false;
  const copy = raw.strdup(name) as number;
  if (copy === 0) return false;
  field.setBigUint64(0, BigInt(copy), true);
  return true;
}

/** Silences libbpf's own printing (it writes warnings to stderr by default). */
export function silenceLibbpf(): void {
  fn.set_print(0);
}

/** An opened (and maybe loaded) libbpf object; close() frees it and closes every fd it made. */
export class BpfObject {
  private constructor(private ptr: number, private readonly image: NativeBuffer, private readonly optsBuf: NativeBuffer) {}

  /**
   * bpf_object__open_mem with the object name set (libbpf names internal maps after it). The
   * bytes are copied into memory of our own that lives as long as the object.
   */
  static openMem(bytes: Uint8Array, name: string): BpfObject {
    checkObjName('bpf_object__open_mem', name);
    const image = new NativeBuffer(Math.max(1, bytes.byteLength));
    image.bytes.set(bytes);
    // struct bpf_object_open_opts (libbpf 1.1): sz@0 object_name@8 relaxed_maps@16
    // pin_root_path@24 (u32 stub)@32 kconfig@40 btf_custom_path@48 kernel_log_buf@56
    // kernel_log_size@64 kernel_log_level@72; 80 bytes. Name string at 128.
    const opts = new NativeBuffer(4096);
    opts.view.setBigUint64(0, 80n, true);
    opts.bytes.set(Buffer.from(`${name}\0`, 'latin1'), 128);
    opts.view.setBigUint64(8, BigInt(opts.address + 128), true);
    const ptr = fn.open_mem(image.address, bytes.byteLength, opts.address) as number;
    // libbpf 1.x returns NULL and sets errno; older builds return an ERR_PTR.
    if (ptr === 0 || (ptr < 0 && ptr > -4096)) {
      image.free();
      opts.free();
      throw new BpfError('bpf_object__open_mem', ptr < 0 ? -ptr : 22, name);
    }
    return new BpfObject(ptr, image, opts);
  }

  programs(): ObjectProgramHandle[] {
    const out: ObjectProgramHandle[] = [];
    for (let p = fn.next_program(this.ptr, 0) as number; p !== 0; p = fn.next_program(this.ptr, p) as number) {
      out.push({
        ptr: p, name: fn.prog_name(p) as string, section: fn.prog_section(p) as string, type: fn.prog_type(p) as number,
        attachType: fn.prog_attach_type(p) as number, flags: fn.prog_flags(p) as number, autoload: fn.prog_autoload(p) as boolean,
      });
      if (out.length > 4096) throw new VxError('too-many-programs', 'bpf_object: more than 4096 programs');
    }
    return out;
  }

  maps(): ObjectMapHandle[] {
    const out: ObjectMapHandle[] = [];
    for (let m = fn.next_map(this.ptr, 0) as number; m !== 0; m = fn.next_map(this.ptr, m) as number) {
      out.push({
        ptr: m, name: fn.map_name(m) as string, type: fn.map_type(m) as number, keySize: fn.map_key_size(m) as number,
        valueSize: fn.map_value_size(m) as number, maxEntries: fn.map_max_entries(m) as number, flags: fn.map_flags(m) as number,
        internal: fn.map_is_internal(m) as boolean,
      });
      if (out.length > 4096) throw new VxError('too-many-maps', 'bpf_object: more than 4096 maps');
    }
    return out;
  }

  /** No pinning: a map definition asking for it must not reach or create anything under bpffs. */
  clearPinPath(m: ObjectMapHandle): void {
    fn.map_set_pin_path(m.ptr, 0);
  }

  /**
   * The name the kernel creates this program with at load() (what `bpftool prog show` prints).
   * False when libbpf's layout is not the known one: the kernel then gets libbpf's own name.
   */
  setKernelName(p: ObjectProgramHandle, name: string): boolean {
    return replaceName(p.ptr, PROGRAM_NAME_OFFSET, fn.prog_name_ptr as (x: number) => number, name);
  }

  /** setKernelName for a map (internal maps included). */
  setMapKernelName(m: ObjectMapHandle, name: string): boolean {
    return replaceName(m.ptr, MAP_NAME_OFFSET, fn.map_name_ptr as (x: number) => number, name);
  }

  /** The buffer must outlive load(); libbpf fills it only when that program fails to load. */
  setLogBuf(p: ObjectProgramHandle, buf: NativeBuffer): void {
    fn.prog_set_log_buf(p.ptr, buf.address, buf.size);
  }

  /** bpf_object__load: creates the maps, relocates, loads every program. Throws BpfError (-errno). */
  load(): void {
    const r = fn.load(this.ptr) as number;
    if (r < 0) throw new BpfError('bpf_object__load', -r);
  }

  programFd(p: ObjectProgramHandle): number { return fn.prog_fd(p.ptr) as number; }
  mapFd(m: ObjectMapHandle): number { return fn.map_fd(m.ptr) as number; }
  btfFd(): number {
    const b = fn.object_btf(this.ptr) as number;
    return b === 0 ? -1 : (fn.btf_fd(b) as number);
  }

  /** The program's instructions as libbpf holds them now: after load(), the final ones (map fds in, subprograms appended). */
  insns(p: ObjectProgramHandle): Uint8Array {
    const n = Number(fn.prog_insn_cnt(p.ptr));
    const at = fn.prog_insns(p.ptr) as number;
    if (at === 0 || n === 0) return new Uint8Array(0);
    // SAFETY: libbpf owns n instructions at `at` until the object is closed; copied at once.
    return new Uint8Array(koffi.view(at, n * BPF_INSN_SIZE).slice(0));
  }

  close(): void {
    if (this.ptr !== 0) fn.close(this.ptr);
    this.ptr = 0;
    this.image.free();
    this.optsBuf.free();
  }
}

/** Reads a NUL-terminated log out of a buffer libbpf wrote. */
export function readLogBuffer(buf: NativeBuffer): string {
  let end = buf.bytes.indexOf(0);
  if (end < 0) end = buf.size;
  return Buffer.from(buf.bytes.buffer, buf.bytes.byteOffset, end).toString('utf8');
}
