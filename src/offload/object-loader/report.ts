// What the object loader's child writes on stdout (one JSON document). The parent decodes it
// as untrusted input (loader.ts): the child ran libbpf over guest bytes.

export interface ChildMapReport {
  name: string; type: number; keySize: number; valueSize: number; maxEntries: number; flags: number;
  /** libbpf's map for .rodata/.data/.bss (global data). */
  internal: boolean;
  /** The fd number in the child: what the relocated instructions' map references hold. */
  childFd: number;
  /** The name the kernel was given: `<device prefix>_<name>` (host-names.ts), or `name` where libbpf's could not be replaced. */
  kernelName: string;
}

export interface ChildProgramReport {
  name: string;
  section: string;
  /** The final instructions (bpf_program__insns after load), base64. */
  insns: string;
  /** As ChildMapReport.kernelName. */
  kernelName: string;
}

export type ChildReport =
  | { ok: true; maps: ChildMapReport[]; programs: ChildProgramReport[] }
  | { ok: false; stage: 'input' | 'open' | 'program-type' | 'load'; errno: number; reason: string; program?: string; log?: string };
