// A strict JSON parser that remembers where each value starts, so a rejected config can
// name the line and column of the offending field (JSON.parse only gives an offset for
// syntax errors, and nothing for a value that parses but is wrong). It also rejects
// duplicate keys, which JSON.parse silently resolves to the last one - a config with
// two "driver" keys in one rule is a mistake, not a choice.

export type JsonValue = null | boolean | number | string | JsonValue[] | { [key: string]: JsonValue };

export interface Location {
  line: number;
  column: number;
}

export class JsonSyntaxError extends Error {
  readonly line: number;
  readonly column: number;
  constructor(message: string, loc: Location) {
    super(message);
    this.name = 'JsonSyntaxError';
    this.line = loc.line;
    this.column = loc.column;
  }
}

export interface LocatedJson {
  value: JsonValue;
  /** Where the value at a path starts; paths are arrays of keys and indices. */
  locate(path: ReadonlyArray<string | number>): Location | undefined;
}

const MAX_DEPTH = 64;

export function parseLocatedJson(text: string): LocatedJson {
  const locations = new Map<string, Location>();
  let pos = 0;
  // Line starts, to turn offsets into line:column cheaply.
  const lineStarts = [0];
  for (let i = 0; i < text.length; i++) if (text.charCodeAt(i) === 10) lineStarts.push(i + 1);

  const locAt = (offset: number): Location => {
    let lo = 0;
    let hi = lineStarts.length - 1;
    while (lo < hi) {
      const mid = (lo + hi + 1) >> 1;
      if (lineStarts[mid]! <= offset) lo = mid;
      else hi = mid - 1;
    }
    return { line: lo + 1, column: offset - lineStarts[lo]! + 1 };
  };
  const fail = (message: string, at = pos): never => {
    throw new JsonSyntaxError(message, locAt(at));
  };
  const ws = (): void => {
    while (pos < text.length) {
      const c = text.charCodeAt(pos);
      if (c === 32 || c === 9 || c === 10 || c === 13) pos++;
      else break;
    }
  };
  const describe = (): string => (pos >= text.length ? 'end of input' : JSON.stringify(text[pos]));

  const parseString = (): string => {
    const start = pos;
    pos++; // opening quote
    let out = '';
    while (true) {
      if (pos >= text.length) fail('unterminated string', start);
      const c = text[pos]!;
      if (c === '"') {
        pos++;
        return out;
      }
      if (c === '\\') {
        const e = text[pos + 1];
        const simple: Record<string, string> = { '"': '"', '\\': '\\', '/': '/', b: '\b', f: '\f', n: '\n', r: '\r', t: '\t' };
        if (e !== undefined && e in simple) {
          out += simple[e];
          pos += 2;
        } else if (e === 'u' && /^[0-9a-fA-F]{4}$/.test(text.slice(pos + 2, pos + 6))) {
          out += String.fromCharCode(parseInt(text.slice(pos + 2, pos + 6), 16));
          pos += 6;
        } else fail('invalid escape in string');
        continue;
      }
      if (c.charCodeAt(0) < 0x20) fail('control character in string (escape it)');
      out += c;
      pos++;
    }
  };

  const parseValue = (path: Array<string | number>, depth: number): JsonValue => {
    ws();
    if (depth > MAX_DEPTH) fail(`nested deeper than ${MAX_DEPTH} levels`);
    locations.set(JSON.stringify(path), locAt(pos));
    const c = text[pos];
    if (c === '{') {
      pos++;
      const obj: { [key: string]: JsonValue } = {};
      ws();
      if (text[pos] === '}') {
        pos++;
        return obj;
      }
      while (true) {
        ws();
        if (text[pos] !== '"') fail(`expected a "quoted" key, found ${describe()}`);
        const keyAt = pos;
        const key = parseString();
        if (Object.prototype.hasOwnProperty.call(obj, key)) fail(`duplicate key ${JSON.stringify(key)}`, keyAt);
        ws();
        if (text[pos] !== ':') fail(`expected ':' after key ${JSON.stringify(key)}, found ${describe()}`);
        pos++;
        Object.defineProperty(obj, key, { value: parseValue([...path, key], depth + 1), enumerable: true, writable: true, configurable: true });
        ws();
        if (text[pos] === ',') {
          pos++;
          continue;
        }
        if (text[pos] === '}') {
          pos++;
          return obj;
        }
        fail(`expected ',' or '}' in object, found ${describe()}`);
      }
    }
    if (c === '[') {
      pos++;
      const arr: JsonValue[] = [];
      ws();
      if (text[pos] === ']') {
        pos++;
        return arr;
      }
      while (true) {
        arr.push(parseValue([...path, arr.length], depth + 1));
        ws();
        if (text[pos] === ',') {
          pos++;
          continue;
        }
        if (text[pos] === ']') {
          pos++;
          return arr;
        }
        fail(`expected ',' or ']' in array, found ${describe()}`);
      }
    }
    if (c === '"') return parseString();
    const lit = /^(?:true|false|null|-?(?:0|[1-9][0-9]*)(?:\.[0-9]+)?(?:[eE][+-]?[0-9]+)?)/.exec(text.slice(pos, pos + 400));
    if (!lit) return fail(`unexpected ${describe()}`);
    pos += lit[0].length;
    if (lit[0] === 'true') return true;
    if (lit[0] === 'false') return false;
    if (lit[0] === 'null') return null;
    return Number(lit[0]);
  };

  if (text.charCodeAt(0) === 0xfeff) pos = 1; // a BOM from some editors
  const value = parseValue([], 0);
  ws();
  if (pos < text.length) fail(`unexpected ${describe()} after the end of the document`);
  return { value, locate: (path) => locations.get(JSON.stringify(path)) };
}

/** rules[2].vendor - a path as an operator reads it. */
export function formatPath(path: ReadonlyArray<string | number>): string {
  let out = '';
  for (const p of path) {
    if (typeof p === 'number') out += `[${p}]`;
    else out += /^[A-Za-z_$][A-Za-z0-9_$]*$/.test(p) ? (out ? `.${p}` : p) : `[${JSON.stringify(p)}]`;
  }
  return out;
}
