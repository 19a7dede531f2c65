// Small helpers for the hook's XML edits that the domain XML model does not offer.
import { escapeXml, type PciAddress } from '../libvirt/domain-xml.ts';
import { parseBdf } from '../host/sysfs.ts';

export { escapeXml };

/** "0000:3b:00.2" -> the model's PciAddress (validated). */
export function parsePciAddress(bdf: string): PciAddress {
  const [d, b, sf] = parseBdf(bdf).split(':') as [string, string, string];
  const [s, f] = sf.split('.') as [string, string];
  return { domain: Number.parseInt(d, 16), bus: Number.parseInt(b, 16), slot: Number.parseInt(s, 16), function: Number.parseInt(f, 16) };
}
