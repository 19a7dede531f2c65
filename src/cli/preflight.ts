// vfio-mig preflight <domain> --to <libvirt-uri> [--json]: can this VM migrate there, and
// with what downtime? Every check (src/compat/preflight) gives pass, warn or fail and one
// sentence of advice. Exit 0 / 1 / 2 for pass / warnings / fail.
// vfio-mig preflight --xml FILE: the same for a domain definition, with this host as the
// destination (what the destination's migrate hook will be asked to accept).
//
// The source domain is read through libvirt (its live XML, its QEMU through the monitor
// pass-through: queries only); the destination's facts come from the destination's own
// vfio-mig (src/compat/preflight/peer.ts). --print-xml FILE writes the destination XML
// (compatible devices substituted, the vfio-mig metadata embedded) for
// `virsh migrate --xml FILE --persistent-xml FILE.persistent`.

import { readFileSync, writeFileSync } from 'node:fs';
import { parseArgs, UsageError } from './args.ts';
import { table } from './table.ts';
import { PREFLIGHT_SCHEMA, type Check, type PreflightReport } from '../compat/preflight/types.ts';
import type { PreflightDeps, PreflightOptions, PreflightResult } from '../compat/preflight/run.ts';
import type { Answer } from '../compat/preflight/qmp-facts.ts';

export const usage = [
  'vfio-mig preflight <domain> --to <libvirt-uri> [--json] [--connect URI] [--postcopy] [--parallel]',
  '                   [--link-gbps N] [--dest-facts FILE] [--print-xml FILE] [--timeout S]',
  '       vfio-mig preflight --xml FILE [--connect URI] [--json]',
].join('\n');

const HELP = `usage: ${usage}

Checks whether a VM can live-migrate to a destination, before any downtime: QEMU,
kernel and libvirt on both ends, each VFIO hostdev's driver and recorded capability,
P2P, QEMU's migration blockers, postcopy, dirty tracking, pinned-device convergence,
the downtime limit against the devices' stop-copy data, a downtime prediction, the
downtime levers that are off, a free compatible device on the destination for every
hostdev, and vendor findings. Each check: PASS, WARN or FAIL and what to do.

  --to URI           destination libvirt URI (qemu+ssh:// reaches its vfio-mig over ssh)
  --connect URI      source libvirt URI (default $LIBVIRT_DEFAULT_URI, else qemu:///system)
  --json             one JSON object (schema vfio-mig/preflight/1)
  --postcopy         you mean to migrate with --postcopy (refused with VFIO devices)
  --parallel         you mean to migrate with --parallel (multifd)
  --link-gbps N      migration link rate (default 10, marked assumed)
  --dest-facts FILE  destination facts saved by \`vfio-mig host-facts --json\` there
  --print-xml FILE   write the destination XML (FILE, FILE.persistent) for virsh migrate --xml
  --timeout S        time the destination may take to answer (default 30)
  --xml FILE         check a definition against this host as the destination

environment: VFIO_MIG_PEER_COMMAND (JSON argv running vfio-mig on the destination),
             VFIO_MIG_REMOTE_COMMAND (vfio-mig's path on an ssh destination)
exit codes: 0 every check passed; 1 warnings; 2 a check failed, or preflight could not run
details: docs/operations.md
`;

const VERDICT = { pass: 'PASS', warn: 'WARN', fail: 'FAIL' } as const;

/** A libvirt call's value, or its error as preflight records it (also vfio-mig migrate). */
export function answer<T>(f: () => T): Answer<T> {
  try {
    return { ok: true, value: f() };
  } catch (err) {
    return { ok: false, error: err instanceof Error ? err.message : String(err) };
  }
}

function positiveNumber(name: string, raw: string | undefined, max: number): number | undefined {
  if (raw === undefined) return undefined;
  const n = Number(raw);
  if (!Number.isFinite(n) || n <= 0 || n > max) throw new UsageError(`--${name} must be a number above 0 and at most ${max}`);
  return n;
}

/** The real host and peer access (also vfio-mig migrate's). */
export async function defaultPreflightDeps(timeoutMs: number): Promise<PreflightDeps> {
  const { compatPort } = await import('../compat/preflight/compat-port.ts');
  const { collectHostFacts } = await import('../compat/preflight/collect.ts');
  const { destinationFacts } = await import('../compat/preflight/peer.ts');
  const compat = await compatPort();
  return {
    compat,
    // The source's own facts need no in-use probe (it opens /dev/vfio groups): skip it there.
    localFacts: (queries, uri, role) => collectHostFacts({ compat, queries, ...(uri ? { libvirtUri: uri } : {}), ...(role === 'source' ? { groupInUse: () => null } : {}) }),
    destinationFacts: (req) => destinationFacts({ timeoutMs, ...req }),
  };
}

export function renderTable(report: PreflightReport): string {
  const rows = report.checks.map((c: Check) => [VERDICT[c.verdict], c.id, c.subject, c.detail]);
  const lines = table(['VERDICT', 'CHECK', 'SUBJECT', 'FINDING'], rows).trimEnd().split('\n');
  const pad = ' '.repeat(6);
  const out: string[] = [`preflight of ${report.domain} -> ${report.destination}`, '', lines[0]!];
  report.checks.forEach((c, i) => {
    out.push(lines[i + 1]!);
    out.push(`${pad}-> ${c.advice}`);
  });
  out.push('');
  if (report.downtime) {
    const d = report.downtime;
    out.push(`downtime: ~${d.totalMs} ms predicted (devices ${d.deviceMs} ms + RAM ${d.ramMs} ms), limit ${d.limitMs} ms`);
  }
  if (report.destinationXml) {
    const x = report.destinationXml;
    out.push(`destination XML: ${x.file}${x.persistentFile ? `, persistent: ${x.persistentFile}` : ''}`);
    for (const n of x.notes) out.push(`  ${n}`);
    out.push(`  virsh migrate --live --xml ${x.file}${x.persistentFile ? ` --persistent --persistent-xml ${x.persistentFile}` : ''} ${report.domain} ${report.destination}`);
  }
  const counts = (['fail', 'warn', 'pass'] as const).map((v) => `${report.checks.filter((c) => c.verdict === v).length} ${v}`).join(', ');
  out.push(`verdict: ${VERDICT[report.verdict]} (${counts}; exit ${report.exitCode})`);
  return `${out.join('\n')}\n`;
}

function emit(out: NodeJS.WritableStream, json: boolean, report: PreflightReport): number {
  out.write(json ? `${JSON.stringify(report, null, 2)}\n` : renderTable(report));
  return report.exitCode;
}

/**
 * Preflight could not even start (no source libvirt, no such domain): one line on stderr,
 * exit 2, and with --json still one report object on stdout, so a script reads the same shape.
 */
function refuse(out: NodeJS.WritableStream, err: NodeJS.WritableStream, json: boolean, domain: string, destination: string, id: string, detail: string, advice: string): number {
  err.write(`vfio-mig preflight: ${detail}\n`);
  if (json) {
    const report: PreflightReport = { schema: PREFLIGHT_SCHEMA, domain, destination, verdict: 'fail', exitCode: 2, checks: [{ id, family: 'source', subject: 'source', verdict: 'fail', detail, advice }] };
    out.write(`${JSON.stringify(report, null, 2)}\n`);
  }
  return 2;
}

let depsOverride: PreflightDeps | undefined;

/** Tests: use these dependencies instead of the real host, compat layer and peer. */
export function setPreflightDeps(deps: PreflightDeps | undefined): void {
  depsOverride = deps;
}

export async function run(argv: string[], out: NodeJS.WritableStream, err: NodeJS.WritableStream): Promise<number> {
  const args = parseArgs(argv, { flags: ['json', 'postcopy', 'parallel', 'help'], options: ['to', 'xml', 'connect', 'link-gbps', 'dest-facts', 'print-xml', 'timeout'] });
  if (args.flags.has('help')) {
    out.write(HELP);
    return 0;
  }
  const one = (name: string): string | undefined => args.options.get(name)?.at(-1);
  const json = args.flags.has('json');
  const timeoutS = positiveNumber('timeout', one('timeout'), 3600) ?? 30;
  const deps = depsOverride ?? (await defaultPreflightDeps(timeoutS * 1000));
  const run = await import('../compat/preflight/run.ts');
  const xmlFile = one('xml');
  const connect = one('connect');

  if (xmlFile !== undefined) {
    if (args.positional.length > 0 || one('to') !== undefined) throw new UsageError('--xml checks a definition against this host: no domain name and no --to');
    let xml: string;
    try {
      xml = readFileSync(xmlFile, 'utf8');
    } catch (e) {
      throw new UsageError(`cannot read --xml ${xmlFile}: ${(e as Error).message}`);
    }
    let libvirt: Answer<string> | undefined;
    let qemu: Answer<string> | undefined;
    if (connect) {
      const versions = await localVersions(connect);
      libvirt = versions.libvirt;
      qemu = versions.qemu;
    }
    const result = await run.preflightXml({ file: xmlFile, xml, ...(connect ? { uri: connect } : {}), libvirt, qemu }, deps);
    return emit(out, json, result.report);
  }

  const [name, ...extra] = args.positional;
  if (!name) throw new UsageError('which domain? (or --xml FILE)');
  if (extra.length > 0) throw new UsageError(`unexpected argument ${JSON.stringify(extra[0])}`);
  const to = one('to');
  if (!to) throw new UsageError('--to <libvirt-uri> is required (the destination)');
  const gbps = positiveNumber('link-gbps', one('link-gbps'), 10000);
  const options: PreflightOptions = {
    postcopy: args.flags.has('postcopy'),
    parallel: args.flags.has('parallel'),
    linkBytesPerSec: gbps !== undefined ? (gbps * 1e9) / 8 : run.DEFAULT_LINK_BYTES_PER_SEC,
    linkAssumed: gbps === undefined,
  };
  const printXml = one('print-xml');
  const destFacts = one('dest-facts');

  const { Connection } = await import('../libvirt/binding.ts');
  const sourceUri = connect ?? process.env.LIBVIRT_DEFAULT_URI ?? 'qemu:///system';
  let conn: import('../libvirt/binding.ts').Connection;
  try {
    conn = Connection.open(sourceUri);
  } catch (e) {
    const msg = `cannot reach the source's libvirt at ${sourceUri}: ${e instanceof Error ? e.message : String(e)}`;
    return refuse(out, err, json, name, to, 'source-libvirt', msg, 'Check --connect (or $LIBVIRT_DEFAULT_URI) and that libvirtd runs here (virsh version).');
  }
  try {
    const dom = conn.lookupDomain(name);
    try {
      const st = dom.state().state;
      const running = st === 'running' || st === 'paused' || st === 'blocked';
      const dest = answer(() => Connection.open(to));
      const destination = {
        uri: to,
        libvirt: dest.ok ? answer(() => dest.value.libVersion()) : dest,
        qemu: dest.ok ? answer(() => dest.value.hypervisorVersion()) : dest,
      };
      if (dest.ok) dest.value.close();
      const result: PreflightResult = await run.preflightDomain(
        {
          name,
          xml: dom.xml(),
          running,
          qmp: running ? dom : undefined,
          sourceLibvirt: answer(() => conn.libVersion()),
          destination,
          ...(destFacts ? { destFactsFile: destFacts } : {}),
          options,
        },
        deps,
      );
      if (printXml) {
        const notes: string[] = [];
        const live = await run.rewriteXml(dom.xml({ migratable: true }), result, deps.compat);
        writeFileSync(printXml, live.xml);
        notes.push(...live.notes);
        let persistentFile: string | undefined;
        const inactive = answer(() => dom.xml({ inactive: true, migratable: true }));
        if (inactive.ok) {
          persistentFile = `${printXml}.persistent`;
          writeFileSync(persistentFile, (await run.rewriteXml(inactive.value, result, deps.compat)).xml);
        }
        if (result.report.verdict === 'fail') notes.push('the preflight failed: migrating with this XML will fail the same way');
        result.report.destinationXml = { file: printXml, ...(persistentFile ? { persistentFile } : {}), notes };
      }
      return emit(out, json, result.report);
    } finally {
      dom.dispose();
    }
  } catch (e) {
    if (e instanceof UsageError) throw e;
    const msg = e instanceof Error ? e.message : String(e);
    return refuse(out, err, json, name, to, 'source-domain', msg, 'Check the domain name (virsh list --all) and that the source libvirt can read it.');
  } finally {
    conn.close();
  }
}

async function localVersions(uri: string): Promise<{ libvirt: Answer<string>; qemu: Answer<string> }> {
  const { Connection } = await import('../libvirt/binding.ts');
  const c = answer(() => Connection.open(uri));
  if (!c.ok) return { libvirt: c, qemu: c };
  try {
    return { libvirt: answer(() => c.value.libVersion()), qemu: answer(() => c.value.hypervisorVersion()) };
  } finally {
    c.value.close();
  }
}
