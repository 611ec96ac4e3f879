#!/usr/bin/env -S node --max-semi-space-size=1
import yargs from 'yargs';
import { hideBin } from 'yargs/helpers';
import { serveCommand } from './serve.js';
import { inspectCommands } from './inspect.js';
import { demoCommand } from './demo.js';
import { offloadCommands } from './offload.js';
import { wantsCapabilities, backendCapabilities } from './conventions.js';

const args = hideBin(process.argv);
// QEMU's backend conventions: --print-capabilities prints and exits, every other option ignored.
if (args[0] === 'serve' && wantsCapabilities(args)) {
  console.log(JSON.stringify(backendCapabilities()));
  process.exit(0);
}

let y = yargs(args)
  .scriptName('vhost-xdp')
  .usage('$0 <command> [options]\n\nA vhost-user virtio-net backend with an XDP offload broker.')
  .strict()
  .demandCommand(1, 'name a command (see --help)')
  .recommendCommands()
  .help()
  .wrap(Math.min(110, process.stdout.columns || 100));
y = serveCommand(y);
y = inspectCommands(y);
y = offloadCommands(y);
y = demoCommand(y);
await y.parseAsync();
