// bpffs pinning for `--pin-dir`: one directory per device holding the program, each map,
// and the broker's own metadata, so a restarted backend can re-adopt a guest's offload.
//
// Layout of `${pinDir}/${device}/`:
//   prog            the loaded program
//   map_<handle>    each live map, named by its guest handle
//   state           claim metadata (JSON)
//   *_new           a document or pin being replaced (renamed over the old one)
//   meta_prog       program metadata (JSON)
//   src             the guest's program as it sent it (map handles, not fds), in a pinned
//                   BPF array map of 4 KiB chunks: what a restarted backend needs to compose it
//                   again (xsk port); bpffs holds no regular files, and a program outgrows a
//                   4 KiB metadata document
//   meta_<handle>   per-map metadata (JSON)
//   meta_obj        a loaded object (OBJ_LOAD, protocol §8): its name, programs (name, tag,
//                   instructions), map handles, entry, license; written last, so it is the
//                   commit point of an object's pins. Its maps are `map_<handle>` as above.
//   obj<G>_p<i>     the object's program i (entry and tail-call targets); G is the entry
//                   program's kernel id, so a replacing object's pins never collide with the
//                   old one's
//   obj<G>_code     the entry's relocated instructions with map references as guest handles
//                   (a blob like `src`): what the xsk port composes again after a restart
//   obj<G>_elf      the object's ELF bytes as uploaded (a blob): what a migration carries
// bpffs refuses regular files, so the JSON documents are stored as symlink targets (bpffs
// supports symlinks and rename): each is written to a temporary name and renamed over the
// old one, so a crash leaves either the old or the new document, never half of one. One
// small document per object keeps each well under the 4 KiB symlink limit.

import { lstatSync, mkdirSync, readdirSync, readlinkSync, renameSync, rmdirSync, statfsSync, symlinkSync, unlinkSync, existsSync } from 'node:fs';
import { join } from 'node:path';
import { BpfMap, BpfMapType } from '../sys/bpf/maps.js';
import { objGet, objPin } from '../sys/bpf/pins.js';
import { bpfPrefix, hostObjectName } from './host-names.js';

const BPF_FS_MAGIC = 0xcafe4a11;
const MAX_DOC_BYTES = 4000;

export interface PinnedClaim { version: 1; device: string; claimedAt: string; nextHandle: number; responseLimit: number }
/** name: the guest's name for the map (the kernel's carries the device prefix, host-names.ts). */
export interface PinnedMapMeta {
  handle: number; chargedBytes: number; createdAt: string; name?: string;
  /** Set on a loaded object's maps: restored only as part of the object meta_obj names. */
  object?: boolean;
}
export interface PinnedProgMeta {
  insns: number; loadedAt: string; usedHandles: number[]; name: string;
  /** Present when `src` was pinned with the program (absent in pins of older versions). */
  source?: { bytes: number; license: string; declaredHandles: number[]; tag: string };
}

/** meta_obj: what restore needs to rebuild the device's view of a loaded object. */
export interface PinnedObjectMeta {
  version: 1; name: string; loadedAt: string;
  /** The entry program's kernel id at load (names the obj<G>_* pins). */
  gen: number;
  entry: number; license: string;
  programs: { name: string; tag: string; insns: number }[];
  mapHandles: number[];
  /** Length of obj<G>_code (0: none pinned). */
  codeBytes: number;
  /** Length of obj<G>_elf, the uploaded object (what a migration carries); absent or 0: none pinned. */
  elfBytes?: number;
}

const SRC_CHUNK = 4096;

// bpffs refuses '.' in names (reserved by the kernel), so temporary names use '_new'.
const DEVICE_RE = /^[A-Za-z0-9_-]{1,64}$/;

export function isBpffs(path: string): boolean {
  try {
    return statfsSync(path).type === BPF_FS_MAGIC;
  } catch {
    return false;
  }
}

export class DevicePins {
  readonly dir: string;

  constructor(readonly pinDir: string, readonly device: string) {
    if (!DEVICE_RE.test(device)) {
      throw new RangeError(`device name '${device}' cannot name a pin directory (1-64 of [A-Za-z0-9_-]; bpffs refuses dots)`);
    }
    if (!isBpffs(pinDir)) throw new Error(`--pin-dir ${pinDir} is not a mounted bpffs (mount -t bpf bpf ${pinDir})`);
    this.dir = join(pinDir, device);
  }

  exists(): boolean {
    // lstat: `state` is a symlink whose target is JSON, not a path, so existsSync would say no.
    try { return lstatSync(join(this.dir, 'state')).isSymbolicLink(); } catch { return false; }
  }

  ensureDir(): void {
    mkdirSync(this.dir, { recursive: true, mode: 0o700 });
  }

  private path(name: string): string {
    return join(this.dir, name);
  }

  private unlinkQuiet(name: string): void {
    try { unlinkSync(this.path(name)); } catch (e) { if ((e as NodeJS.ErrnoException).code !== 'ENOENT') throw e; }
  }

  private writeDoc(name: string, doc: unknown): void {
    const text = JSON.stringify(doc);
    if (Buffer.byteLength(text) > MAX_DOC_BYTES) throw new Error(`pin metadata '${name}' is too large to store`);
    const tmp = `${name}_new`;
    this.unlinkQuiet(tmp);
    symlinkSync(text, this.path(tmp));
    renameSync(this.path(tmp), this.path(name));
  }

  private readDoc<T>(name: string): T | null {
    try {
      return JSON.parse(readlinkSync(this.path(name), 'utf8')) as T;
    } catch {
      return null;
    }
  }

  writeClaim(c: PinnedClaim): void { this.writeDoc('state', c); }
  readClaim(): PinnedClaim | null { return this.readDoc<PinnedClaim>('state'); }

  pinMap(handle: number, fd: number, meta: PinnedMapMeta): void {
    this.unlinkQuiet(`map_${handle}`);
    objPin(fd, this.path(`map_${handle}`));
    try {
      this.writeDoc(`meta_${handle}`, meta);
    } catch (e) {
      this.unlinkQuiet(`map_${handle}`);
      throw e;
    }
  }

  unpinMap(handle: number): void {
    this.unlinkQuiet(`map_${handle}`);
    this.unlinkQuiet(`meta_${handle}`);
  }

  /**
   * Pins under temporary names and renames over `prog` (and `src`), so the old pins stay until
   * the new ones exist. A crash between the renames can pair a new `src` or meta_prog with the
   * old program: OffloadBroker.restore compares meta_prog's source tag with the program's.
   */
  pinProg(fd: number, meta: PinnedProgMeta, source?: Uint8Array): void {
    this.unlinkQuiet('prog_new');
    this.unlinkQuiet('src_new');
    try {
      if (source) this.pinBlob('src_new', 'src', source);
      objPin(fd, this.path('prog_new'));
      this.writeDoc('meta_prog', meta);
      if (source) renameSync(this.path('src_new'), this.path('src'));
      else this.unlinkQuiet('src');
      renameSync(this.path('prog_new'), this.path('prog'));
    } catch (e) {
      this.unlinkQuiet('prog_new');
      this.unlinkQuiet('src_new');
      throw e;
    }
  }

  unpinProg(): void {
    this.unlinkQuiet('prog');
    this.unlinkQuiet('src');
    this.unlinkQuiet('meta_prog');
  }

  /**
   * Pins an object's programs and the entry's code under obj<gen>_*, then meta_obj (the commit
   * point, renamed over any older one). The maps are pinned by the caller (pinMap). On failure
   * nothing of this generation stays.
   */
  pinObject(meta: PinnedObjectMeta, progFds: number[], code: Uint8Array | null, elf?: Uint8Array): void {
    const g = `obj${meta.gen}`;
    try {
      progFds.forEach((fd, i) => { this.unlinkQuiet(`${g}_p${i}`); objPin(fd, this.path(`${g}_p${i}`)); });
      this.unlinkQuiet(`${g}_code`);
      if (code && code.byteLength > 0) this.pinBlob(`${g}_code`, 'obj_code', code);
      this.unlinkQuiet(`${g}_elf`);
      if (elf && elf.byteLength > 0) this.pinBlob(`${g}_elf`, 'obj_elf', elf);
      this.writeDoc('meta_obj', meta);
    } catch (e) {
      this.unpinObjectGen(meta.gen);
      throw e;
    }
  }

  /** true when an object's metadata is pinned (readable or not). */
  hasObject(): boolean {
    try { return lstatSync(this.path('meta_obj')).isSymbolicLink(); } catch { return false; }
  }

  /** The pinned object metadata as stored (untrusted shape: restore.ts checks it), or null. */
  readObject(): unknown { return this.readDoc<unknown>('meta_obj'); }

  /** Opens program i of object generation gen; the caller owns the fd. */
  getObjectProg(gen: number, i: number): number { return objGet(this.path(`obj${gen}_p${i}`)); }

  getObjectCode(gen: number, bytes: number): Uint8Array | null { return this.getBlob(`obj${gen}_code`, bytes); }

  getObjectElf(gen: number, bytes: number): Uint8Array | null { return this.getBlob(`obj${gen}_elf`, bytes); }

  /** Removes generation gen's program and code pins, and meta_obj when it names gen (or cannot be read). */
  unpinObjectGen(gen: number): void {
    const meta = this.readDoc<{ gen?: unknown }>('meta_obj');
    if (!meta || meta.gen === gen) this.unlinkQuiet('meta_obj');
    this.unlinkQuiet('meta_obj_new');
    let names: string[];
    try { names = readdirSync(this.dir); } catch { return; }
    const re = new RegExp(`^obj${gen}_(p\\d+|code|elf)$`);
    for (const n of names) if (re.test(n)) this.unlinkQuiet(n);
  }

  /** Removes every object pin (any generation) and meta_obj: what a refused restore leaves behind. */
  unpinAnyObject(): void {
    this.unlinkQuiet('meta_obj');
    this.unlinkQuiet('meta_obj_new');
    let names: string[];
    try { names = readdirSync(this.dir); } catch { return; }
    for (const n of names) if (/^obj\d+_(p\d+|code|elf)$/.test(n)) this.unlinkQuiet(n);
  }

  /**
   * Pins `bytes` as an array map at `name`, the map named for its device and `role` like every
   * other host object of it (host-names.ts): `vm1_src`, `vm1_obj_code`, `vm1_obj_elf`. The
   * caller says the role: the pin name is temporary or carries a generation.
   */
  private pinBlob(name: string, role: 'src' | 'obj_code' | 'obj_elf', bytes: Uint8Array): void {
    const chunks = Math.max(1, Math.ceil(bytes.byteLength / SRC_CHUNK));
    const map = BpfMap.create(BpfMapType.ARRAY, 4, SRC_CHUNK, chunks, { name: hostObjectName(bpfPrefix(this.device), role) });
    try {
      const key = new Uint8Array(4);
      const kv = new DataView(key.buffer);
      const chunk = new Uint8Array(SRC_CHUNK);
      for (let i = 0; i < chunks; i++) {
        chunk.fill(0);
        chunk.set(bytes.subarray(i * SRC_CHUNK, Math.min(bytes.byteLength, (i + 1) * SRC_CHUNK)));
        kv.setUint32(0, i, true);
        map.update(key, chunk);
      }
      objPin(map.fd, this.path(name));
    } finally {
      map.close();
    }
  }

  /** The pinned program source (`bytes` long), or null when none is pinned or it is shorter than that. */
  getSource(bytes: number): Uint8Array | null { return this.getBlob('src', bytes); }

  private getBlob(name: string, bytes: number): Uint8Array | null {
    if (!Number.isSafeInteger(bytes) || bytes <= 0) return null;
    if (!existsSync(this.path(name))) return null;
    const map = BpfMap.fromFd(objGet(this.path(name)));
    try {
      if (map.type !== BpfMapType.ARRAY || map.valueSize !== SRC_CHUNK || map.maxEntries * SRC_CHUNK < bytes) return null;
      const out = new Uint8Array(bytes);
      const key = new Uint8Array(4);
      const kv = new DataView(key.buffer);
      for (let i = 0; i * SRC_CHUNK < bytes; i++) {
        kv.setUint32(0, i, true);
        const v = map.lookup(key);
        if (!v) return null;
        out.set(v.subarray(0, Math.min(SRC_CHUNK, bytes - i * SRC_CHUNK)), i * SRC_CHUNK);
      }
      return out;
    } finally {
      map.close();
    }
  }

  /** Pinned map handles with their metadata (metadata null when missing or unreadable). */
  listMaps(): { handle: number; meta: PinnedMapMeta | null }[] {
    let names: string[];
    try { names = readdirSync(this.dir); } catch { return []; }
    const out: { handle: number; meta: PinnedMapMeta | null }[] = [];
    for (const n of names) {
      const m = /^map_(\d{1,10})$/.exec(n);
      if (!m) continue;
      const handle = Number(m[1]);
      out.push({ handle, meta: this.readDoc<PinnedMapMeta>(`meta_${handle}`) });
    }
    return out.sort((a, b) => a.handle - b.handle);
  }

  /** Opens a pinned map; the caller owns the fd. */
  getMap(handle: number): number { return objGet(this.path(`map_${handle}`)); }

  /** undefined when no program is pinned; else its metadata (null when unreadable). */
  getProgMeta(): PinnedProgMeta | null | undefined {
    if (!existsSync(this.path('prog'))) return undefined;
    return this.readDoc<PinnedProgMeta>('meta_prog');
  }

  /** Opens the pinned program, or returns null when none is pinned. */
  getProg(): { fd: number; meta: PinnedProgMeta | null } | null {
    if (!existsSync(this.path('prog'))) return null;
    return { fd: objGet(this.path('prog')), meta: this.readDoc<PinnedProgMeta>('meta_prog') };
  }

  /** Unpins everything of this device and removes its directory. */
  removeAll(): void {
    let names: string[];
    try { names = readdirSync(this.dir); } catch { return; }
    for (const n of names) this.unlinkQuiet(n);
    try { rmdirSync(this.dir); } catch (e) { if ((e as NodeJS.ErrnoException).code !== 'ENOENT') throw e; }
  }
}
