/*
 * Prints the VFIO/iommufd ABI as the C compiler sees it in <linux/vfio.h> (and
 * <linux/iommufd.h> when present): one "name=value" line per ioctl number, constant,
 * struct size and field offset. test/unit/abi.test.ts compiles this against the
 * system header and against the rig kernel's uapi headers and compares every line
 * with src/vfio/uapi.ts. Items a header does not define are simply not printed.
 */
#include <stddef.h>
#include <stdio.h>
#include <linux/vfio.h>
#if defined(__has_include)
#if __has_include(<linux/iommufd.h>)
#include <linux/iommufd.h>
#define HAVE_IOMMUFD_H 1
#endif
#endif

#define V(name) printf("%s=%llu\n", #name, (unsigned long long)(name))
#define SZ(type) printf("sizeof.%s=%zu\n", #type, sizeof(struct type))
#define OFF(type, field) printf("offsetof.%s.%s=%zu\n", #type, #field, offsetof(struct type, field))

int main(void)
{
	V(VFIO_API_VERSION);
	V(VFIO_GET_API_VERSION);
	V(VFIO_CHECK_EXTENSION);
	V(VFIO_SET_IOMMU);
	V(VFIO_GROUP_GET_STATUS);
	V(VFIO_GROUP_SET_CONTAINER);
	V(VFIO_GROUP_UNSET_CONTAINER);
	V(VFIO_GROUP_GET_DEVICE_FD);
	V(VFIO_DEVICE_GET_INFO);
	V(VFIO_DEVICE_GET_REGION_INFO);
	V(VFIO_DEVICE_RESET);
	V(VFIO_DEVICE_FEATURE);
	V(VFIO_TYPE1_IOMMU);
	V(VFIO_TYPE1v2_IOMMU);
	V(VFIO_NOIOMMU_IOMMU);
	V(VFIO_GROUP_FLAGS_VIABLE);
	V(VFIO_GROUP_FLAGS_CONTAINER_SET);
	V(VFIO_DEVICE_FLAGS_RESET);
	V(VFIO_DEVICE_FLAGS_PCI);
	V(VFIO_DEVICE_FLAGS_CAPS);
	V(VFIO_DEVICE_FEATURE_MASK);
	V(VFIO_DEVICE_FEATURE_GET);
	V(VFIO_DEVICE_FEATURE_SET);
	V(VFIO_DEVICE_FEATURE_PROBE);
	V(VFIO_DEVICE_FEATURE_PCI_VF_TOKEN);
	V(VFIO_DEVICE_FEATURE_MIGRATION);
	V(VFIO_DEVICE_FEATURE_MIG_DEVICE_STATE);
	V(VFIO_DEVICE_FEATURE_DMA_LOGGING_START);
	V(VFIO_DEVICE_FEATURE_DMA_LOGGING_STOP);
	V(VFIO_DEVICE_FEATURE_DMA_LOGGING_REPORT);
	V(VFIO_MIGRATION_STOP_COPY);
	V(VFIO_MIGRATION_P2P);
	V(VFIO_DEVICE_STATE_ERROR);
	V(VFIO_DEVICE_STATE_STOP);
	V(VFIO_DEVICE_STATE_RUNNING);
	V(VFIO_DEVICE_STATE_STOP_COPY);
	V(VFIO_DEVICE_STATE_RESUMING);
	V(VFIO_DEVICE_STATE_RUNNING_P2P);
	V(VFIO_REGION_INFO_FLAG_CAPS);
	V(VFIO_REGION_INFO_CAP_TYPE);
	V(VFIO_REGION_TYPE_MIGRATION_DEPRECATED);
	V(VFIO_REGION_SUBTYPE_MIGRATION_DEPRECATED);
	SZ(vfio_device_feature);
	OFF(vfio_device_feature, argsz);
	OFF(vfio_device_feature, flags);
	OFF(vfio_device_feature, data);
	SZ(vfio_device_feature_migration);
	SZ(vfio_device_feature_mig_state);
	OFF(vfio_device_feature_mig_state, device_state);
	OFF(vfio_device_feature_mig_state, data_fd);
	SZ(vfio_device_feature_dma_logging_control);
	OFF(vfio_device_feature_dma_logging_control, page_size);
	OFF(vfio_device_feature_dma_logging_control, num_ranges);
	OFF(vfio_device_feature_dma_logging_control, ranges);
	SZ(vfio_device_feature_dma_logging_range);
	SZ(vfio_device_feature_dma_logging_report);
	OFF(vfio_device_feature_dma_logging_report, page_size);
	OFF(vfio_device_feature_dma_logging_report, bitmap);
	SZ(vfio_group_status);
	SZ(vfio_device_info);
	OFF(vfio_device_info, num_regions);
	OFF(vfio_device_info, num_irqs);
	OFF(vfio_device_info, cap_offset);
	SZ(vfio_region_info);
	OFF(vfio_region_info, index);
	OFF(vfio_region_info, cap_offset);
	OFF(vfio_region_info, size);
	OFF(vfio_region_info, offset);
	SZ(vfio_region_info_cap_type);
	OFF(vfio_region_info_cap_type, type);
	OFF(vfio_region_info_cap_type, subtype);
#ifdef VFIO_MIGRATION_PRE_COPY
	V(VFIO_MIGRATION_PRE_COPY);
	V(VFIO_DEVICE_STATE_PRE_COPY);
	V(VFIO_DEVICE_STATE_PRE_COPY_P2P);
	V(VFIO_DEVICE_STATE_NR);
#endif
#ifdef VFIO_MIG_GET_PRECOPY_INFO
	V(VFIO_MIG_GET_PRECOPY_INFO);
	SZ(vfio_precopy_info);
	OFF(vfio_precopy_info, flags);
	OFF(vfio_precopy_info, initial_bytes);
	OFF(vfio_precopy_info, dirty_bytes);
#endif
#ifdef VFIO_DEVICE_FEATURE_MIG_DATA_SIZE
	V(VFIO_DEVICE_FEATURE_MIG_DATA_SIZE);
	SZ(vfio_device_feature_mig_data_size);
#endif
#ifdef VFIO_DEVICE_FEATURE_MIG_PRECOPY_INFOv2
	V(VFIO_DEVICE_FEATURE_MIG_PRECOPY_INFOv2);
#endif
#ifdef VFIO_DEVICE_BIND_IOMMUFD
	V(VFIO_DEVICE_BIND_IOMMUFD);
	V(VFIO_DEVICE_ATTACH_IOMMUFD_PT);
	V(VFIO_DEVICE_DETACH_IOMMUFD_PT);
	SZ(vfio_device_bind_iommufd);
	OFF(vfio_device_bind_iommufd, iommufd);
	OFF(vfio_device_bind_iommufd, out_devid);
	SZ(vfio_device_attach_iommufd_pt);
	OFF(vfio_device_attach_iommufd_pt, pt_id);
#endif
#ifdef HAVE_IOMMUFD_H
	V(IOMMU_IOAS_ALLOC);
	V(IOMMU_DESTROY);
	SZ(iommu_ioas_alloc);
	OFF(iommu_ioas_alloc, out_ioas_id);
#endif
	return 0;
}
