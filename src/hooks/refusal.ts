// A hook's "no": one line for libvirt's error message (libvirt quotes the hook's stderr
// in the error `virsh` prints), and the exit status that aborts the operation.
// Kept in its own tiny module so the hook's entry can recognise it without loading the
// operation modules.

export class HookRefusal extends Error {
  /** The device the line is about (PCI address, mdev UUID), when there is one. */
  readonly device: string | undefined;
  constructor(message: string, device?: string) {
    super(message);
    this.name = 'HookRefusal';
    this.device = device;
  }
}

/** One line: no newlines, bounded length (libvirt puts it into an error message). */
export function oneLine(text: string, max = 1000): string {
  const flat = [...text.replace(/\s*\n\s*/g, '; ')].map((c) => (isControl(c) && c !== '\t' ? '?' : c)).join('');
  return flat.length > max ? `${flat.slice(0, max - 3)}...` : flat;
}

function isControl(c: string): boolean {
  const n = c.charCodeAt(0);
  return n < 0x20 || n === 0x7f;
}

/** Whether the text holds a control character (NUL, newline, escape, DEL, ...). */
export function hasControlChars(text: string): boolean {
  for (const c of text) if (isControl(c)) return true;
  return false;
}
