// One line per event, prefixed with the device name, so several devices in one process stay readable.
export type LogLevel = 'debug' | 'info' | 'warn' | 'error';

const order: Record<LogLevel, number> = { debug: 0, info: 1, warn: 2, error: 3 };
let threshold: LogLevel = (process.env.VHOST_XDP_LOG as LogLevel) in order ? (process.env.VHOST_XDP_LOG as LogLevel) : 'info';
let sink: (line: string) => void = (line) => process.stderr.write(line + '\n');

export function setLogLevel(level: LogLevel): void { threshold = level; }
export function setLogSink(fn: (line: string) => void): void { sink = fn; }

export interface Logger {
  debug(msg: string): void;
  info(msg: string): void;
  warn(msg: string): void;
  error(msg: string): void;
}

export function logger(scope: string): Logger {
  const emit = (level: LogLevel, msg: string) => {
    if (order[level] < order[threshold]) return;
    sink(`${new Date().toISOString()} ${level.padEnd(5)} [${scope}] ${msg}`);
  };
  return {
    debug: (m) => emit('debug', m),
    info: (m) => emit('info', m),
    warn: (m) => emit('warn', m),
    error: (m) => emit('error', m),
  };
}

/**
 * A log line something outside our control (a guest) can trigger at will: at most one per
 * `intervalMs`; the next one that passes says how many were left out meanwhile.
 */
export function rateLimited(emit: (msg: string) => void, intervalMs: number, now: () => number = Date.now): (msg: string) => void {
  let last = -Infinity;
  let skipped = 0;
  return (msg) => {
    const t = now();
    if (t - last < intervalMs) {
      skipped++;
      return;
    }
    last = t;
    emit(skipped > 0 ? `${msg} (${skipped} more such lines left out)` : msg);
    skipped = 0;
  };
}
