//! Checkpointable VM state: everything besides guest memory that a VM needs to continue
//! exactly where it stopped, on another KVM VM, process or host.
//!
//! Serialized as `MAGIC | version u32 LE | postcard(VmState)`. The version is bumped on every
//! change of the layout below; a decoder refuses any other version with an error naming both.

use kvm_bindings::{
    kvm_cpuid_entry2, kvm_debugregs, kvm_mp_state, kvm_regs, kvm_sregs, kvm_vcpu_events, kvm_xcrs,
};
use serde::{Deserialize, Serialize};

use crate::nic::NicState;

/// First bytes of an encoded [`VmState`].
pub const MAGIC: [u8; 4] = *b"RMCS";
/// Current encoding version.
pub const VERSION: u32 = 1;

/// State of one vCPU.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct VcpuState {
    /// CPUID the vCPU was given (restored first: it decides the XSAVE layout and valid MSRs).
    pub cpuid: Vec<kvm_cpuid_entry2>,
    /// General registers.
    pub regs: kvm_regs,
    /// Special registers (segments, control registers, EFER, APIC base).
    pub sregs: kvm_sregs,
    /// FPU, SSE and AVX state: the 4 KiB KVM_GET_XSAVE area as 1,024 words.
    pub xsave: Vec<u32>,
    /// Extended control registers (XCR0).
    pub xcrs: kvm_xcrs,
    /// Debug registers.
    pub debugregs: kvm_debugregs,
    /// Model-specific registers: (index, value) for every MSR KVM reports as saveable.
    pub msrs: Vec<(u32, u64)>,
    /// Pending exceptions, interrupts, NMIs, interrupt shadow.
    pub events: kvm_vcpu_events,
    /// Multiprocessing state (runnable, halted, ...).
    pub mp_state: kvm_mp_state,
}

/// Console state: partial lines not yet logged, per vCPU.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConsoleState {
    /// Bytes after the last newline, per vCPU.
    pub partial: Vec<Vec<u8>>,
}

/// Everything except guest memory.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct VmState {
    /// Guest memory size in bytes (a restore must use the same).
    pub mem_size: u64,
    /// One entry per vCPU.
    pub vcpus: Vec<VcpuState>,
    /// The NIC.
    pub nic: NicState,
    /// The console.
    pub console: ConsoleState,
}

/// An encoded state could not be decoded.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    /// Input too short or not starting with [`MAGIC`].
    #[error("Not an rmc VM state (bad magic or shorter than its header)")]
    BadMagic,
    /// Written by another encoding version.
    #[error("VM state version {found} is not supported (this build reads version {VERSION})")]
    Version {
        /// Version found in the header.
        found: u32,
    },
    /// The body did not decode.
    #[error("VM state body is malformed")]
    Body(#[source] postcard::Error),
    /// The state does not fit the VM it is restored into.
    #[error("VM state does not fit this VM: {0}")]
    Mismatch(String),
}

impl VmState {
    /// Encodes the state with its header.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(8 + 8192 * self.vcpus.len());
        out.extend_from_slice(&MAGIC);
        out.extend_from_slice(&VERSION.to_le_bytes());
        // Encoding into a Vec only fails for types serde cannot express; ours all can.
        postcard::to_io(self, &mut out).expect("VmState is always serializable");
        out
    }

    /// Decodes a state, refusing other versions and trailing garbage.
    pub fn decode(bytes: &[u8]) -> Result<Self, StateError> {
        if bytes.len() < 8 || bytes[..4] != MAGIC {
            return Err(StateError::BadMagic);
        }
        let found = u32::from_le_bytes(bytes[4..8].try_into().expect("4 bytes"));
        if found != VERSION {
            return Err(StateError::Version { found });
        }
        let (state, rest) = postcard::take_from_bytes(&bytes[8..]).map_err(StateError::Body)?;
        if !rest.is_empty() {
            return Err(StateError::Mismatch(format!(
                "{} bytes of trailing data after the state",
                rest.len()
            )));
        }
        Ok(state)
    }
}

#[cfg(test)]
mod tests_support {
    use super::*;

    /// A small but complete VM state.
    pub(super) fn sample() -> VmState {
        let regs = kvm_regs {
            rip: 0x2_0000,
            rax: 42,
            ..Default::default()
        };
        let mut xsave = vec![0u32; 1024];
        xsave[7] = 0xdead_beef;
        VmState {
            mem_size: 256 << 20,
            vcpus: vec![VcpuState {
                cpuid: vec![kvm_cpuid_entry2::default()],
                regs,
                sregs: kvm_sregs::default(),
                xsave,
                xcrs: kvm_xcrs::default(),
                debugregs: kvm_debugregs::default(),
                msrs: vec![(0x10, 123), (0xc000_0080, 0x500)],
                events: kvm_vcpu_events::default(),
                mp_state: kvm_mp_state::default(),
            }],
            nic: NicState {
                size: 64,
                rx_used: 9,
                ..Default::default()
            },
            console: ConsoleState {
                partial: vec![b"abc".to_vec()],
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::tests_support::sample;
    use super::*;

    #[test]
    fn round_trip() {
        let s = sample();
        let back = VmState::decode(&s.encode()).unwrap();
        assert_eq!(back.vcpus[0].regs.rax, 42);
        assert_eq!(back.vcpus[0].xsave[7], 0xdead_beef);
        assert_eq!(back.vcpus[0].msrs, s.vcpus[0].msrs);
        assert_eq!(back.nic, s.nic);
        assert_eq!(back.console, s.console);
        assert_eq!(back.encode(), s.encode());
    }

    #[test]
    fn refuses_bad_input() {
        let enc = sample().encode();
        assert!(matches!(VmState::decode(b"RMC"), Err(StateError::BadMagic)));
        let mut v2 = enc.clone();
        v2[4] = 2;
        let err = VmState::decode(&v2).unwrap_err();
        assert!(matches!(err, StateError::Version { found: 2 }));
        assert!(err.to_string().contains("version 2"));
        assert!(matches!(
            VmState::decode(&enc[..enc.len() - 10]),
            Err(StateError::Body(_))
        ));
        let mut long = enc.clone();
        long.push(0);
        assert!(matches!(
            VmState::decode(&long),
            Err(StateError::Mismatch(_))
        ));
    }
}

#[cfg(test)]
mod restore_check_tests {
    use super::tests_support::sample;
    use crate::RestoreCheck;

    #[test]
    fn a_standby_acks_only_states_it_can_restore() {
        let good = sample();
        let regions = crate::layout::ram_regions(good.mem_size);
        RestoreCheck::check_guest(1, &regions).unwrap();
        RestoreCheck::check_state(&good.encode(), 1, &regions).unwrap();
        // Garbage with a good checksum, another encoding version, another vCPU count, another
        // memory size, an impossible NIC ring: each is refused with what is wrong.
        let err = |bytes: &[u8], vcpus: u32, regions: &[(u64, u64)]| {
            RestoreCheck::check_state(bytes, vcpus, regions)
                .unwrap_err()
                .to_string()
        };
        assert!(err(b"definitely not a state", 1, &regions).contains("Not an rmc VM state"));
        let mut other = good.encode();
        other[4..8].copy_from_slice(&7u32.to_le_bytes());
        assert!(err(&other, 1, &regions).contains("version 7"));
        assert!(err(&good.encode(), 2, &regions).contains("state has 1 vCPUs"));
        let small = crate::layout::ram_regions(512 << 20);
        assert!(err(&good.encode(), 1, &small).contains("bytes of memory"));
        let mut ring = good.clone();
        ring.nic.size = 4096;
        assert!(err(&ring.encode(), 1, &regions).contains("NIC ring of 4096 entries"));
        // Guests this VMM does not build.
        let guest_err = |vcpus: u32, regions: &[(u64, u64)]| {
            RestoreCheck::check_guest(vcpus, regions)
                .unwrap_err()
                .to_string()
        };
        assert!(guest_err(1, &crate::layout::ram_regions(8 << 20)).contains("memory must be"));
        assert!(guest_err(9, &crate::layout::ram_regions(256 << 20)).contains("vCPUs"));
        assert!(
            guest_err(1, &[(0x10_0000, 256 << 20)]).contains("not those of a 256 MiB rmc guest")
        );
    }
}
