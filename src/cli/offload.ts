import type { Argv } from 'yargs';
import { callControl } from '../control/control-client.js';
import type { OffloadDetach, OffloadShow } from '../offload/broker.js';
import type { Quotas, QuotaUsage } from '../offload/quotas.js';
import type { OffloadHost, PinQuota } from '../service/device.js';
import { PIN_QUOTA_KEY } from '../service/service.js';
import { fail, formatBytes } from './output.js';

const QUOTA_OPTIONS: Record<string, keyof Quotas> = {
  'max-maps': 'maxMaps', 'max-map-memory': 'maxMapMemory', 'max-entries': 'maxEntries',
  'max-prog-insns': 'maxProgInsns', 'max-ops-per-sec': 'maxOpsPerSec', 'max-key-size': 'maxKeySize', 'max-value-size': 'maxValueSize',
  'max-object-bytes': 'maxObjectBytes',
};

/** The pinned-memory quota's flag (xsk ports). */
const PIN_FLAG = 'max-pinned-memory';

/** What quota.show / quota.set answer: broker quotas with --offload, pinnedMemory on xsk ports. */
interface QuotaReply { limits?: Quotas; usage?: QuotaUsage; pinnedMemory?: PinQuota; warnings?: string[] }

function printQuotas(q: QuotaReply): void {
  const rows: [string, string, string][] = !q.limits || !q.usage ? [] : [
    ['maps', String(q.usage.maps), String(q.limits.maxMaps)],
    ['map memory', formatBytes(q.usage.mapMemory), formatBytes(q.limits.maxMapMemory)],
    ['entries per map', String(q.usage.largestMapEntries), String(q.limits.maxEntries)],
    ['program insns', String(q.usage.progInsns), String(q.limits.maxProgInsns)],
    ['requests/s', String(q.usage.opsPerSec), String(q.limits.maxOpsPerSec)],
  ];
  const pin = q.pinnedMemory;
  if (pin) rows.push(['pinned memory', formatBytes(pin.used), formatBytes(pin.limit)]);
  console.log(`  ${'quota'.padEnd(18)}${'used'.padStart(12)}${'limit'.padStart(14)}`);
  for (const [k, u, l] of rows) console.log(`  ${k.padEnd(18)}${u.padStart(12)}${l.padStart(14)}`);
  if (pin) console.log(`  UMEM: ${pin.umem ?? 'none (no guest memory yet)'}; pin limit minimum ${formatBytes(pin.minimum)}`);
  for (const w of q.warnings ?? []) console.log(`  warning: ${w}`);
}

export function offloadCommands(y: Argv) {
  return y
    .command('offload <action> <name>', 'Show or detach what a guest offloaded (program, maps, verdict counters)', (a) => a
      .positional('action', { choices: ['show', 'detach'] as const, demandOption: true })
      .positional('name', { type: 'string', demandOption: true, describe: 'device name' })
      .option('json', { type: 'boolean', default: false }),
    async (argv) => {
      if (argv.action === 'detach') {
        const r = (await callControl(argv.control as string, 'offload.detach', { name: argv.name }).catch(fail)) as OffloadDetach;
        if (argv.json) return console.log(JSON.stringify(r));
        if (r.cancelledLoad) console.log(`${argv.name}: a pending object load was cancelled (the guest's OBJ_LOAD answers CANCELLED)`);
        const what = !r.detached ? 'no program was attached'
          : r.kind === 'object' ? 'object detached (its programs and maps went with it)' : 'program detached (maps kept)';
        console.log(`${argv.name}: ${what}`);
        return;
      }
      const r = (await callControl(argv.control as string, 'offload.show', { name: argv.name }).catch(fail)) as OffloadShow & { host: OffloadHost | null; verdicts: Record<string, number> };
      if (argv.json) return console.log(JSON.stringify(r, null, 2));
      console.log(`${r.device}: offload channel ${r.claimed ? `claimed since ${r.claimedAt}` : 'not claimed'}${r.pinDir ? `, pinned under ${r.pinDir}` : ''}; host BPF objects named ${r.bpfPrefix}_*`);
      if (r.program) {
        console.log(`  program '${r.program.name}' (guest) tag ${r.program.tag}, ${r.program.insns} insns, loaded ${r.program.loadedAt}, maps ${r.program.mapHandles.join(' ') || '-'}`);
        const h = r.host?.program;
        const runs = !h ? '' : h.runs === 'tap-test-run' ? `, run on each frame by the backend (tap-test-run: BPF_PROG_TEST_RUN${h.fallback ? `; not at the tap's tc egress: ${h.fallback.reason} [${h.fallback.code}]; the xsk port is the fast path for offload` : ''})`
          : h.runs === 'tap-tc' ? `; runs as host program id ${h.hostId} '${h.hostProgramName}' at the tap's tc egress (tap-tc: dropped frames never reach the backend)`
          : h.hostId !== null ? `; runs as host program id ${h.hostId} '${h.hostProgramName}' attached natively at the veth (xdp-native)` : '; not attached';
        console.log(`  host program id ${r.program.id} '${r.program.hostName}'${runs}`);
      } else {
        console.log('  no program');
      }
      console.log(`  verdicts: pass ${r.verdicts.pass}  drop ${r.verdicts.drop}  tx ${r.verdicts.tx}  aborted ${r.verdicts.aborted}`);
      for (const m of r.maps) console.log(`  map ${m.handle}: ${m.type} '${m.name}' key ${m.keySize} value ${m.valueSize}, ${m.entries}/${m.maxEntries} entries, ${formatBytes(m.bytes)} (host id ${m.id} '${m.hostName}')`);
      printQuotas(r.quotas);
    })
    .command('quota <action> <name>', 'Show or change a device\'s quotas: offload quotas (live; lowering below use refuses new allocations) and, on xsk ports, pinned guest memory (takes effect at the next memory table)', (a) => {
      let b = a
        .positional('action', { choices: ['show', 'set'] as const, demandOption: true })
        .positional('name', { type: 'string', demandOption: true })
        .option('json', { type: 'boolean', default: false });
      for (const flag of Object.keys(QUOTA_OPTIONS)) b = b.option(flag, { type: 'string', describe: flag === 'max-map-memory' ? 'bytes, or with a unit: 16MiB' : undefined });
      b = b.option(PIN_FLAG, { type: 'string', describe: 'xsk ports: guest RAM the UMEM may pin, bytes or with a unit: 1GiB (over it the guest runs bounce-only)' });
      return b.example('$0 quota set vm1 --max-maps 8 --max-map-memory 16MiB', '').example(`$0 quota set vm1 --${PIN_FLAG} 1GiB`, '');
    },
    async (argv) => {
      if (argv.action === 'show') {
        const r = (await callControl(argv.control as string, 'quota.show', { name: argv.name }).catch(fail)) as QuotaReply;
        if (argv.json) return console.log(JSON.stringify(r, null, 2));
        console.log(`${argv.name}:`);
        printQuotas(r);
        return;
      }
      const changes: Record<string, string> = {};
      for (const [flag, key] of Object.entries(QUOTA_OPTIONS)) if (argv[flag] !== undefined) changes[key] = String(argv[flag]);
      if (argv[PIN_FLAG] !== undefined) changes[PIN_QUOTA_KEY] = String(argv[PIN_FLAG]);
      if (Object.keys(changes).length === 0) fail(new Error(`quota set: give at least one of ${[...Object.keys(QUOTA_OPTIONS), PIN_FLAG].map((f) => `--${f}`).join(' ')}`));
      const r = (await callControl(argv.control as string, 'quota.set', { name: argv.name, changes }).catch(fail)) as QuotaReply;
      if (argv.json) return console.log(JSON.stringify(r, null, 2));
      console.log(`${argv.name}: quotas updated`);
      printQuotas(r);
    });
}
