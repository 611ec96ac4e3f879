// Per-device offload quotas: defaults, parsing of operator input ("16MiB"), validation,
// the request-rate token bucket, and the map memory estimate that is checked before the
// kernel is asked to allocate anything (the kernel's own figure is read afterwards).

import { readFileSync } from 'node:fs';
import { OffloadConfigError } from './errors.js';

export interface Quotas {
  /** Live maps per device. */
  maxMaps: number;
  /** Bytes of kernel memory charged to all of the device's maps together. */
  maxMapMemory: number;
  /** max_entries of any one map. */
  maxEntries: number;
  /** Instructions in one program. */
  maxProgInsns: number;
  /** Offload requests per second (token bucket, one second of burst). */
  maxOpsPerSec: number;
  maxKeySize: number;
  maxValueSize: number;
  /** Bytes of one ELF object on the object path (OBJ_BEGIN total_bytes). */
  maxObjectBytes: number;
}

export interface QuotaUsage {
  maps: number;
  mapMemory: number;
  /** Largest max_entries among live maps. */
  largestMapEntries: number;
  /** Instructions of the loaded program (0 when none). */
  progInsns: number;
  /** Requests seen in the last completed second. */
  opsPerSec: number;
}

export const DEFAULT_QUOTAS: Readonly<Quotas> = Object.freeze({
  maxMaps: 16,
  maxMapMemory: 16 * 1024 * 1024,
  maxEntries: 65536,
  maxProgInsns: 4096,
  // High enough that the map round-trip targets (20k/s single) are never throttled by
  // default, low enough that one guest cannot keep a backend core busy on syscalls.
  maxOpsPerSec: 100_000,
  maxKeySize: 512,
  maxValueSize: 32 * 1024,
  // "Objects up to at least 1 MiB" (issue 17).
  maxObjectBytes: 1024 * 1024,
});

/** Inclusive ranges; the upper bounds are what the kernel or one offload message can carry. */
export const QUOTA_RANGES: Readonly<Record<keyof Quotas, readonly [number, number]>> = Object.freeze({
  maxMaps: [0, 1024],
  maxMapMemory: [0, 2 ** 40],
  maxEntries: [1, 1 << 24],
  maxProgInsns: [1, 1_000_000],
  maxOpsPerSec: [1, 10_000_000],
  // The kernel's hash maps cap keys at 512 bytes (MAX_BPF_STACK).
  maxKeySize: [1, 512],
  // A value must fit in one ELEM_UPDATE message with its key.
  maxValueSize: [1, 32 * 1024],
  // The upload is held in memory until OBJ_LOAD; 64 MiB bounds what one device can make the backend hold.
  maxObjectBytes: [0, 64 * 1024 * 1024],
});

/** Operator-facing names (the CLI flags). */
export const QUOTA_FLAGS: Readonly<Record<keyof Quotas, string>> = Object.freeze({
  maxMaps: 'max-maps', maxMapMemory: 'max-map-memory', maxEntries: 'max-entries', maxProgInsns: 'max-prog-insns',
  maxOpsPerSec: 'max-ops-per-sec', maxKeySize: 'max-key-size', maxValueSize: 'max-value-size',
  maxObjectBytes: 'max-object-bytes',
});

const UNITS: Record<string, number> = {
  '': 1, b: 1,
  k: 1024, kib: 1024, m: 1024 ** 2, mib: 1024 ** 2, g: 1024 ** 3, gib: 1024 ** 3, t: 1024 ** 4, tib: 1024 ** 4,
  kb: 1000, mb: 1000 ** 2, gb: 1000 ** 3, tb: 1000 ** 4,
};

/** "16MiB", "16M" (binary), "16MB" (decimal), "4096", 4096 → bytes. Throws OffloadConfigError ('bad-size'). */
export function parseSize(input: string | number): number {
  if (typeof input === 'number') {
    if (!Number.isSafeInteger(input) || input < 0) throw new OffloadConfigError('bad-size', `size ${input} is not a non-negative integer`, String(input));
    return input;
  }
  const m = /^\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*$/.exec(input);
  const unit = m ? UNITS[m[2]!.toLowerCase()] : undefined;
  if (!m || unit === undefined) throw new OffloadConfigError('bad-size', `size '${input}': expected a number with an optional unit (KiB, MiB, GiB, KB, MB, GB)`, input);
  const n = Math.round(Number(m[1]) * unit);
  if (!Number.isSafeInteger(n)) throw new OffloadConfigError('bad-size', `size '${input}' is too large`, input);
  return n;
}

/** Checks each given quota against its range; returns a clean copy. Throws OffloadConfigError naming it (subject: the CLI flag). */
export function validateQuotas(changes: Partial<Record<keyof Quotas, unknown>>): Partial<Quotas> {
  const out: Partial<Quotas> = {};
  for (const [k, raw] of Object.entries(changes)) {
    if (raw === undefined) continue;
    if (!(k in QUOTA_RANGES)) throw new OffloadConfigError('unknown-quota', `unknown quota '${k}'`, k);
    const key = k as keyof Quotas;
    const [lo, hi] = QUOTA_RANGES[key];
    let value = NaN;
    try {
      if (typeof raw === 'string' || typeof raw === 'number') value = parseSize(raw);
    } catch (e) {
      throw new OffloadConfigError('bad-quota', `--${QUOTA_FLAGS[key]} ${String(raw)}: ${(e as Error).message}`, QUOTA_FLAGS[key]);
    }
    if (!Number.isSafeInteger(value) || value < lo || value > hi) {
      throw new OffloadConfigError('bad-quota', `--${QUOTA_FLAGS[key]} ${String(raw)}: must be an integer in ${lo}..${hi}`, QUOTA_FLAGS[key]);
    }
    out[key] = value;
  }
  return out;
}

/** Human lines for every quota now below its current use (lowering is allowed, with a warning). */
export function quotaWarnings(limits: Quotas, usage: QuotaUsage): string[] {
  const w: string[] = [];
  if (usage.maps > limits.maxMaps) {
    w.push(`max-maps ${limits.maxMaps} is below current use (${usage.maps} maps): MAP_CREATE is refused until maps are freed`);
  }
  if (usage.mapMemory > limits.maxMapMemory) {
    w.push(`max-map-memory ${limits.maxMapMemory} is below current use (${usage.mapMemory} bytes): MAP_CREATE is refused until maps are freed`);
  }
  if (usage.largestMapEntries > limits.maxEntries) {
    w.push(`max-entries ${limits.maxEntries} is below an existing map's max_entries (${usage.largestMapEntries}): existing maps keep their size, new maps are limited`);
  }
  if (usage.progInsns > limits.maxProgInsns) {
    w.push(`max-prog-insns ${limits.maxProgInsns} is below the loaded program (${usage.progInsns} instructions): it keeps running, a new PROG_SET must fit`);
  }
  return w;
}

/**
 * Requests-per-second limit: `rate` tokens per second, at most one second's worth saved.
 * take() returns 0 when a token was taken, else the milliseconds until one is available.
 */
export class TokenBucket {
  private tokens: number;
  private last: number;
  private rate: number;
  private windowStart: number;
  private windowCount = 0;
  private lastWindowCount = 0;

  constructor(rate: number, private readonly now: () => number) {
    this.rate = rate;
    this.tokens = rate;
    this.last = now();
    this.windowStart = this.last;
  }

  setRate(rate: number): void {
    this.refill();
    this.rate = rate;
    this.tokens = Math.min(this.tokens, rate);
  }

  private refill(): void {
    const t = this.now();
    const dt = t - this.last;
    if (dt > 0) {
      this.tokens = Math.min(this.rate, this.tokens + (dt * this.rate) / 1000);
      this.last = t;
    }
    if (t - this.windowStart >= 1000) {
      this.lastWindowCount = t - this.windowStart >= 2000 ? 0 : this.windowCount;
      this.windowCount = 0;
      this.windowStart = t;
    }
  }

  take(): number {
    this.refill();
    this.windowCount++;
    if (this.tokens >= 1) {
      this.tokens -= 1;
      return 0;
    }
    return Math.max(1, Math.ceil(((1 - this.tokens) * 1000) / this.rate));
  }

  /** Requests counted in the last completed one-second window. */
  get recentRate(): number {
    this.refill();
    return this.lastWindowCount;
  }
}

const MAP_HASH = 1, MAP_ARRAY = 2, MAP_LRU_HASH = 9;
const round8 = (n: number) => Math.ceil(n / 8) * 8;
const pow2 = (n: number) => 2 ** Math.ceil(Math.log2(Math.max(1, n)));

/**
 * Worst-case bytes a map can pin, from its geometry. Calibrated against the kernel's
 * fdinfo `memlock` on 6.18 (ARRAY 4/8×1024: 8504; HASH 4/8×1024: 82960): arrays hold
 * round8(value) per slot; hash maps one bucket per power-of-two slot plus ~48 bytes of
 * element header per entry. NO_PREALLOC hash maps are charged as if full, because the
 * kernel's figure then only covers the elements present at the time it is read.
 */
export function estimateMapBytes(type: number, keySize: number, valueSize: number, maxEntries: number): number {
  const base = 1024;
  if (type === MAP_ARRAY) return base + round8(valueSize) * maxEntries;
  if (type === MAP_HASH || type === MAP_LRU_HASH) {
    return base + 16 * pow2(maxEntries) + maxEntries * (48 + round8(keySize) + round8(valueSize));
  }
  return base + maxEntries * (64 + round8(keySize) + round8(valueSize));
}

/** The kernel's own memory figure for a map fd of this process, or null when unreadable. */
export function readMemlock(fd: number): number | null {
  try {
    const m = /^memlock:\s*(\d+)/m.exec(readFileSync(`/proc/self/fdinfo/${fd}`, 'utf8'));
    return m ? Number(m[1]) : null;
  } catch {
    return null;
  }
}
