// virTypedParameter arrays that libvirt returns (job statistics): their memory layout and
// a decoder that works on a copy of the bytes, so it can be tested without libvirt.
//
//   struct _virTypedParameter {         // libvirt-common.h, x86_64 / aarch64
//     char field[80];                   // VIR_TYPED_PARAM_FIELD_LENGTH, NUL-terminated
//     int type;                         // virTypedParameterType
//     union { int i; unsigned int ui; long long l; unsigned long long ul;
//             double d; char b; char *s; } value;   // at offset 88 (8-byte aligned)
//   };                                  // 96 bytes

/** virTypedParameterType */
export const TypedParamType = { INT: 1, UINT: 2, LLONG: 3, ULLONG: 4, DOUBLE: 5, BOOLEAN: 6, STRING: 7 } as const;

export const TYPED_PARAM_SIZE = 96;
const FIELD_LENGTH = 80;
const TYPE_OFFSET = 80;
const VALUE_OFFSET = 88;

export type TypedParamValue = number | boolean | string;

export class TypedParamError extends Error {
  constructor(message: string) {
    super(message);
    this.name = 'TypedParamError';
  }
}

/**
 * Decodes `count` parameters from `bytes` (a copy of libvirt's array). String values are
 * pointers into libvirt's memory: `readString` turns one into text (it is not called for
 * a NULL pointer, which decodes as ""). 64-bit integers beyond 2^53 lose precision as
 * numbers; job statistics (bytes, ms) stay far below that. A parameter of a type this
 * decoder does not know is skipped rather than guessed at.
 */
export function decodeTypedParams(bytes: Uint8Array, count: number, readString: (ptr: bigint) => string): Map<string, TypedParamValue> {
  if (!Number.isSafeInteger(count) || count < 0) throw new TypedParamError(`typed parameters: bad count ${count}`);
  if (bytes.byteLength < count * TYPED_PARAM_SIZE) throw new TypedParamError(`typed parameters: ${count} need ${count * TYPED_PARAM_SIZE} bytes, got ${bytes.byteLength}`);
  const view = new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
  const out = new Map<string, TypedParamValue>();
  for (let i = 0; i < count; i++) {
    const base = i * TYPED_PARAM_SIZE;
    let end = base;
    while (end < base + FIELD_LENGTH && bytes[end] !== 0) end++;
    if (end === base + FIELD_LENGTH) throw new TypedParamError(`typed parameter ${i}: field name is not NUL-terminated`);
    const field = Buffer.from(bytes.buffer, bytes.byteOffset + base, end - base).toString('latin1');
    const type = view.getInt32(base + TYPE_OFFSET, true);
    const at = base + VALUE_OFFSET;
    let value: TypedParamValue;
    switch (type) {
      case TypedParamType.INT:
        value = view.getInt32(at, true);
        break;
      case TypedParamType.UINT:
        value = view.getUint32(at, true);
        break;
      case TypedParamType.LLONG:
        value = Number(view.getBigInt64(at, true));
        break;
      case TypedParamType.ULLONG:
        value = Number(view.getBigUint64(at, true));
        break;
      case TypedParamType.DOUBLE:
        value = view.getFloat64(at, true);
        break;
      case TypedParamType.BOOLEAN:
        value = view.getInt8(at) !== 0;
        break;
      case TypedParamType.STRING: {
        const p = view.getBigUint64(at, true);
        value = p === 0n ? '' : readString(p);
        break;
      }
      default:
        continue;
    }
    out.set(field, value);
  }
  return out;
}

/** Encodes parameters in the same layout (for tests; strings as the given fake pointers). */
export function encodeTypedParams(params: Array<{ field: string; type: number; value: number | boolean | bigint }>): Buffer {
  const buf = Buffer.alloc(params.length * TYPED_PARAM_SIZE);
  params.forEach((p, i) => {
    const base = i * TYPED_PARAM_SIZE;
    buf.write(p.field, base, FIELD_LENGTH - 1, 'latin1');
    buf.writeInt32LE(p.type, base + TYPE_OFFSET);
    const at = base + VALUE_OFFSET;
    const v = p.value;
    if (p.type === TypedParamType.INT) buf.writeInt32LE(Number(v), at);
    else if (p.type === TypedParamType.UINT) buf.writeUInt32LE(Number(v), at);
    else if (p.type === TypedParamType.LLONG) buf.writeBigInt64LE(BigInt(v), at);
    else if (p.type === TypedParamType.ULLONG || p.type === TypedParamType.STRING) buf.writeBigUInt64LE(BigInt(v), at);
    else if (p.type === TypedParamType.DOUBLE) buf.writeDoubleLE(Number(v), at);
    else if (p.type === TypedParamType.BOOLEAN) buf.writeInt8(v ? 1 : 0, at);
  });
  return buf;
}
