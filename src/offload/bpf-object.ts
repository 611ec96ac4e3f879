// Reader for BPF ELF objects as clang builds them (`clang -target bpf -g`): one program
// section's instructions, the BTF-defined maps it references (the `.maps` DATASEC, as
// libbpf, iproute2 and bpftool read them), its map relocations and the license. The input
// is untrusted: every offset, size and index is checked before use and every failure is a
// BpfObjectError naming what was wrong. Nothing here loops more than a bounded number of
// times per input byte.

import { VxError } from '../errors.js';
import { BPF_INSN_SIZE as INSN, decodeInsn, setInsnImm, setInsnSrc, Op, Pseudo, PseudoCall } from '../sys/bpf/insns.js';

export interface BpfMapDef {
  name: string; type: number; keySize: number; valueSize: number; maxEntries: number; flags: number;
}

/** A `.maps` definition as the object path reads it: pinning and a static initialiser are reported, not refused. */
export interface ObjectMapDef extends BpfMapDef { pinning: number; initialValues: boolean }

export interface BpfObjectProgram {
  section: string;
  /**
   * The section's instructions, copied. Each map ld_imm64 has src_reg = BPF_PSEUDO_MAP_FD
   * and imm = its index into `maps`, ready for the loader to substitute a handle or fd.
   * Calls to extern (kfunc) symbols have src_reg = BPF_PSEUDO_KFUNC_CALL and imm = 0.
   */
  insns: Uint8Array;
  license: string;
  /** Every map the program references, in order of first reference. */
  maps: BpfMapDef[];
  /** ld_imm64 at insnIndex refers to maps[mapIndex]. */
  mapRelocations: { insnIndex: number; mapIndex: number }[];
  /** Calls to symbols the object does not define (kfuncs); left for the caller to judge. */
  externCalls: { insnIndex: number; symbol: string }[];
}

/** Every refusal of a guest-supplied object; the message names the rule (one code: the object is malformed or unsupported). */
export class BpfObjectError extends VxError {
  constructor(message: string) {
    super('bad-bpf-object', message);
  }
}

function bad(msg: string): never {
  throw new BpfObjectError(msg);
}

const EM_BPF = 247;
const SHT_SYMTAB = 2;
const SHT_REL = 9;
const SHT_NOBITS = 8;
const SHF_EXECINSTR = 0x4;
const SHN_UNDEF = 0;
const SHN_LORESERVE = 0xff00;
const STT_SECTION = 3;
const R_BPF_64_64 = 1;
const R_BPF_64_32 = 10;
const MAX_NAME = 4096;
/** Far above any real program (the kernel's own cap is 1M); bounds work on hostile input. */
const MAX_INSNS = 1 << 20;

interface Section {
  index: number; name: string; type: number; flags: number; offset: number; size: number;
  link: number; info: number; entsize: number;
}

interface Symbol { name: string; info: number; shndx: number; value: number; size: number }

/** Bounds-checked little-endian reads over the whole file. */
class Bytes {
  readonly b: Uint8Array;
  readonly v: DataView;
  constructor(b: Uint8Array) {
    this.b = b;
    this.v = new DataView(b.buffer, b.byteOffset, b.byteLength);
  }
  get length(): number { return this.b.byteLength; }
  need(off: number, len: number, what: string): void {
    if (!Number.isSafeInteger(off) || !Number.isSafeInteger(len) || off < 0 || len < 0 || off + len > this.b.byteLength) {
      bad(`${what}: bytes ${off}..${off + len} outside the file (${this.b.byteLength} bytes)`);
    }
  }
  u8(off: number, what: string): number { this.need(off, 1, what); return this.v.getUint8(off); }
  u16(off: number, what: string): number { this.need(off, 2, what); return this.v.getUint16(off, true); }
  u32(off: number, what: string): number { this.need(off, 4, what); return this.v.getUint32(off, true); }
  /** A u64 that must fit in a JS safe integer (offsets, sizes). */
  u64(off: number, what: string): number {
    this.need(off, 8, what);
    const lo = this.v.getUint32(off, true);
    const hi = this.v.getUint32(off + 4, true);
    if (hi >= 0x200000) bad(`${what}: value too large`);
    return hi * 0x100000000 + lo;
  }
  /** NUL-terminated string within [start, limit). */
  cstr(start: number, limit: number, what: string): string {
    if (start < 0 || start >= limit || limit > this.b.byteLength) bad(`${what}: string offset ${start} outside its table`);
    // Scan at most MAX_NAME bytes so many hostile names cannot cost file-size work each.
    const scanEnd = Math.min(limit, start + MAX_NAME + 1);
    const end = this.b.subarray(0, scanEnd).indexOf(0, start);
    if (end < 0) bad(`${what}: string not terminated within ${scanEnd - start} bytes`);
    return Buffer.from(this.b.buffer, this.b.byteOffset + start, end - start).toString('latin1');
  }
}

function readSections(f: Bytes): Section[] {
  f.need(0, 64, 'ELF header');
  if (f.u32(0, 'ELF magic') !== 0x464c457f) bad('not an ELF file (bad magic)');
  if (f.u8(4, 'EI_CLASS') !== 2) bad('not a 64-bit ELF object');
  if (f.u8(5, 'EI_DATA') !== 1) bad('not a little-endian ELF object');
  if (f.u16(18, 'e_machine') !== EM_BPF) bad(`e_machine ${f.u16(18, 'e_machine')} is not EM_BPF (247)`);
  const shoff = f.u64(40, 'e_shoff');
  const shentsize = f.u16(58, 'e_shentsize');
  const shnum = f.u16(60, 'e_shnum');
  const shstrndx = f.u16(62, 'e_shstrndx');
  if (shentsize !== 64) bad(`e_shentsize ${shentsize} is not 64`);
  if (shnum === 0) bad('no section headers');
  f.need(shoff, shnum * 64, 'section header table');
  if (shstrndx >= shnum) bad(`e_shstrndx ${shstrndx} out of range`);
  const raw: Omit<Section, 'name'>[] = [];
  for (let i = 0; i < shnum; i++) {
    const h = shoff + i * 64;
    const type = f.u32(h + 4, 'sh_type');
    const s = {
      index: i, type, flags: f.u64(h + 8, 'sh_flags'),
      offset: f.u64(h + 24, 'sh_offset'), size: f.u64(h + 32, 'sh_size'),
      link: f.u32(h + 40, 'sh_link'), info: f.u32(h + 44, 'sh_info'), entsize: f.u64(h + 56, 'sh_entsize'),
    };
    if (type !== SHT_NOBITS && i !== 0) f.need(s.offset, s.size, `section ${i} contents`);
    raw.push(s);
  }
  const strtab = raw[shstrndx]!;
  return raw.map((s, i) => ({
    ...s,
    name: i === 0 ? '' : f.cstr(strtab.offset + f.u32(shoff + i * 64, 'sh_name'), strtab.offset + strtab.size, `section ${i} name`),
  }));
}

function readSymbols(f: Bytes, sections: Section[]): Symbol[] {
  const symtabs = sections.filter((s) => s.type === SHT_SYMTAB);
  if (symtabs.length !== 1) bad(`expected one symbol table, found ${symtabs.length}`);
  const st = symtabs[0]!;
  if (st.entsize !== 24 || st.size % 24 !== 0) bad('symbol table entry size is not 24');
  const strtab = sections[st.link];
  if (!strtab || strtab.type !== 3 /* SHT_STRTAB */) bad('symbol table does not link to a string table');
  const out: Symbol[] = [];
  for (let o = st.offset; o < st.offset + st.size; o += 24) {
    const nameOff = f.u32(o, 'st_name');
    out.push({
      name: nameOff === 0 ? '' : f.cstr(strtab.offset + nameOff, strtab.offset + strtab.size, 'symbol name'),
      info: f.u8(o + 4, 'st_info'),
      shndx: f.u16(o + 6, 'st_shndx'),
      value: f.u64(o + 8, 'st_value'),
      size: f.u64(o + 16, 'st_size'),
    });
  }
  return out;
}

// ---------------------------------------------------------------------------------------
// BTF: just enough to read `.maps` map definitions.

const BTF_KIND = {
  INT: 1, PTR: 2, ARRAY: 3, STRUCT: 4, UNION: 5, ENUM: 6, FWD: 7, TYPEDEF: 8, VOLATILE: 9,
  CONST: 10, RESTRICT: 11, FUNC: 12, FUNC_PROTO: 13, VAR: 14, DATASEC: 15, FLOAT: 16,
  DECL_TAG: 17, TYPE_TAG: 18, ENUM64: 19,
} as const;

interface BtfType { kind: number; nameOff: number; vlen: number; sizeOrType: number; extra: number }

class Btf {
  private readonly f: Bytes;
  private readonly strStart: number;
  private readonly strEnd: number;
  /** types[id], id 0 = void. */
  readonly types: (BtfType | null)[] = [null];

  constructor(f: Bytes, sec: Section) {
    this.f = f;
    const base = sec.offset;
    const end = sec.offset + sec.size;
    if (sec.size < 24) bad('.BTF: shorter than its header');
    if (f.u16(base, 'BTF magic') !== 0xeb9f) bad('.BTF: bad magic');
    const hdrLen = f.u32(base + 4, 'BTF hdr_len');
    const typeOff = f.u32(base + 8, 'BTF type_off');
    const typeLen = f.u32(base + 12, 'BTF type_len');
    const strOff = f.u32(base + 16, 'BTF str_off');
    const strLen = f.u32(base + 20, 'BTF str_len');
    if (hdrLen < 24 || hdrLen > sec.size) bad('.BTF: bad header length');
    const typesStart = base + hdrLen + typeOff;
    const typesEnd = typesStart + typeLen;
    this.strStart = base + hdrLen + strOff;
    this.strEnd = this.strStart + strLen;
    if (typesEnd > end || this.strEnd > end) bad('.BTF: type or string area outside the section');
    let o = typesStart;
    while (o < typesEnd) {
      if (o + 12 > typesEnd) bad('.BTF: truncated type');
      const nameOff = f.u32(o, 'btf_type.name_off');
      const info = f.u32(o + 4, 'btf_type.info');
      const sizeOrType = f.u32(o + 8, 'btf_type.size');
      const kind = (info >>> 24) & 0x1f;
      const vlen = info & 0xffff;
      let extraLen: number;
      switch (kind) {
        case BTF_KIND.INT: case BTF_KIND.VAR: case BTF_KIND.DECL_TAG: extraLen = 4; break;
        case BTF_KIND.ARRAY: extraLen = 12; break;
        case BTF_KIND.STRUCT: case BTF_KIND.UNION: case BTF_KIND.DATASEC: case BTF_KIND.ENUM64: extraLen = 12 * vlen; break;
        case BTF_KIND.ENUM: case BTF_KIND.FUNC_PROTO: extraLen = 8 * vlen; break;
        case BTF_KIND.PTR: case BTF_KIND.FWD: case BTF_KIND.TYPEDEF: case BTF_KIND.VOLATILE:
        case BTF_KIND.CONST: case BTF_KIND.RESTRICT: case BTF_KIND.FUNC: case BTF_KIND.FLOAT:
        case BTF_KIND.TYPE_TAG: extraLen = 0; break;
        default: bad(`.BTF: unknown type kind ${kind} (type ${this.types.length})`);
      }
      if (o + 12 + extraLen > typesEnd) bad('.BTF: truncated type data');
      this.types.push({ kind, nameOff, vlen, sizeOrType, extra: o + 12 });
      o += 12 + extraLen;
    }
  }

  name(nameOff: number): string {
    if (nameOff === 0) return '';
    return this.f.cstr(this.strStart + nameOff, this.strEnd, 'BTF name');
  }

  type(id: number, what: string): BtfType {
    const t = id > 0 ? this.types[id] : undefined;
    if (!t) bad(`.BTF: ${what} refers to missing type ${id}`);
    return t;
  }

  /** Follows typedef/const/volatile/restrict/type_tag; bounded so loops in hostile BTF end. */
  skipMods(id: number, what: string): { id: number; t: BtfType } {
    for (let depth = 0; depth < 32; depth++) {
      const t = this.type(id, what);
      if (t.kind !== BTF_KIND.TYPEDEF && t.kind !== BTF_KIND.CONST && t.kind !== BTF_KIND.VOLATILE &&
          t.kind !== BTF_KIND.RESTRICT && t.kind !== BTF_KIND.TYPE_TAG) return { id, t };
      id = t.sizeOrType;
    }
    bad(`.BTF: ${what}: modifier chain too long`);
  }

  sizeOf(id: number, what: string, depth = 0): number {
    if (depth > 32) bad(`.BTF: ${what}: type nesting too deep`);
    const { t } = this.skipMods(id, what);
    switch (t.kind) {
      case BTF_KIND.INT: case BTF_KIND.STRUCT: case BTF_KIND.UNION: case BTF_KIND.ENUM:
      case BTF_KIND.ENUM64: case BTF_KIND.FLOAT: return t.sizeOrType;
      case BTF_KIND.PTR: return 8;
      case BTF_KIND.ARRAY: {
        const elem = this.f.u32(t.extra, 'btf_array.type');
        const n = this.f.u32(t.extra + 8, 'btf_array.nelems');
        const size = this.sizeOf(elem, what, depth + 1) * n;
        if (size > 0xffffffff) bad(`.BTF: ${what}: array too large`);
        return size;
      }
      default: bad(`.BTF: ${what}: type kind ${t.kind} has no size`);
    }
  }

  /** `__uint(name, N)` is `int (*name)[N]`: a pointer to an array of N elements. */
  uintMember(typeId: number, what: string): number {
    const p = this.skipMods(typeId, what).t;
    if (p.kind !== BTF_KIND.PTR) bad(`.BTF: ${what} is not declared with __uint()`);
    const a = this.skipMods(p.sizeOrType, what).t;
    if (a.kind !== BTF_KIND.ARRAY) bad(`.BTF: ${what} is not declared with __uint()`);
    return this.f.u32(a.extra + 8, 'btf_array.nelems');
  }

  /** `__type(name, T)` is `T *name`: the size of T. */
  typeMember(typeId: number, what: string): number {
    const p = this.skipMods(typeId, what).t;
    if (p.kind !== BTF_KIND.PTR) bad(`.BTF: ${what} is not declared with __type()`);
    return this.sizeOf(p.sizeOrType, what);
  }

  /** Map definitions of the `.maps` DATASEC, by variable name. */
  mapDefs(objectPath = false): Map<string, ObjectMapDef> {
    const out = new Map<string, ObjectMapDef>();
    for (const t of this.types) {
      if (!t || t.kind !== BTF_KIND.DATASEC || this.name(t.nameOff) !== '.maps') continue;
      for (let i = 0; i < t.vlen; i++) {
        const varId = this.f.u32(t.extra + 12 * i, 'btf_var_secinfo.type');
        const v = this.type(varId, '.maps variable');
        if (v.kind !== BTF_KIND.VAR) bad(`.BTF: .maps entry ${i} is not a variable`);
        const name = this.name(v.nameOff);
        out.set(name, this.mapDef(name, v.sizeOrType, objectPath));
      }
    }
    return out;
  }

  private mapDef(name: string, structId: number, objectPath: boolean): ObjectMapDef {
    const st = this.skipMods(structId, `map '${name}'`).t;
    if (st.kind !== BTF_KIND.STRUCT) bad(`.BTF: map '${name}' is not a struct`);
    const def: BpfMapDef = { name, type: 0, keySize: 0, valueSize: 0, maxEntries: 0, flags: 0 };
    const extra = { pinning: 0, initialValues: false };
    let haveType = false;
    for (let i = 0; i < st.vlen; i++) {
      const m = st.extra + 12 * i;
      const mname = this.name(this.f.u32(m, 'btf_member.name_off'));
      const mtype = this.f.u32(m + 4, 'btf_member.type');
      const what = `map '${name}' field '${mname}'`;
      switch (mname) {
        case 'type': def.type = this.uintMember(mtype, what); haveType = true; break;
        case 'max_entries': def.maxEntries = this.uintMember(mtype, what); break;
        case 'map_flags': def.flags = this.uintMember(mtype, what); break;
        case 'key_size': def.keySize = this.uintMember(mtype, what); break;
        case 'value_size': def.valueSize = this.uintMember(mtype, what); break;
        case 'key': def.keySize = this.typeMember(mtype, what); break;
        case 'value': def.valueSize = this.typeMember(mtype, what); break;
        // Host-side placement hints with no meaning for an offloaded map.
        case 'pinning': if (objectPath) extra.pinning = this.uintMember(mtype, what); break;
        case 'numa_node': case 'map_extra': break;
        // A PROG_ARRAY's static initialiser (`.values = { [0] = &prog }`): libbpf fills it at load.
        case 'values': if (objectPath) { extra.initialValues = true; break; } bad(`.BTF: ${what} is not supported (inner maps and initial values are not)`);
        default: bad(`.BTF: ${what} is not supported (inner maps and initial values are not)`);
      }
    }
    if (!haveType) bad(`.BTF: map '${name}' has no type`);
    // The kernel path's reader reports the definition only; the object path also what it asks for.
    return (objectPath ? { ...def, ...extra } : def) as ObjectMapDef;
  }
}

// ---------------------------------------------------------------------------------------

function chooseProgramSection(sections: Section[], wanted: string | undefined): Section {
  if (wanted !== undefined) {
    const s = sections.find((x) => x.name === wanted);
    if (!s) bad(`no section '${wanted}'`);
    if ((s.flags & SHF_EXECINSTR) === 0 || s.type === SHT_NOBITS) bad(`section '${wanted}' is not a program section`);
    return s;
  }
  const progs = sections.filter((s) => (s.flags & SHF_EXECINSTR) !== 0 && s.size > 0 && s.name !== '.text');
  if (progs.length !== 1) {
    bad(progs.length === 0 ? 'no program section' : `several program sections (${progs.map((p) => p.name).join(', ')}); name one`);
  }
  return progs[0]!;
}

function readLicense(f: Bytes, sections: Section[]): string {
  const s = sections.find((x) => x.name === 'license');
  if (!s) bad("no 'license' section");
  if (s.type === SHT_NOBITS || s.size === 0) bad("empty 'license' section");
  return f.cstr(s.offset, s.offset + s.size, 'license');
}

/**
 * Reads program `section` (or the object's only program section) of a clang-built BPF
 * object. Refuses subprogram (bpf-to-bpf) calls, global-data relocations and maps it cannot
 * describe, each with a BpfObjectError that says so.
 */
export function readBpfObject(bytes: Uint8Array, section?: string): BpfObjectProgram {
  const f = new Bytes(bytes);
  const sections = readSections(f);
  const prog = chooseProgramSection(sections, section);
  if (prog.size % INSN !== 0) bad(`section '${prog.name}' size ${prog.size} is not a multiple of 8`);
  if (prog.size / INSN > MAX_INSNS) bad(`section '${prog.name}' has more than ${MAX_INSNS} instructions`);
  // A real copy: Buffer.prototype.slice returns a view into Node's shared pool, and the
  // instructions are rewritten below.
  const insns = Uint8Array.prototype.slice.call(bytes, prog.offset, prog.offset + prog.size);
  const nInsns = insns.byteLength / INSN;
  const license = readLicense(f, sections);

  const rels = sections.filter((s) => s.type === SHT_REL && s.info === prog.index);
  const symbols = rels.length > 0 ? readSymbols(f, sections) : [];
  const mapsSec = sections.find((s) => s.name === '.maps');
  let btfMaps: Map<string, BpfMapDef> | null = null;

  const maps: BpfMapDef[] = [];
  const mapIndexByName = new Map<string, number>();
  const mapRelocations: BpfObjectProgram['mapRelocations'] = [];
  const externCalls: BpfObjectProgram['externCalls'] = [];
  const relocated = new Set<number>();

  for (const rel of rels) {
    if (rel.entsize !== 16 || rel.size % 16 !== 0) bad(`relocation section '${rel.name}' entry size is not 16`);
    for (let o = rel.offset; o < rel.offset + rel.size; o += 16) {
      const rOffset = f.u64(o, 'r_offset');
      const rType = f.u32(o + 8, 'r_info type');
      const symIdx = f.u32(o + 12, 'r_info symbol');
      if (rOffset % INSN !== 0 || rOffset / INSN >= nInsns) bad(`relocation at offset ${rOffset} is outside '${prog.name}'`);
      const at = rOffset / INSN;
      if (relocated.has(at)) bad(`instruction ${at} relocated twice`);
      relocated.add(at);
      const sym = symbols[symIdx];
      if (!sym) bad(`relocation at instruction ${at} names missing symbol ${symIdx}`);
      const { code } = decodeInsn(insns, at);
      const symSec = sym.shndx !== SHN_UNDEF && sym.shndx < SHN_LORESERVE ? sections[sym.shndx] : undefined;

      if (rType === R_BPF_64_32 && code === Op.CALL) {
        if (sym.shndx === SHN_UNDEF) {
          // A kernel function resolved by BTF id at load time; mark it the way a loader would.
          setInsnSrc(insns, at, PseudoCall.KFUNC_CALL);
          setInsnImm(insns, at, 0);
          externCalls.push({ insnIndex: at, symbol: sym.name });
          continue;
        }
        bad(`instruction ${at} calls subprogram '${sym.name || symSec?.name || '?'}': bpf-to-bpf calls are not supported`);
      }
      if (rType !== R_BPF_64_64) bad(`instruction ${at}: unsupported relocation type ${rType}`);
      if (code !== Op.LD_IMM64) bad(`instruction ${at}: map relocation on an instruction that is not ld_imm64`);
      if (at + 1 >= nInsns) bad(`instruction ${at}: ld_imm64 is truncated`);
      if (sym.shndx === SHN_UNDEF) bad(`instruction ${at} loads extern symbol '${sym.name}' (ksym): not supported`);
      if (!symSec || symSec !== mapsSec) {
        const where = symSec?.name ?? `section ${sym.shndx}`;
        bad(`instruction ${at} refers to '${sym.name || where}' in '${where}': only .maps references are supported (no global data)`);
      }
      if ((sym.info & 0xf) === STT_SECTION || sym.name === '') bad(`instruction ${at}: map reference through a section symbol is not supported`);
      btfMaps ??= loadBtfMaps(f, sections);
      let mapIndex = mapIndexByName.get(sym.name);
      if (mapIndex === undefined) {
        const def = btfMaps.get(sym.name);
        if (!def) bad(`map '${sym.name}' has no BTF definition in .maps`);
        mapIndex = maps.length;
        maps.push(def);
        mapIndexByName.set(sym.name, mapIndex);
      }
      setInsnSrc(insns, at, Pseudo.MAP_FD);
      setInsnImm(insns, at, mapIndex);
      setInsnImm(insns, at + 1, 0);
      mapRelocations.push({ insnIndex: at, mapIndex });
    }
  }

  // Calls that clang resolved without a relocation (static functions in the same section),
  // and pseudo ld_imm64s no relocation explains (a crafted object posing as relocated).
  for (let i = 0; i < nInsns; i++) {
    if (relocated.has(i)) continue;
    const { code, src } = decodeInsn(insns, i);
    if (code === Op.CALL && src === PseudoCall.CALL) bad(`instruction ${i} is a bpf-to-bpf call: subprograms are not supported`);
    if (code === Op.LD_IMM64 && src !== 0) bad(`instruction ${i}: ld_imm64 with src_reg ${src} but no relocation`);
  }
  mapRelocations.sort((a, b) => a.insnIndex - b.insnIndex);
  return { section: prog.name, insns, license, maps, mapRelocations, externCalls };
}

function loadBtfMaps(f: Bytes, sections: Section[]): Map<string, ObjectMapDef> {
  const btf = sections.find((s) => s.name === '.BTF');
  if (!btf || btf.type === SHT_NOBITS) bad('maps are referenced but the object has no .BTF (build with -g)');
  return new Btf(f, btf).mapDefs();
}

// ---------------------------------------------------------------------------------------
// The object path's pre-check (docs/offload-protocol.md §8): what the backend reads of a
// guest's whole object *before* libbpf sees it (in a child process). It bounds the things a
// hostile object could use to make the loader work hard or allocate much (section count and
// sizes, string tables, BTF, map geometry), and reads every program section so policy can
// judge the instructions first. libbpf's own parse is not trusted to be robust; this one is.

const ET_REL = 1;
const SHT_PROGBITS = 1;
const SHF_ALLOC = 0x2;
/** clang -g emits ~30 sections for one source file; far more is not an object we want. */
export const MAX_OBJECT_SECTIONS = 256;
/** Programs (functions in executable sections) one object may hold. */
export const MAX_OBJECT_PROGRAMS = 16;

export interface ObjectInspection {
  /** Executable sections with instructions (program sections and .text subprograms). */
  code: { section: string; insns: Uint8Array }[];
  /** `.maps` definitions (BTF), in declaration order. */
  maps: ObjectMapDef[];
  /** Global data sections libbpf turns into internal ARRAY maps of one element (value = the section). */
  dataSections: { name: string; size: number; readonly: boolean }[];
  /** Function symbols in program sections (not .text): the programs libbpf will load. */
  programs: string[];
  license: string;
  /** Symbols the object does not define (kfuncs, ksyms, kconfig): the caller refuses them. */
  externs: { name: string; calledFrom: string | null }[];
}

/**
 * Reads an object for the object path without trusting it: ELF header, a bounded section table,
 * names within their string tables, contents within the file, the symbol table, BTF (types and
 * `.maps` definitions), global data sections. Throws BpfObjectError naming the first problem.
 */
export function inspectObject(bytes: Uint8Array): ObjectInspection {
  const f = new Bytes(bytes);
  f.need(0, 64, 'ELF header');
  if (f.u32(0, 'ELF magic') !== 0x464c457f) bad('not an ELF file (bad magic)');
  if (f.u16(16, 'e_type') !== ET_REL) bad(`e_type ${f.u16(16, 'e_type')} is not ET_REL (a relocatable object, as clang -c makes)`);
  const shnum = f.u16(60, 'e_shnum');
  if (shnum > MAX_OBJECT_SECTIONS) bad(`${shnum} sections; at most ${MAX_OBJECT_SECTIONS}`);
  const sections = readSections(f);
  const symbols = readSymbols(f, sections);
  if (symbols.length > 65536) bad(`${symbols.length} symbols`);
  const license = readLicense(f, sections);

  const code: ObjectInspection['code'] = [];
  const programs: string[] = [];
  const dataSections: ObjectInspection['dataSections'] = [];
  let totalInsns = 0;
  for (const s of sections) {
    if (s.index === 0) continue;
    if ((s.flags & SHF_EXECINSTR) !== 0) {
      if (s.size === 0) continue;
      if (s.type !== SHT_PROGBITS) bad(`section '${s.name}' is executable but not PROGBITS`);
      if (s.name !== '.text' && s.name !== 'xdp') bad(`program section '${s.name}': only SEC("xdp") programs (and .text subprograms) are offloaded`);
      if (s.size % INSN !== 0) bad(`section '${s.name}' size ${s.size} is not a multiple of 8`);
      totalInsns += s.size / INSN;
      if (totalInsns > MAX_INSNS) bad(`more than ${MAX_INSNS} instructions`);
      code.push({ section: s.name, insns: Uint8Array.prototype.slice.call(bytes, s.offset, s.offset + s.size) });
    } else if (s.name === 'maps') {
      bad("legacy 'maps' section (struct bpf_map_def): declare maps in SEC(\".maps\") with BTF");
    } else if (s.name === '.kconfig' || s.name === '.ksyms') {
      bad(`section '${s.name}' (host kernel configuration or symbols) is not offloadable`);
    } else if ((s.flags & SHF_ALLOC) !== 0 && /^\.(data|rodata|bss)(\.|$)/.test(s.name)) {
      dataSections.push({ name: s.name, size: s.size, readonly: s.name.startsWith('.rodata') });
    } else if (s.name === '.struct_ops' || s.name.startsWith('.struct_ops.')) {
      bad('struct_ops maps are not offloadable');
    }
  }
  if (code.length === 0) bad('no program section');

  const externs: ObjectInspection['externs'] = [];
  const STT_FUNC = 2;
  for (const [i, sym] of symbols.entries()) {
    if (i === 0) continue;
    if (sym.shndx === SHN_UNDEF && sym.name !== '') externs.push({ name: sym.name, calledFrom: null });
    const sec = sym.shndx !== SHN_UNDEF && sym.shndx < SHN_LORESERVE ? sections[sym.shndx] : undefined;
    if ((sym.info & 0xf) === STT_FUNC && sec?.name === 'xdp' && (sym.info >> 4) === 1 /* STB_GLOBAL */) {
      programs.push(sym.name);
      if (programs.length > MAX_OBJECT_PROGRAMS) bad(`more than ${MAX_OBJECT_PROGRAMS} programs`);
    }
  }
  // Calls to externs: which one is a kfunc (called) rather than a ksym/kconfig variable.
  if (externs.length > 0) {
    for (const rel of sections.filter((s) => s.type === SHT_REL)) {
      const target = sections[rel.info];
      if (!target || (target.flags & SHF_EXECINSTR) === 0) continue;
      if (rel.entsize !== 16 || rel.size % 16 !== 0) bad(`relocation section '${rel.name}' entry size is not 16`);
      for (let o = rel.offset; o < rel.offset + rel.size; o += 16) {
        const sym = symbols[f.u32(o + 12, 'r_info symbol')];
        if (!sym || sym.shndx !== SHN_UNDEF) continue;
        const off = f.u64(o, 'r_offset');
        if (off + INSN > target.size) bad(`relocation at ${off} outside '${target.name}'`);
        if (f.u8(target.offset + off, 'insn code') === Op.CALL) {
          const e = externs.find((x) => x.name === sym.name);
          if (e) e.calledFrom = target.name;
        }
      }
    }
  }

  const mapsSec = sections.find((s) => s.name === '.maps');
  let maps: ObjectMapDef[] = [];
  if (mapsSec && mapsSec.size > 0) {
    const btf = sections.find((s) => s.name === '.BTF');
    if (!btf || btf.type === SHT_NOBITS) bad('the object has .maps but no .BTF (build with -g)');
    maps = [...new Btf(f, btf).mapDefs(true).values()];
  } else {
    // Still bound and parse the BTF libbpf will load, so a malformed one is refused here.
    const btf = sections.find((s) => s.name === '.BTF');
    if (btf && btf.type !== SHT_NOBITS) new Btf(f, btf);
  }
  return { code, maps, dataSections, programs, license, externs };
}
