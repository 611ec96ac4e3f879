// Entry point of a datapath worker thread: one epoll loop over the kick eventfds and host queue
// fds of every queue pair the pool assigned here, whatever device they belong to, plus a
// control eventfd through which the main thread's synchronous requests arrive (received with
// receiveMessageOnPort, between bursts, so the loop never yields to the event loop).
import { workerData, parentPort, receiveMessageOnPort, type MessagePort } from 'node:worker_threads';
import { Epoll, EPOLLIN, eventfdDrain } from '../sys/libc.js';
import { logger } from '../log.js';
import { DeviceQueues } from '../net/device-queues.js';
import type { Watcher } from './watcher.js';
import { applyWorkerPlacement } from './placement.js';
import { gettid } from '../sys/sched.js';
import { CTL_SEQ, CTL_STATUS, CTL_TID, CTL_VALUE, type DataAnswer, type WorkerData, type WorkerRequest } from './messages.js';

const data = workerData as WorkerData & { port: MessagePort };
const log = logger(data.name);
const ctl = new Int32Array(data.control);
const tid = gettid();
Atomics.store(ctl, CTL_TID, tid);
/**
 * Why this worker serves nothing: it could not take its CPU or priority (serve checked both at
 * start, but a cpuset or rlimit can change since). Every request but exit is answered with it,
 * so the queue start that needed the worker fails with the reason; a worker that threw here
 * instead would leave the main thread, blocked in its synchronous request, to time out.
 */
let refusal: string | null = null;
try {
  applyWorkerPlacement(tid, data.index, data.placement);
} catch (e) {
  refusal = `cannot take its CPU or priority: ${(e as Error).message}`;
}
const epoll = new Epoll(256);
const TOKEN_CONTROL = 0;

/** Token → what to run when its fd is ready; tokens are reused once their fd is removed. */
const handlers: ((() => void) | null)[] = [null];
const freeTokens: number[] = [];
const tokenOf = new Map<number, number>();
const devices = new Map<number, DeviceQueues>();
/** Devices with queues that had work left after their last burst. */
let active = new Set<DeviceQueues>();
/**
 * The set being served while `active` collects the next round: the two swap each turn, where
 * copying the set allocated an array per burst (it showed in profiles of the xsk path).
 */
let serving = new Set<DeviceQueues>();
let exiting = false;

function watcherFor(dq: () => DeviceQueues): Watcher {
  return {
    add(fd, events, ready) {
      const token = freeTokens.pop() ?? handlers.length;
      handlers[token] = ready;
      try {
        epoll.add(fd, events, token);
      } catch (e) {
        handlers[token] = null;
        freeTokens.push(token);
        throw e;
      }
      tokenOf.set(fd, token);
    },
    modify(fd, events) {
      const token = tokenOf.get(fd);
      if (token !== undefined) epoll.modify(fd, events, token);
    },
    remove(fd) {
      const token = tokenOf.get(fd);
      epoll.remove(fd);
      if (token === undefined) return;
      tokenOf.delete(fd);
      handlers[token] = null;
      freeTokens.push(token);
    },
    pending() {
      active.add(dq());
    },
  };
}

function device(id: number): DeviceQueues {
  const d = devices.get(id);
  if (!d) throw new Error(`device ${id} is not attached to this worker`);
  return d;
}

function handle(req: WorkerRequest): number | DataAnswer {
  if (refusal !== null && req.op !== 'exit') throw new Error(refusal);
  switch (req.op) {
    case 'attach': {
      if (devices.has(req.device)) return 0;
      let dq: DeviceQueues | null = null;
      // Events go to the worker's parent port (its 'message' handler); data.port carries only request answers.
      dq = new DeviceQueues(req.device, req.name, req.stats, data.busyPoll, data.replyPollUs, watcherFor(() => dq!), parentPort!);
      devices.set(req.device, dq);
      return 0;
    }
    case 'detach': {
      const d = devices.get(req.device);
      if (!d) return 0;
      devices.delete(req.device);
      active.delete(d);
      d.close();
      return 0;
    }
    case 'device':
      return device(req.device).handle(req.req);
    case 'exit':
      for (const d of devices.values()) d.close();
      devices.clear();
      active.clear();
      exiting = true;
      return 0;
  }
}

function drainControl(): void {
  eventfdDrain(data.controlFd);
  for (;;) {
    const m = receiveMessageOnPort(data.port);
    if (!m) return;
    const { seq, req, posted } = m.message as { seq: number; req: WorkerRequest; posted?: boolean };
    let status = 0;
    let value = 0;
    try {
      const out = handle(req);
      // Posted before the answer is signalled: the caller reads it once it sees its seq answered.
      if (typeof out === 'number') value = out;
      else if (!posted) data.port.postMessage({ seq, data: out.data });
    } catch (e) {
      status = 1;
      // Nobody waits for a posted request's answer: its failure is said here.
      if (posted) log.warn(`${req.op === 'device' ? req.req.op : req.op}: ${(e as Error).message}`);
      else data.port.postMessage({ seq, error: (e as Error).message });
    }
    Atomics.store(ctl, CTL_STATUS, status);
    Atomics.store(ctl, CTL_VALUE, value);
    Atomics.store(ctl, CTL_SEQ, seq);
    Atomics.notify(ctl, CTL_SEQ);
  }
}

function onEvent(token: number): void {
  if (token === TOKEN_CONTROL) return drainControl();
  handlers[token]?.();
}

epoll.add(data.controlFd, EPOLLIN, TOKEN_CONTROL);

/** Some pair's reply window is open: look again instead of sleeping (DeviceQueues.pollReplies). */
let replyPolling = false;
try {
  while (!exiting) {
    // Busy-poll spins on every running queue; otherwise sleep in epoll until something is ready.
    // AF_XDP completions arrive without a wakeup of ours: poll them every millisecond meanwhile.
    let inFlight = false;
    for (const d of devices.values()) if (d.inFlight()) inFlight = true;
    const timeout = data.busyPoll || active.size > 0 || replyPolling ? 0 : inFlight ? 1 : 1000;
    epoll.wait(timeout, onEvent);
    if (inFlight) for (const d of devices.values()) d.pollInFlight();
    if (data.busyPoll) {
      for (const d of devices.values()) d.serveAll();
    } else if (active.size > 0) {
      const again = active;
      active = serving;
      serving = again;
      for (const d of again) d.servePending();
      again.clear();
    }
    if (data.replyPollUs > 0) {
      replyPolling = false;
      for (const d of devices.values()) if (d.pollReplies()) replyPolling = true;
    }
  }
} catch (e) {
  log.error(`datapath loop failed: ${(e as Error).stack ?? e}`);
  throw e;
} finally {
  epoll.close();
}
