import type { Argv } from 'yargs';
import { callControl, DEFAULT_CONTROL_PATH } from '../control/control-client.js';
import { fail, formatBytes } from './output.js';
import type { DeviceStatus } from '../service/device.js';

export function inspectCommands(y: Argv) {
  return y
    .option('control', { type: 'string', default: DEFAULT_CONTROL_PATH, describe: 'control API socket of the running serve', global: true })
    .command('status', 'Show devices, connection state and negotiated features', (a) => a.option('json', { type: 'boolean', default: false }),
      async (argv) => {
        const r = (await callControl(argv.control, 'status').catch(fail)) as { pid: number; devices: DeviceStatus[] };
        if (argv.json) return console.log(JSON.stringify(r, null, 2));
        console.log(`vhost-xdp pid ${r.pid}, ${r.devices.length} device(s)`);
        for (const d of r.devices) {
          console.log(`${d.name}: ${d.connected ? 'connected' : 'waiting'} (${d.mode} ${d.socket}), port ${d.port.kind}:${d.port.ifname}, ${d.queuePairs} pair(s), mtu ${d.mtu}`);
          console.log(`  running vrings: ${d.runningVrings.join(' ') || '-'}; connections so far ${d.connections}; refused requests ${d.refusedRequests}`);
          if (d.queuePairs > 1) console.log(`  host traffic to pair(s) ${d.hostPairs.join(' ')} (the others are not enabled by the guest, or reserved)`);
          if (d.features.length) console.log(`  features ${d.featureBits}: ${d.features.join(' ')}`);
          if (d.port.io) {
            console.log(`  tap I/O: ${d.port.io.mode === 'uring' ? 'io_uring (guest->host writes batched per burst)' : `readv/writev (${d.port.io.reason})`}`);
          }
          if (d.offload) {
            const o = d.offload;
            console.log(`  offload: pair ${o.pair} ${o.claimed ? 'claimed' : 'not claimed'}; ${o.program === null ? 'no program' : `program ${o.program} runs ${o.runs ?? '?'}`}`);
          }
          if (d.port.pinLimitBytes !== null) {
            console.log(`  umem: ${d.port.umem ?? 'none (no guest memory yet)'}; pinned ${formatBytes(d.port.pinnedBytes)} of ${formatBytes(d.port.pinLimitBytes)} allowed`);
          }
        }
      })
    .command('stats [name]', 'Per-queue datapath counters', (a) => a.positional('name', { type: 'string' }).option('json', { type: 'boolean', default: false }),
      async (argv) => {
        const r = (await callControl(argv.control, 'stats', argv.name ? { name: argv.name } : {}).catch(fail)) as Array<{ name: string; total: Record<string, number>; pairs: Record<string, number>[]; port: Record<string, number> }>;
        if (argv.json) return console.log(JSON.stringify(r, null, 2));
        for (const d of r) {
          console.log(`${d.name}:`);
          const keys = Object.keys(d.total).filter((k) => d.total[k] !== 0);
          console.log(['  counter'.padEnd(16), 'total'.padStart(12), ...d.pairs.map((_, i) => `pair${i}`.padStart(12))].join(''));
          for (const k of keys) console.log([`  ${k}`.padEnd(16), String(d.total[k]).padStart(12), ...d.pairs.map((p) => String(p[k]).padStart(12))].join(''));
          console.log(`  port: rx ${d.port.rxPackets} pkts, tx ${d.port.txPackets} pkts, drops rx ${d.port.rxDropped} tx ${d.port.txDropped}`);
        }
      });
}
