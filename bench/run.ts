// `npm run bench [-- tap|offload|all] [--seconds N]`: throughput of vhost-xdp beside DPDK
// references measured in the same run (ratios matter, not absolute numbers: the machine is shared).
import { loadavg } from 'node:os';
import { measureDpdkTapReference, measureVhostXdpTap, measureDpdkAfXdpReference, measureVhostXdpXsk } from './reference-dpdk.js';
import { runOffloadBench } from './offload-bench.js';

const args = process.argv.slice(2);
const which = args.find((a) => !a.startsWith('--')) ?? 'all';
const secIdx = args.indexOf('--seconds');
const seconds = secIdx >= 0 ? Number(args[secIdx + 1]) : 5;
const json = args.includes('--json');
const results: Record<string, unknown> = { loadAvg1: loadavg()[0] };

function line(label: string, value: string, ref = ''): void {
  if (!json) console.log(`  ${label.padEnd(44)}${value.padStart(14)}${ref ? `   ${ref}` : ''}`);
}

if (which === 'tap' || which === 'all') {
  if (!json) console.log('tap port, 64-byte frames, DPDK virtio-user as the guest (Mpps)');
  const ref = await measureDpdkTapReference({ seconds });
  results.dpdkTap = ref;
  line('DPDK vhost PMD <-> tap PMD, guest->host', ref.guestToHostMpps.toFixed(3));
  line('DPDK vhost PMD <-> tap PMD, host->guest', ref.hostToGuestMpps.toFixed(3), `(offered ${ref.details.hostToGuest.offeredMpps?.toFixed(3)})`);
  const ours = await measureVhostXdpTap({ seconds });
  results.vhostXdpTap = ours;
  const ratio = (a: number, b: number) => (b > 0 ? `${(a / b).toFixed(2)}x DPDK` : 'n/a');
  line('vhost-xdp serve --port tap, guest->host', ours.guestToHostMpps.toFixed(3), `${ratio(ours.guestToHostMpps, ref.guestToHostMpps)} (target 0.8x)`);
  line('vhost-xdp serve --port tap, host->guest', ours.hostToGuestMpps.toFixed(3), `${ratio(ours.hostToGuestMpps, ref.hostToGuestMpps)} (offered ${ours.details.hostToGuest.offeredMpps?.toFixed(3)})`);
  line('1-min load average at start (2 cores)', String(ref.details.loadAvg1));
}

if (which === 'xsk' || which === 'all') {
  if (!json) console.log('xsk port (AF_XDP over guest RAM), 64-byte frames, DPDK virtio-user as the guest (Mpps)');
  const ref = await measureDpdkAfXdpReference({ seconds });
  results.dpdkAfXdp = ref;
  line('DPDK vhost PMD <-> af_xdp PMD (veth), guest->host', ref.guestToHostMpps.toFixed(3));
  line('DPDK vhost PMD <-> af_xdp PMD (veth), host->guest', ref.hostToGuestMpps.toFixed(3), `(offered ${ref.details.hostToGuest.offeredMpps?.toFixed(3)})`);
  const ours = await measureVhostXdpXsk({ seconds });
  results.vhostXdpXsk = ours;
  const ratio = (a: number, b: number) => (b > 0 ? `${(a / b).toFixed(2)}x DPDK` : 'n/a');
  line('vhost-xdp serve --port xsk, guest->host', ours.guestToHostMpps.toFixed(3), `${ratio(ours.guestToHostMpps, ref.guestToHostMpps)} (target 1.0x)`);
  line('vhost-xdp serve --port xsk, host->guest', ours.hostToGuestMpps.toFixed(3), `${ratio(ours.hostToGuestMpps, ref.hostToGuestMpps)} (offered ${ours.details.hostToGuest.offeredMpps?.toFixed(3)})`);
  const refB = ref.details.hostToGuestFloodOnBackendCore;
  const oursB = ours.details.hostToGuestFloodOnBackendCore;
  if (refB && oursB) {
    if (!json) console.log('  host->guest again with the flood on the backend\'s core instead of the guest\'s:');
    line('DPDK vhost PMD <-> af_xdp PMD (veth), host->guest', refB.mpps.toFixed(3), `(offered ${refB.offeredMpps?.toFixed(3)})`);
    line('vhost-xdp serve --port xsk, host->guest', oursB.mpps.toFixed(3), `${ratio(oursB.mpps, refB.mpps)} (offered ${oursB.offeredMpps?.toFixed(3)})`);
  }
}

/** When the drop side kept up with everything offered, the generator was the limit: say so. */
function generatorBound(r: Awaited<ReturnType<typeof runOffloadBench>>): string {
  const h = r.hostToGuest;
  return h.offloadDropPps >= 0.99 * h.offeredPps.dropped ? '; every offered frame was dropped: the generator is the limit, the ratio a lower bound' : '';
}

if (which === 'offload' || which === 'all') {
  if (!json) console.log('offload queue and XDP_DROP on the tap port (TS frontend as the guest)');
  const r = await runOffloadBench(Math.max(2, Math.round(seconds / 2)));
  results.offload = r;
  line('map ELEM_UPDATE round trips /s', String(r.singleUpdatesPerSec), 'target >= 20,000');
  line('map ELEM_LOOKUP round trips /s', String(r.singleLookupsPerSec));
  line(`batched element ops /s (batch ${r.batchSize})`, String(r.batchedElementOpsPerSec), 'target >= 200,000');
  line('host->guest delivered without offload (pps)', String(r.hostToGuest.deliveredPps), `(offered ${r.hostToGuest.offeredPps.delivered})`);
  line('host->guest dropped on host by XDP_DROP (pps)', String(r.hostToGuest.offloadDropPps), `(offered ${r.hostToGuest.offeredPps.dropped})`);
  line('offload effect (drop rate / delivery rate)', `${r.hostToGuest.ratio}x`, `RFC measured 5.2x${generatorBound(r)}`);
  if (!json) console.log('offload effect on the xsk port (program native in the kernel)');
  const x = await runOffloadBench(Math.max(2, Math.round(seconds / 2)), 'xsk');
  results.offloadXsk = x;
  line('host->guest delivered without offload (pps)', String(x.hostToGuest.deliveredPps), `(offered ${x.hostToGuest.offeredPps.delivered})`);
  line('host->guest dropped in the kernel by XDP_DROP (pps)', String(x.hostToGuest.offloadDropPps), `(offered ${x.hostToGuest.offeredPps.dropped})`);
  line('offload effect (drop rate / delivery rate)', `${x.hostToGuest.ratio}x`, `target >= 10x${generatorBound(x)}`);
}

if (json) console.log(JSON.stringify(results, null, 2));
process.exit(0);
