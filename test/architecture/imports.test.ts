// The layering rules of docs/architecture.md, checked over the source's import graph (type
// imports included): a rule broken by a new import fails here, not in review.
import { describe, test, expect } from 'vitest';
import fs from 'node:fs';
import path from 'node:path';
import { repoRoot } from '../support/backend.js';

function importGraph(root: string): Map<string, string[]> {
  const files: string[] = [];
  (function walk(d: string) {
    for (const e of fs.readdirSync(d, { withFileTypes: true })) {
      const p = path.join(d, e.name);
      if (e.isDirectory()) walk(p);
      else if (p.endsWith('.ts')) files.push(p);
    }
  })(root);
  const graph = new Map<string, string[]>();
  const rel = (p: string) => path.relative(repoRoot(), p);
  for (const f of files) {
    const deps: string[] = [];
    const src = fs.readFileSync(f, 'utf8');
    for (const m of src.matchAll(/(?:import|export)\s[^'";]*?from\s+'([^']+)'|import\s+'([^']+)'|import\(\s*'([^']+)'\s*\)/g)) {
      const spec = (m[1] ?? m[2] ?? m[3])!;
      if (spec.startsWith('.')) deps.push(rel(path.join(path.dirname(f), spec.replace(/\.js$/, '.ts'))));
    }
    graph.set(rel(f), deps);
  }
  return graph;
}

/** Strongly connected components with more than one file (or a self-import): import cycles. */
function cycles(graph: Map<string, string[]>): string[][] {
  let next = 0;
  const stack: string[] = [];
  const onStack = new Set<string>();
  const index = new Map<string, number>();
  const low = new Map<string, number>();
  const out: string[][] = [];
  const visit = (v: string): void => {
    index.set(v, next);
    low.set(v, next++);
    stack.push(v);
    onStack.add(v);
    for (const w of graph.get(v) ?? []) {
      if (!graph.has(w)) continue;
      if (!index.has(w)) {
        visit(w);
        low.set(v, Math.min(low.get(v)!, low.get(w)!));
      } else if (onStack.has(w)) {
        low.set(v, Math.min(low.get(v)!, index.get(w)!));
      }
    }
    if (low.get(v) !== index.get(v)) return;
    const comp: string[] = [];
    let w: string;
    do {
      w = stack.pop()!;
      onStack.delete(w);
      comp.push(w);
    } while (w !== v);
    if (comp.length > 1 || (graph.get(v) ?? []).includes(v)) out.push(comp);
  };
  for (const v of graph.keys()) if (!index.has(v)) visit(v);
  return out;
}

describe('layering of src/', () => {
  const graph = importGraph(path.join(repoRoot(), 'src'));

  test('no file in net/ imports AF_XDP or tap code: one RX and one TX path for every port', () => {
    const bad = [...graph].flatMap(([f, deps]) => (f.startsWith('src/net/') ? deps.filter((d) => d === 'src/sys/xsk.ts' || /^src\/ports\/(xsk|tap|fd-queue|packet-queue)/.test(d)).map((d) => `${f} -> ${d}`) : []));
    expect(bad).toEqual([]);
  });

  test('nothing in ports/ imports net/', () => {
    const bad = [...graph].flatMap(([f, deps]) => (f.startsWith('src/ports/') ? deps.filter((d) => d.startsWith('src/net/')).map((d) => `${f} -> ${d}`) : []));
    expect(bad).toEqual([]);
  });

  test('sys/ and memory/ know nothing of the layers built on them', () => {
    const bad = [...graph].flatMap(([f, deps]) => (/^src\/(sys|memory)\//.test(f)
      ? deps.filter((d) => /^src\/(vhost-user|virtio|net|ports|datapath|offload|control|service|cli)\//.test(d)).map((d) => `${f} -> ${d}`)
      : []));
    expect(bad).toEqual([]);
  });

  test('no import cycles', () => {
    expect(cycles(graph)).toEqual([]);
  });
});
