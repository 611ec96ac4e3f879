// A locked read-modify-write is a full barrier on x86 (and Atomics are seq-cst everywhere).
// Plain stores are not ordered against later loads (the store buffer): exactly the "publish an
// index, then read the other side's flags" pattern of the rings we share with a guest (virtio's
// notification suppression) or the kernel (AF_XDP's need_wakeup).
const fenceCell = new Int32Array(new SharedArrayBuffer(4));

/** Orders every earlier store before every later load. */
export function fullFence(): void {
  Atomics.add(fenceCell, 0, 0);
}
