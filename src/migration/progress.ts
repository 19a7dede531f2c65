// Progress of a state transfer: bytes moved, rate, ETA, per device. The meter is fed by
// saveSet/loadSet and calls back at most every `intervalMs` (and at each device's end);
// progressPrinter renders the snapshots as a bar on a terminal and as JSON lines
// otherwise (logs, a parent process). Over `ssh host vfio-mig receive` stdout carries
// the stream's verdict, so a receiver prints progress to stderr.

export interface DeviceProgress {
  device: string;
  bytes: number;
  /** The sender's estimate (MIG_DATA_SIZE), when known. */
  total?: number;
  done: boolean;
}

export interface ProgressSnapshot {
  phase: 'send' | 'receive';
  /** Data bytes moved so far (device state, not framing). */
  bytes: number;
  /** Sum of the estimates, when every device has one (never below `bytes`). */
  total?: number;
  /** Bytes per second over the last few seconds. */
  rate: number;
  /** Seconds left at the current rate, when `total` is known and data moves. */
  eta?: number;
  /** Seconds since the meter started. */
  elapsed: number;
  devices: DeviceProgress[];
  done: boolean;
}

export interface MeterOptions {
  onProgress?: (s: ProgressSnapshot) => void;
  /** Least time between two callbacks (default 250 ms); device ends and finish always call. */
  intervalMs?: number;
  /** Clock in ms (tests). */
  now?: () => number;
}

const WINDOW_MS = 3000;

export class ProgressMeter {
  readonly #phase: 'send' | 'receive';
  readonly #devices: DeviceProgress[];
  readonly #on: ((s: ProgressSnapshot) => void) | undefined;
  readonly #interval: number;
  readonly #now: () => number;
  readonly #t0: number;
  #bytes = 0;
  #last = -Infinity;
  #done = false;
  /** (time, bytes) samples for the rate, oldest first, spanning about WINDOW_MS. */
  #samples: { t: number; bytes: number }[] = [];

  constructor(phase: 'send' | 'receive', devices: readonly { device: string; total?: number }[], opts: MeterOptions = {}) {
    this.#phase = phase;
    this.#devices = devices.map((d) => ({ device: d.device, bytes: 0, ...(d.total !== undefined ? { total: d.total } : {}), done: false }));
    this.#on = opts.onProgress;
    this.#interval = opts.intervalMs ?? 250;
    this.#now = opts.now ?? (() => performance.now());
    this.#t0 = this.#now();
    this.#samples.push({ t: this.#t0, bytes: 0 });
  }

  add(index: number, n: number): void {
    const d = this.#devices[index];
    if (!d) return;
    d.bytes += n;
    this.#bytes += n;
    this.#maybeEmit(false);
  }

  deviceDone(index: number): void {
    const d = this.#devices[index];
    if (!d || d.done) return;
    d.done = true;
    this.#maybeEmit(true);
  }

  finish(): void {
    if (this.#done) return;
    this.#done = true;
    this.#maybeEmit(true);
  }

  #maybeEmit(force: boolean): void {
    const t = this.#now();
    this.#sample(t);
    if (!this.#on || (!force && t - this.#last < this.#interval)) return;
    this.#last = t;
    this.#on(this.snapshot());
  }

  #sample(t: number): void {
    const s = this.#samples;
    s.push({ t, bytes: this.#bytes });
    // Keep one sample older than the window so the rate spans the whole window.
    while (s.length > 2 && t - s[1]!.t >= WINDOW_MS) s.shift();
    if (s.length > 512) s.splice(1, s.length - 256); // bounded however often add() runs
  }

  snapshot(): ProgressSnapshot {
    const t = this.#now();
    const first = this.#samples[0]!;
    const span = (t - first.t) / 1000;
    const rate = span > 0 ? (this.#bytes - first.bytes) / span : 0;
    const known = this.#devices.every((d) => d.total !== undefined);
    const total = known ? Math.max(this.#bytes, this.#devices.reduce((a, d) => a + Math.max(d.total!, d.bytes), 0)) : undefined;
    const out: ProgressSnapshot = {
      phase: this.#phase,
      bytes: this.#bytes,
      rate: Math.round(rate),
      elapsed: (t - this.#t0) / 1000,
      devices: this.#devices.map((d) => ({ ...d })),
      done: this.#done,
    };
    if (total !== undefined) {
      out.total = total;
      if (this.#done) out.eta = 0;
      else if (rate > 0) out.eta = Math.max(0, (total - this.#bytes) / rate);
    }
    return out;
  }
}

export function formatBytes(n: number): string {
  const units = ['B', 'KiB', 'MiB', 'GiB', 'TiB'];
  let i = 0;
  while (n >= 1024 && i < units.length - 1) {
    n /= 1024;
    i++;
  }
  return i === 0 ? `${n} B` : `${n.toFixed(1)} ${units[i]}`;
}

function formatSeconds(s: number): string {
  if (s < 60) return `${Math.ceil(s)}s`;
  const m = Math.floor(s / 60);
  return `${m}m${String(Math.ceil(s - m * 60)).padStart(2, '0')}s`;
}

/** One line for a terminal: a bar when the total is known, then bytes, rate and ETA. */
export function progressLine(s: ProgressSnapshot, width = 80): string {
  const parts = [`${s.phase === 'send' ? 'sent' : 'received'} ${formatBytes(s.bytes)}${s.total !== undefined ? ` of ${formatBytes(s.total)}` : ''}`, `${formatBytes(s.rate)}/s`];
  if (s.eta !== undefined && !s.done) parts.push(`ETA ${formatSeconds(s.eta)}`);
  const devices = `${s.devices.filter((d) => d.done).length}/${s.devices.length} devices`;
  parts.push(s.done ? `${devices}, done in ${formatSeconds(s.elapsed)}` : devices);
  const text = parts.join('  ');
  if (s.total === undefined || s.total === 0) return text;
  const barWidth = Math.max(10, Math.min(40, width - text.length - 8));
  const frac = Math.min(1, s.bytes / s.total);
  const filled = Math.round(frac * barWidth);
  return `[${'#'.repeat(filled)}${'.'.repeat(barWidth - filled)}] ${String(Math.floor(frac * 100)).padStart(3)}%  ${text}`;
}

/** What progressPrinter writes to: a stream, and whether it is a terminal. */
export interface ProgressOutput {
  write(s: string): unknown;
  isTTY?: boolean;
  columns?: number;
}

/**
 * A progress callback that draws a bar in place on a terminal (`\r`, clear to the end of
 * line, a newline when done) and writes one JSON object per line otherwise.
 */
export function progressPrinter(out: ProgressOutput): (s: ProgressSnapshot) => void {
  if (out.isTTY) {
    return (s) => {
      out.write(`\r${progressLine(s, out.columns ?? 80)}\x1b[K${s.done ? '\n' : ''}`);
    };
  }
  return (s) => {
    out.write(`${JSON.stringify({ event: 'progress', ...s, eta: s.eta === undefined ? undefined : Math.round(s.eta * 10) / 10 })}\n`);
  };
}
