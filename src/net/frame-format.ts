/** Ethernet header: destination, source, EtherType. */
export const ETH_HLEN = 14;

/** How frames are laid out for one device (from the acked features); plain data, posted to workers. */
export interface FrameFormat {
  eventIdx: boolean;
  headerLength: number;
  mergeable: boolean;
  /** Largest frame the host may hand us, header included: decides how many RX buffers to stash. */
  maxFrame: number;
  /** What guest TX headers may ask for: TX_CSUM | TX_TSO4 | TX_TSO6 | TX_ECN (vnet-header.ts). */
  txOffloads: number;
}

export const DEFAULT_FORMAT: FrameFormat = { eventIdx: false, headerLength: 12, mergeable: false, maxFrame: 1518 + 12, txOffloads: 0 };
