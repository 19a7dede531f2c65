// modules.alias matching for VFIO variant drivers (kernel commit cc6711b0bf36, libvirt's
// virPCIDeviceFindBestVFIOVariant): take the device's modalias, turn "pci:" into
// "vfio_pci:", glob-match the override-only `alias vfio_pci:...` lines, and pick the
// match with the fewest '*'. Those lines are never used by the kernel's autoprobe; they
// exist only for userspace that writes driver_override.
//
// The ordinary `alias pci:` lines are kept too: they say whether a host driver would
// claim a device, which the "safe" alias policy needs (choose.ts). A real
// modules.alias has ~30000 lines; both kinds are bucketed by their literal vendor, so a
// lookup touches a few entries.

import { readFileSync, statSync } from 'node:fs';
import { release } from 'node:os';
import { join } from 'node:path';
import { isModuleName } from '../host/sysfs.ts';
import { MODALIAS } from './pcidev.ts';
import { PciError, errCode } from './errors.ts';

/** The generic vfio-pci module: its catch-all entry is the fallback, never a "variant". */
export const GENERIC_VFIO_MODULE = 'vfio_pci';

const PATTERN = /^(?:vfio_)?pci:[A-Za-z0-9*?[\]!_-]+$/;
const LITERAL_VENDOR = /^(?:vfio_)?pci:v([0-9A-F]{8})d/;

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

/** vfio_pci entries, bucketed by literal vendor so a lookup touches a few. */
class Bucketed {
  readonly byVendor = new Map<string, AliasEntry[]>();
  /** Wildcard vendors: in practice vfio_pci's own catch-all. */
  readonly anyVendor: AliasEntry[] = [];
  size = 0;

  add(entry: AliasEntry): void {
    const vendor = LITERAL_VENDOR.exec(entry.pattern);
    if (vendor) {
      const list = this.byVendor.get(vendor[1]!);
      if (list) list.push(entry);
      else this.byVendor.set(vendor[1]!, [entry]);
    } else {
      this.anyVendor.push(entry);
    }
    this.size++;
  }

  candidates(vendor: string): AliasEntry[] {
    const list = this.byVendor.get(vendor);
    return list ? [...list, ...this.anyVendor] : this.anyVendor;
  }
}

export class AliasIndex {
  readonly source: string;
  /** Override-only `alias vfio_pci:` entries: variant drivers (and vfio_pci itself). */
  readonly #vfio = new Bucketed();
  /**
   * Ordinary `alias pci:` entries (drivers the kernel autoprobes), read lazily per
   * vendor from the text: there are tens of thousands and a lookup needs a few.
   */
  readonly #host = new Map<string, AliasEntry[]>();
  #text: string;
  readonly #compiled = new Map<string, RegExp>();
  /** vfio_pci alias lines that were skipped because they did not look like one. */
  readonly skipped: number[] = [];

  constructor(source: string, entries: Iterable<AliasEntry> = [], text = '') {
    this.source = source;
    this.#text = text;
    for (const e of entries) this.add(e);
  }

  /** Number of vfio_pci entries. */
  get size(): number {
    return this.#vfio.size;
  }

  add(entry: AliasEntry): void {
    if (entry.pattern.startsWith('vfio_pci:')) this.#vfio.add(entry);
    else {
      const vendor = LITERAL_VENDOR.exec(entry.pattern)?.[1] ?? '*';
      this.#hostEntries(vendor).push(entry);
    }
  }

  /** Parses modules.alias text: the `alias vfio_pci:` lines now, `alias pci:` ones on demand. */
  static parse(text: string, source = 'modules.alias'): AliasIndex {
    const index = new AliasIndex(source, [], text);
    for (const { line, fields } of scan(text, 'alias vfio_pci:')) {
      const [, pattern, module] = fields;
      if (fields.length === 3 && pattern !== undefined && module !== undefined && PATTERN.test(pattern) && isModuleName(module)) {
        index.add({ pattern, module, wildcards: countStars(pattern), line });
      } else {
        index.skipped.push(line);
      }
    }
    return index;
  }

  /** Host entries for a literal vendor ('*': the wildcard-vendor ones), scanned once. */
  #hostEntries(vendor: string): AliasEntry[] {
    let list = this.#host.get(vendor);
    if (!list) {
      list = [];
      for (const { line, fields } of scan(this.#text, `alias pci:v${vendor}`)) {
        const [, pattern, module] = fields;
        if (fields.length === 3 && pattern !== undefined && module !== undefined && PATTERN.test(pattern) && isModuleName(module)) {
          list.push({ pattern, module, wildcards: countStars(pattern), line });
        }
      }
      this.#host.set(vendor, list);
    }
    return list;
  }

  /** vfio_pci entries that match a device's modalias (pci:... as sysfs prints it). */
  matches(modalias: string): AliasEntry[] {
    const target = vfioModalias(modalias);
    return this.#vfio.candidates(target.slice('vfio_pci:v'.length, 'vfio_pci:v'.length + 8)).filter((e) => this.#regex(e.pattern).test(target));
  }

  /**
   * Modules with an ordinary alias for the device: host drivers that autoprobe would
   * load for it, loaded yet or not. VFIO modules are left out.
   */
  hostModules(modalias: string): string[] {
    vfioModalias(modalias); // validates
    const vendor = modalias.slice('pci:v'.length, 'pci:v'.length + 8);
    const mods = new Set<string>();
    for (const e of [...this.#hostEntries(vendor), ...this.#hostEntries('*')]) {
      if (!/vfio/.test(e.module) && this.#regex(e.pattern).test(modalias)) mods.add(e.module);
    }
    return [...mods].sort();
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

/**
 * Lines starting with `prefix`, with their 1-based line numbers. Scans with indexOf
 * for the prefix instead of splitting 30000 lines into strings.
 */
function* scan(text: string, prefix: string): Generator<{ line: number; fields: string[] }> {
  let line = 1;
  let counted = 0;
  for (let at = text.indexOf(prefix); at !== -1; ) {
    const end = text.indexOf('\n', at);
    if (at === 0 || text.charCodeAt(at - 1) === 10) {
      for (let i = text.indexOf('\n', counted); i !== -1 && i < at; i = text.indexOf('\n', i + 1)) line++;
      counted = at;
      yield { line, fields: text.slice(at, end === -1 ? text.length : end).trim().split(/\s+/) };
    }
    at = end === -1 ? -1 : text.indexOf(prefix, end);
  }
}

function countStars(s: string): number {
  let n = 0;
  for (let i = 0; i < s.length; i++) if (s.charCodeAt(i) === 42) n++;
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
