// modules.alias content for the PCI unit tests.

/** A modules.alias like a distribution kernel's: thousands of ordinary lines, a few vfio_pci ones. */
export function bigAliasFile(extraVfio: string[] = []): string[] {
  const lines: string[] = [];
  for (let v = 0; v < 300; v++) {
    const vendor = (0x1000 + v).toString(16).toUpperCase().padStart(8, '0');
    for (let d = 0; d < 100; d++) {
      const dev = (0x2000 + d).toString(16).toUpperCase().padStart(8, '0');
      lines.push(`alias pci:v${vendor}d${dev}sv*sd*bc*sc*i* drv_${v}`);
    }
  }
  lines.push('alias pci:v*d*sv*sd*bc0Csc03i30* xhci_pci', 'alias pci:v*d*sv*sd*bc01sc08i02* nvme', 'alias usb:v05ACp*d*dc*dsc*dp*ic*isc*ip*in* apple_usb');
  lines.push('alias pci:v000015B3d0000101Esv*sd*bc*sc*i* mlx5_core', 'alias pci:v00001AF4d00001041sv*sd*bc*sc*i* virtio_pci');
  lines.push(
    'alias vfio_pci:v*d*sv*sd*bc*sc*i* vfio_pci',
    'alias vfio_pci:v000015B3d0000101Esv*sd*bc*sc*i* mlx5_vfio_pci',
    'alias vfio_pci:v00001AF4d00001041sv*sd*bc*sc*i* virtio_vfio_pci',
    'alias vfio_pci:v00001234d000011E8sv*sd*bc*sc*i* edu_vfio_pci',
    'alias vfio_pci:v00008086d0000E20Bsv*sd*bc03sc*i* xe_vfio_pci',
    ...extraVfio,
  );
  return lines;
}
