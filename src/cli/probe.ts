// vfio-mig probe <device>... [--json]: open idle VFIO devices, read their migration
// flags and MIG_DATA_SIZE, and store them with the device's compatibility descriptor in
// the capability cache ($VFIO_MIG_STATE_DIR/capabilities/). A device held by a VM cannot
// be opened; its earlier entry stays. `--show` opens nothing: it prints the cached
// entries and whether each still belongs to the device's current driver build.
// Exit 0 when every device was probed (or, with --show, every entry is valid).

import { parseArgs, UsageError } from './args.ts';
import { table } from './table.ts';
import { parseDeviceId, deviceIdString } from '../host/sysfs.ts';

export const usage = 'vfio-mig probe <device>... [--json] | vfio-mig probe --show [<device>...] [--json]   cache (or show) idle devices\' migration capabilities';

export const help = `usage: vfio-mig probe <device>... [--json]
       vfio-mig probe --show [<device>...] [--json]

Opens idle VFIO devices, reads their migration flags and MIG_DATA_SIZE, and stores them
with the device's compatibility descriptor in the capability cache
($VFIO_MIG_STATE_DIR/capabilities/), which preflight and host-facts read. A device held
by a VM cannot be opened; its earlier entry stays. "vfio-mig bind" probes each device it
binds. --show opens nothing: it prints the cached entries (all, or the named ones) and
whether each still belongs to the device's current driver build.

options:
  --show   print the cache instead of probing
  --json   an array of rows (device, ok, driver, flags, dataSize, migrationVersion, path, probedAt, error)

environment: VFIO_MIG_STATE_DIR (default /var/lib/vfio-mig)
exit codes: 0 every device probed (with --show: every entry valid); 1 otherwise; 2 usage error
`;

interface Row {
  device: string;
  ok: boolean;
  driver?: string | null;
  flags?: string[];
  dataSize?: string | null;
  migrationVersion?: string;
  path?: string;
  probedAt?: string;
  error?: string;
}

function versionText(mv: { present: boolean; value?: string; error?: string }): string {
  if (!mv.present) return 'none';
  if (mv.value !== undefined) return JSON.stringify(mv.value.length > 40 ? `${mv.value.slice(0, 40)}...` : mv.value);
  return `read error: ${mv.error ?? ''}`;
}

export async function run(argv: string[], out: NodeJS.WritableStream): Promise<number> {
  const args = parseArgs(argv, { flags: ['json', 'show'] });
  const show = args.flags.has('show');
  const cache = await import('../compat/cache.ts');
  let ids = args.positional;
  if (!show && ids.length === 0) throw new UsageError('name at least one device (PCI address or mdev UUID)');
  if (show && ids.length === 0) ids = cache.listCachedIds();
  const names: string[] = [];
  for (const id of ids) {
    try {
      names.push(deviceIdString(parseDeviceId(id)));
    } catch (err) {
      throw new UsageError((err as Error).message);
    }
  }
  if (new Set(names).size !== names.length) throw new UsageError('a device is named twice');

  const rows: Row[] = [];
  if (show) {
    for (const name of names) {
      const r = cache.readCapabilities(name);
      if (r.ok) {
        const e = r.entry;
        rows.push({ device: name, ok: true, driver: e.identity.driver, flags: e.flagNames, dataSize: e.dataSize, migrationVersion: versionText(e.descriptor.migrationVersion), probedAt: e.probedAt, path: cache.capabilityPath(name) });
      } else {
        rows.push({ device: name, ok: false, error: r.reason });
      }
    }
  } else {
    const { probeCapabilities } = await import('../compat/probe.ts');
    for (const name of names) {
      try {
        const { entry, path } = await probeCapabilities(name);
        rows.push({
          device: name,
          ok: entry.flags !== null,
          driver: entry.identity.driver,
          flags: entry.flagNames,
          dataSize: entry.dataSize,
          migrationVersion: versionText(entry.descriptor.migrationVersion),
          probedAt: entry.probedAt,
          path,
          ...(entry.flagsError ? { error: entry.flagsError } : entry.dataSizeError ? { error: `MIG_DATA_SIZE: ${entry.dataSizeError}` } : {}),
        });
      } catch (err) {
        rows.push({ device: name, ok: false, error: `not probed: ${(err as Error).message}` });
      }
    }
  }

  if (args.flags.has('json')) {
    out.write(`${JSON.stringify(rows, null, 2)}\n`);
  } else if (rows.length === 0) {
    out.write('no cached capabilities\n');
  } else {
    out.write(
      table(
        ['DEVICE', 'DRIVER', 'FLAGS', 'MIG_DATA_SIZE', 'MIGRATION_VERSION', show ? 'CACHE' : 'RESULT'],
        rows.map((r) => [
          r.device,
          r.driver ?? '-',
          r.flags?.join('|') || '-',
          r.dataSize ?? '-',
          r.migrationVersion ?? '-',
          r.ok ? (r.error ? `ok (${r.error})` : show ? `valid, probed ${r.probedAt}` : 'cached') : `FAILED ${r.error ?? ''}`,
        ]),
      ),
    );
  }
  return rows.every((r) => r.ok) ? 0 : 1;
}
