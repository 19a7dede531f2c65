// What every preflight check returns, and the versioned JSON shapes preflight prints and
// reads. A check is one verdict about one thing (the domain, one hostdev, one end of the
// migration) with one sentence telling the operator what to do about it.

export type Verdict = 'pass' | 'warn' | 'fail';

/** The families checks belong to; one module of src/compat/preflight each. */
export type CheckFamily = 'source' | 'versions' | 'devices' | 'qemu' | 'dirty-tracking' | 'downtime' | 'destination' | 'vendor';

export interface Check {
  /** Stable id, e.g. "qemu-version", "device-capability" (the same for every subject). */
  id: string;
  family: CheckFamily;
  /** What the verdict is about: "source", "destination", a hostdev ("hostdev0 0000:3b:00.2"), ... */
  subject: string;
  verdict: Verdict;
  /** What was found, for the record (numbers, versions, reasons). */
  detail: string;
  /** One sentence: what to do (or, on pass, why nothing needs doing). */
  advice: string;
}

/** Schema of `vfio-mig preflight --json`. A consumer refuses a major version it does not know. */
export const PREFLIGHT_SCHEMA = 'vfio-mig/preflight/1';

export interface PreflightReport {
  schema: typeof PREFLIGHT_SCHEMA;
  /** The domain (its name) or the --xml file checked. */
  domain: string;
  /** Destination libvirt URI, or "local" for the --xml form. */
  destination: string;
  verdict: Verdict;
  /** 0 pass, 1 warnings, 2 fail. */
  exitCode: 0 | 1 | 2;
  /** Predicted downtime (ms) including the devices' stop-copy data, when it could be computed. */
  downtime?: DowntimePrediction;
  checks: Check[];
  /** --print-xml: where the rewritten destination XML went. */
  destinationXml?: { file: string; persistentFile?: string; notes: string[] };
}

export interface DowntimePrediction {
  /** ms: the devices' STOP_COPY data at the link rate. */
  deviceMs: number;
  /** ms: guest RAM sent while the guest is stopped (an upper bound). */
  ramMs: number;
  totalMs: number;
  /** downtime-limit (ms) in force on the source. */
  limitMs: number;
  /** Bytes per second assumed for the migration link. */
  linkBytesPerSec: number;
  /** Sum of the devices' MIG_DATA_SIZE estimates (bytes); devices without an estimate are listed. */
  deviceBytes: number;
  unknownDevices: string[];
  /** How the RAM part was bounded. */
  ramBasis: string;
}

export function worst(verdicts: Iterable<Verdict>): Verdict {
  let w: Verdict = 'pass';
  for (const v of verdicts) {
    if (v === 'fail') return 'fail';
    if (v === 'warn') w = 'warn';
  }
  return w;
}

export function exitCodeOf(v: Verdict): 0 | 1 | 2 {
  return v === 'pass' ? 0 : v === 'warn' ? 1 : 2;
}

export function check(id: string, family: CheckFamily, subject: string, verdict: Verdict, detail: string, advice: string): Check {
  return { id, family, subject, verdict, detail, advice };
}

/** "1.5 GiB", "640 KiB", "96 B". */
export function formatBytes(n: number): string {
  const units = ['B', 'KiB', 'MiB', 'GiB', 'TiB'];
  let v = n;
  let i = 0;
  while (v >= 1024 && i < units.length - 1) {
    v /= 1024;
    i++;
  }
  return i === 0 ? `${n} B` : `${v >= 100 ? v.toFixed(0) : v.toFixed(1)} ${units[i]}`;
}
