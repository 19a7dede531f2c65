// The destination end: its versions and kernel, and for every hostdev a free device there
// that passes the compatibility test against the source device's descriptor. The
// assignment is one-to-one (two hostdevs never get the same destination device), and it
// is what the rewritten destination XML (--print-xml) substitutes.

import { check, type Check } from './types.ts';
import type { VfioHostdev } from './domain-view.ts';
import type { CompatAnswer, HostFacts } from './facts.ts';

export interface Assignment {
  alias: string;
  /** The destination device id (or "new mdev TYPE on PARENT"). */
  target: string;
  /** Its descriptor, when the destination sent one. */
  descriptor?: unknown;
}

export function factsCheck(facts: HostFacts | undefined, via: string, error: string | undefined): Check {
  if (facts) return check('destination-facts', 'destination', 'destination', 'pass', `host facts of ${facts.hostname} via ${via} (kernel ${facts.kernel.release}, ${facts.devices.length} VFIO devices)`, 'Nothing to do.');
  return check('destination-facts', 'destination', 'destination', 'warn', `no host facts from the destination: ${error ?? 'unknown reason'}`, 'Install vfio-mig on the destination and make it reachable (ssh BatchMode), or pass --dest-facts FILE from `vfio-mig host-facts --json` there.');
}

function summary(a: CompatAnswer): string {
  const reasons = [...new Set(a.candidates.filter((c) => !c.compatible).map((c) => `${c.target}: ${c.reason || c.decidedBy}`))];
  return reasons.slice(0, 3).join('; ') + (reasons.length > 3 ? `; and ${reasons.length - 3} more` : '');
}

/** One check per hostdev, and the chosen destination device of each. */
export function destinationDeviceChecks(hostdevs: VfioHostdev[], facts: HostFacts | undefined, descriptorErrors: Map<string, string>): { checks: Check[]; assignments: Assignment[] } {
  const checks: Check[] = [];
  const assignments: Assignment[] = [];
  const taken = new Set<string>();
  for (const h of hostdevs) {
    const id = 'destination-device';
    const descErr = descriptorErrors.get(h.alias);
    if (descErr !== undefined) {
      checks.push(check(id, 'destination', h.label, 'fail', `no descriptor of the source device: ${descErr}`, 'Fix the source device first (see its device-capability check); the destination needs its descriptor.'));
      continue;
    }
    if (!facts) {
      checks.push(check(id, 'destination', h.label, 'warn', 'destination devices unknown (no host facts)', 'See the destination-facts check.'));
      continue;
    }
    const answer = facts.compatibility.find((a) => a.key === h.alias);
    if (!answer) {
      checks.push(check(id, 'destination', h.label, 'warn', 'the destination did not test this device (its facts carry no answer for it)', 'Collect the facts with the source descriptors (preflight does this itself over ssh or the peer command).'));
      continue;
    }
    if (answer.error) {
      checks.push(check(id, 'destination', h.label, 'fail', `the destination could not test compatibility: ${answer.error}`, 'Run vfio-mig host-facts on the destination and fix what it reports.'));
      continue;
    }
    const compatible = answer.candidates.filter((c) => c.compatible);
    // Prefer devices whose migration capability is on record there (a probed, bound variant driver).
    const recorded = (target: string): number => (facts.devices.find((d) => d.id === target)?.capabilities.ok ? 0 : 1);
    const free = compatible.filter((c) => c.free && !taken.has(c.target)).sort((a, b) => recorded(a.target) - recorded(b.target));
    if (free.length > 0) {
      const pick = free[0]!;
      taken.add(pick.target);
      assignments.push({ alias: h.alias, target: pick.target, ...(pick.descriptor !== undefined ? { descriptor: pick.descriptor } : {}) });
      checks.push(check(id, 'destination', h.label, 'pass', `${free.length} free compatible device${free.length === 1 ? '' : 's'} on ${facts.hostname}; using ${pick.target} (${pick.decidedBy})`, 'Nothing to do.'));
    } else if (compatible.length > 0) {
      checks.push(check(id, 'destination', h.label, 'fail', `every compatible device on ${facts.hostname} is taken (${compatible.map((c) => c.target).join(', ')})`, 'Free one (stop the VM holding it) or create more VFs/mdevs of that kind on the destination.'));
    } else if (answer.candidates.length === 0) {
      checks.push(check(id, 'destination', h.label, 'fail', `${facts.hostname} has no VFIO device (or mdev type) to offer`, 'Create VFs or mdevs on the destination and bind them with vfio-mig bind.'));
    } else {
      checks.push(check(id, 'destination', h.label, 'fail', `no device on ${facts.hostname} accepts this device's state: ${summary(answer)}`, 'Use a destination with the same device model, driver and firmware (the migration_version test must pass).'));
    }
  }
  return { checks, assignments };
}
