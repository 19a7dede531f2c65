// vfio-mig events --socket PATH [--json] [--until EVENT] [--timeout S]: prints the QMP
// events of a QEMU as they arrive, one line each, through the project's own client.
//
// Ends:
//  - at the first event named EVENT (--until): that event is printed, exit 0;
//  - at --timeout: exit 0 when no --until was given (watching for S seconds is the job),
//    exit 4 when --until was given and EVENT did not come (a script waiting for it failed);
//  - when the socket closes or the peer breaks QMP: exit 3, one line on stderr (events that
//    came before are printed);
//  - without --timeout it runs until one of the above (or Ctrl-C). Connecting (greeting and
//    capability negotiation) is always bounded: by --timeout, or 10 s without it;
//  - when stdout's reader goes away (EPIPE, e.g. `| head -3`): exit 0, quietly.
//
// QEMU stamps each event with its host clock; the human format prints that time (UTC,
// microseconds), the name and the data as compact JSON. --json prints QEMU's own envelope,
// {"event", "data", "timestamp"}, one object per line.

import { parseArgs, UsageError } from './args.ts';
import { EXIT, EXIT_CODES_HELP, connectQmp, socketOption, timeoutOption, transportFailure } from './qmp.ts';
import type { QmpClient } from '../qmp/client.ts';
import type { QmpEvent } from '../qmp/events.ts';

export const usage = 'vfio-mig events --socket PATH [--json] [--until EVENT] [--timeout S]';

const CONNECT_TIMEOUT_MS = 10_000;
const EVENT_NAME = /^[A-Za-z][A-Za-z0-9_-]{0,127}$/;

const HELP = [
  `usage: ${usage}`,
  '',
  'Prints the QMP events of a QEMU as they arrive: time (UTC), name, data; with --json one',
  'JSON object per line ({"event", "data", "timestamp"} as QEMU sends them).',
  '',
  '  --socket PATH   the QMP unix socket (QEMU -qmp unix:PATH,server=on,wait=off)',
  '  --until EVENT   stop after the first event named EVENT (exit 0)',
  '  --timeout S     stop after S seconds: exit 0, or 4 when --until EVENT was not seen;',
  `                  without it: run until EVENT or the socket closes (connect: ${CONNECT_TIMEOUT_MS / 1000} s)`,
  '',
  ...EXIT_CODES_HELP,
  '',
].join('\n');

export async function run(argv: string[], out: NodeJS.WritableStream, err: NodeJS.WritableStream = process.stderr): Promise<number> {
  const args = parseArgs(argv, { flags: ['help', 'json'], options: ['socket', 'until', 'timeout'] });
  if (args.flags.has('help')) {
    out.write(HELP);
    return EXIT.OK;
  }
  if (args.positional.length > 0) throw new UsageError(`unexpected argument ${JSON.stringify(args.positional[0])}`);
  const path = socketOption(args);
  const timeoutMs = timeoutOption(args, undefined);
  const untilValues = args.options.get('until');
  if (untilValues && untilValues.length > 1) throw new UsageError('--until given more than once');
  const until = untilValues?.[0];
  if (until !== undefined && !EVENT_NAME.test(until)) throw new UsageError(`not a QMP event name: ${JSON.stringify(until)}`);
  const format = args.flags.has('json') ? formatJson : formatLine;

  const started = Date.now();
  let client: QmpClient | undefined;
  try {
    client = await connectQmp(path, timeoutMs ?? CONNECT_TIMEOUT_MS);
  } catch (e) {
    const f = transportFailure(e);
    err.write(`vfio-mig events: ${f.message}\n`);
    return f.code;
  }
  const c = client;
  try {
    return await new Promise<number>((resolve) => {
      let finished = false;
      let timer: NodeJS.Timeout | undefined;
      const finish = (code: number, message?: string): void => {
        if (finished) return;
        finished = true;
        clearTimeout(timer);
        out.off('error', onOutputError);
        if (message) err.write(`vfio-mig events: ${message}\n`);
        resolve(code);
      };
      // The reader went away (`vfio-mig events ... | head -3`): stop quietly, like any filter.
      const onOutputError = (e: NodeJS.ErrnoException): void => {
        if (e.code === 'EPIPE') finish(EXIT.OK);
        else finish(EXIT.REFUSED, `cannot write the events: ${e.message}`);
      };
      out.on('error', onOutputError);
      const onEvent = (ev: QmpEvent): void => {
        if (finished) return;
        out.write(format(ev));
        if (ev.event === until) finish(EXIT.OK);
      };
      // Events that came with the negotiation reply were received before connect() returned:
      // they are in the backlog. Taking those and subscribing in one tick loses none.
      for (const ev of c.recentEvents()) onEvent(ev);
      c.onEvent(onEvent);
      void c.done.then((reason) => {
        const f = transportFailure(reason ?? new Error('the QMP connection closed'));
        finish(f.code, `${f.message}${until === undefined ? '' : ` (before ${until})`}`);
      });
      if (timeoutMs !== undefined && !finished) {
        const left = Math.max(1, timeoutMs - (Date.now() - started));
        timer = setTimeout(() => {
          if (until === undefined) finish(EXIT.OK);
          else finish(EXIT.TIMEOUT, `no ${until} event within ${formatSeconds(timeoutMs)} s`);
        }, left);
      }
    });
  } finally {
    await c.close();
  }
}

function formatLine(ev: QmpEvent): string {
  return `${isoTime(ev)} ${ev.event} ${JSON.stringify(ev.data)}\n`;
}

function formatJson(ev: QmpEvent): string {
  return `${JSON.stringify({ event: ev.event, data: ev.data, timestamp: ev.timestamp })}\n`;
}

/** QEMU's timestamp as ISO 8601 UTC with microseconds; events without a clock (-1) say so. */
function isoTime(ev: QmpEvent): string {
  const { seconds, microseconds } = ev.timestamp;
  if (!(seconds >= 0 && seconds <= 8_640_000_000_000) || !(microseconds >= 0 && microseconds < 1_000_000)) return `(no-time:${seconds}.${microseconds})`;
  const base = new Date(seconds * 1000).toISOString().slice(0, 19);
  return `${base}.${String(microseconds).padStart(6, '0')}Z`;
}

function formatSeconds(ms: number): string {
  return String(Math.round(ms) / 1000);
}
