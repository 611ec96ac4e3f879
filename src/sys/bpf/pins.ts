import { libbpf, fail } from './libbpf.js';

// Pinning: programs and maps outlive this process as files in a mounted bpffs.

const fn = {
  obj_pin: libbpf.func('bpf_obj_pin', 'int', ['int', 'str']),
  obj_get: libbpf.func('bpf_obj_get', 'int', ['str']),
};

/** Pins a program or map fd at a path inside a mounted bpffs. */
export function objPin(fd: number, path: string): void {
  const r = fn.obj_pin(fd, path) as number;
  if (r < 0) fail('bpf_obj_pin', r, path);
}

/** Opens a pinned object; the caller owns the returned fd. */
export function objGet(path: string): number {
  const fd = fn.obj_get(path) as number;
  if (fd < 0) fail('bpf_obj_get', fd, path);
  return fd;
}
