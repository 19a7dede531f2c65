// The vfio-mig command. Subcommands are imported lazily: `vfio-mig devices` must not pay
// for loading what `vfio-mig qualify` needs, and hooks share this start-up path.

import { UsageError } from './args.ts';

interface Subcommand {
  usage: string;
  /** The page `vfio-mig <command> --help` prints, for commands whose run() has none. */
  help?: string;
  run(argv: string[], out: NodeJS.WritableStream, err: NodeJS.WritableStream): Promise<number>;
}

const SUBCOMMANDS: Record<string, () => Promise<Subcommand>> = {
  devices: () => import('./devices.ts'),
  qualify: () => import('./qualify.ts'),
  probe: () => import('./probe.ts'),
  drivers: () => import('./drivers.ts'),
  bind: () => import('./bind.ts'),
  unbind: () => import('./unbind.ts'),
  qmp: () => import('./qmp.ts'),
  events: () => import('./events.ts'),
  preflight: () => import('./preflight.ts'),
  migrate: () => import('./migrate.ts'),
  'enable-events': () => import('./enable-events.ts'),
  'host-facts': () => import('./host-facts.ts'),
  watch: () => import('./watch.ts'),
  report: () => import('./report.ts'),
  'migrate-devices': () => import('./migrate-devices.ts'),
  receive: () => import('./receive.ts'),
  trial: () => import('./trial.ts'),
  install: () => import('./install.ts'),
  uninstall: () => import('./uninstall.ts'),
};

// One line per command; kept here (not taken from the lazily loaded modules) so that
// `vfio-mig --help` loads nothing.
const HELP_LINES = [
  'vfio-mig devices [--json]              list VFIO-bound devices and their migration capability',
  'vfio-mig qualify <device>... [--json]  walk every migration arc of idle devices; verdict',
  'vfio-mig probe <device>... [--json]    cache idle devices\' migration flags, MIG_DATA_SIZE, descriptor',
  'vfio-mig probe --show [<device>...]    show cached capabilities and whether they are still valid',
  'vfio-mig drivers [--json]              every PCI device: current driver, chosen driver and why',
  'vfio-mig bind [--all | --device BDF...] [--dry-run] [--json]',
  '                                       bind devices to their VFIO (variant) driver, whole IOMMU groups',
  'vfio-mig unbind [--all | --device BDF...] [--dry-run] [--json]',
  '                                       give devices back the drivers they had before `bind`',
  'vfio-mig qmp --socket PATH [--timeout S] COMMAND [ARGS-JSON]',
  '                                       run one QMP command on a QEMU monitor socket, print its return as JSON',
  'vfio-mig events --socket PATH [--json] [--until EVENT] [--timeout S]',
  '                                       print QMP events as they arrive; stop at EVENT or after S seconds',
  'vfio-mig preflight <domain> --to URI [--json] [--print-xml FILE] | --xml FILE',
  '                                       can this VM migrate there: every check, pass/warn/fail, advice (exit 0/1/2)',
  'vfio-mig migrate <domain> --to URI [--live] [--fix] [--force] [--downtime auto|MS] [--json]',
  '                                       preflight, destination XMLs, downtime limit, libvirt migration, watched; verdict',
  'vfio-mig enable-events <domain> [--uri URI] [--fix]',
  '                                       migration-events=on (and --fix: the trap fixes) in the persistent definition',
  'vfio-mig host-facts [--json] [--sources FILE|-] [--uri URI]',
  '                                       this host\'s migration facts (versioned JSON; what preflight asks a destination)',
  'vfio-mig watch --source-qmp PATH --dest-qmp PATH [--json] [--timeout S] [--timeline FILE]',
  'vfio-mig watch --source-domain NAME --source-uri URI --dest-uri URI [--json] [--timeout S] [--timeline FILE]',
  '                                       watch a QEMU-driven migration from both ends (QMP sockets, or a libvirt',
  '                                       domain through libvirt); check the ordering rules; verdict',
  'vfio-mig report <timeline.json> [-o report.svg] [--json]',
  '                                       summary (and SVG) of a watch or engine timeline',
  'vfio-mig migrate-devices --device ID... --to ADDR [--qmp SOCK [--uri URI]] [--token HEX|--tls]',
  '                                       the engine, source: move held devices\' state (around QEMU\'s migration)',
  'vfio-mig receive --device ID... --from ADDR [--qmp SOCK [--uri URI]]',
  '                                       the engine, destination: load the state, then `cont` the VM',
  'vfio-mig trial --device ID (--to ADDR | --peer-device ID)',
  '                                       spare-device trial; the verdict is stored as compatibility evidence',
  'vfio-mig install [--root DIR] [--dry-run]  install CLI, hooks, units, udev rule, default config (hosts without the .deb)',
  'vfio-mig uninstall [--root DIR] [--purge]  give devices back and remove what install put there',
];

// Shared by every command; `qmp` and `events` use 1, 3 and 4 as their --help says.
const EXIT_LINES = [
  'exit codes: 0 success; 1 failed (qmp: QEMU refused the command, "<class>: <desc>" on stderr);',
  '            2 usage error; 3 qmp/events: transport (no socket, refused, closed, not QMP);',
  '            4 qmp/events: time limit reached (no greeting or reply; --until EVENT not seen)',
  '            watch/report: 0 ok, 1 migration failed, 5 ordering rule broken',
  '            preflight: 0 every check passed, 1 warnings, 2 a check failed (or preflight could not run)',
  '            migrate: 0 ok, 1 failed (still on the source), 3 not started, 4 time limit (aborted), 5 rule broken',
];

function help(): string {
  return ['usage: vfio-mig <command> [options]', '', 'commands:', ...HELP_LINES.map((l) => `  ${l}`), '', ...EXIT_LINES, '', 'vfio-mig <command> --help: options and details', ''].join('\n');
}

export async function main(argv: string[], out: NodeJS.WritableStream = process.stdout, err: NodeJS.WritableStream = process.stderr): Promise<number> {
  const [name, ...rest] = argv;
  if (!name || name === '--help' || name === '-h' || name === 'help') {
    out.write(help());
    return name ? 0 : 2;
  }
  const load = SUBCOMMANDS[name];
  if (!load) {
    err.write(`vfio-mig: unknown command ${JSON.stringify(name)}\n${help()}`);
    return 2;
  }
  try {
    const cmd = await load();
    if (cmd.help && (rest.includes('--help') || rest.includes('-h'))) {
      out.write(cmd.help);
      return 0;
    }
    return await cmd.run(rest, out, err);
  } catch (e) {
    if (e instanceof UsageError) {
      // A command without a --help page of its own: its usage line is the help.
      if (rest.includes('--help') || rest.includes('-h')) {
        out.write(`usage: ${(await load()).usage}\n`);
        return 0;
      }
      err.write(`vfio-mig ${name}: ${e.message}\nusage: ${(await load()).usage}\n`);
      return 2;
    }
    err.write(`vfio-mig ${name}: ${e instanceof Error ? e.message : String(e)}\n`);
    return 1;
  }
}

// Run when executed directly (tsx src/cli/main.ts ...), not when imported by tests.
if (import.meta.url === `file://${process.argv[1]}`) {
  void main(process.argv.slice(2)).then((code) => (process.exitCode = code));
}
