// Entry point of a datapath worker thread: one epoll loop over the kick eventfds and host queue
// fds of the queue pairs it serves, plus a control eventfd through which the main thread's
// synchronous requests arrive (received with receiveMessageOnPort, so the loop never yields).
import { workerData, parentPort, receiveMessageOnPort, type MessagePort } from 'node:worker_threads';
import { Epoll, EPOLLIN, eventfdDrain, eventfdSignal } from '../sys/libc.js';
import { GuestMemory } from '../memory/guest-memory.js';
import { SplitQueue } from '../virtio/split-queue.js';
import { openHostQueue } from '../ports/host-queue.js';
import type { HostQueue } from '../ports/port.js';
import type { VringConfig } from '../vhost-user/backend.js';
import { logger } from '../log.js';
import { closeBpfFd, progGetFdById } from '../sys/bpf/programs.js';
import { TestRunner } from '../sys/bpf/test-run.js';
import { OffloadBroker } from '../offload/broker.js';
import { validateQuotas } from '../offload/quotas.js';
import { ComposedProgram } from '../offload/compose.js';
import { xdpAttach, XDP_FLAGS_DRV_MODE } from '../sys/bpf/xdp.js';
import { RxPath, TxPath, BURST, type PathContext, type OffloadLink } from './queue-paths.js';
import { XskQueue, XskRxPath, XskTxPath } from './xsk-paths.js';
import { setBounceReceive } from '../ports/xsk.js';
import { C, COUNTERS } from './stats.js';
import { CTL_SEQ, CTL_STATUS, CTL_VALUE, type DatapathEvent, type DatapathRequest, type DatapathWorkerData, type FrameFormat, type OffloadInit, type OffloadMethod } from './datapath-messages.js';

const data = workerData as DatapathWorkerData & { port: MessagePort };
const log = logger(`${data.name}/datapath`);
const ctl = new Int32Array(data.control);
const stats = new Float64Array(data.stats);
const epoll = new Epoll(128);
const TOKEN_CONTROL = 1 << 16;
const TOKEN_KICK = 2 << 16;
const TOKEN_HOST = 3 << 16;

let memory: GuestMemory | null = null;
let format: FrameFormat = { eventIdx: false, headerLength: 12, mergeable: false, maxFrame: 1518 + 12, txOffloads: 0 };
const hosts = new Map<number, HostQueue>();
// Tap queues use the iovec paths; AF_XDP queues the ring paths (same process() contract).
interface Running { cfg: VringConfig; rx?: RxPath | XskRxPath; tx?: TxPath | XskTxPath; }
const vrings = new Map<number, Running>();
let exiting = false;
/** Sequence number of the control request being handled (object results carry it). */
let currentSeq = 0;
/** The offloaded program, shared by every RX path of this worker. */
let runner: { fd: number; runner: TestRunner } | null = null;
/** Offload channel state per pair, and responses waiting for receive buffers. */
const offloadPairs = new Map<number, OffloadLink & { pending: Uint8Array[] }>();
/** The broker of this worker's offload pair: requests are handled here, inline, no thread hop. */
let broker: OffloadBroker | null = null;

function offloadLink(pair: number, b: OffloadBroker): OffloadLink & { pending: Uint8Array[] } {
  const link: OffloadLink & { pending: Uint8Array[] } = {
    claimed: b.claimed, pending: [],
    post: (message) => {
      const reply = b.handle(message);
      // Bounded: a guest that never posts receive buffers cannot make us hoard responses.
      if (link.pending.length >= 64) link.pending.shift();
      link.pending.push(reply);
      flushReplies(pair);
    },
  };
  return link;
}

/** The claim moved: a claimed pair carries only offload messages, and the tap stops feeding it. */
function claimChanged(pair: number, claimed: boolean): void {
  const link = offloadPairs.get(pair);
  if (link) link.claimed = claimed;
  try {
    hosts.get(pair)?.setAttached?.(!claimed);
  } catch (e) {
    log.warn(`pair ${pair}: ${(e as Error).message}`);
  }
  const rx = vrings.get(pair * 2)?.rx;
  if (rx instanceof RxPath) rx.runner = claimed ? null : runner?.runner ?? null;
  if (vrings.has(pair * 2)) hostArmed(pair, !claimed);
  log.info(`offload pair ${pair} ${claimed ? 'claimed by the guest' : 'released: back to data use'}`);
}

function publishState(): void {
  if (!broker) return;
  const ev: DatapathEvent = { kind: 'offload-state', claimed: broker.claimed, program: broker.program };
  parentPort!.postMessage(ev);
}

function startBroker(pair: number, init: OffloadInit): void {
  if (broker) throw new Error('this worker already runs an offload broker');
  const b = OffloadBroker.restore({ device: init.device, pinDir: init.pinDir, log: (l) => log.info(l) });
  broker = b;
  if (b.claimed) log.info(`re-adopted pinned offload state from ${init.pinDir}`);
  offloadPairs.set(pair, offloadLink(pair, b));
  b.onClaimChange((claimed) => { claimChanged(pair, claimed); publishState(); });
  // Our own fd of the program: the broker closes its fd when the program changes.
  if (init.xsk) {
    // AF_XDP: the guest program runs in the kernel at the veth's ingress, composed with the
    // redirect to this device's sockets; nothing runs per frame in JavaScript.
    const xsk = init.xsk;
    b.onProgramChange(() => { attachComposed(b, xsk); publishState(); });
    attachComposed(b, xsk);
  } else {
    b.onProgramChange((p) => { setProgram(p ? progGetFdById(p.id) : -1); publishState(); });
    const p = b.program;
    setProgram(p ? progGetFdById(p.id) : -1);
  }
  claimChanged(pair, b.claimed);
  publishState();
}

let composed: ComposedProgram | null = null;

function attachComposed(b: OffloadBroker, xsk: NonNullable<OffloadInit['xsk']>): void {
  const src = b.programSource;
  let next: ComposedProgram | null = null;
  try {
    if (src) next = ComposedProgram.load(src.code, { xskMapFd: xsk.xskMapFd, name: 'vx_xsk_guest' }, src.license);
    xdpAttach(xsk.peerIfindex, next ? next.fd : xsk.redirectFd, XDP_FLAGS_DRV_MODE);
  } catch (e) {
    next?.close();
    log.error(`offloaded program not attached to the veth: ${(e as Error).message}`);
    return;
  }
  // The attached program holds its own reference: the previous one can go.
  composed?.close();
  composed = next;
  try {
    setBounceReceive(xsk, next !== null);
  } catch (e) {
    log.warn(`host end of the veth: ${(e as Error).message} (XDP_TX bounces may not reach the host)`);
  }
  log.info(next ? `composed program ${next.id} (guest program + AF_XDP redirect) attached natively` : 'plain AF_XDP redirect attached');
}

function brokerCall(method: OffloadMethod, arg: unknown): unknown {
  if (!broker) throw new Error('no offload broker on this worker');
  switch (method) {
    case 'show': return broker.show();
    case 'quotas': return broker.quotas();
    case 'setQuotas': return broker.setQuotas(validateQuotas((arg ?? {}) as Record<string, unknown>));
    case 'detach': return broker.detach();
    case 'reset':
      if (broker.claimed) broker.reset(String(arg ?? 'reset'));
      return true;
  }
}

function setProgram(progFd: number): void {
  if (runner) {
    runner.runner.dispose();
    closeBpfFd(runner.fd);
    runner = null;
  }
  if (progFd >= 0) runner = { fd: progFd, runner: new TestRunner(progFd) };
  for (const v of vrings.values()) if (v.rx instanceof RxPath) v.rx.runner = offloadPairs.get(v.cfg.index >> 1)?.claimed ? null : runner?.runner ?? null;
}

/** Sends queued offload responses of a pair while the guest has buffers for them. */
function flushReplies(pair: number): void {
  const link = offloadPairs.get(pair);
  const rx = vrings.get(pair * 2)?.rx;
  if (!link || !(rx instanceof RxPath)) return;
  while (link.pending.length > 0 && rx.deliverMessage(link.pending[0]!)) link.pending.shift();
}

function context(pair: number): PathContext {
  return {
    name: data.name, stats, pair,
    onBroken: (index, why) => {
      log.warn(`vring ${index} stopped: ${why} (device needs reset)`);
      const v = vrings.get(index);
      if (v && v.cfg.errFd >= 0) eventfdSignal(v.cfg.errFd);
    },
  };
}

function hostArmed(pair: number, armed: boolean): void {
  const h = hosts.get(pair);
  if (!h) return;
  epoll.modify(h.fd, armed ? EPOLLIN : 0, TOKEN_HOST | pair);
}

function start(cfg: VringConfig): void {
  if (!memory) throw new Error(`vring ${cfg.index}: no memory table`);
  const pair = cfg.index >> 1;
  if (!data.pairs.includes(pair)) throw new Error(`vring ${cfg.index} is not served by this worker`);
  const host = hosts.get(pair);
  if (!host) throw new Error(`vring ${cfg.index}: no host queue for pair ${pair}`);
  const q = new SplitQueue(memory, { size: cfg.size, descGpa: cfg.descGpa, availGpa: cfg.availGpa, usedGpa: cfg.usedGpa },
    { eventIdx: format.eventIdx, name: `${data.name}/q${cfg.index}` });
  q.lastAvailIdx = cfg.lastAvailIdx;
  // Resume where the guest's used ring is (after a reconnect the frontend only tells us avail).
  const usedRegion = memory.regionFor(cfg.usedGpa, 4);
  q.usedIdx = usedRegion.view.getUint16(cfg.usedGpa - usedRegion.gpa + 2, true);
  const run: Running = { cfg };
  if (host instanceof XskQueue) {
    // AF_XDP: the kernel writes into and reads from guest buffers; programs run in the kernel.
    if (cfg.index % 2 === 0) {
      run.rx = new XskRxPath(q, cfg.index, cfg.callFd, context(pair), host, memory, format.headerLength);
      q.setKickNotification(false);
    } else {
      run.tx = new XskTxPath(q, cfg.index, cfg.callFd, context(pair), host, memory, format.headerLength);
    }
  } else if (cfg.index % 2 === 0) {
    const rx = new RxPath(q, cfg.index, cfg.callFd, context(pair), host, memory, format.headerLength, format.mergeable, format.maxFrame);
    rx.runner = offloadPairs.get(pair)?.claimed ? null : runner?.runner ?? null;
    run.rx = rx;
    // Kicks on the receive queue matter only while we wait for buffers.
    q.setKickNotification(false);
  } else {
    const tx = new TxPath(q, cfg.index, cfg.callFd, context(pair), host, format.headerLength, memory);
    tx.offload = offloadPairs.get(pair) ?? null;
    tx.offloads = format.txOffloads;
    run.tx = tx;
  }
  epoll.add(cfg.kickFd, EPOLLIN, TOKEN_KICK | cfg.index);
  vrings.set(cfg.index, run);
  if (run.rx) hostArmed(pair, !offloadPairs.get(pair)?.claimed);
  serve(cfg.index);
}

function stop(index: number): number {
  const run = vrings.get(index);
  if (!run) throw new Error(`vring ${index} is not running`);
  epoll.remove(run.cfg.kickFd);
  vrings.delete(index);
  if (run.rx) hostArmed(index >> 1, false);
  const last = run.rx ? run.rx.stop() : run.tx!.stop();
  run.rx?.free();
  run.tx?.free();
  return last;
}

function setMemory(next: GuestMemory | null): void {
  // The session stops every ring before it changes memory; a ring still running here would
  // read regions about to be unmapped, so stop it rather than trust that.
  for (const i of [...vrings.keys()]) {
    log.warn(`vring ${i} still running at a memory change; stopping it`);
    stop(i);
  }
  memory = next;
}

/** Forgets a pair's host queue; it is closed even when epoll no longer holds its fd. */
function closeHost(pair: number): void {
  const old = hosts.get(pair);
  if (!old) return;
  hosts.delete(pair);
  try {
    epoll.remove(old.fd);
  } finally {
    old.close?.();
  }
}

function handle(req: DatapathRequest): number {
  switch (req.op) {
    case 'memory':
      setMemory(req.regions.length > 0 ? new GuestMemory(req.regions) : null);
      return 0;
    case 'host': {
      closeHost(req.pair);
      if (req.cfg) {
        const h = openHostQueue(req.cfg);
        try {
          epoll.add(h.fd, vrings.has(req.pair * 2) ? EPOLLIN : 0, TOKEN_HOST | req.pair);
        } catch (e) {
          h.close?.();
          throw e;
        }
        hosts.set(req.pair, h);
      }
      return 0;
    }
    case 'format':
      format = req.format;
      return 0;
    case 'start':
      start(req.vring);
      return 0;
    case 'stop':
      return stop(req.index);
    case 'call': {
      const run = vrings.get(req.index);
      if (run) {
        (run.rx ?? run.tx)!.callFd = req.fd;
        // Used entries may have been published while the old fd was QEMU's masked one; with
        // EVENT_IDX the guest would then wait forever. One spurious interrupt is harmless.
        if (req.fd >= 0) eventfdSignal(req.fd);
      }
      return 0;
    }
    case 'xdp':
      setProgram(req.progFd);
      return 0;
    case 'offload':
      startBroker(req.pair, req.init);
      return 0;
    case 'offload-call':
      data.port.postMessage({ seq: currentSeq, result: brokerCall(req.method, req.arg) });
      return 0;
    case 'exit':
      setProgram(-1);
      composed?.close();
      composed = null;
      broker?.close();
      broker = null;
      for (const i of [...vrings.keys()]) stop(i);
      // Queues the worker opened itself (a packet socket) are its to close.
      for (const pair of [...hosts.keys()]) closeHost(pair);
      exiting = true;
      return 0;
  }
}

function drainControl(): void {
  eventfdDrain(data.controlFd);
  for (;;) {
    const m = receiveMessageOnPort(data.port);
    if (!m) return;
    const { seq, req } = m.message as { seq: number; req: DatapathRequest };
    currentSeq = seq;
    let status = 0;
    let value = 0;
    try {
      value = handle(req);
    } catch (e) {
      status = 1;
      data.port.postMessage({ seq, error: (e as Error).message });
    }
    Atomics.store(ctl, CTL_STATUS, status);
    Atomics.store(ctl, CTL_VALUE, value);
    Atomics.store(ctl, CTL_SEQ, seq);
    Atomics.notify(ctl, CTL_SEQ);
  }
}

/** Runs one vring until its burst is used; returns true when it has more work. */
function serve(index: number): boolean {
  const run = vrings.get(index);
  if (!run) return false;
  if (run.tx) return run.tx.process(BURST, !data.busyPoll);
  const rx = run.rx!;
  if (offloadPairs.get(index >> 1)?.claimed) {
    // The offload channel: only responses go to the guest, and its buffer refills wake us.
    rx.queue.setKickNotification(true);
    flushReplies(index >> 1);
    return false;
  }
  const r = rx.process(BURST);
  if (r === 'starved' && !rx.starving) {
    rx.starving = true;
    hostArmed(index >> 1, false);
    rx.queue.setKickNotification(true);
    // Buffers may have arrived between the last pop and enabling kicks.
    if (rx.queue.availableCount() > 0) return wake(index);
  }
  return r === 'more';
}

function wake(index: number): boolean {
  const run = vrings.get(index);
  if (run?.rx && offloadPairs.get(index >> 1)?.pending.length) flushReplies(index >> 1);
  if (run?.rx?.starving && !offloadPairs.get(index >> 1)?.claimed) {
    run.rx.starving = false;
    run.rx.queue.setKickNotification(false);
    hostArmed(index >> 1, true);
  }
  return serve(index);
}

const pending = new Set<number>();

function onEvent(token: number): void {
  const kind = token & 0xffff0000;
  const index = token & 0xffff;
  if (kind === TOKEN_CONTROL) return drainControl();
  if (kind === TOKEN_KICK) {
    const run = vrings.get(index);
    if (!run) return;
    eventfdDrain(run.cfg.kickFd);
    stats[(index >> 1) * COUNTERS.length + C.kicks]! += 1;
    if (wake(index)) pending.add(index);
    return;
  }
  if (kind === TOKEN_HOST) {
    if (serve(index * 2)) pending.add(index * 2);
  }
}

epoll.add(data.controlFd, EPOLLIN, TOKEN_CONTROL);
parentPort?.postMessage({ ready: true });

while (!exiting) {
  // Busy-poll spins on every running vring; otherwise sleep in epoll until something is ready.
  // AF_XDP completions arrive without a wakeup of ours: poll them every millisecond meanwhile.
  let inFlight = false;
  for (const v of vrings.values()) if (v.tx instanceof XskTxPath && v.tx.inFlight > 0) inFlight = true;
  const timeout = data.busyPoll || pending.size > 0 ? 0 : inFlight ? 1 : 1000;
  epoll.wait(timeout, onEvent);
  if (inFlight) for (const [i, v] of vrings) if (v.tx instanceof XskTxPath && v.tx.inFlight > 0 && v.tx.process(BURST, !data.busyPoll)) pending.add(i);
  if (data.busyPoll) {
    for (const i of vrings.keys()) serve(i);
  } else if (pending.size > 0) {
    const again = [...pending];
    pending.clear();
    for (const i of again) if (serve(i)) pending.add(i);
  }
}
epoll.close();
