// Start-up cost of the libvirt qemu hook, which libvirtd runs synchronously for every
// domain at every lifecycle step: the built hooks/qemu (dist/js, from a fresh install
// tree) against `node -e 0` - the floor any Node.js hook pays - in the same run,
// interleaved, each repeated, medians compared.
//   - pass-through: `prepare begin` of a domain without hostdevs (libvirt's own
//     q35-virt-manager-basic XML on stdin): the path every ordinary VM takes;
//   - hostdev8: `migrate begin` of a domain with 8 PCI hostdevs and vfio-mig metadata on
//     a fake sysfs host with 8 free compatible VFs: parse, compatibility checks, the
//     lock and reservations, the rewrite - the heaviest path.
// Headline: hooks: ratio=<pass-through/node> hostdev8_ms=<median> (target ratio <= 1.5).
import { spawn } from 'node:child_process';
import { readFileSync } from 'node:fs';
import { join } from 'node:path';
import { FakeSysfs } from '../test/fake/sysfs.ts';
import { makePrefix, repo, runHook } from '../test/unit/hook-harness.ts';
import { DomainXml } from '../src/libvirt/domain-xml.ts';
import { writeMetadata } from '../src/compat/domain-metadata.ts';
import { describeDevice } from '../src/compat/descriptor.ts';

const RUNS = Number(process.env.VFIO_MIG_BENCH_RUNS ?? 15);

function median(xs: number[]): number {
  const s = [...xs].sort((a, b) => a - b);
  return s.length % 2 ? s[(s.length - 1) / 2]! : (s[s.length / 2 - 1]! + s[s.length / 2]!) / 2;
}

/** Start to exit of one process, stdin written and closed, the hook's minimal environment for both. */
function timed(args: string[], stdin: string, env: Record<string, string>): Promise<number> {
  const t0 = process.hrtime.bigint();
  return new Promise((resolve, reject) => {
    const child = spawn(process.execPath, args, { env: { LC_ALL: 'C', PATH: process.env.PATH ?? '/usr/bin:/bin', HOME: '/', ...env }, stdio: ['pipe', 'ignore', 'ignore'] });
    child.stdin.on('error', () => {}); // node -e 0 does not read it
    child.stdin.end(stdin);
    child.on('error', reject);
    child.on('close', () => resolve(Number(process.hrtime.bigint() - t0) / 1e6));
  });
}

export async function run(): Promise<string> {
  const fake = new FakeSysfs();
  const prefix = await makePrefix();
  try {
    fake.addModule('mlx5_vfio_pci', [{ name: 'mlx5_vfio_pci' }], { loaded: true });
    const vfs = Array.from({ length: 8 }, (_, i) => `0000:3c:0${i >> 3}.${i & 7}`);
    vfs.forEach((bdf, i) => fake.addDevice({ bdf, vendor: '15b3', device: '101e', driver: 'mlx5_vfio_pci', group: 40 + i }));
    const env = { ...fake.env(), VFIO_MIG_LOG_DIR: join(fake.root, 'log'), VFIO_MIG_LIBVIRT_RUN_DIR: join(fake.root, 'run'), VFIO_MIG_LIBVIRT_VERSION: '11.3.0' };
    Object.assign(process.env, env); // describeDevice below reads the fake host

    const plain = readFileSync(join(repo, 'test/fixtures/libvirt-xml/q35-virt-manager-basic.x86_64-latest.xml'), 'utf8');
    let xml = readFileSync(join(repo, 'test/fixtures/libvirt-xml/hostdev-pci-address.x86_64-latest.xml'), 'utf8');
    const block = /( *<hostdev [\s\S]*?<\/hostdev>\n)/.exec(xml)![1]!;
    xml = xml.replace(block, Array.from({ length: 8 }, (_, i) => block.replace(/function='0x5'/, `function='0x${i}'`).replace(/slot='0x02'/, `slot='0x${(i + 2).toString(16).padStart(2, '0')}'`)).join(''));
    const doc = DomainXml.parse(xml);
    const desc = describeDevice(vfs[0]!) as unknown as Record<string, unknown>;
    writeMetadata(doc, { host: 'src', hostdevs: doc.hostdevs().map((_, i) => ({ alias: undefined, type: 'pci' as const, address: `0000:06:12.${i}`, descriptor: { ...desc, id: `0000:06:12.${i}` } })) });
    const eight = doc.serialize();

    // Warm the page cache and check that each path does what is measured.
    const check8 = await runHook(prefix, ['bench8', 'migrate', 'begin', '-'], { stdin: eight, env });
    if (check8.code !== 0 || !check8.stdout.includes("bus='0x3c'")) throw new Error(`the 8-hostdev migrate failed: ${check8.stderr}`);
    const checkPlain = await runHook(prefix, ['benchp', 'prepare', 'begin', '-'], { stdin: plain, env });
    if (checkPlain.code !== 0 || checkPlain.stderr !== '') throw new Error(`pass-through failed: ${checkPlain.stderr}`);
    await timed(['-e', '0'], plain, env);

    const node: number[] = [];
    const pass: number[] = [];
    const h8: number[] = [];
    for (let i = 0; i < RUNS; i++) {
      node.push(await timed(['-e', '0'], plain, env));
      pass.push(await timed([prefix.hook, 'benchp', 'prepare', 'begin', '-'], plain, env));
      h8.push(await timed([prefix.hook, 'bench8', 'migrate', 'begin', '-'], eight, env));
    }
    const mNode = median(node);
    const mPass = median(pass);
    const m8 = median(h8);
    console.log(`hooks: ${RUNS} interleaved runs each (start to exit, ms; medians)`);
    console.log(`  node -e 0                          ${mNode.toFixed(1)}  (min ${Math.min(...node).toFixed(1)})`);
    console.log(`  hooks/qemu prepare, no hostdevs    ${mPass.toFixed(1)}  (min ${Math.min(...pass).toFixed(1)})`);
    console.log(`  hooks/qemu migrate, 8 hostdevs     ${m8.toFixed(1)}  (min ${Math.min(...h8).toFixed(1)}; fake sysfs)`);
    return `hooks: ratio=${(mPass / mNode).toFixed(2)} hostdev8_ms=${m8.toFixed(0)} node_ms=${mNode.toFixed(0)} passthrough_ms=${mPass.toFixed(0)} runs=${RUNS}`;
  } finally {
    prefix.dispose();
    fake.dispose();
  }
}
