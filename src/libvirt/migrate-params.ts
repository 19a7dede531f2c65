// Live migration's inputs: virDomainMigrateFlags and the typed migration parameters
// (VIR_MIGRATE_PARAM_*) that Domain.migrateToUri3 passes as a virTypedParameter array.

import { checkString } from './calls.ts';

/** virDomainMigrateFlags (libvirt-domain.h of libvirt 11.3). */
export const MigrateFlag = {
  LIVE: 1 << 0,
  PEER2PEER: 1 << 1,
  TUNNELLED: 1 << 2,
  PERSIST_DEST: 1 << 3,
  UNDEFINE_SOURCE: 1 << 4,
  PAUSED: 1 << 5,
  NON_SHARED_DISK: 1 << 6,
  NON_SHARED_INC: 1 << 7,
  CHANGE_PROTECTION: 1 << 8,
  UNSAFE: 1 << 9,
  OFFLINE: 1 << 10,
  COMPRESSED: 1 << 11,
  ABORT_ON_ERROR: 1 << 12,
  AUTO_CONVERGE: 1 << 13,
  RDMA_PIN_ALL: 1 << 14,
  POSTCOPY: 1 << 15,
  TLS: 1 << 16,
  PARALLEL: 1 << 17,
  NON_SHARED_SYNCHRONOUS_WRITES: 1 << 18,
  POSTCOPY_RESUME: 1 << 19,
  ZEROCOPY: 1 << 20,
} as const;

/** Typed migration parameters (VIR_MIGRATE_PARAM_*), the ones vfio-mig uses. */
export interface MigrateParams {
  /** migrate_uri: where QEMU's stream goes, e.g. "tcp://10.0.0.2". */
  uri?: string;
  /** destination_name */
  destName?: string;
  /** destination_xml: the domain XML to use on the destination (e.g. with remapped hostdevs). */
  destXml?: string;
  /** persistent_xml */
  persistXml?: string;
  /** bandwidth in MiB/s */
  bandwidth?: number;
  /** listen_address on the destination */
  listenAddress?: string;
  /** parallel.connections (with MigrateFlag.PARALLEL) */
  parallelConnections?: number;
}

const PARAM_FIELDS: Record<keyof MigrateParams, { field: string; type: 'string' | 'ullong' | 'int' }> = {
  uri: { field: 'migrate_uri', type: 'string' },
  destName: { field: 'destination_name', type: 'string' },
  destXml: { field: 'destination_xml', type: 'string' },
  persistXml: { field: 'persistent_xml', type: 'string' },
  bandwidth: { field: 'bandwidth', type: 'ullong' },
  listenAddress: { field: 'listen_address', type: 'string' },
  parallelConnections: { field: 'parallel.connections', type: 'int' },
};

/** Builds the virTypedParameter array (VIR_TYPED_PARAM_INT = 1, ULLONG = 4, STRING = 7). */
export function typedParams(params: MigrateParams): Array<{ field: string; type: number; value: Record<string, unknown> }> {
  const out: Array<{ field: string; type: number; value: Record<string, unknown> }> = [];
  for (const [key, value] of Object.entries(params) as Array<[keyof MigrateParams, unknown]>) {
    if (value === undefined) continue;
    const spec = PARAM_FIELDS[key];
    if (!spec) throw new TypeError(`unknown migration parameter ${String(key)}`);
    if (spec.type === 'string') {
      checkString(`migration parameter ${key}`, value as string, 16 * 1024 * 1024);
      out.push({ field: spec.field, type: 7, value: { s: value } });
    } else if (spec.type === 'ullong') {
      if (!Number.isSafeInteger(value) || (value as number) < 0) throw new RangeError(`migration parameter ${key} must be a non-negative integer`);
      out.push({ field: spec.field, type: 4, value: { ul: BigInt(value as number) } });
    } else {
      if (!Number.isSafeInteger(value) || Math.abs(value as number) > 2 ** 31 - 1) throw new RangeError(`migration parameter ${key} must be a 32-bit integer`);
      out.push({ field: spec.field, type: 1, value: { i: value } });
    }
  }
  return out;
}
