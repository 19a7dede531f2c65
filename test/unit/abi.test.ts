// uapi.ts against the C compiler's view of <linux/vfio.h>: native/abi-probe is compiled
// here and every value it prints must equal ours. Bookworm's 6.1 header lacks PRE_COPY,
// MIG_DATA_SIZE and the cdev ioctls; those are checked against the rig kernel's 6.12
// uapi headers: $VFIO_MIG_RIG_UAPI (test/run-all.sh runs the rig cache set-up before
// the unit tests and exports it; the rig sets it in the guest), else the rig cache
// ($VFIO_MIG_RIG_CACHE, default ~/.cache/vfio-mig). Without them the test is reported
// as SKIPPED, loudly - never as a pass - and on CI (CI=1) or in the rig it fails.
import test from 'ava';
import { execFileSync } from 'node:child_process';
import { mkdtempSync, existsSync, readdirSync, mkdirSync, copyFileSync, readFileSync } from 'node:fs';
import { tmpdir, homedir } from 'node:os';
import { join, dirname } from 'node:path';
import { fileURLToPath } from 'node:url';
import { Ioctl, Extension, GroupStatusFlag, DeviceInfoFlag, FeatureFlag, Feature, MigrationFlag, MigState, MIG_STATE_COUNT, Layout, RegionInfo, VFIO_API_VERSION } from '../../src/vfio/uapi.ts';

const root = join(dirname(fileURLToPath(import.meta.url)), '..', '..');
const probeSource = join(root, 'native', 'abi-probe', 'abi-probe.c');

/** Our value for every key the probe can print. Arrays list every value an ABI-compatible header may show. */
export const OURS: Record<string, number | number[]> = {
  VFIO_API_VERSION,
  VFIO_GET_API_VERSION: Ioctl.GET_API_VERSION,
  VFIO_CHECK_EXTENSION: Ioctl.CHECK_EXTENSION,
  VFIO_SET_IOMMU: Ioctl.SET_IOMMU,
  VFIO_GROUP_GET_STATUS: Ioctl.GROUP_GET_STATUS,
  VFIO_GROUP_SET_CONTAINER: Ioctl.GROUP_SET_CONTAINER,
  VFIO_GROUP_UNSET_CONTAINER: Ioctl.GROUP_UNSET_CONTAINER,
  VFIO_GROUP_GET_DEVICE_FD: Ioctl.GROUP_GET_DEVICE_FD,
  VFIO_DEVICE_GET_INFO: Ioctl.DEVICE_GET_INFO,
  VFIO_DEVICE_GET_REGION_INFO: Ioctl.DEVICE_GET_REGION_INFO,
  VFIO_DEVICE_RESET: Ioctl.DEVICE_RESET,
  VFIO_DEVICE_FEATURE: Ioctl.DEVICE_FEATURE,
  VFIO_TYPE1_IOMMU: Extension.TYPE1,
  VFIO_TYPE1v2_IOMMU: Extension.TYPE1v2,
  VFIO_NOIOMMU_IOMMU: Extension.NOIOMMU,
  VFIO_GROUP_FLAGS_VIABLE: GroupStatusFlag.VIABLE,
  VFIO_GROUP_FLAGS_CONTAINER_SET: GroupStatusFlag.CONTAINER_SET,
  VFIO_DEVICE_FLAGS_RESET: DeviceInfoFlag.RESET,
  VFIO_DEVICE_FLAGS_PCI: DeviceInfoFlag.PCI,
  VFIO_DEVICE_FLAGS_CAPS: DeviceInfoFlag.CAPS,
  VFIO_DEVICE_FEATURE_MASK: FeatureFlag.MASK,
  VFIO_DEVICE_FEATURE_GET: FeatureFlag.GET,
  VFIO_DEVICE_FEATURE_SET: FeatureFlag.SET,
  VFIO_DEVICE_FEATURE_PROBE: FeatureFlag.PROBE,
  VFIO_DEVICE_FEATURE_PCI_VF_TOKEN: Feature.PCI_VF_TOKEN,
  VFIO_DEVICE_FEATURE_MIGRATION: Feature.MIGRATION,
  VFIO_DEVICE_FEATURE_MIG_DEVICE_STATE: Feature.MIG_DEVICE_STATE,
  VFIO_DEVICE_FEATURE_DMA_LOGGING_START: Feature.DMA_LOGGING_START,
  VFIO_DEVICE_FEATURE_DMA_LOGGING_STOP: Feature.DMA_LOGGING_STOP,
  VFIO_DEVICE_FEATURE_DMA_LOGGING_REPORT: Feature.DMA_LOGGING_REPORT,
  VFIO_DEVICE_FEATURE_MIG_DATA_SIZE: Feature.MIG_DATA_SIZE,
  VFIO_DEVICE_FEATURE_MIG_PRECOPY_INFOv2: Feature.MIG_PRECOPY_INFOv2,
  VFIO_MIGRATION_STOP_COPY: MigrationFlag.STOP_COPY,
  VFIO_MIGRATION_P2P: MigrationFlag.P2P,
  VFIO_MIGRATION_PRE_COPY: MigrationFlag.PRE_COPY,
  VFIO_DEVICE_STATE_ERROR: MigState.Error,
  VFIO_DEVICE_STATE_STOP: MigState.Stop,
  VFIO_DEVICE_STATE_RUNNING: MigState.Running,
  VFIO_DEVICE_STATE_STOP_COPY: MigState.StopCopy,
  VFIO_DEVICE_STATE_RESUMING: MigState.Resuming,
  VFIO_DEVICE_STATE_RUNNING_P2P: MigState.RunningP2P,
  VFIO_DEVICE_STATE_PRE_COPY: MigState.PreCopy,
  VFIO_DEVICE_STATE_PRE_COPY_P2P: MigState.PreCopyP2P,
  VFIO_DEVICE_STATE_NR: MIG_STATE_COUNT,
  VFIO_REGION_INFO_FLAG_CAPS: RegionInfo.FLAG_CAPS,
  VFIO_REGION_INFO_CAP_TYPE: RegionInfo.CAP_TYPE,
  VFIO_REGION_TYPE_MIGRATION_DEPRECATED: RegionInfo.TYPE_MIGRATION_DEPRECATED,
  VFIO_REGION_SUBTYPE_MIGRATION_DEPRECATED: RegionInfo.SUBTYPE_MIGRATION_DEPRECATED,
  VFIO_MIG_GET_PRECOPY_INFO: Ioctl.MIG_GET_PRECOPY_INFO,
  VFIO_DEVICE_BIND_IOMMUFD: Ioctl.DEVICE_BIND_IOMMUFD,
  VFIO_DEVICE_ATTACH_IOMMUFD_PT: Ioctl.DEVICE_ATTACH_IOMMUFD_PT,
  VFIO_DEVICE_DETACH_IOMMUFD_PT: Ioctl.DEVICE_DETACH_IOMMUFD_PT,
  IOMMU_IOAS_ALLOC: Ioctl.IOMMU_IOAS_ALLOC,
  IOMMU_DESTROY: Ioctl.IOMMU_DESTROY,
  'sizeof.vfio_device_feature': Layout.feature.size,
  'offsetof.vfio_device_feature.argsz': Layout.feature.argsz,
  'offsetof.vfio_device_feature.flags': Layout.feature.flags,
  'offsetof.vfio_device_feature.data': Layout.feature.data,
  'sizeof.vfio_device_feature_migration': Layout.featureMigration.size,
  'sizeof.vfio_device_feature_mig_state': Layout.featureMigState.size,
  'offsetof.vfio_device_feature_mig_state.device_state': Layout.featureMigState.deviceState,
  'offsetof.vfio_device_feature_mig_state.data_fd': Layout.featureMigState.dataFd,
  'sizeof.vfio_device_feature_mig_data_size': Layout.featureMigDataSize.size,
  'sizeof.vfio_device_feature_dma_logging_control': Layout.dmaLoggingControl.size,
  'offsetof.vfio_device_feature_dma_logging_control.page_size': Layout.dmaLoggingControl.pageSize,
  'offsetof.vfio_device_feature_dma_logging_control.num_ranges': Layout.dmaLoggingControl.numRanges,
  'offsetof.vfio_device_feature_dma_logging_control.ranges': Layout.dmaLoggingControl.ranges,
  'sizeof.vfio_device_feature_dma_logging_range': Layout.dmaLoggingRange.size,
  'sizeof.vfio_device_feature_dma_logging_report': Layout.dmaLoggingReport.size,
  'offsetof.vfio_device_feature_dma_logging_report.page_size': Layout.dmaLoggingReport.pageSize,
  'offsetof.vfio_device_feature_dma_logging_report.bitmap': Layout.dmaLoggingReport.bitmap,
  'sizeof.vfio_group_status': Layout.groupStatus.size,
  'sizeof.vfio_device_info': [Layout.deviceInfo.size, Layout.deviceInfo.sizeWithoutPad],
  'offsetof.vfio_device_info.num_regions': Layout.deviceInfo.numRegions,
  'offsetof.vfio_device_info.num_irqs': Layout.deviceInfo.numIrqs,
  'offsetof.vfio_device_info.cap_offset': Layout.deviceInfo.capOffset,
  'sizeof.vfio_region_info': RegionInfo.size,
  'offsetof.vfio_region_info.index': RegionInfo.index,
  'offsetof.vfio_region_info.cap_offset': RegionInfo.capOffset,
  'offsetof.vfio_region_info.size': RegionInfo.regionSize,
  'offsetof.vfio_region_info.offset': RegionInfo.offset,
  'sizeof.vfio_region_info_cap_type': 16,
  'offsetof.vfio_region_info_cap_type.type': RegionInfo.capTypeType,
  'offsetof.vfio_region_info_cap_type.subtype': RegionInfo.capTypeSubtype,
  'sizeof.vfio_precopy_info': Layout.precopyInfo.size,
  'offsetof.vfio_precopy_info.flags': Layout.precopyInfo.flags,
  'offsetof.vfio_precopy_info.initial_bytes': Layout.precopyInfo.initialBytes,
  'offsetof.vfio_precopy_info.dirty_bytes': Layout.precopyInfo.dirtyBytes,
  'sizeof.vfio_device_bind_iommufd': [Layout.bindIommufd.size, 16],
  'offsetof.vfio_device_bind_iommufd.iommufd': Layout.bindIommufd.iommufd,
  'offsetof.vfio_device_bind_iommufd.out_devid': Layout.bindIommufd.outDevid,
  'sizeof.vfio_device_attach_iommufd_pt': [Layout.attachIommufdPt.size, 12],
  'offsetof.vfio_device_attach_iommufd_pt.pt_id': Layout.attachIommufdPt.ptId,
  'sizeof.iommu_ioas_alloc': Layout.iommuIoasAlloc.size,
  'offsetof.iommu_ioas_alloc.out_ioas_id': Layout.iommuIoasAlloc.outIoasId,
};

/** The spec's table (vfio-migration-uapi.md §1-§3, §6, §9) for what old headers lack. */
const SPEC: Record<string, number> = {
  VFIO_MIGRATION_PRE_COPY: 4,
  VFIO_DEVICE_STATE_PRE_COPY: 6,
  VFIO_DEVICE_STATE_PRE_COPY_P2P: 7,
  VFIO_DEVICE_STATE_NR: 8,
  VFIO_MIG_GET_PRECOPY_INFO: 0x3b79,
  VFIO_DEVICE_FEATURE_MIG_DATA_SIZE: 9,
  VFIO_DEVICE_FEATURE_MIG_PRECOPY_INFOv2: 12,
  VFIO_DEVICE_BIND_IOMMUFD: 0x3b76,
  VFIO_DEVICE_ATTACH_IOMMUFD_PT: 0x3b77,
  VFIO_DEVICE_DETACH_IOMMUFD_PT: 0x3b78,
  IOMMU_DESTROY: 0x3b80,
  IOMMU_IOAS_ALLOC: 0x3b81,
  'sizeof.vfio_precopy_info': 24,
  'offsetof.vfio_precopy_info.initial_bytes': 8,
  'offsetof.vfio_precopy_info.dirty_bytes': 16,
  'sizeof.vfio_device_feature_mig_data_size': 8,
  'offsetof.vfio_device_bind_iommufd.out_devid': 12,
  'offsetof.iommu_ioas_alloc.out_ioas_id': 8,
};

function compileAndRun(includeFlags: string[]): Map<string, number> {
  const dir = mkdtempSync(join(tmpdir(), 'abi-probe-'));
  const exe = join(dir, 'abi-probe');
  execFileSync('gcc', ['-Wall', '-Werror', ...includeFlags, '-o', exe, probeSource], { stdio: ['ignore', 'ignore', 'inherit'] });
  const out = execFileSync(exe, { encoding: 'utf8' });
  const values = new Map<string, number>();
  for (const line of out.trim().split('\n')) {
    const [k, v] = line.split('=');
    values.set(k!, Number(v));
  }
  return values;
}

function mismatches(header: Map<string, number>): string[] {
  const bad: string[] = [];
  for (const [key, value] of header) {
    const ours = OURS[key];
    if (ours === undefined) bad.push(`${key}: printed by the probe but not mapped in this test`);
    else if (Array.isArray(ours) ? !ours.includes(value) : ours !== value) bad.push(`${key}: header ${value}, uapi.ts ${String(ours)}`);
  }
  return bad;
}

/** Finds `linux-headers-*-common` trees at most `depth` levels below `dir`. */
function findHeaderTrees(dir: string, depth: number, out: string[]): void {
  let entries: import('node:fs').Dirent[];
  try {
    entries = readdirSync(dir, { withFileTypes: true });
  } catch {
    return;
  }
  for (const e of entries) {
    if (!e.isDirectory()) continue;
    const p = join(dir, e.name);
    if (/^linux-headers-.*-common$/.test(e.name)) out.push(p);
    else if (depth > 0 && !['lib', 'modules', 'build'].includes(e.name)) findHeaderTrees(p, depth - 1, out);
  }
}

interface RigUapi {
  /** gcc flags that make <linux/vfio.h> the rig kernel's. */
  includes: string[];
  /** Where they came from, for the log. */
  source: string;
  /** LINUX_VERSION_MAJOR.PATCHLEVEL of the headers, when known. */
  version?: string;
}

/** "6.12" from a sanitised uapi tree's linux/version.h. */
function uapiVersion(includeDir: string): string | undefined {
  try {
    const text = readFileSync(join(includeDir, 'linux', 'version.h'), 'utf8');
    const major = /LINUX_VERSION_MAJOR\s+(\d+)/.exec(text)?.[1];
    const minor = /LINUX_VERSION_PATCHLEVEL\s+(\d+)/.exec(text)?.[1];
    return major && minor ? `${major}.${minor}` : undefined;
  } catch {
    return undefined;
  }
}

/**
 * Include flags for the rig kernel's (6.12) uapi vfio.h/iommufd.h. First the sanitised
 * userspace headers (`make headers_install` form) that the rig cache set-up makes:
 * $VFIO_MIG_RIG_UAPI, or kernel/<kver>/uapi/include of the cache's current kernel.
 * Else a full kernel-tree header package: its uapi headers are not sanitised for user
 * space, so the two files are copied into a private include dir (the system supplies
 * linux/types.h) and the kernel-only annotations are defined away.
 */
function rigUapiIncludes(): RigUapi | undefined {
  const cache = process.env.VFIO_MIG_RIG_CACHE || join(homedir(), '.cache', 'vfio-mig');
  const sanitised: string[] = [];
  if (process.env.VFIO_MIG_RIG_UAPI) sanitised.push(process.env.VFIO_MIG_RIG_UAPI);
  try {
    const kver = /^kver=(.+)$/m.exec(readFileSync(join(cache, 'current-kernel'), 'utf8'))?.[1];
    if (kver) sanitised.push(join(cache, 'kernel', kver, 'uapi', 'include'));
  } catch {
    // no cache yet
  }
  const dir = sanitised.find((d) => existsSync(join(d, 'linux', 'vfio.h')) && existsSync(join(d, 'linux', 'iommufd.h')));
  if (dir) return { includes: ['-I', dir], source: dir, version: uapiVersion(dir) };
  const trees: string[] = [];
  if (process.env.VFIO_MIG_RIG_HEADERS) trees.push(process.env.VFIO_MIG_RIG_HEADERS.replace(/-amd64\/?$/, '-common'));
  findHeaderTrees(cache, 6, trees);
  const tree = trees.find((t) => existsSync(join(t, 'include', 'uapi', 'linux', 'vfio.h')));
  if (!tree) return undefined;
  const inc = mkdtempSync(join(tmpdir(), 'uapi-'));
  mkdirSync(join(inc, 'linux'));
  for (const f of ['vfio.h', 'iommufd.h']) copyFileSync(join(tree, 'include', 'uapi', 'linux', f), join(inc, 'linux', f));
  return { includes: ['-D__user=', '-D__counted_by(m)=', '-I', inc], source: tree };
}

const rigUapi = rigUapiIncludes();
const mustHaveRigUapi = Boolean(process.env.CI || process.env.VFIO_MIG_IN_RIG);
if (!rigUapi) {
  // Loud on every path: on stderr at load time and as a SKIP (or a failure on CI) in TAP.
  console.error(
    'abi.test: NO 6.12 UAPI HEADERS - the rig cache has not been set up (test/rig/setup-cache.sh, run by npm test as root). ' +
      (mustHaveRigUapi ? 'On CI and in the rig this is a failure.' : 'The 6.12 ABI test is reported as skipped.'),
  );
}

test('uapi.ts equals the system <linux/vfio.h> for everything it defines', (t) => {
  const header = compileAndRun([]);
  t.true(header.size >= 60, `probe printed ${header.size} values`);
  t.deepEqual(mismatches(header), []);
});

test('what the system header lacks equals the spec table', (t) => {
  for (const [key, value] of Object.entries(SPEC)) {
    const ours = OURS[key];
    t.true(Array.isArray(ours) ? ours.includes(value) : ours === value, `${key}: spec ${value}, uapi.ts ${String(ours)}`);
  }
});

// Without the headers the test is registered as skipped (TAP "# SKIP": counted as
// skipped, never as passed) - except on CI and in the rig, where it runs and fails.
(rigUapi || mustHaveRigUapi ? test : test.skip)('uapi.ts equals the rig kernel 6.12 uapi headers (PRE_COPY, MIG_DATA_SIZE, cdev)', (t) => {
  if (!rigUapi) {
    t.fail('no 6.12 uapi headers: set up the rig cache first (test/rig/setup-cache.sh; npm test does it as root before the unit tests) - they must be available on CI and in the rig');
    return;
  }
  t.log(`headers: ${rigUapi.source}${rigUapi.version ? ` (Linux ${rigUapi.version})` : ''}`);
  const header = compileAndRun(rigUapi.includes);
  for (const key of ['VFIO_MIGRATION_PRE_COPY', 'VFIO_MIG_GET_PRECOPY_INFO', 'VFIO_DEVICE_FEATURE_MIG_DATA_SIZE', 'VFIO_DEVICE_BIND_IOMMUFD']) {
    t.true(header.has(key), `${key} present in the 6.12 header`);
  }
  t.deepEqual(mismatches(header), []);
});

test('the comparison fails when a constant differs (the probe is not vacuous)', (t) => {
  const header = compileAndRun([]);
  const tampered = new Map(header);
  tampered.set('VFIO_DEVICE_FEATURE', 0x3b74);
  tampered.set('offsetof.vfio_device_feature_mig_state.data_fd', 8);
  t.deepEqual(mismatches(tampered).length, 2);
});
