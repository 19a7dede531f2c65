// What the running source QEMU says about itself, asked through any QMP executor (the
// libvirt binding's monitor pass-through for a libvirt domain, a fake in the tests):
// its version, its migration blockers, the capabilities and parameters in force. Only
// queries are sent: preflight never changes the domain. Each answer is kept with the
// error that replaced it, so one refused query does not hide the others.

import { queryMigrate, queryMigrateCapabilities, queryVersion, type MigrationInfo, type QmpExecutor } from '../../qmp/commands.ts';

export type Answer<T> = { ok: true; value: T } | { ok: false; error: string };

export interface QemuFacts {
  version: Answer<string>;
  migrate: Answer<MigrationInfo>;
  capabilities: Answer<Record<string, boolean>>;
  parameters: Answer<Record<string, unknown>>;
}

const TIMEOUT_MS = 10_000;

async function ask<T>(f: () => Promise<T>): Promise<Answer<T>> {
  try {
    return { ok: true, value: await f() };
  } catch (err) {
    return { ok: false, error: err instanceof Error ? err.message : String(err) };
  }
}

export async function gatherQemuFacts(q: QmpExecutor): Promise<QemuFacts> {
  const o = { timeoutMs: TIMEOUT_MS };
  // One at a time: libvirt serialises monitor commands anyway, and a fake may not cope with overlap.
  const version = await ask(async () => {
    const v = await queryVersion(q, o);
    return `${v.qemu.major}.${v.qemu.minor}.${v.qemu.micro}`;
  });
  const migrate = await ask(() => queryMigrate(q, o));
  const capabilities = await ask(async () => Object.fromEntries((await queryMigrateCapabilities(q, o)).map((c) => [c.capability, c.state])));
  const parameters = await ask(async () => {
    const r = await q.execute('query-migrate-parameters', undefined, o);
    if (typeof r !== 'object' || r === null || Array.isArray(r)) throw new Error('query-migrate-parameters: reply is not an object');
    return r as Record<string, unknown>;
  });
  return { version, migrate, capabilities, parameters };
}

/** A numeric migration parameter, when QEMU reported it. */
export function numParam(f: QemuFacts, name: string): number | undefined {
  if (!f.parameters.ok) return undefined;
  const v = f.parameters.value[name];
  return typeof v === 'number' && Number.isFinite(v) ? v : undefined;
}

export function capOn(f: QemuFacts, name: string): boolean | undefined {
  return f.capabilities.ok ? f.capabilities.value[name] === true : undefined;
}
