// What the CLI commands print: sizes for people, and how a failed command ends.
/** A byte count for people: B, KiB, MiB or GiB with one decimal. */
export function formatBytes(n: number): string {
  return n >= 2 ** 30 ? `${(n / 2 ** 30).toFixed(1)} GiB` : n >= 1 << 20 ? `${(n / 2 ** 20).toFixed(1)} MiB` : n >= 1024 ? `${(n / 1024).toFixed(1)} KiB` : `${n} B`;
}

/** Ends a CLI command on an error: its message on stderr, exit status 1. */
export function fail(e: unknown): never {
  console.error(`vhost-xdp: ${(e as Error).message}`);
  process.exit(1);
}
