/**
 * How a device's queues ask their worker to watch fds (kick eventfds, host queue fds) without
 * knowing the worker's epoll or its token scheme.
 */
export interface Watcher {
  /** Watches fd for `events` (EPOLLIN or 0 for "registered but quiet"); `ready` runs when it fires. */
  add(fd: number, events: number, ready: () => void): void;
  modify(fd: number, events: number): void;
  remove(fd: number): void;
  /** The device has queues with work left after their burst: serve them again before sleeping. */
  pending(): void;
}
