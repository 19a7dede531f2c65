// The driver table: /etc/vfio-mig/config.json ($VFIO_MIG_CONFIG), validated against
// plugin/config.schema.json. Rules map vendor/device (optionally subsystem ids and
// class, wildcards allowed) to a driver, or exclude devices. The first matching rule
// wins, like a firewall: an operator reads the file top-down.
//
// A config with any error is rejected as a whole, with file:line:column and the field,
// before anything is touched: half a table would bind half the devices it meant to.

import { readFileSync } from 'node:fs';
import { fileURLToPath } from 'node:url';
import { ConfigError, errCode } from './errors.ts';
import { parseLocatedJson, formatPath, JsonSyntaxError, type JsonValue, type LocatedJson } from './jsonloc.ts';
import { checkSchema, validate, type Schema } from './schema.ts';
import type { PciDeviceInfo } from './pcidev.ts';

export type AliasPolicy = 'safe' | 'all' | 'off';

export interface Rule {
  /** 0-based position in `rules`. */
  index: number;
  /** Line of the rule in the file (for "rule 3 (line 17)"). */
  line: number | undefined;
  vendor: string;
  device: string;
  subsystemVendor: string;
  subsystemDevice: string;
  class: string;
  driver: string | undefined;
  exclude: boolean;
  comment: string | undefined;
}

export interface DriverTable {
  /** The file it came from, or undefined when none exists (then: no rules, defaults). */
  source: string | undefined;
  rules: Rule[];
  /** When a modules.alias match alone is enough to bind a device (see chooseDriver). */
  aliasPolicy: AliasPolicy;
  manageSriovAutoprobe: boolean;
  /** The libvirt qemu hook's settings (the `hooks` section; docs/hooks.md); absent means DEFAULT_HOOKS. */
  hooks?: HooksConfig;
}

export interface HooksConfig {
  /** prepare: bind a hostdev to its chosen driver when it has another one (else refuse). */
  bind: boolean;
  /** migrate: add migration-events=on to each incoming VFIO hostdev (<qemu:override>). */
  migrationEvents: boolean;
  /** release: keep devices on their VFIO driver, or give them their previous driver back. */
  releasePolicy: 'keep' | 'restore';
  /** How long a device picked for an incoming migration stays reserved if the domain never starts. */
  reservationSeconds: number;
  timeouts: { prepareSeconds: number; migrateSeconds: number; releaseSeconds: number };
}

export const DEFAULT_HOOKS: HooksConfig = Object.freeze({
  bind: true,
  migrationEvents: false,
  releasePolicy: 'keep',
  reservationSeconds: 600,
  timeouts: Object.freeze({ prepareSeconds: 60, migrateSeconds: 30, releaseSeconds: 60 }),
}) as HooksConfig;

export const DEFAULT_TABLE: DriverTable = Object.freeze({ source: undefined, rules: [], aliasPolicy: 'safe', manageSriovAutoprobe: true, hooks: DEFAULT_HOOKS }) as DriverTable;

const MAX_CONFIG_BYTES = 1 << 20;

export function configPath(): string {
  return process.env.VFIO_MIG_CONFIG || '/etc/vfio-mig/config.json';
}

let schemaCache: Schema | undefined;

/** The shipped JSON Schema (plugin/config.schema.json), checked to use only what validate() knows. */
export function configSchema(): Schema {
  if (!schemaCache) {
    const path = fileURLToPath(new URL('../../plugin/config.schema.json', import.meta.url));
    const parsed = JSON.parse(readFileSync(path, 'utf8')) as Schema;
    checkSchema(parsed);
    schemaCache = parsed;
  }
  return schemaCache;
}

/** Loads the table; a missing file means "no rules" (alias matches still apply). */
export function loadDriverTable(path = configPath()): DriverTable {
  let text: string;
  try {
    const buf = readFileSync(path);
    if (buf.length > MAX_CONFIG_BYTES) throw new ConfigError(path, `larger than ${MAX_CONFIG_BYTES} bytes`);
    text = buf.toString('utf8');
  } catch (err) {
    if (err instanceof ConfigError) throw err;
    if (errCode(err) === 'ENOENT') return { ...DEFAULT_TABLE, rules: [] };
    throw new ConfigError(path, `cannot read: ${(err as Error).message}`);
  }
  return parseDriverTable(text, path);
}

export function parseDriverTable(text: string, source: string): DriverTable {
  let doc: LocatedJson;
  try {
    doc = parseLocatedJson(text);
  } catch (err) {
    if (err instanceof JsonSyntaxError) throw new ConfigError(source, `invalid JSON: ${err.message}`, { line: err.line, column: err.column });
    throw err;
  }
  const issues = validate(configSchema(), doc.value);
  if (issues.length > 0) {
    // Report the first issue in file order; say how many more there are.
    const located = issues.map((i) => ({ ...i, loc: doc.locate(i.path) }));
    located.sort((a, b) => (a.loc?.line ?? 0) - (b.loc?.line ?? 0) || (a.loc?.column ?? 0) - (b.loc?.column ?? 0));
    const first = located[0]!;
    const more = located.length > 1 ? ` (and ${located.length - 1} more problem${located.length > 2 ? 's' : ''})` : '';
    throw new ConfigError(source, `${first.message}${more}`, { line: first.loc?.line, column: first.loc?.column, field: formatPath(first.path) || '(document)' });
  }
  const root = doc.value as { [k: string]: JsonValue };
  const rawRules = (root.rules as Array<{ [k: string]: JsonValue }> | undefined) ?? [];
  const rules = rawRules.map((r, index): Rule => {
    const s = (k: string): string | undefined => (typeof r[k] === 'string' ? (r[k] as string) : undefined);
    const rule: Rule = {
      index,
      line: doc.locate(['rules', index])?.line,
      vendor: s('vendor')!.toLowerCase(),
      device: s('device')!.toLowerCase(),
      subsystemVendor: (s('subsystem_vendor') ?? '*').toLowerCase(),
      subsystemDevice: (s('subsystem_device') ?? '*').toLowerCase(),
      class: (s('class') ?? '*').toLowerCase(),
      driver: s('driver'),
      exclude: r.exclude === true,
      comment: s('comment'),
    };
    // Beyond the schema: a driver rule for every vendor would hand the host's own NICs,
    // disks and GPUs to that driver at the next boot.
    if (rule.driver !== undefined && rule.vendor === '*') {
      const loc = doc.locate(['rules', index, 'vendor']);
      throw new ConfigError(source, `a rule with a driver must name a vendor: "*" would give every matching device on the host to ${rule.driver} (use "exclude" rules for wide matches)`, {
        line: loc?.line,
        column: loc?.column,
        field: formatPath(['rules', index, 'vendor']),
      });
    }
    return rule;
  });
  return {
    source,
    rules,
    aliasPolicy: (root.aliasPolicy as AliasPolicy | undefined) ?? 'safe',
    manageSriovAutoprobe: (root.manageSriovAutoprobe as boolean | undefined) ?? true,
    hooks: parseHooks(root.hooks),
  };
}

/** The `hooks` section (already validated against the schema), defaults filled in. */
function parseHooks(raw: JsonValue | undefined): HooksConfig {
  const h = (raw ?? {}) as { [k: string]: JsonValue };
  const t = (h.timeouts ?? {}) as { [k: string]: JsonValue };
  const num = (v: JsonValue | undefined, d: number): number => (typeof v === 'number' ? v : d);
  return {
    bind: typeof h.bind === 'boolean' ? h.bind : DEFAULT_HOOKS.bind,
    migrationEvents: typeof h.migrationEvents === 'boolean' ? h.migrationEvents : DEFAULT_HOOKS.migrationEvents,
    releasePolicy: h.releasePolicy === 'restore' ? 'restore' : 'keep',
    reservationSeconds: num(h.reservationSeconds, DEFAULT_HOOKS.reservationSeconds),
    timeouts: {
      prepareSeconds: num(t.prepareSeconds, DEFAULT_HOOKS.timeouts.prepareSeconds),
      migrateSeconds: num(t.migrateSeconds, DEFAULT_HOOKS.timeouts.migrateSeconds),
      releaseSeconds: num(t.releaseSeconds, DEFAULT_HOOKS.timeouts.releaseSeconds),
    },
  };
}

/** The ids a rule is matched against (a device, or the VFs a PF will create). */
export type RuleTarget = Pick<PciDeviceInfo, 'vendor' | 'device' | 'subsystemVendor' | 'subsystemDevice' | 'class'>;

function idMatches(pattern: string, value: string): boolean {
  return pattern === '*' || pattern === value;
}

function classMatches(pattern: string, value: string): boolean {
  if (pattern === '*') return true;
  if (pattern.endsWith('*')) return value.startsWith(pattern.slice(0, -1));
  return pattern === value;
}

export function ruleMatches(rule: Rule, dev: RuleTarget): boolean {
  return (
    idMatches(rule.vendor, dev.vendor) &&
    idMatches(rule.device, dev.device) &&
    idMatches(rule.subsystemVendor, dev.subsystemVendor) &&
    idMatches(rule.subsystemDevice, dev.subsystemDevice) &&
    classMatches(rule.class, dev.class)
  );
}

/** The first rule matching a device, if any. */
export function findRule(table: DriverTable, dev: RuleTarget): Rule | undefined {
  return table.rules.find((r) => ruleMatches(r, dev));
}

export function describeRule(rule: Rule): string {
  const where = rule.line === undefined ? '' : ` (line ${rule.line})`;
  return `rule ${rule.index + 1}${where}`;
}
