import { execFileSync } from 'node:child_process';
import { readFileSync } from 'node:fs';

/**
 * Pins every thread of this process (the bench, when its TS frontend plays the guest) to
 * `cpus` and returns a function that puts back the CPUs it had: the guest seat must be the
 * same core in every run it is compared across, and the bench's later children (started with
 * their own taskset) must not inherit the narrowed mask.
 */
export function pinSelf(cpus: string): () => void {
  const before = /Cpus_allowed_list:\s*(\S+)/.exec(readFileSync('/proc/self/status', 'utf8'))?.[1];
  if (!before) throw new Error('no Cpus_allowed_list in /proc/self/status');
  execFileSync('taskset', ['-a', '-p', '-c', cpus, String(process.pid)], { stdio: 'ignore' });
  return () => execFileSync('taskset', ['-a', '-p', '-c', before, String(process.pid)], { stdio: 'ignore' });
}
