//! Address-space buses: ranges of addresses, each mapped to the device that answers it (the
//! shape of Firecracker's `devices::Bus` and cloud-hypervisor's `vm-device`).
//!
//! A VM has two: port I/O (the console, the NIC's register block, the guest control ports,
//! see [`crate::layout::ports`]) and MMIO (empty for now: the guest program uses no MMIO
//! device, and an access there stops the vCPU as before). A vCPU thread that exits on an
//! `in`/`out` (or an MMIO access) looks the address up and calls the device's
//! [`BusDevice::read`] or [`BusDevice::write`] with the offset inside the device's range.
//!
//! Buses are built when the VM is created and never change afterwards, so a lookup takes no
//! lock; a device that keeps state locks it itself (and must not hold a lock while it blocks,
//! see [`IoContext::wait`]).

use std::collections::BTreeMap;
use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use crate::vcpu::Waker;

/// What the vCPU does after a device handled its access.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum IoAction {
    /// Go back into the guest.
    Continue,
    /// Stop this vCPU for good, for the reason given (the guest did something fatal).
    Stop(String),
}

/// Who made an access, and how a device that has to wait for something (input, a timer)
/// waits without making the vCPU unpausable: every wait ends early when the vCPU is asked to
/// pause.
pub struct IoContext<'a> {
    vcpu: usize,
    waker: &'a Waker<'a>,
}

impl<'a> IoContext<'a> {
    pub(crate) fn new(vcpu: usize, waker: &'a Waker<'a>) -> Self {
        IoContext { vcpu, waker }
    }

    /// Index of the vCPU that made the access.
    pub fn vcpu(&self) -> usize {
        self.vcpu
    }

    /// Blocks until `fd` (if any) is readable, the vCPU is asked to pause, or `timeout`
    /// passes. Returns true when it ended because of a pause request.
    pub fn wait(&self, fd: Option<i32>, timeout: Duration) -> bool {
        self.waker.wait(fd, timeout)
    }

    /// Sleeps up to `d`, returning early when the vCPU is asked to pause.
    pub fn sleep(&self, d: Duration) {
        self.waker.sleep(d)
    }
}

impl fmt::Debug for IoContext<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("IoContext")
            .field("vcpu", &self.vcpu)
            .finish_non_exhaustive()
    }
}

/// A device on a bus. Both methods take `&self`: vCPU threads call them concurrently, and a
/// device locks what it has to (never across [`IoContext::wait`] / [`IoContext::sleep`]).
pub trait BusDevice: Send + Sync {
    /// A guest read of `data.len()` bytes at `offset` inside the device's range. The default
    /// answers all ones, like an empty ISA bus (every device so far is write-only).
    fn read(&self, io: &IoContext<'_>, offset: u64, data: &mut [u8]) {
        let _ = (io, offset);
        data.fill(0xff);
    }

    /// A guest write of `data` at `offset` inside the device's range.
    fn write(&self, io: &IoContext<'_>, offset: u64, data: &[u8]) -> IoAction;
}

/// The first (up to) four bytes of an access as a little-endian value: what an `out` of 1, 2
/// or 4 bytes wrote.
pub fn le_value(data: &[u8]) -> u32 {
    let mut v = [0u8; 4];
    let n = data.len().min(4);
    v[..n].copy_from_slice(&data[..n]);
    u32::from_le_bytes(v)
}

/// A device could not be put on a bus.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BusError {
    /// The range is empty.
    #[error("{bus} bus: device {device} at {base:#x} has an empty range")]
    Empty {
        /// Which bus.
        bus: &'static str,
        /// The device.
        device: &'static str,
        /// Its base address.
        base: u64,
    },
    /// The range runs past the end of the address space.
    #[error("{bus} bus: device {device} at {base:#x} (+{len:#x}) runs past the end of the address space")]
    Overflow {
        /// Which bus.
        bus: &'static str,
        /// The device.
        device: &'static str,
        /// Its base address.
        base: u64,
        /// Its length.
        len: u64,
    },
    /// The range overlaps a device already on the bus.
    #[error("{bus} bus: device {device} at [{base:#x}, {end:#x}) overlaps device {other} at [{other_base:#x}, {other_end:#x})")]
    Overlap {
        /// Which bus.
        bus: &'static str,
        /// The device refused.
        device: &'static str,
        /// Its base address.
        base: u64,
        /// Its end (exclusive).
        end: u64,
        /// The device already there.
        other: &'static str,
        /// Its base address.
        other_base: u64,
        /// Its end (exclusive).
        other_end: u64,
    },
}

struct Entry {
    name: &'static str,
    /// Exclusive end; `base < end` (a range may not reach `u64::MAX`).
    end: u64,
    device: Arc<dyn BusDevice>,
}

/// A device found on a bus for an address.
pub struct Resolved<'a> {
    /// The device's name.
    pub name: &'static str,
    /// The device's base address.
    pub base: u64,
    /// The address's offset from `base`.
    pub offset: u64,
    /// The device.
    pub device: &'a Arc<dyn BusDevice>,
}

/// Ranges of one address space mapped to devices; ranges never overlap.
pub struct Bus {
    name: &'static str,
    /// By base address.
    entries: BTreeMap<u64, Entry>,
}

impl Bus {
    /// An empty bus; `name` ("port I/O", "MMIO") appears in errors.
    pub fn new(name: &'static str) -> Self {
        Bus {
            name,
            entries: BTreeMap::new(),
        }
    }

    /// Maps `[base, base + len)` to `device`, refusing an empty range, one that runs past the
    /// address space, and one that overlaps a device already there (naming both).
    pub fn insert(
        &mut self,
        name: &'static str,
        base: u64,
        len: u64,
        device: Arc<dyn BusDevice>,
    ) -> Result<(), BusError> {
        let bus = self.name;
        if len == 0 {
            return Err(BusError::Empty {
                bus,
                device: name,
                base,
            });
        }
        let end = base.checked_add(len).ok_or(BusError::Overflow {
            bus,
            device: name,
            base,
            len,
        })?;
        // The only candidates: the last range starting below `end`; the ranges are disjoint
        // and sorted, so if it ends at or before `base` nothing overlaps.
        if let Some((&other_base, other)) = self.entries.range(..end).next_back() {
            if other.end > base {
                return Err(BusError::Overlap {
                    bus,
                    device: name,
                    base,
                    end,
                    other: other.name,
                    other_base,
                    other_end: other.end,
                });
            }
        }
        self.entries.insert(base, Entry { name, end, device });
        Ok(())
    }

    /// The device whose range holds `addr`.
    pub fn resolve(&self, addr: u64) -> Option<Resolved<'_>> {
        let (&base, e) = self.entries.range(..=addr).next_back()?;
        (addr < e.end).then_some(Resolved {
            name: e.name,
            base,
            offset: addr - base,
            device: &e.device,
        })
    }

    /// Hands a read at `addr` to its device; false when no device is there (`data` untouched).
    pub fn read(&self, io: &IoContext<'_>, addr: u64, data: &mut [u8]) -> bool {
        match self.resolve(addr) {
            Some(r) => {
                r.device.read(io, r.offset, data);
                true
            }
            None => false,
        }
    }

    /// Hands a write at `addr` to its device; `None` when no device is there.
    pub fn write(&self, io: &IoContext<'_>, addr: u64, data: &[u8]) -> Option<IoAction> {
        self.resolve(addr)
            .map(|r| r.device.write(io, r.offset, data))
    }
}

impl fmt::Debug for Bus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut m = f.debug_map();
        for (base, e) in &self.entries {
            m.entry(&format_args!("{base:#x}..{:#x}", e.end), &e.name);
        }
        m.finish()
    }
}

impl fmt::Debug for Resolved<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Resolved")
            .field("name", &self.name)
            .field("base", &format_args!("{:#x}", self.base))
            .field("offset", &self.offset)
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::vcpu::RunControl;
    use parking_lot::Mutex;
    use vmm_sys_util::eventfd::EventFd;

    /// Records every access; reads answer the offset.
    #[derive(Default)]
    struct Recorder(Mutex<Vec<(usize, u64, Vec<u8>)>>);

    impl BusDevice for Recorder {
        fn read(&self, _: &IoContext<'_>, offset: u64, data: &mut [u8]) {
            data.fill(offset as u8);
        }

        fn write(&self, io: &IoContext<'_>, offset: u64, data: &[u8]) -> IoAction {
            self.0.lock().push((io.vcpu(), offset, data.to_vec()));
            if data == b"die" {
                IoAction::Stop("asked to".into())
            } else {
                IoAction::Continue
            }
        }
    }

    struct WriteOnly;

    impl BusDevice for WriteOnly {
        fn write(&self, _: &IoContext<'_>, _: u64, _: &[u8]) -> IoAction {
            IoAction::Continue
        }
    }

    #[test]
    fn insertion_refuses_overlaps_and_bad_ranges() {
        let mut bus = Bus::new("port I/O");
        bus.insert("a", 0x600, 0x1c, Arc::new(WriteOnly)).unwrap();
        bus.insert("b", 0x620, 0xc, Arc::new(WriteOnly)).unwrap();
        // Adjacent on both sides is fine.
        bus.insert("c", 0x61c, 4, Arc::new(WriteOnly)).unwrap();
        bus.insert("d", 0x5ff, 1, Arc::new(WriteOnly)).unwrap();
        for (base, len, other) in [
            (0x600, 1, "a"),
            (0x5f0, 0x20, "a"),
            (0x61b, 1, "a"),
            (0x62b, 0x10, "b"),
            (0x500, 0x1000, "b"),
            (0x604, 2, "a"),
        ] {
            let err = bus.insert("x", base, len, Arc::new(WriteOnly)).unwrap_err();
            assert!(
                matches!(err, BusError::Overlap { other: o, .. } if o == other),
                "[{base:#x}, +{len:#x}): {err}"
            );
            assert!(
                err.to_string().contains(&format!("device {other} at")),
                "{err}"
            );
        }
        assert!(matches!(
            bus.insert("x", 0x700, 0, Arc::new(WriteOnly)),
            Err(BusError::Empty { .. })
        ));
        assert!(matches!(
            bus.insert("x", u64::MAX, 2, Arc::new(WriteOnly)),
            Err(BusError::Overflow { .. })
        ));
        // Nothing refused was inserted.
        assert!(bus.resolve(0x700).is_none());
        assert_eq!(
            format!("{bus:?}"),
            r#"{0x5ff..0x600: "d", 0x600..0x61c: "a", 0x61c..0x620: "c", 0x620..0x62c: "b"}"#
        );
    }

    #[test]
    fn lookup_by_address_hands_the_offset_to_the_device() {
        let mut bus = Bus::new("port I/O");
        let rec = Arc::new(Recorder::default());
        bus.insert("rec", 0x600, 0x10, rec.clone()).unwrap();
        bus.insert("wo", 0xe9, 1, Arc::new(WriteOnly)).unwrap();
        for (addr, want) in [
            (0x5ff, None),
            (0x600, Some(0)),
            (0x60f, Some(0xf)),
            (0x610, None),
            (0xe9, Some(0)),
            (0xe8, None),
            (0, None),
            (u64::MAX, None),
        ] {
            assert_eq!(bus.resolve(addr).map(|r| r.offset), want, "{addr:#x}");
        }
        assert_eq!(bus.resolve(0x604).unwrap().name, "rec");
        assert_eq!(bus.resolve(0x604).unwrap().base, 0x600);

        let kick = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let ctl = RunControl::new(1);
        let waker = Waker::new(&kick, &ctl);
        let io = IoContext::new(3, &waker);
        assert_eq!(bus.write(&io, 0x604, &[1, 2]), Some(IoAction::Continue));
        assert_eq!(
            bus.write(&io, 0x600, b"die"),
            Some(IoAction::Stop("asked to".into()))
        );
        assert_eq!(bus.write(&io, 0x610, &[1]), None);
        assert_eq!(
            *rec.0.lock(),
            vec![(3, 4, vec![1, 2]), (3, 0, b"die".to_vec())]
        );
        let mut data = [0u8; 2];
        assert!(bus.read(&io, 0x607, &mut data));
        assert_eq!(data, [7, 7]);
        // A write-only device answers all ones; no device leaves the buffer alone.
        assert!(bus.read(&io, 0xe9, &mut data));
        assert_eq!(data, [0xff, 0xff]);
        let mut data = [5u8; 1];
        assert!(!bus.read(&io, 0x700, &mut data));
        assert_eq!(data, [5]);
    }

    #[test]
    fn le_value_reads_what_an_out_wrote() {
        assert_eq!(le_value(&[0x41]), 0x41);
        assert_eq!(le_value(&[1, 2]), 0x0201);
        assert_eq!(le_value(&[1, 2, 3, 4]), 0x0403_0201);
        assert_eq!(le_value(&[1, 2, 3, 4, 5]), 0x0403_0201);
        assert_eq!(le_value(&[]), 0);
    }
}
