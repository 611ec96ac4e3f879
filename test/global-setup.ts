// Runs once around the whole test run (vitest globalSetup). Test files make their scratch
// directories under /tmp with a `vx-` prefix (support/backend.ts tempDir); the worker processes
// that made them are ended without a normal exit, so the directories are removed here, after
// the run, unless something is still mounted on them.
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';

export default function setup(): () => void {
  const started = Date.now() - 1000;
  return () => {
    const mounts = fs.readFileSync('/proc/mounts', 'utf8');
    for (const name of fs.readdirSync(os.tmpdir())) {
      if (!name.startsWith('vx-')) continue;
      const dir = path.join(os.tmpdir(), name);
      try {
        if (fs.statSync(dir).birthtimeMs < started && fs.statSync(dir).ctimeMs < started) continue;
        if (mounts.includes(` ${dir}`)) continue;
        fs.rmSync(dir, { recursive: true, force: true });
      } catch { /* gone or busy: leave it */ }
    }
  };
}
