// The ordering rules of a VFIO migration, checked over a recorded timeline. Pure functions:
// no I/O, the same answer for the same timeline.
//
// Each rule is what QEMU's code guarantees, so a correct migration never breaks one, and
// each is stated over the *order* of one side's events (see timeline.ts), never over
// timestamps across sides:
//
//  - p2p-before-stop: stopping the VM (do_vm_stop in system/cpus.c) runs
//    vm_state_notify(running=false) (system/runstate.c), which calls every handler's
//    prepare callback before any main callback. VFIO's prepare moves a device to
//    RUNNING_P2P (PRE_COPY_P2P from PRE_COPY); its main callback then moves it to STOP or
//    STOP_COPY. So with several devices, every device is in a P2P state before any device
//    stops. A single device may skip P2P (QEMU allows one device without P2P).
//  - vcpus-stopped: do_vm_stop pauses every vCPU, then runs the notifiers, then sends QMP
//    STOP. So a device that stops while the VM runs does it inside that sequence: only
//    VFIO_MIGRATION events between the device's stop and QMP STOP; or the VM was already
//    stopped (STOP seen and no RESUME since, or it started out not running).
//  - p2p-before-running (destination): starting the VM (vm_prepare_start) runs
//    vm_state_notify(running=true): prepare callbacks (RUNNING_P2P) for all, then main
//    callbacks (RUNNING). So with several devices, every device is RUNNING_P2P before any
//    is RUNNING.
//  - running-after-resume (destination): vm_prepare_start sends QMP RESUME first, then
//    runs the notifiers, and only then are the vCPUs resumed. So a destination device
//    enters RUNNING right after RESUME, with only VFIO_MIGRATION events in between.
//
// The engine's own timelines (no vCPU events) are checked for the two P2P rules only.

import { P2P, RUNNING, STOPPED, SIDES, sideMarks, type Mark, type Side, type Timeline } from './timeline.ts';

export type Rule = 'p2p-before-stop' | 'vcpus-stopped' | 'p2p-before-running' | 'running-after-resume';

export interface Violation {
  rule: Rule;
  side: Side;
  /** The device the rule was broken for. */
  device: string;
  /** The migration phase in words (`switchover`, `resume`). */
  phase: string;
  /** ms on the timeline where it was seen. */
  at: number;
  message: string;
}

/** States a device can leave for STOP/STOP_COPY as the VM stops (QEMU 11 adds *-prepare). */
function isLive(state: string): boolean {
  return RUNNING.has(state) || P2P.has(state) || state === 'pre-copy-p2p-prepare';
}

/** Devices that have at least one state mark on `side`. */
function devicesOn(marks: Mark[]): string[] {
  const seen: string[] = [];
  for (const m of marks) if ((m.kind === 'device' || m.kind === 'reset') && m.device && !seen.includes(m.device)) seen.push(m.device);
  return seen;
}

interface Step {
  mark: Mark;
  index: number;
  device: string;
  prev: string;
  state: string;
  /** Every device's state just before this mark (absent: never reported, i.e. still RUNNING). */
  others: Map<string, string>;
  /** Devices that are RUNNING because QEMU reset them after a failed arc (see below). */
  recovered: Set<string>;
}

/**
 * Walks one side's device transitions with the state of every device at each step.
 *
 * A device that reaches RUNNING from a stopped or P2P state outside a VM start (not right
 * after RESUME) was put there by QEMU's recovery: a failed arc in a VM-state handler resets
 * the device (VFIO_DEVICE_RESET leaves it RUNNING), and a failed migration moves every device
 * back to RUNNING. QEMU gives no ordering guarantee on that path, so the P2P rules do not
 * hold such a device against the others; the migration fails and the verdict says so.
 */
function* transitions(marks: Mark[]): Generator<Step> {
  const current = new Map<string, string>();
  const recovered = new Set<string>();
  for (let index = 0; index < marks.length; index++) {
    const mark = marks[index]!;
    if ((mark.kind !== 'device' && mark.kind !== 'reset') || !mark.device || !mark.state) continue;
    // A device QEMU never reported on is where it started: RUNNING.
    const prev = current.get(mark.device) ?? 'running';
    yield { mark, index, device: mark.device, prev, state: mark.state, others: new Map(current), recovered: new Set(recovered) };
    current.set(mark.device, mark.state);
    if (mark.state === 'running' && !RUNNING.has(prev) && (mark.kind === 'reset' || prevNonDevice(marks, index)?.kind !== 'resume')) recovered.add(mark.device);
    else recovered.delete(mark.device);
  }
}

/** Source (and any side): with several devices, every one is P2P before any stops. */
export function checkP2PBeforeStop(tl: Timeline, side: Side = 'source'): Violation[] {
  const marks = sideMarks(tl, side);
  const devices = devicesOn(marks);
  if (devices.length < 2) return [];
  const out: Violation[] = [];
  const reported = new Set<string>();
  const report = (device: string, at: number, message: string): void => {
    if (reported.has(device)) return;
    reported.add(device);
    out.push({ rule: 'p2p-before-stop', side, device, phase: 'switchover', at, message });
  };
  for (const s of transitions(marks)) {
    if (!STOPPED.has(s.state) || !isLive(s.prev)) continue;
    if (!P2P.has(s.prev)) report(s.device, s.mark.t, `${s.device} went from ${s.prev} to ${s.state} on the ${side} without a P2P state first (with ${devices.length} devices each must be running-p2p or pre-copy-p2p before any stops)`);
    for (const other of devices) {
      if (other === s.device || s.recovered.has(other)) continue;
      const st = s.others.get(other) ?? 'running';
      if (RUNNING.has(st) || st === 'pre-copy-p2p-prepare') {
        report(other, s.mark.t, `${other} was still ${st} on the ${side} when ${s.device} reached ${s.state}: every device must be running-p2p or pre-copy-p2p before any device stops`);
      }
    }
  }
  return out;
}

/** Destination: with several devices, every one is RUNNING_P2P before any is RUNNING. */
export function checkP2PBeforeRunning(tl: Timeline, side: Side = 'destination'): Violation[] {
  const marks = sideMarks(tl, side);
  const devices = devicesOn(marks);
  if (devices.length < 2) return [];
  const out: Violation[] = [];
  const reported = new Set<string>();
  const report = (device: string, at: number, message: string): void => {
    if (reported.has(device)) return;
    reported.add(device);
    out.push({ rule: 'p2p-before-running', side, device, phase: 'resume', at, message });
  };
  for (const s of transitions(marks)) {
    if (s.state !== 'running' || RUNNING.has(s.prev)) continue;
    if (!P2P.has(s.prev)) report(s.device, s.mark.t, `${s.device} went from ${s.prev} to running on the ${side} without running-p2p first (with ${devices.length} devices each must be running-p2p before any runs)`);
    for (const other of devices) {
      if (other === s.device) continue;
      const st = s.others.get(other);
      // Never reported: the device did not take part in this resume yet (it would be
      // RUNNING only if it never left it, which a destination device does at RESUMING).
      if (st === undefined || (!P2P.has(st) && !RUNNING.has(st))) {
        report(other, s.mark.t, `${other} was ${st ?? 'not yet resumed'} on the ${side} when ${s.device} reached running: every device must be running-p2p before any device runs`);
      }
    }
  }
  return out;
}

/** Runstate before `index` on this side: STOP/RESUME seen, else what query-status said at the start. */
function vmStoppedBefore(marks: Mark[], index: number, initial: string | undefined): boolean | undefined {
  for (let i = index - 1; i >= 0; i--) {
    const k = marks[i]!.kind;
    if (k === 'stop') return true;
    if (k === 'resume') return false;
  }
  if (initial === undefined) return undefined;
  return initial !== 'running';
}

/** The first mark after `index` that is not a device event. */
function nextNonDevice(marks: Mark[], index: number): Mark | undefined {
  for (let i = index + 1; i < marks.length; i++) if (marks[i]!.kind !== 'device') return marks[i];
  return undefined;
}

/** The last mark before `index` that is not a device event. */
function prevNonDevice(marks: Mark[], index: number): Mark | undefined {
  for (let i = index - 1; i >= 0; i--) if (marks[i]!.kind !== 'device') return marks[i];
  return undefined;
}

function describeMark(m: Mark | undefined): string {
  if (!m) return 'nothing';
  if (m.kind === 'migration') return `MIGRATION ${m.status ?? ''}`.trim();
  if (m.kind === 'pass') return `MIGRATION_PASS ${m.pass ?? ''}`.trim();
  return m.event;
}

/** A device stops only with the vCPUs stopped (watch timelines: QMP STOP is recorded). */
export function checkVcpusStopped(tl: Timeline, side: Side = 'source'): Violation[] {
  if (!tl.vcpusRecorded) return [];
  const marks = sideMarks(tl, side);
  const out: Violation[] = [];
  const reported = new Set<string>();
  for (const s of transitions(marks)) {
    if (!STOPPED.has(s.state) || !isLive(s.prev) || reported.has(s.device)) continue;
    if (vmStoppedBefore(marks, s.index, tl.initialStatus[side]) === true) continue;
    const next = nextNonDevice(marks, s.index);
    if (next?.kind === 'stop') continue;
    reported.add(s.device);
    out.push({
      rule: 'vcpus-stopped',
      side,
      device: s.device,
      phase: 'switchover',
      at: s.mark.t,
      message: `${s.device} reached ${s.state} on the ${side} while the vCPUs ran: QEMU pauses the vCPUs, moves the devices and then sends STOP, but ${describeMark(next)} came next instead of STOP`,
    });
  }
  return out;
}

/** A destination device enters RUNNING only as the VM starts (right after RESUME). */
export function checkRunningAfterResume(tl: Timeline, side: Side = 'destination'): Violation[] {
  if (!tl.vcpusRecorded) return [];
  const marks = sideMarks(tl, side);
  const out: Violation[] = [];
  const reported = new Set<string>();
  for (const s of transitions(marks)) {
    if (s.state !== 'running' || RUNNING.has(s.prev) || reported.has(s.device)) continue;
    const before = prevNonDevice(marks, s.index);
    if (before?.kind === 'resume') continue;
    reported.add(s.device);
    out.push({
      rule: 'running-after-resume',
      side,
      device: s.device,
      phase: 'resume',
      at: s.mark.t,
      message: `${s.device} reached running on the ${side} outside a VM start: QEMU sends RESUME, moves the devices, then runs the vCPUs, but ${describeMark(before)} came last before it`,
    });
  }
  return out;
}

/** Every rule that applies to this timeline, violations in timeline order. */
export function checkInvariants(tl: Timeline): Violation[] {
  const all = [
    ...checkP2PBeforeStop(tl, 'source'),
    ...checkVcpusStopped(tl, 'source'),
    ...checkP2PBeforeRunning(tl, 'destination'),
    ...checkRunningAfterResume(tl, 'destination'),
  ];
  return all.sort((a, b) => a.at - b.at || SIDES.indexOf(a.side) - SIDES.indexOf(b.side));
}
