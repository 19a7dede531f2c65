// A libvirt connection: open/close, versions, domain listing and look-up, node devices, and
// QEMU monitor event subscriptions (which need libvirt's event loop, see event-loop.ts).

import { readPtr, takePtrArray, type Ptr } from './ffi.ts';
import { checkString, isNeg, isNull, lib, quiet, sync } from './calls.ts';
import { ErrorCode, LibvirtError } from './errors.ts';
import { pump } from './event-loop.ts';
import { subscribeMonitorEvents, type MonitorEventOptions, type QemuMonitorEvents } from './monitor-events.ts';
import { Domain } from './domain.ts';

/** virConnectListAllDomainsFlags */
export const ListDomainsFlag = { ACTIVE: 1, INACTIVE: 2, PERSISTENT: 4, TRANSIENT: 8, RUNNING: 16, PAUSED: 32 } as const;

/** virConnectListAllNodeDeviceFlags (the ones vfio-mig uses) */
export const ListNodeDevicesFlag = { CAP_PCI_DEV: 1 << 1, CAP_MDEV_TYPES: 1 << 13, CAP_MDEV: 1 << 14, CAP_VDPA: 1 << 17, INACTIVE: 1 << 30, ACTIVE: 2 ** 31 } as const;

export interface OpenOptions {
  /** Enable QEMU monitor events on this connection (starts libvirt's event loop). */
  events?: boolean;
}

export interface NodeDevice {
  name: string;
  /** The node device XML (libvirt's nodedev format). */
  xml: string;
}

export class Connection {
  readonly uri: string;
  /** The virConnectPtr (valid until close()). */
  readonly handle: Ptr;
  private open = true;
  private readonly pumped: boolean;
  private readonly subs = new Set<QemuMonitorEvents>();

  private constructor(uri: string, handle: Ptr, pumped: boolean) {
    this.uri = uri;
    this.handle = handle;
    this.pumped = pumped;
  }

  /**
   * Opens a connection (e.g. "qemu:///system", "qemu+unix:///system?socket=/path").
   * With `events`, libvirt's event loop is registered first and pumped while the
   * connection is open (needed for qemuMonitorEvents()).
   */
  static open(uri: string, options: OpenOptions = {}): Connection {
    checkString('libvirt URI', uri, 4096);
    const n = lib();
    if (options.events) pump.register();
    const h = sync(`virConnectOpen ${uri}`, () => n.connectOpen(uri) as Ptr | null, isNull) as Ptr;
    // Once the loop is registered, every connection's keepalive runs through it.
    const pumped = pump.isRegistered;
    if (pumped) pump.acquire();
    return new Connection(uri, BigInt(h), pumped);
  }

  get isOpen(): boolean {
    return this.open;
  }

  /** Closes the connection (subscriptions first). Idempotent. */
  close(): void {
    if (!this.open) return;
    for (const s of [...this.subs]) s.close();
    this.open = false;
    const n = lib();
    try {
      sync('virConnectClose', () => n.connectClose(this.handle), isNeg);
    } finally {
      if (this.pumped) pump.release();
    }
  }

  /** Resolves once libvirt's event loop has stopped (after the last pumped connection closed). */
  static eventLoopStopped(): Promise<void> {
    return pump.stopped();
  }

  /** libvirt library version of the daemon side, e.g. "11.3.0". */
  libVersion(): string {
    const out = [0];
    sync('virConnectGetLibVersion', () => lib().connectGetLibVersion(this.live(), out), isNeg);
    return versionString(Number(out[0]));
  }

  /** Hypervisor (QEMU) version, e.g. "10.0.2". */
  hypervisorVersion(): string {
    const out = [0];
    sync('virConnectGetVersion', () => lib().connectGetVersion(this.live(), out), isNeg);
    return versionString(Number(out[0]));
  }

  listDomains(flags = 0): Domain[] {
    const n = lib();
    const out = Buffer.alloc(8);
    const count = sync('virConnectListAllDomains', () => n.connectListAllDomains(this.live(), out, flags), isNeg) as number;
    return takePtrArray(readPtr(out), count).map((p) => new Domain(this, p));
  }

  lookupDomain(name: string): Domain {
    checkString('domain name', name, 1024);
    const n = lib();
    const p = sync(`virDomainLookupByName ${name}`, () => n.domainLookupByName(this.live(), name), isNull) as Ptr;
    return new Domain(this, BigInt(p));
  }

  lookupDomainByUuid(uuid: string): Domain {
    if (!/^[0-9a-fA-F]{8}-?[0-9a-fA-F]{4}-?[0-9a-fA-F]{4}-?[0-9a-fA-F]{4}-?[0-9a-fA-F]{12}$/.test(uuid)) throw new TypeError(`not a UUID: ${uuid}`);
    const n = lib();
    const p = sync(`virDomainLookupByUUIDString ${uuid}`, () => n.domainLookupByUUIDString(this.live(), uuid), isNull) as Ptr;
    return new Domain(this, BigInt(p));
  }

  /** The domain named `name`, or undefined when this host has none (yet). */
  findDomain(name: string): Domain | undefined {
    try {
      return this.lookupDomain(name);
    } catch (err) {
      if (err instanceof LibvirtError && err.code === ErrorCode.NO_DOMAIN) return undefined;
      throw err;
    }
  }

  /** The domain with this UUID, or undefined when this host has none (yet), e.g. an incoming migration not yet prepared. */
  findDomainByUuid(uuid: string): Domain | undefined {
    try {
      return this.lookupDomainByUuid(uuid);
    } catch (err) {
      if (err instanceof LibvirtError && err.code === ErrorCode.NO_DOMAIN) return undefined;
      throw err;
    }
  }

  /** Defines (or redefines) a persistent domain from XML. */
  defineDomain(xml: string): Domain {
    checkString('domain XML', xml, 16 * 1024 * 1024);
    const n = lib();
    const p = sync('virDomainDefineXML', () => n.domainDefineXML(this.live(), xml), isNull) as Ptr;
    return new Domain(this, BigInt(p));
  }

  /** Node device names (e.g. pci_0000_00_03_0), filtered by ListNodeDevicesFlag. */
  listNodeDevices(flags = 0): string[] {
    const n = lib();
    const out = Buffer.alloc(8);
    const count = sync('virConnectListAllNodeDevices', () => n.connectListAllNodeDevices(this.live(), out, flags >>> 0), isNeg) as number;
    return takePtrArray(readPtr(out), count).map((p) => {
      try {
        return sync('virNodeDeviceGetName', () => n.nodeDeviceGetName(p) as string | null, (r) => r === null)!;
      } finally {
        quiet(() => n.nodeDeviceFree(p));
      }
    });
  }

  nodeDevice(name: string): NodeDevice {
    checkString('node device name', name, 1024);
    const n = lib();
    const p = sync(`virNodeDeviceLookupByName ${name}`, () => n.nodeDeviceLookupByName(this.live(), name), isNull) as Ptr;
    try {
      const xml = sync(`virNodeDeviceGetXMLDesc ${name}`, () => n.nodeDeviceGetXMLDesc(p, 0) as string | null, (x) => x === null) as string;
      return { name, xml };
    } finally {
      quiet(() => n.nodeDeviceFree(p));
    }
  }

  /**
   * Subscribes to QMP events of `domain` (all domains when undefined), optionally only the
   * event named `event` (a regex when `regex`). The connection must be opened with
   * `{ events: true }`. Events keep QEMU's data and timestamp.
   */
  qemuMonitorEvents(opts: Omit<MonitorEventOptions, 'domain'> & { domain?: Domain } = {}): QemuMonitorEvents {
    if (!this.pumped) throw new Error('QEMU monitor events need a connection opened with { events: true }');
    const sub = subscribeMonitorEvents(this, opts);
    this.subs.add(sub);
    return sub;
  }

  /** @internal */
  dropSubscription(s: QemuMonitorEvents): void {
    this.subs.delete(s);
  }

  /** @internal the live handle, or an error after close(). */
  live(): Ptr {
    if (!this.open) throw new LibvirtError(`connection ${this.uri}`, ErrorCode.INVALID_CONN, 0, 'the connection is closed');
    return this.handle;
  }
}

function versionString(v: number): string {
  return `${Math.floor(v / 1_000_000)}.${Math.floor(v / 1000) % 1000}.${v % 1000}`;
}
