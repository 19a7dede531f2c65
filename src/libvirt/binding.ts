// The libvirt binding's public API: koffi over libvirt.so.0 and libvirt-qemu.so.0, split by
// concern (docs/architecture.md):
//
//   ffi.ts             every koffi declaration (the binding's only koffi import), loaded lazily
//   errors.ts          libvirt error codes and domains, LibvirtError
//   calls.ts           how a call is made: sync calls, async calls on a worker, error capture
//   event-loop.ts      libvirt's event loop, pumped on a libuv worker
//   monitor-events.ts  QEMU monitor event subscriptions (QMP events of libvirt domains)
//   connection.ts      Connection: open/close, versions, domains, node devices, events
//   domain.ts          Domain: state, XML, life cycle, QMP pass-through, migration
//   migrate-params.ts  MigrateFlag and the typed migration parameters
//   typed-params.ts    decoding the virTypedParameter arrays libvirt returns
//   job-stats.ts       job statistics (virDomainGetJobStats), also in query-migrate terms
//
// Importers use this file; the modules behind it may move.

export { ErrorCode, LibvirtError } from './errors.ts';
export { Connection, ListDomainsFlag, ListNodeDevicesFlag, type NodeDevice, type OpenOptions } from './connection.ts';
export { Domain, DomainState, DomainXmlFlag, type DomainStateInfo, type DomainStateName, type JobInfo } from './domain.ts';
export { JobOperation, JobStatsFlag, JobType, asQueryMigrate, jobActive, parseJobStats, type JobStats } from './job-stats.ts';
export { decodeTypedParams, TypedParamType, type TypedParamValue } from './typed-params.ts';
export { QemuMonitorEvents, type DomainQmpEvent, type MonitorEventOptions } from './monitor-events.ts';
export { MigrateFlag, typedParams, type MigrateParams } from './migrate-params.ts';
