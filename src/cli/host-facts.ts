// vfio-mig host-facts [--json] [--sources FILE|-] [--uri URI]: what only this host can
// tell about itself - kernel and its config, libvirt and QEMU versions, its VFIO devices
// with their recorded capabilities and whether a VM holds them - as versioned JSON. A
// source's preflight runs this on the destination (over ssh, or a configured command)
// and sends its hostdevs' descriptors on stdin (--sources -): the answer then says which
// devices here pass the compatibility test (the migration_version write test) for each.

import { readFileSync } from 'node:fs';
import { parseArgs, UsageError } from './args.ts';
import { table } from './table.ts';

export const usage = 'vfio-mig host-facts [--json] [--sources FILE|-] [--uri LIBVIRT-URI]   this host\'s migration facts (versioned JSON with --json)';

const HELP = `usage: ${usage}

Prints what only this host can tell about itself: kernel release and whether its config
has CONFIG_IOMMUFD_DRIVER, libvirt and QEMU versions (with --uri), and every VFIO device
with its driver, its recorded migration capability and whether a VM holds it.

  --json            versioned JSON (schema vfio-mig/host-facts/1): what preflight reads
  --sources FILE|-  source devices' descriptors, {"sources":[{"key","descriptor"}]}; the
                    answer says which devices here are compatible (migration_version test)
  --uri URI         this host's libvirt, for the libvirt and QEMU versions

Run as root: telling free devices from held ones opens /dev/vfio/<group>.
`;

async function readStdin(): Promise<string> {
  const chunks: Buffer[] = [];
  let size = 0;
  for await (const c of process.stdin as AsyncIterable<Buffer>) {
    size += c.length;
    if (size > 16 * 1024 * 1024) throw new UsageError('--sources: more than 16 MiB on stdin');
    chunks.push(c);
  }
  return Buffer.concat(chunks).toString('utf8');
}

export async function run(argv: string[], out: NodeJS.WritableStream): Promise<number> {
  const args = parseArgs(argv, { flags: ['json', 'help'], options: ['sources', 'uri'] });
  if (args.flags.has('help')) {
    out.write(HELP);
    return 0;
  }
  if (args.positional.length > 0) throw new UsageError(`unexpected argument ${JSON.stringify(args.positional[0])}`);
  const { collectHostFacts } = await import('../compat/preflight/collect.ts');
  const { parseCompatQueries } = await import('../compat/preflight/facts.ts');
  const { compatPort } = await import('../compat/preflight/compat-port.ts');
  const src = args.options.get('sources')?.at(-1);
  const queries = src === undefined ? [] : parseCompatQueries(src === '-' ? await readStdin() : readFileSync(src, 'utf8'));
  const uri = args.options.get('uri')?.at(-1);
  const facts = await collectHostFacts({ compat: await compatPort(), queries, ...(uri ? { libvirtUri: uri } : {}) });
  if (args.flags.has('json')) {
    out.write(`${JSON.stringify(facts, null, 2)}\n`);
    return 0;
  }
  const cfg = facts.kernelConfig;
  out.write(
    [
      `host      ${facts.hostname}`,
      `kernel    ${facts.kernel.release}`,
      `config    CONFIG_IOMMUFD_DRIVER ${cfg.iommufdDriver === null ? `unknown (${cfg.error ?? 'no config'})` : cfg.iommufdDriver ? 'set' : 'not set'}${cfg.source ? ` (${cfg.source})` : ''}`,
      `libvirt   ${facts.libvirt.version ?? `unknown: ${facts.libvirt.error ?? ''}`}`,
      `qemu      ${facts.qemu.version ?? `unknown: ${facts.qemu.error ?? ''}`}`,
      '',
    ].join('\n'),
  );
  if (facts.devices.length === 0) out.write('no VFIO devices\n');
  else {
    const rows = facts.devices.map((d) => {
      const cap = d.capabilities;
      const mig = cap.ok ? `${cap.flags.join('|') || '-'}${cap.stopCopyBytes !== null ? ` (stop-copy ${cap.stopCopyBytes} B)` : ''}` : `unknown: ${cap.reason}`;
      return [d.id, d.kind === 'mdev' ? `mdev ${d.mdevType ?? '?'}` : `${d.vendor ?? '?'}:${d.device ?? '?'}`, d.driver ?? '-', d.inUse === null ? '?' : d.inUse ? 'yes' : 'no', mig];
    });
    out.write(table(['DEVICE', 'IDS', 'DRIVER', 'IN USE', 'MIGRATION'], rows));
  }
  for (const a of facts.compatibility) {
    out.write(`\nsource ${a.key}:${a.error ? ` error: ${a.error}` : ''}\n`);
    for (const c of a.candidates) out.write(`  ${c.compatible ? (c.free ? 'compatible, free' : 'compatible, in use') : 'incompatible'}  ${c.target}  (${c.decidedBy}: ${c.reason})\n`);
  }
  return 0;
}
