// libvirt's errors: its error numbers and domains (virterror.h of libvirt 11.3) and
// LibvirtError, which keeps libvirt's code, domain and message next to our operation, so a
// caller can branch on `code` and an operator reads libvirt's own words.

/** virErrorNumber values callers branch on. */
export const ErrorCode = {
  INTERNAL_ERROR: 1, NO_SUPPORT: 3, NO_CONNECT: 5, INVALID_CONN: 6, INVALID_DOMAIN: 7, INVALID_ARG: 8,
  OPERATION_FAILED: 9, XML_ERROR: 27, XML_DETAIL: 35, DOM_EXIST: 28, OPERATION_DENIED: 29, SYSTEM_ERROR: 38, RPC: 39,
  NO_DOMAIN: 42, AUTH_FAILED: 45, INVALID_NODE_DEVICE: 52, NO_NODE_DEVICE: 53, OPERATION_INVALID: 55,
  CONFIG_UNSUPPORTED: 67, OPERATION_TIMEOUT: 68, MIGRATE_PERSIST_FAILED: 69, HOOK_SCRIPT_FAILED: 70,
  ARGUMENT_UNSUPPORTED: 74, OPERATION_ABORTED: 78, MIGRATE_UNSAFE: 81, OPERATION_UNSUPPORTED: 84,
  AGENT_UNRESPONSIVE: 86, RESOURCE_BUSY: 87, ACCESS_DENIED: 88, DEVICE_MISSING: 99,
} as const;
/** virErrorNumber names, indexed by code (VIR_ERR_ prefix dropped; VIR_WAR_* kept as WAR_*). */
const CODE_NAMES = [
  'OK', 'INTERNAL_ERROR', 'NO_MEMORY', 'NO_SUPPORT', 'UNKNOWN_HOST', 'NO_CONNECT', 'INVALID_CONN',
  'INVALID_DOMAIN', 'INVALID_ARG', 'OPERATION_FAILED', 'GET_FAILED', 'POST_FAILED', 'HTTP_ERROR',
  'SEXPR_SERIAL', 'NO_XEN', 'XEN_CALL', 'OS_TYPE', 'NO_KERNEL', 'NO_ROOT', 'NO_SOURCE', 'NO_TARGET',
  'NO_NAME', 'NO_OS', 'NO_DEVICE', 'NO_XENSTORE', 'DRIVER_FULL', 'CALL_FAILED', 'XML_ERROR', 'DOM_EXIST',
  'OPERATION_DENIED', 'OPEN_FAILED', 'READ_FAILED', 'PARSE_FAILED', 'CONF_SYNTAX', 'WRITE_FAILED',
  'XML_DETAIL', 'INVALID_NETWORK', 'NETWORK_EXIST', 'SYSTEM_ERROR', 'RPC', 'GNUTLS_ERROR', 'WAR_NO_NETWORK',
  'NO_DOMAIN', 'NO_NETWORK', 'INVALID_MAC', 'AUTH_FAILED', 'INVALID_STORAGE_POOL', 'INVALID_STORAGE_VOL',
  'WAR_NO_STORAGE', 'NO_STORAGE_POOL', 'NO_STORAGE_VOL', 'WAR_NO_NODE', 'INVALID_NODE_DEVICE',
  'NO_NODE_DEVICE', 'NO_SECURITY_MODEL', 'OPERATION_INVALID', 'WAR_NO_INTERFACE', 'NO_INTERFACE',
  'INVALID_INTERFACE', 'MULTIPLE_INTERFACES', 'WAR_NO_NWFILTER', 'INVALID_NWFILTER', 'NO_NWFILTER',
  'BUILD_FIREWALL', 'WAR_NO_SECRET', 'INVALID_SECRET', 'NO_SECRET', 'CONFIG_UNSUPPORTED',
  'OPERATION_TIMEOUT', 'MIGRATE_PERSIST_FAILED', 'HOOK_SCRIPT_FAILED', 'INVALID_DOMAIN_SNAPSHOT',
  'NO_DOMAIN_SNAPSHOT', 'INVALID_STREAM', 'ARGUMENT_UNSUPPORTED', 'STORAGE_PROBE_FAILED',
  'STORAGE_POOL_BUILT', 'SNAPSHOT_REVERT_RISKY', 'OPERATION_ABORTED', 'AUTH_CANCELLED', 'NO_DOMAIN_METADATA',
  'MIGRATE_UNSAFE', 'OVERFLOW', 'BLOCK_COPY_ACTIVE', 'OPERATION_UNSUPPORTED', 'SSH', 'AGENT_UNRESPONSIVE',
  'RESOURCE_BUSY', 'ACCESS_DENIED', 'DBUS_SERVICE', 'STORAGE_VOL_EXIST', 'CPU_INCOMPATIBLE',
  'XML_INVALID_SCHEMA', 'MIGRATE_FINISH_OK', 'AUTH_UNAVAILABLE', 'NO_SERVER', 'NO_CLIENT', 'AGENT_UNSYNCED',
  'LIBSSH', 'DEVICE_MISSING', 'INVALID_NWFILTER_BINDING', 'NO_NWFILTER_BINDING', 'INVALID_DOMAIN_CHECKPOINT',
  'NO_DOMAIN_CHECKPOINT', 'NO_DOMAIN_BACKUP', 'INVALID_NETWORK_PORT', 'NETWORK_PORT_EXIST',
  'NO_NETWORK_PORT', 'NO_HOSTNAME', 'CHECKPOINT_INCONSISTENT', 'MULTIPLE_DOMAINS', 'NO_NETWORK_METADATA',
  'AGENT_COMMAND_TIMEOUT', 'AGENT_COMMAND_FAILED',
];

/** virErrorDomain names (where in libvirt the error was raised). */
const ERROR_DOMAINS = [
  'NONE', 'XEN', 'XEND', 'XENSTORE', 'SEXPR', 'XML', 'DOM', 'RPC', 'PROXY', 'CONF', 'QEMU', 'NET', 'TEST', 'REMOTE',
  'OPENVZ', 'XENXM', 'STATS_LINUX', 'LXC', 'STORAGE', 'NETWORK', 'DOMAIN', 'UML', 'NODEDEV', 'XEN_INOTIFY', 'SECURITY',
  'VBOX', 'INTERFACE', 'ONE', 'ESX', 'PHYP', 'SECRET', 'CPU', 'XENAPI', 'NWFILTER', 'HOOK', 'DOMAIN_SNAPSHOT', 'AUDIT',
  'SYSINFO', 'STREAMS', 'VMWARE', 'EVENT', 'LIBXL', 'LOCKING', 'HYPERV', 'CAPABILITIES', 'URI', 'AUTH', 'DBUS',
  'PARALLELS', 'DEVICE', 'SSH', 'LOCKSPACE', 'INITCTL', 'IDENTITY', 'CGROUP', 'ACCESS', 'SYSTEMD', 'BHYVE', 'CRYPTO',
  'FIREWALL', 'POLKIT', 'THREAD', 'ADMIN', 'LOGGING', 'XENXL', 'PERF', 'LIBSSH', 'RESCTRL', 'FIREWALLD',
  'DOMAIN_CHECKPOINT', 'TPM', 'BPF', 'CH',
];

/** A failed libvirt call, with libvirt's own code, domain and message kept. */
export class LibvirtError extends Error {
  /** virErrorNumber (e.g. 42 = VIR_ERR_NO_DOMAIN). */
  readonly code: number;
  /** "NO_DOMAIN" etc. (libvirt 11.3 names), or the number as text for newer codes. */
  readonly codeName: string;
  /** virErrorDomain (e.g. 10 = VIR_FROM_QEMU). */
  readonly domain: number;
  readonly domainName: string;
  /** libvirt's message, as libvirt wrote it. */
  readonly libvirtMessage: string;
  /** Our operation, e.g. "virDomainMigrateToURI3 tiny". */
  readonly operation: string;
  constructor(operation: string, code: number, domain: number, message: string) {
    const codeName = CODE_NAMES[code] || String(code);
    const domainName = ERROR_DOMAINS[domain] ?? String(domain);
    super(`${operation}: ${message} [libvirt ${domainName}/${codeName}]`);
    this.name = 'LibvirtError';
    this.code = code;
    this.codeName = codeName;
    this.domain = domain;
    this.domainName = domainName;
    this.libvirtMessage = message;
    this.operation = operation;
  }
}
