//! hyperjob-image-tools: what every backend that boots a disk image needs, whatever runs the
//! VM — a per-job qcow2 [`overlay`] of the base image, a cloud-init NoCloud [`seed`] with the
//! job's keys, and the tail of the guest's serial [`console`]. No libvirt: the libvirt backend
//! and the plain-QEMU plugin both use it.

pub mod console;
pub mod overlay;
pub mod seed;
