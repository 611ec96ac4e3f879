import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { GuestVm } from '../support/guest/guest-vm.js';

// One guest for the whole file: a TCG boot costs ~10-20 s on these machines.
describe('guest image boots under TCG to a usable root shell', () => {
  let vm: GuestVm | undefined;

  beforeAll(async () => {
    vm = await GuestVm.boot({ name: 'boot-test', net: { kind: 'none' } });
    console.log(`[boot-test] TCG boot to ready marker: ${vm.bootMs} ms`);
  }, 120_000);

  afterAll(async () => {
    await vm?.shutdown();
  });

  const guest = (): GuestVm => {
    if (!vm) throw new Error('guest did not boot');
    return vm;
  };

  it('runs the Debian 6.1 kernel', async () => {
    const r = await guest().run('uname -r');
    expect(r.status).toBe(0);
    expect(r.output).toMatch(/^6\.1\.\d+-\d+-amd64$/);
  });

  it("has Debian's iproute2 and bpftool with their libraries", async () => {
    const ip = await guest().run('ip -V');
    expect(ip.status).toBe(0);
    expect(ip.output).toMatch(/iproute2/);
    const bt = await guest().run('bpftool version');
    expect(bt.status).toBe(0);
    expect(bt.output).toMatch(/bpftool v\d+/);
    expect(bt.output).toMatch(/libbpf v1\./);
  });

  it('mounts bpffs at /sys/fs/bpf', async () => {
    const r = await guest().run('grep " /sys/fs/bpf bpf " /proc/mounts');
    expect(r.status).toBe(0);
  });

  it('loads virtio_net with its dependencies', async () => {
    const r = await guest().run('modprobe virtio_net && grep -E "^(virtio_net|net_failover|virtio_pci) " /proc/modules | cut -d" " -f1 | sort');
    expect(r.status).toBe(0);
    expect(r.output.split('\n')).toEqual(['net_failover', 'virtio_net', 'virtio_pci']);
  });

  it('reports a failing command status and keeps the shell usable', async () => {
    const bad = await guest().run('ls /does-not-exist');
    expect(bad.status).not.toBe(0);
    expect(bad.output).toMatch(/No such file/);
    expect((await guest().run('exit_code() { return 7; }; exit_code')).status).toBe(7);
    // ash drops the rest of the line on a syntax error at run time; the harness notices.
    const syntax = await guest().run(`eval 'if then'`);
    expect(syntax.status).toBe(2);
    expect(syntax.output).toMatch(/syntax error/);
    expect((await guest().run('echo still here')).output).toBe('still here');
  });

  it('passes quotes, multi-line and long commands through intact', async () => {
    const quoted = await guest().run(`printf '%s|' "a b" 'it'"'"'s' "\\$HOME"`);
    expect(quoted.output).toBe(`a b|it's|$HOME|`);
    const multi = await guest().run('for i in 1 2 3; do\n  echo "line $i"\ndone');
    expect(multi.output).toBe('line 1\nline 2\nline 3');
    const long = 'x'.repeat(3000);
    const r = await guest().run(`v=${long}; echo \${#v}`);
    expect(r).toEqual({ output: '3000', status: 0 });
  });

  it('serializes concurrent run() calls', async () => {
    const results = await Promise.all([1, 2, 3].map((i) => guest().run(`echo n${i}`)));
    expect(results.map((r) => r.output)).toEqual(['n1', 'n2', 'n3']);
  });
});
