// A validator for the subset of JSON Schema (2020-12) that plugin/config.schema.json
// uses. Why not ajv: it is only here as a transitive dev dependency (v6, draft-07),
// loading it costs more than the whole binder at boot, and we need a dozen keywords.
// A keyword outside the subset makes the schema itself an error, so the shipped schema
// and this validator cannot silently drift apart.

import type { JsonValue } from './jsonloc.ts';

export type Schema = { [keyword: string]: JsonValue };

export interface SchemaIssue {
  path: Array<string | number>;
  message: string;
}

const ANNOTATIONS = new Set(['$schema', '$id', '$comment', 'title', 'description', 'default', 'examples']);
const KEYWORDS = new Set([
  'type', 'const', 'enum', 'properties', 'required', 'additionalProperties', 'items', 'minItems', 'maxItems',
  'pattern', 'minLength', 'maxLength', 'minimum', 'maximum', 'oneOf', '$ref', '$defs',
]);

export class SchemaError extends Error {
  constructor(message: string) {
    super(`unsupported config schema: ${message}`);
    this.name = 'SchemaError';
  }
}

function isObject(v: unknown): v is { [k: string]: JsonValue } {
  return typeof v === 'object' && v !== null && !Array.isArray(v);
}

/** Checks that a schema only uses the supported keywords (recursively). */
export function checkSchema(schema: JsonValue, where = '#'): void {
  if (!isObject(schema)) throw new SchemaError(`${where} is not an object`);
  for (const [k, v] of Object.entries(schema)) {
    if (ANNOTATIONS.has(k)) continue;
    if (!KEYWORDS.has(k)) throw new SchemaError(`keyword ${k} at ${where}`);
    if (k === 'properties' || k === '$defs') {
      if (!isObject(v)) throw new SchemaError(`${where}/${k} is not an object`);
      for (const [name, sub] of Object.entries(v)) checkSchema(sub, `${where}/${k}/${name}`);
    } else if (k === 'items') checkSchema(v, `${where}/items`);
    else if (k === 'oneOf') {
      if (!Array.isArray(v)) throw new SchemaError(`${where}/oneOf is not an array`);
      v.forEach((sub, i) => checkSchema(sub, `${where}/oneOf/${i}`));
    } else if (k === 'additionalProperties' && v !== false) throw new SchemaError(`${where}: only additionalProperties: false is supported`);
    else if (k === '$ref' && (typeof v !== 'string' || !v.startsWith('#/$defs/'))) throw new SchemaError(`${where}: only local #/$defs/ references are supported`);
  }
}

function typeOf(v: JsonValue): string {
  if (v === null) return 'null';
  if (Array.isArray(v)) return 'array';
  if (typeof v === 'number') return Number.isInteger(v) ? 'integer' : 'number';
  return typeof v;
}

function typeMatches(v: JsonValue, t: string): boolean {
  const actual = typeOf(v);
  return actual === t || (t === 'number' && actual === 'integer');
}

function show(v: JsonValue): string {
  const s = JSON.stringify(v);
  return s.length > 60 ? `${s.slice(0, 60)}...` : s;
}

/** Validates `value`; returns every issue found (empty = valid). */
export function validate(schema: Schema, value: JsonValue): SchemaIssue[] {
  const issues: SchemaIssue[] = [];
  const root = schema;
  const resolve = (ref: string): Schema => {
    const name = ref.slice('#/$defs/'.length);
    const defs = root.$defs;
    const target = isObject(defs) ? defs[name] : undefined;
    if (!isObject(target)) throw new SchemaError(`unresolved $ref ${ref}`);
    return target;
  };

  const walk = (s: Schema, v: JsonValue, path: Array<string | number>, out: SchemaIssue[]): void => {
    if (typeof s.$ref === 'string') walk(resolve(s.$ref), v, path, out);
    const hint = typeof s.description === 'string' ? ` (${s.description})` : '';
    if (typeof s.type === 'string' && !typeMatches(v, s.type)) {
      out.push({ path, message: `expected ${s.type === 'object' ? 'an object' : s.type === 'array' ? 'an array' : `a ${s.type}`}, found ${typeOf(v)} ${show(v)}` });
      return;
    }
    if ('const' in s && JSON.stringify(s.const) !== JSON.stringify(v)) out.push({ path, message: `must be ${show(s.const!)}, found ${show(v)}` });
    if (Array.isArray(s.enum) && !s.enum.some((e) => JSON.stringify(e) === JSON.stringify(v))) {
      out.push({ path, message: `must be one of ${s.enum.map(show).join(', ')}, found ${show(v)}` });
    }
    if (typeof v === 'string') {
      if (typeof s.pattern === 'string' && !new RegExp(s.pattern, 'u').test(v)) out.push({ path, message: `${show(v)} is not valid${hint}` });
      if (typeof s.minLength === 'number' && [...v].length < s.minLength) out.push({ path, message: `must have at least ${s.minLength} characters` });
      if (typeof s.maxLength === 'number' && [...v].length > s.maxLength) out.push({ path, message: `must have at most ${s.maxLength} characters` });
    }
    if (typeof v === 'number') {
      if (typeof s.minimum === 'number' && v < s.minimum) out.push({ path, message: `must be >= ${s.minimum}` });
      if (typeof s.maximum === 'number' && v > s.maximum) out.push({ path, message: `must be <= ${s.maximum}` });
    }
    if (Array.isArray(v)) {
      if (typeof s.minItems === 'number' && v.length < s.minItems) out.push({ path, message: `needs at least ${s.minItems} entries` });
      if (typeof s.maxItems === 'number' && v.length > s.maxItems) out.push({ path, message: `allows at most ${s.maxItems} entries, found ${v.length}` });
      if (isObject(s.items)) v.forEach((item, i) => walk(s.items as Schema, item, [...path, i], out));
    }
    if (isObject(v)) {
      const props = isObject(s.properties) ? s.properties : {};
      if (Array.isArray(s.required)) {
        for (const r of s.required) if (typeof r === 'string' && !(r in v)) out.push({ path, message: `missing required field ${JSON.stringify(r)}` });
      }
      for (const [k, sub] of Object.entries(v)) {
        const ps = props[k];
        if (isObject(ps)) walk(ps, sub, [...path, k], out);
        else if (s.additionalProperties === false) {
          const known = Object.keys(props);
          out.push({ path: [...path, k], message: `unknown field ${JSON.stringify(k)}${known.length ? ` (known: ${known.join(', ')})` : ''}` });
        }
      }
    }
    if (Array.isArray(s.oneOf)) {
      const passing = s.oneOf.filter((alt) => {
        const sub: SchemaIssue[] = [];
        walk(alt as Schema, v, path, sub);
        return sub.length === 0;
      }).length;
      if (passing !== 1) {
        // The common shape is oneOf: [{required: [a]}, {required: [b]}]: say it that way.
        const names = s.oneOf.map((alt) => (isObject(alt) && Array.isArray(alt.required) && alt.required.length === 1 ? String(alt.required[0]) : undefined));
        const msg = names.every((n) => n !== undefined)
          ? `needs exactly one of ${names.map((n) => JSON.stringify(n)).join(', ')}${passing > 1 ? ', not several' : ''}`
          : `matches ${passing} of the ${s.oneOf.length} alternatives; exactly one is required`;
        out.push({ path, message: msg });
      }
    }
  };

  walk(schema, value, [], issues);
  return issues;
}
