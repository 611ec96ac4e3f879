// Just enough of systemd's unit file syntax to run a unit's command lines the way systemd would
// on a host where systemd is not PID 1: sections and keys (repeatable), specifiers (%i, %I, %t,
// %%), Environment=/EnvironmentFile=, and ExecStart= word splitting with $VAR / ${VAR}
// expansion and the executable prefixes (-, +, @, :, !). See systemd.unit(5), systemd.service(5).
import fs from 'node:fs';

export type Unit = Map<string, Map<string, string[]>>;

export function parseUnit(text: string): Unit {
  const unit: Unit = new Map();
  let section: Map<string, string[]> | null = null;
  const lines = text.replace(/\\\n/g, ' ').split('\n');
  for (const raw of lines) {
    const line = raw.trim();
    if (line === '' || line.startsWith('#') || line.startsWith(';')) continue;
    const sec = /^\[(.+)\]$/.exec(line);
    if (sec) {
      section = new Map();
      unit.set(sec[1]!, section);
      continue;
    }
    const i = line.indexOf('=');
    if (i < 0 || !section) throw new Error(`unit: cannot parse '${line}'`);
    const key = line.slice(0, i).trim();
    const value = line.slice(i + 1).trim();
    section.set(key, [...(section.get(key) ?? []), value]);
  }
  return unit;
}

export function values(unit: Unit, section: string, key: string): string[] {
  return unit.get(section)?.get(key) ?? [];
}

/** The one value of a key (the last assignment wins, as in systemd). */
export function value(unit: Unit, section: string, key: string): string | undefined {
  const v = values(unit, section, key);
  return v[v.length - 1];
}

/** Specifiers of a template instance (systemd.unit(5) "Specifiers"); %t is the system runtime dir. */
export function expandSpecifiers(text: string, instance: string): string {
  return text.replace(/%([%iIt])/g, (_m, c: string) => (c === '%' ? '%' : c === 't' ? '/run' : instance));
}

/** Words of a command line, quotes honoured (systemd's extract_first_word with quotes). */
function words(text: string): string[] {
  const out: string[] = [];
  const re = /"((?:[^"\\]|\\.)*)"|'([^']*)'|(\S+)/g;
  for (let m = re.exec(text); m; m = re.exec(text)) out.push(m[1] ?? m[2] ?? m[3]!);
  return out;
}

/** Environment= values (each may hold several quoted VAR=value words) and EnvironmentFile= files. */
export function unitEnvironment(unit: Unit, instance: string): Record<string, string> {
  const env: Record<string, string> = {};
  for (const v of values(unit, 'Service', 'Environment')) {
    for (const w of words(expandSpecifiers(v, instance))) {
      const i = w.indexOf('=');
      if (i > 0) env[w.slice(0, i)] = w.slice(i + 1);
    }
  }
  for (const v of values(unit, 'Service', 'EnvironmentFile')) {
    const optional = v.startsWith('-');
    const file = expandSpecifiers(optional ? v.slice(1) : v, instance);
    if (!fs.existsSync(file)) {
      if (optional) continue;
      throw new Error(`EnvironmentFile ${file} is missing`);
    }
    for (const line of fs.readFileSync(file, 'utf8').split('\n')) {
      const m = /^\s*([A-Za-z_][A-Za-z0-9_]*)=(.*)$/.exec(line);
      if (m) env[m[1]!] = m[2]!.replace(/^"(.*)"$/, '$1');
    }
  }
  return env;
}

export interface Command {
  argv: string[];
  /** '+': run with full privileges (no User=, no capability limits). */
  privileged: boolean;
  /** '-': a failure is ignored. */
  ignoreFailure: boolean;
}

/**
 * One Exec*= line as systemd runs it: specifiers, then `${VAR}` inside a word and `$VAR` as a
 * word of its own split on whitespace (systemd.service(5) "Command lines").
 */
export function commandLine(line: string, instance: string, env: Record<string, string>): Command {
  let text = expandSpecifiers(line, instance);
  let privileged = false;
  let ignoreFailure = false;
  for (;;) {
    const c = text[0];
    if (c === '+') privileged = true;
    else if (c === '-') ignoreFailure = true;
    else if (c !== '@' && c !== ':' && c !== '!') break;
    text = text.slice(1);
  }
  const argv: string[] = [];
  for (const w of words(text)) {
    const whole = /^\$([A-Za-z_][A-Za-z0-9_]*)$/.exec(w);
    if (whole) {
      argv.push(...(env[whole[1]!] ?? '').split(/\s+/).filter(Boolean));
      continue;
    }
    argv.push(w.replace(/\$\{([A-Za-z_][A-Za-z0-9_]*)\}/g, (_m, n: string) => env[n] ?? ''));
  }
  return { argv, privileged, ignoreFailure };
}

/** `CAP_NET_ADMIN CAP_BPF` → ['net_admin', 'bpf'] (setpriv's spelling), over every assignment. */
export function capabilities(unit: Unit, key: string): string[] {
  return values(unit, 'Service', key).flatMap((v) => v.split(/\s+/)).filter(Boolean).map((c) => c.replace(/^CAP_/, '').toLowerCase());
}
