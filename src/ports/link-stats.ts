import fs from 'node:fs';

function readCounter(name: string, counter: string): number {
  try {
    return Number(fs.readFileSync(`/sys/class/net/${name}/statistics/${counter}`, 'utf8'));
  } catch {
    return 0;
  }
}

/** The kernel's counters of a host interface (0 for those it does not have). */
export function linkStats(ifname: string) {
  const c = (k: string) => readCounter(ifname, k);
  return {
    rxPackets: c('rx_packets'), txPackets: c('tx_packets'), rxBytes: c('rx_bytes'), txBytes: c('tx_bytes'),
    rxDropped: c('rx_dropped'), txDropped: c('tx_dropped'),
  };
}
