// Guest TX headers may only ask for what the driver negotiated (virtio 1.x 5.1.6.2).
import { describe, expect, it } from 'vitest';
import { unnegotiatedRequest, TX_CSUM, TX_TSO4, TX_TSO6, TX_ECN } from '../../src/net/vnet-header.js';

/** flags (low byte) | gso_type << 8, as headerRequests returns them. */
const req = (flags: number, gso: number) => flags | (gso << 8);
const ALL = TX_CSUM | TX_TSO4 | TX_TSO6 | TX_ECN;

describe('header requests against negotiated features', () => {
  it('a plain frame is always fine; DATA_VALID and unknown flag bits are ignored', () => {
    for (const allowed of [0, ALL]) {
      expect(unnegotiatedRequest(req(0, 0), allowed)).toBe(false);
      expect(unnegotiatedRequest(req(2, 0), allowed)).toBe(false);
      expect(unnegotiatedRequest(req(0xfe, 0), allowed)).toBe(false);
    }
  });

  it('a zero header asks for nothing under any feature set (TxPath skips the rules for it)', () => {
    for (let allowed = 0; allowed <= ALL; allowed++) expect(unnegotiatedRequest(0, allowed)).toBe(false);
  });

  it('NEEDS_CSUM needs CSUM', () => {
    expect(unnegotiatedRequest(req(1, 0), 0)).toBe(true);
    expect(unnegotiatedRequest(req(1, 0), TX_TSO4)).toBe(true);
    expect(unnegotiatedRequest(req(1, 0), TX_CSUM)).toBe(false);
  });

  it('each segmentation type needs its own feature; UDP (UFO) and UDP_L4 (USO) are never offered', () => {
    expect(unnegotiatedRequest(req(1, 1), TX_CSUM | TX_TSO6)).toBe(true);
    expect(unnegotiatedRequest(req(1, 1), TX_CSUM | TX_TSO4)).toBe(false);
    expect(unnegotiatedRequest(req(1, 4), TX_CSUM | TX_TSO4)).toBe(true);
    expect(unnegotiatedRequest(req(1, 4), TX_CSUM | TX_TSO6)).toBe(false);
    expect(unnegotiatedRequest(req(1, 3), ALL)).toBe(true);
    expect(unnegotiatedRequest(req(1, 5), ALL)).toBe(true);
    expect(unnegotiatedRequest(req(1, 0x42), ALL)).toBe(true);
  });

  it('the ECN bit needs HOST_ECN', () => {
    expect(unnegotiatedRequest(req(1, 0x81), TX_CSUM | TX_TSO4)).toBe(true);
    expect(unnegotiatedRequest(req(1, 0x81), TX_CSUM | TX_TSO4 | TX_ECN)).toBe(false);
  });
});
