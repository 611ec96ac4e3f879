import { describe, expect, it } from 'vitest';
import { clockTick, coreCost, coreTicks } from '../../bench/proc-cpu.js';

describe('bench core accounting', () => {
  it('splits a core\'s window into user and kernel time per frame', () => {
    const before = { user: 1000, kernel: 2000, idle: 500, steal: 0 };
    // 100 ticks at 100 Hz = 1 s: 10 user, 85 kernel, 5 idle; a million frames.
    const after = { user: 1010, kernel: 2085, idle: 505, steal: 0 };
    expect(coreCost(before, after, 1_000_000, 100)).toEqual({ userNsPerFrame: 100, kernelNsPerFrame: 850, idlePct: 5, stealPct: 0 });
  });

  it('gives 0 per frame, not Infinity, for a window without frames', () => {
    const t = { user: 1, kernel: 1, idle: 1, steal: 1 };
    expect(coreCost(t, { user: 2, kernel: 2, idle: 2, steal: 2 }, 0, 100)).toEqual({ userNsPerFrame: 0, kernelNsPerFrame: 0, idlePct: 25, stealPct: 25 });
  });

  it('reads every core of this machine from /proc/stat, and refuses one it does not have', () => {
    const a = coreTicks(0);
    expect(Object.values(a).every((x) => Number.isInteger(x) && x >= 0)).toBe(true);
    expect(a.user + a.kernel + a.idle).toBeGreaterThan(0);
    expect(clockTick()).toBeGreaterThan(0);
    expect(() => coreTicks(100_000)).toThrow();
  });
});
