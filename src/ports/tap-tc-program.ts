// The guest's offloaded program running in the kernel at a tap's egress (issue 18): translated
// and composed for tc (offload/tc-translate.ts), loaded as SCHED_CLS, attached through a tcx
// link. Frames it drops never reach the tap's fd; frames it passes are read by the datapath
// as if no program ran; XDP_TX frames go back to the host's receive path.
//
// Lifetime: the link is never pinned. A tcx link detaches when its last reference goes, so
// the program leaves the tap with this process however it ends — close(), SIGTERM, or a
// SIGKILL/crash (the kernel closes our fds) — and a persistent tap that outlives us carries no
// filter dropping traffic that nobody will read. A restarted serve that re-adopts the pinned
// guest program attaches a fresh one.

import { BpfMap, BpfMapType } from '../sys/bpf/maps.js';
import { BpfProgType, closeBpfFd, progLoadWithLog } from '../sys/bpf/programs.js';
import { progInfo } from '../sys/bpf/info.js';
import { tcxAttach, tcxReplace } from '../sys/bpf/tcx.js';
import { closeFd } from '../sys/libc.js';
import type { ProgramSource } from './port.js';
import { translateXdpToTc, composeTc, TcCounter, TC_COUNTERS_BYTES } from '../offload/tc-translate.js';

export interface TcVerdicts { pass: number; drop: number; tx: number; aborted: number }

export const ZERO_VERDICTS: Readonly<TcVerdicts> = Object.freeze({ pass: 0, drop: 0, tx: 0, aborted: 0 });

function addVerdicts(a: Readonly<TcVerdicts>, b: Readonly<TcVerdicts>): TcVerdicts {
  return { pass: a.pass + b.pass, drop: a.drop + b.drop, tx: a.tx + b.tx, aborted: a.aborted + b.aborted };
}

/** A loaded (not yet attached) tc program and the verdict counters its entry block adds to. */
export class TcProgram {
  readonly id: number;
  readonly tag: string;
  readonly name: string;
  readonly rewrites: number;
  private readonly key = new Uint8Array(4);
  private readonly value = new Uint8Array(TC_COUNTERS_BYTES);
  private closed = false;

  private constructor(readonly fd: number, private readonly counters: BpfMap, name: string, rewrites: number) {
    const info = progInfo(fd);
    this.id = info.id;
    this.tag = info.tag;
    this.name = name;
    this.rewrites = rewrites;
  }

  /**
   * Translates, composes and loads. Throws TcTranslateError (the translation refused, with its
   * code) or BpfError (the verifier refused the result: a rewrite it cannot accept is never run).
   */
  static load(source: ProgramSource, opts: { ifindex: number; name: string; countersName: string }): TcProgram {
    const t = translateXdpToTc(source.code);
    const counters = BpfMap.create(BpfMapType.ARRAY, 4, TC_COUNTERS_BYTES, 1, { name: opts.countersName });
    let fd = -1;
    try {
      const insns = composeTc(t.code, { countersFd: counters.fd, ifindex: opts.ifindex });
      // The guest's license: it may call GPL-only helpers.
      fd = progLoadWithLog(insns, { license: source.license, type: BpfProgType.SCHED_CLS, name: opts.name }).fd;
      return new TcProgram(fd, counters, opts.name, t.rewrites.length);
    } catch (e) {
      if (fd >= 0) closeBpfFd(fd);
      counters.close();
      throw e;
    }
  }

  verdicts(): TcVerdicts {
    if (this.closed) return { ...ZERO_VERDICTS };
    const v = this.counters.lookup(this.key, this.value);
    if (!v) return { ...ZERO_VERDICTS };
    const d = new DataView(v.buffer, v.byteOffset, v.byteLength);
    const at = (o: number) => Number(d.getBigUint64(o, true));
    return { pass: at(TcCounter.pass), drop: at(TcCounter.drop), tx: at(TcCounter.tx), aborted: at(TcCounter.aborted) };
  }

  /** Closes the program fd and its counters; an attached program stays until its link goes. */
  close(): void {
    if (this.closed) return;
    this.closed = true;
    closeBpfFd(this.fd);
    this.counters.close();
  }
}

/**
 * The tcx egress attachment of one tap: at most one program, replaced in place (bpf_link_update
 * swaps the link's program atomically, so no frame meets neither or both). Verdicts of programs
 * it replaced are kept so the device's counters only grow.
 */
export class TapTcAttachment {
  private link = -1;
  private current: TcProgram | null = null;
  private retired: TcVerdicts = { ...ZERO_VERDICTS };

  constructor(private readonly ifindex: number, private readonly what: string) {}

  get program(): TcProgram | null { return this.current; }

  /** Attaches `next` (taking ownership), replacing the current program. */
  set(next: TcProgram): void {
    if (this.link < 0) {
      this.link = tcxAttach(this.ifindex, next.fd, 'egress');
    } else {
      tcxReplace(this.link, next.fd, this.what);
    }
    this.retire();
    this.current = next;
  }

  /** Detaches (closes the link) and closes the program. */
  clear(): void {
    if (this.link >= 0) {
      closeFd(this.link);
      this.link = -1;
    }
    this.retire();
  }

  /** Verdicts of every program this attachment has run, the current one included. */
  verdicts(): TcVerdicts {
    return addVerdicts(this.retired, this.current?.verdicts() ?? ZERO_VERDICTS);
  }

  private retire(): void {
    const old = this.current;
    if (!old) return;
    this.retired = addVerdicts(this.retired, old.verdicts());
    old.close();
    this.current = null;
  }
}
