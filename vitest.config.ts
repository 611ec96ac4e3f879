import { defineConfig } from 'vitest/config';

// Integration tests own real kernel objects (taps, namespaces, hugepages, QEMU):
// files run one at a time so they never fight over them on a 2-core machine.
export default defineConfig({
  test: {
    include: ['test/**/*.test.ts'],
    globalSetup: ['test/global-setup.ts'],
    fileParallelism: false,
    testTimeout: 120_000,
    hookTimeout: 240_000,
    pool: 'forks',
    reporters: ['default'],
  },
});
