// `qemu <domain> release end <reason>`: after libvirt released everything of a stopped
// domain (also on the source after a successful migration, reason "migrated", and on
// the destination of a failed one). Its exit status is ignored by libvirt. We drop the
// domain's reservations and, with hooks.releasePolicy "restore", give its PCI devices
// the driver they had before vfio-mig bound them (the binder's record). With "keep"
// (default) they stay on their VFIO driver, ready for the next VM. Devices libvirt
// itself binds (managed='yes', libvirt >= 10) are libvirt's to give back.

import { asRefusal, hookLock, libvirtVersion, loadConfig, logEvent, parseDomainXml, remainingMs, say, vfioHostdevs, type HookContext, type HookResult } from './qemu-common.ts';
import { readReservations, writeReservations } from './reservations.ts';

export async function release(ctx: HookContext): Promise<HookResult> {
  const doc = parseDomainXml(ctx.xml);
  const devs = vfioHostdevs(doc, { lenient: true });
  if (devs.length === 0) return { code: 0 };
  const { hooks } = loadConfig();

  const lock = await hookLock(ctx);
  let dropped = 0;
  try {
    const all = readReservations();
    const kept = all.filter((r) => r.domain !== ctx.domain);
    dropped = all.length - kept.length;
    if (dropped) writeReservations(kept);
  } finally {
    lock.release();
  }

  let restored: string[] = [];
  if (hooks.releasePolicy === 'restore') {
    const lv = libvirtVersion();
    const libvirtOwns = (managed: boolean | undefined) => managed === true && (lv === undefined || lv.major >= 10);
    const pci = devs.filter((d) => d.kind === 'pci' && !libvirtOwns(d.view.managed)).map((d) => d.id);
    if (pci.length) {
      const { unbind } = await import('../pci/binder.ts');
      let report;
      try {
        report = await unbind({ devices: pci, lockTimeoutMs: Math.max(500, remainingMs(ctx) - 2000) });
      } catch (err) {
        throw asRefusal(err);
      }
      restored = report.results.filter((r) => r.action === 'restored').map((r) => r.address);
      const bad = report.results.find((r) => r.action === 'failed' || r.action === 'refused');
      if (bad) say(ctx, `releasePolicy restore: ${bad.address}: ${bad.error ?? bad.action}`);
    }
  }
  logEvent(ctx, 'released', { reason: ctx.extra, reservationsDropped: dropped, restored });
  return { code: 0 };
}
