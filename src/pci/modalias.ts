// modules.alias matching for VFIO variant drivers (kernel commit cc6711b0bf36, libvirt's
// virPCIDeviceFindBestVFIOVariant): take the device's modalias, turn "pci:" into
// "vfio_pci:", glob-match the override-only `alias vfio_pci:...` lines, and pick the
// match with the fewest '*'. Those lines are never used by the kernel's autoprobe; they
// exist only for userspace that writes driver_override.
//
// A real modules.alias has ~30000 lines, a handful of them vfio_pci ones; we only keep
// those, indexed by their literal vendor, so a lookup touches a few entries.

import { readFileSync, statSync } from 'node:fs';
import { release } from 'node:os';
import { join } from 'node:path';
import { isModuleName } from './sysfs.ts';
import { MODALIAS } from './pcidev.ts';
import { PciError, errCode } from './errors.ts';

/** The generic vfio-pci module: its catch-all entry is the fallback, never a "variant". */
export const GENERIC_VFIO_MODULE = 'vfio_pci';

const PREFIX = 'alias vfio_pci:';
const PATTERN = /^vfio_pci:[A-Za-z0-9*?[\]!_-]+$/;
const LITERAL_VENDOR = /^v([0-9A-F]{8})d/;

export interface AliasEntry {
  /** The glob, e.g. vfio_pci:v000015B3d0000101Esv*sd*bc*sc*i* */
  pattern: string;
  module: string;
  /** Number of '*' in the pattern: fewer means more specific. */
  wildcards: number;
  /** 1-based line in modules.alias, for messages. */
  line: number;
}

export type AliasMatch =
  | { kind: 'none' }
  | { kind: 'variant'; module: string; pattern: string; wildcards: number }
  /** Equally specific entries of different modules: reported, never guessed. */
  | { kind: 'ambiguous'; modules: string[]; wildcards: number };

export class AliasIndex {
  readonly source: string;
  /** vfio_pci entries whose vendor is a literal, by 8-digit upper-case vendor. */
  readonly #byVendor = new Map<string, AliasEntry[]>();
  /** Entries with a wildcard vendor (in practice only vfio_pci's own catch-all). */
  readonly #anyVendor: AliasEntry[] = [];
  readonly #compiled = new Map<string, RegExp>();
  /** vfio_pci lines that were skipped because they did not look like an alias line. */
  readonly skipped: number[] = [];
  #size = 0;

  constructor(source: string, entries: Iterable<AliasEntry> = []) {
    this.source = source;
    for (const e of entries) this.add(e);
  }

  get size(): number {
    return this.#size;
  }

  add(entry: AliasEntry): void {
    const vendor = LITERAL_VENDOR.exec(entry.pattern.slice('vfio_pci:'.length));
    if (vendor) {
      const list = this.#byVendor.get(vendor[1]!);
      if (list) list.push(entry);
      else this.#byVendor.set(vendor[1]!, [entry]);
    } else {
      this.#anyVendor.push(entry);
    }
    this.#size++;
  }

  /** Parses modules.alias text; only `alias vfio_pci:` lines are kept. */
  static parse(text: string, source = 'modules.alias'): AliasIndex {
    const index = new AliasIndex(source);
    // Scan for the prefix instead of splitting 30000 lines: the vfio_pci lines are few.
    let at = text.indexOf(PREFIX);
    let lineNo = 1;
    let counted = 0;
    while (at !== -1) {
      const end = text.indexOf('\n', at);
      const stop = end === -1 ? text.length : end;
      if (at === 0 || text.charCodeAt(at - 1) === 10) {
        lineNo += countNewlines(text, counted, at);
        counted = at;
        const fields = text.slice(at, stop).trim().split(/\s+/);
        const [, pattern, module] = fields;
        if (fields.length === 3 && pattern !== undefined && module !== undefined && PATTERN.test(pattern) && isModuleName(module)) {
          index.add({ pattern, module, wildcards: countStars(pattern), line: lineNo });
        } else {
          index.skipped.push(lineNo);
        }
      }
      at = end === -1 ? -1 : text.indexOf(PREFIX, end);
    }
    return index;
  }

  /** Entries that match a device's modalias (pci:... as sysfs prints it). */
  matches(modalias: string): AliasEntry[] {
    const target = vfioModalias(modalias);
    const vendor = target.slice('vfio_pci:v'.length, 'vfio_pci:v'.length + 8);
    const candidates = [...(this.#byVendor.get(vendor) ?? []), ...this.#anyVendor];
    return candidates.filter((e) => this.#regex(e.pattern).test(target));
  }

  /** The best variant driver module for a modalias, libvirt's way. */
  best(modalias: string): AliasMatch {
    let bestStars = Infinity;
    let modules = new Set<string>();
    let winner: AliasEntry | undefined;
    for (const e of this.matches(modalias)) {
      if (e.module === GENERIC_VFIO_MODULE) continue;
      if (e.wildcards < bestStars) {
        bestStars = e.wildcards;
        modules = new Set([e.module]);
        winner = e;
      } else if (e.wildcards === bestStars) {
        modules.add(e.module);
      }
    }
    if (!winner) return { kind: 'none' };
    if (modules.size > 1) return { kind: 'ambiguous', modules: [...modules].sort(), wildcards: bestStars };
    return { kind: 'variant', module: winner.module, pattern: winner.pattern, wildcards: bestStars };
  }

  #regex(pattern: string): RegExp {
    let re = this.#compiled.get(pattern);
    if (!re) {
      re = globToRegExp(pattern);
      this.#compiled.set(pattern, re);
    }
    return re;
  }
}

function countStars(s: string): number {
  let n = 0;
  for (let i = 0; i < s.length; i++) if (s.charCodeAt(i) === 42) n++;
  return n;
}

function countNewlines(text: string, from: number, to: number): number {
  let n = 0;
  for (let i = text.indexOf('\n', from); i !== -1 && i < to; i = text.indexOf('\n', i + 1)) n++;
  return n;
}

/** fnmatch(3)-style glob (`*`, `?`, `[...]`, `[!...]`) to an anchored RegExp. */
export function globToRegExp(glob: string): RegExp {
  let out = '^';
  for (let i = 0; i < glob.length; i++) {
    const c = glob[i]!;
    if (c === '*') out += '.*';
    else if (c === '?') out += '.';
    else if (c === '[') {
      const close = glob.indexOf(']', i + 2);
      if (close === -1) {
        out += '\\[';
        continue;
      }
      let body = glob.slice(i + 1, close);
      const negate = body.startsWith('!');
      if (negate) body = body.slice(1);
      out += `[${negate ? '^' : ''}${body.replace(/[\\^\]]/g, '\\$&')}]`;
      i = close;
    } else out += c.replace(/[.*+?^${}()|[\]\\/]/g, '\\$&');
  }
  return new RegExp(`${out}$`);
}

/** pci:v...  ->  vfio_pci:v...  (validated first: the modalias comes from sysfs). */
export function vfioModalias(modalias: string): string {
  if (!MODALIAS.test(modalias)) {
    throw new PciError({ operation: 'match modules.alias', device: '-', reason: `${JSON.stringify(modalias.slice(0, 80))} is not a PCI modalias` });
  }
  return `vfio_${modalias}`;
}

/** The directory holding modules.alias: $VFIO_MIG_MODULES_DIR or /lib/modules/$(uname -r). */
export function modulesDir(): string {
  return process.env.VFIO_MIG_MODULES_DIR || join('/lib/modules', release());
}

let cache: { path: string; mtimeMs: number; size: number; index: AliasIndex } | undefined;

/**
 * Loads (and caches, keyed by mtime and size) the running kernel's modules.alias. A
 * missing file is an empty index: then no device has a variant, which is reported.
 */
export function loadAliasIndex(dir = modulesDir()): AliasIndex {
  const path = join(dir, 'modules.alias');
  let st;
  try {
    st = statSync(path);
  } catch (err) {
    if (errCode(err) === 'ENOENT') return new AliasIndex(`${path} (missing)`);
    throw new PciError({ operation: 'read modules.alias', device: '-', reason: `${path}: ${(err as Error).message}`, code: errCode(err), cause: err });
  }
  if (cache && cache.path === path && cache.mtimeMs === st.mtimeMs && cache.size === st.size) return cache.index;
  const index = AliasIndex.parse(readFileSync(path, 'latin1'), path);
  cache = { path, mtimeMs: st.mtimeMs, size: st.size, index };
  return index;
}
