import fs from 'node:fs';
import type { Argv } from 'yargs';
import { TAP_IO_MODES, type TapIoMode } from '../ports/port.js';
import { logger, setLogLevel, type LogLevel } from '../log.js';
import { Service } from '../service/service.js';
import type { MetricsServer } from '../service/metrics.js';
import { VxError } from '../errors.js';
import { defaultWorkers } from '../datapath/worker-pool.js';
import { parseCpuList, checkWorkerCpus, checkNiceRange, checkFifo, checkSlice, kernelKeepsSlice, DEFAULT_WORKER_SLICE_US, checkPriorityPermitted, moveOtherThreads, type WorkerPlacement } from '../datapath/placement.js';
import { formatCpuList } from '../sys/sched.js';
import { checkReplyPoll, DEFAULT_REPLY_POLL_US, REPLY_POLL_MAX_US } from '../net/reply-poll.js';
import { parseDeviceOption, validateSpec, parsePinLimit, pinLimitDefault, SpecError, type DeviceSpec } from '../service/device-spec.js';
import { socketFromSystemd, parseSocketMode, resolveGroup, backendCapabilities } from './conventions.js';
import type { SocketFiles } from '../service/device.js';

/** After SIGTERM, the longest a clean shutdown may take before the process exits anyway. */
const SHUTDOWN_DEADLINE_MS = 3000;

const log = logger('vhost-xdp');

/**
 * Whether the kernel keeps a worker slice, so status reports what the workers really run with.
 * Warned about only when asked for: the default is a hint that a kernel before 6.12 ignores, and
 * a kernel refusing the call (seccomp, an architecture without the syscall number) must not
 * stop serve for a default.
 */
function sliceHonoured(us: number, asked: boolean): boolean {
  try {
    if (kernelKeepsSlice(us)) return true;
    if (asked) log.warn(`--worker-slice ${us}: this kernel ignores a thread's own slice (Linux 6.12 on); workers run with the base slice`);
  } catch (e) {
    if (asked) throw e;
    log.debug(`no worker slice: ${(e as Error).message}`);
  }
  return false;
}

export function serveCommand(y: Argv) {
  return y.command(
    'serve',
    'Serve virtio-net devices over vhost-user sockets (QEMU or DPDK virtio-user connect to them)',
    (a) => a
      .option('socket', { type: 'string', alias: 'socket-path', describe: 'vhost-user socket path of the (single) device (--socket-path: QEMU\'s backend convention)' })
      .option('fd', { type: 'number', describe: 'serve the (single) device on this inherited listening unix socket instead of binding --socket (QEMU\'s backend convention; systemd socket activation passes fd 3 with LISTEN_FDS/LISTEN_PID, which serve picks up by itself)' })
      .option('socket-group', { type: 'string', describe: 'group (name or gid) of the vhost-user socket files serve binds, e.g. the group QEMU runs as (libvirt-qemu, kvm); serve must be a member of it' })
      .option('socket-mode', { type: 'string', default: '0600', describe: 'mode of the vhost-user socket files serve binds (0660 lets --socket-group connect)' })
      .option('print-capabilities', { type: 'boolean', describe: 'print the backend capabilities as JSON (vhost-user.json schema) and exit' })
      .option('port', { type: 'string', describe: 'host port: tap:IFNAME (created if missing, removed on exit if we created it), or xsk:IFNAME (a veth pair served over AF_XDP with guest RAM as the UMEM)' })
      .option('queues', { type: 'number', default: 1, describe: 'queue pairs offered to the guest' })
      .option('name', { type: 'string', default: 'dev0', describe: 'device name used in logs, status and the control API' })
      .option('client', { type: 'boolean', default: false, describe: 'connect to the socket (QEMU listens with server=on) and reconnect with backoff' })
      .option('workers', { type: 'number', describe: `datapath threads shared by every device (default: the cores this process may run on, ${defaultWorkers()} here); each queue pair runs on one, the least busy when it starts` })
      .option('busy-poll', { type: 'boolean', default: false, describe: 'datapath workers spin on their rings instead of sleeping in epoll (burns a core each, lowers latency)' })
      .option('reply-poll', { type: 'number', defaultDescription: `${DEFAULT_REPLY_POLL_US} (none with --busy-poll)`, describe: `after delivering frames to a guest, a worker looks at that queue pair's transmit ring for up to this many µs (0..${REPLY_POLL_MAX_US}; 0: off) before it sleeps, so an answer (a ping reply, an RPC response, an ACK) is taken without waiting for the guest's kick and a wake-up. The window adapts per queue pair: it grows while answers come just after it, and shrinks to nothing on traffic that does not answer. Not with --busy-poll, which polls anyway` })
      .option('worker-cpus', { type: 'string', describe: 'pin datapath worker i to the i-th CPU of LIST (taskset -c syntax: 1, 2-3,6; default --workers: one per CPU), like DPDK\'s -l or OVS\'s pmd-cpu-mask. serve\'s other threads (main loop, V8 compiler and GC) then run on the remaining CPUs serve may use, if any. Every CPU must be one serve may run on' })
      .option('worker-nice', { type: 'number', describe: 'nice value of each datapath worker thread (-20..19). Below serve\'s own it needs CAP_SYS_NICE or RLIMIT_NICE (systemd LimitNICE=); serve refuses to start without it [worker-priority-denied]' })
      .option('worker-slice', { type: 'number', describe: 'EEVDF slice of each datapath worker thread in µs (100..100000; 0: the kernel\'s base slice). A worker with a shorter slice than the thread running on its CPU preempts it when a frame wakes it, with no privilege (Linux 6.12 on; older kernels ignore it, and serve says so when it was asked for). Not with --worker-fifo', defaultDescription: `${DEFAULT_WORKER_SLICE_US} (none with --worker-fifo)` })
      .option('worker-fifo', { type: 'number', describe: 'run each datapath worker under SCHED_FIFO at this priority (1..99): woken, it preempts every normal thread on its CPU (kernel threads, compile jobs). Needs CAP_SYS_NICE or RLIMIT_RTPRIO (systemd LimitRTPRIO=); serve refuses to start without it [worker-priority-denied]. Not with --busy-poll or --worker-nice' })
      .option('tap-io', { type: 'string', choices: TAP_IO_MODES, default: 'auto', describe: 'how tap ports move frames: uring (io_uring, one system call per burst of guest frames), rw (readv/writev, one per frame) or auto (io_uring unless the host refuses it: io_uring_disabled, seccomp, old kernel; then rw, logged). status shows which' })
      .option('mtu', { type: 'number', describe: 'MTU applied to the port until the frontend sends NET_SET_MTU' })
      .option('device', { type: 'string', array: true, describe: 'more devices: name=N,socket=PATH,port=tap:IF[,queues=N,client=1,mtu=N,offload=1,pin-dir=DIR,pin-limit=SIZE] (repeatable)' })
      .option('config', { type: 'string', describe: 'JSON file: {"devices":[{name,socket,port,queues,...}], "control": PATH}' })
      .option('offload', { type: 'boolean', default: false, describe: 'offer one more queue pair as the XDP offload channel (docs/offload-protocol.md); start QEMU with queues=N+1' })
      .option('pin-dir', { type: 'string', describe: 'with --offload: pin offloaded programs and maps under DIR/<device>/ so a restarted backend re-adopts them (a bpffs directory)' })
      .option('pin-limit', { type: 'string', describe: 'xsk ports: most guest RAM one device may pin for its zero-copy UMEM (512MiB, 4GiB; default 4GiB). A guest over it runs bounce-only (every frame copied). Change it live with `quota set NAME --max-pinned-memory SIZE`' })
      .option('control', { type: 'string', describe: 'control API unix socket (ws), mode 0600; used by status/stats' })
      .option('metrics', { type: 'string', describe: 'serve Prometheus metrics at http://HOST:PORT/metrics (PORT alone: loopback 127.0.0.1; off by default). docs/metrics.md' })
      .option('log-level', { type: 'string', choices: ['debug', 'info', 'warn', 'error'], default: 'info' })
      .example('$0 serve --socket /tmp/vx0.sock --port tap:vx0 --queues 2', 'one device; start QEMU with -chardev socket,path=/tmp/vx0.sock')
      .example('$0 serve --device name=a,socket=/tmp/a.sock,port=tap:vxa --device name=b,socket=/tmp/b.sock,port=tap:vxb --control /tmp/vx.ctl', 'two devices in one process'),
    async (argv) => {
      setLogLevel(argv['log-level'] as LogLevel);
      if (argv['print-capabilities']) {
        // Also caught in main.ts before any other option is looked at.
        console.log(JSON.stringify(backendCapabilities()));
        process.exit(0);
      }
      let specs: DeviceSpec[];
      let files: SocketFiles = {};
      let control = argv.control ?? null;
      const placement: WorkerPlacement = {};
      const replyPoll = argv['reply-poll'];
      try {
        const pinLimit = argv['pin-limit'] === undefined ? undefined : parsePinLimit(argv['pin-limit'], '--pin-limit');
        const defaults = { queues: argv.queues, client: argv.client, mtu: argv.mtu, offload: argv.offload, pinDir: argv['pin-dir'], pinLimit, tapIo: argv['tap-io'] as TapIoMode };
        if (argv.workers !== undefined && (!Number.isInteger(argv.workers) || argv.workers < 1 || argv.workers > 256)) {
          throw new SpecError('bad-workers', `--workers ${argv.workers} outside 1..256`);
        }
        if (argv['worker-cpus'] !== undefined) {
          placement.cpus = parseCpuList(argv['worker-cpus']);
          checkWorkerCpus(placement.cpus);
        }
        if (replyPoll !== undefined) {
          checkReplyPoll(replyPoll);
          if (argv['busy-poll'] && replyPoll > 0) throw new SpecError('bad-reply-poll', '--reply-poll with --busy-poll: a busy-polling worker looks at its rings all the time; choose one');
        }
        if (argv['worker-nice'] !== undefined) {
          checkNiceRange(argv['worker-nice']);
          placement.nice = argv['worker-nice'];
        }
        if (argv['worker-fifo'] !== undefined) {
          checkFifo(argv['worker-fifo'], argv['busy-poll'], placement.nice);
          placement.fifo = argv['worker-fifo'];
        }
        if (argv['worker-slice'] !== undefined) {
          checkSlice(argv['worker-slice'], placement.fifo);
          placement.slice = argv['worker-slice'];
        } else if (placement.fifo === undefined) {
          placement.slice = DEFAULT_WORKER_SLICE_US;
        }
        specs = [];
        if (argv.config) {
          const cfg = JSON.parse(fs.readFileSync(argv.config, 'utf8')) as { devices?: Partial<DeviceSpec>[]; control?: string };
          for (const d of cfg.devices ?? []) {
            specs.push(validateSpec({ ...defaults, name: '', socket: '', port: '', ...d, pinLimit: d.pinLimit ?? pinLimitDefault(d.port ?? '', pinLimit) } as DeviceSpec));
          }
          control ??= cfg.control ?? null;
        }
        // An inherited listening socket: --fd N, or fd 3 from systemd socket activation.
        const activated = socketFromSystemd();
        const listenFd = argv.fd ?? activated ?? undefined;
        if (listenFd !== undefined) {
          if (argv.socket) throw new SpecError('fd-with-socket', `--fd ${listenFd}${argv.fd === undefined ? ' (LISTEN_FDS)' : ''} and --socket are incompatible: the socket is inherited`);
          if (!argv.port) throw new SpecError('socket-without-port', '--fd and --port go together');
          specs.push(validateSpec({ ...defaults, name: argv.name, socket: `fd:${listenFd}`, listenFd, port: argv.port }));
        } else if (argv.socket || argv.port) {
          if (!argv.socket || !argv.port) throw new SpecError('socket-without-port', '--socket and --port go together');
          specs.push(validateSpec({ ...defaults, name: argv.name, socket: argv.socket, port: argv.port }));
        }
        files = { mode: parseSocketMode(argv['socket-mode']), group: argv['socket-group'] === undefined ? undefined : resolveGroup(argv['socket-group']) };
        for (const d of argv.device ?? []) specs.push(parseDeviceOption(d, defaults));
        if (specs.length === 0) throw new SpecError('nothing-to-serve', 'nothing to serve: give --socket and --port, --device, or --config');
      } catch (e) {
        const code = e instanceof VxError ? `[${e.code}] ` : '';
        console.error(`vhost-xdp serve: ${code}${(e as Error).message}`);
        process.exit(2);
      }
      let svc: Service;
      let metrics: MetricsServer | null = null;
      try {
        // prom-client is loaded only when metrics are asked for: it costs every process megabytes.
        const m = argv.metrics === undefined ? null : await import('../service/metrics.js');
        const metricsAt = m ? m.parseMetricsAddress(argv.metrics!) : null;
        checkPriorityPermitted(placement);
        if (placement.slice && !sliceHonoured(placement.slice, argv['worker-slice'] !== undefined)) placement.slice = undefined;
        const rest = placement.cpus ? moveOtherThreads(placement.cpus) : null;
        if (placement.cpus) log.info(`datapath workers on CPU ${formatCpuList(placement.cpus)}; other threads ${rest ? `on ${formatCpuList(rest)}` : 'share them (no other CPU allowed)'}`);
        // Not refused: on a quiet host the shared CPU is what gave the bench its tail. But a
        // flood keeps a real-time worker running, and normal threads beside it then get only
        // what RT throttling leaves (5 % of each second by default), vhost-user replies included.
        if (placement.fifo !== undefined && !rest) log.warn(`--worker-fifo ${placement.fifo} without a CPU of the workers' own (--worker-cpus with another CPU left): under sustained load serve's main loop gets only what real-time throttling leaves`);
        svc = await Service.start(specs, control, { workers: argv.workers, busyPoll: argv['busy-poll'], replyPollUs: replyPoll, placement }, files);
        if (m && metricsAt) {
          const s = svc;
          metrics = await m.MetricsServer.listen(metricsAt, () => s.devices.values()).catch(async (e) => { await s.stop(); throw e; });
        }
      } catch (e) {
        // The stable code first, for scripts; the message names the path, the owner, the fix.
        const code = e instanceof VxError ? `[${e.code}] ` : '';
        console.error(`vhost-xdp serve: ${code}${(e as Error).message}`);
        process.exit(1);
      }
      // The backend conventions: end as quickly and cleanly as possible on SIGTERM (a management
      // layer follows up with SIGKILL after a few seconds). A clean stop that hangs is cut short.
      const shutdown = (sig: string) => {
        log.info(`${sig}: shutting down`);
        svc.abandonPorts(false);
        setTimeout(() => {
          log.error(`shutdown took longer than ${SHUTDOWN_DEADLINE_MS} ms: exiting anyway`);
          svc.abandonPorts(true);
          process.exit(1);
        }, SHUTDOWN_DEADLINE_MS).unref();
        void (metrics?.close() ?? Promise.resolve()).then(() => svc.stop()).then(() => process.exit(0), (e: unknown) => {
          log.error(`shutdown: ${(e as Error).message}`);
          process.exit(1);
        });
      };
      process.once('SIGINT', () => shutdown('SIGINT'));
      process.once('SIGTERM', () => shutdown('SIGTERM'));
      // One line on stdout that scripts can wait for.
      console.log(`vhost-xdp ready: ${specs.map((s) => `${s.name} ${s.client ? 'client' : 'server'} ${s.socket} ${s.port} queues=${s.queues}`).join('; ')}${control ? `; control ${control}` : ''}`);
    },
  );
}
