#!/usr/bin/env -S node --max-semi-space-size=1
// The program a vhost-user.json descriptor names (contrib/vhost-user/50-vhost-xdp.json): QEMU's
// backend conventions call the backend binary with --print-capabilities, --socket-path or --fd
// and no subcommand, so this is `vhost-xdp serve` under its own name.
import { wantsCapabilities, backendCapabilities } from './conventions.js';

const args = process.argv.slice(2);
if (wantsCapabilities(args)) {
  console.log(JSON.stringify(backendCapabilities()));
  process.exit(0);
}
process.argv.splice(2, 0, 'serve');
await import('./main.js');
