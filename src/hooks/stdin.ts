// Reads the domain XML libvirt writes to a hook's stdin: bounded in size and in time, so
// a hook run by hand (a terminal), with stdin closed, or fed something endless still
// ends with one clear line instead of hanging or exhausting memory.

import { fstatSync } from 'node:fs';
import { isatty } from 'node:tty';

export type StdinResult =
  | { kind: 'text'; text: string }
  | { kind: 'missing'; why: string }
  | { kind: 'too-large'; limit: number }
  | { kind: 'timeout'; ms: number; bytes: number };

export async function readStdin(limitBytes: number, timeoutMs: number, input: NodeJS.ReadableStream & { destroy?: () => void } = process.stdin): Promise<StdinResult> {
  if (input === process.stdin) {
    try {
      fstatSync(0);
    } catch {
      return { kind: 'missing', why: 'stdin is closed' };
    }
    if (isatty(0)) return { kind: 'missing', why: 'stdin is a terminal' };
  }
  return new Promise<StdinResult>((resolve) => {
    const chunks: Buffer[] = [];
    let bytes = 0;
    let done = false;
    const finish = (r: StdinResult) => {
      if (done) return;
      done = true;
      clearTimeout(timer);
      input.removeAllListeners('data');
      input.removeAllListeners('end');
      input.removeAllListeners('error');
      if (r.kind !== 'text') input.destroy?.();
      resolve(r);
    };
    const timer = setTimeout(() => finish({ kind: 'timeout', ms: timeoutMs, bytes }), timeoutMs);
    input.on('data', (c: Buffer | string) => {
      const b = typeof c === 'string' ? Buffer.from(c) : c;
      bytes += b.length;
      if (bytes > limitBytes) return finish({ kind: 'too-large', limit: limitBytes });
      chunks.push(b);
    });
    input.on('end', () => {
      const text = Buffer.concat(chunks).toString('utf8');
      finish(text.trim() === '' ? { kind: 'missing', why: 'stdin is empty' } : { kind: 'text', text });
    });
    input.on('error', (err: NodeJS.ErrnoException) => finish({ kind: 'missing', why: `stdin cannot be read (${err.code ?? err.message})` }));
  });
}
