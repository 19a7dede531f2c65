// Alias module: the qemu hook loads checkCompatibility from here. The protocol itself
// lives in migration-version.ts.
export { checkCompatibility, checkMdevParents, type MdevTypeTarget } from './migration-version.ts';
export type { CompatVerdict } from './types.ts';
