//! Versioned save and restore of the parts of a VM (Firecracker's `persist.rs` pattern).
//!
//! Every part of a VM that a checkpoint carries (each vCPU, each device) has its own state
//! type, which implements [`Versioned`]: a stable name, its own encoding version, and the
//! checks any state of that type must pass before it is restored (a state is input from a
//! peer). The code that saves and restores a device lives with the device (`Persist`);
//! [`crate::state::VmState`] puts the parts together, each encoded as a `Section` (name,
//! version, bytes), so a version mismatch is reported for the very part it concerns.
//!
//! Changing a state type's fields (or what they mean) bumps its `VERSION`; changing which
//! parts a VM has, or how sections are framed, bumps [`crate::state::VERSION`], which the
//! handshake announces.

use std::fmt;

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize, Serializer};

use crate::state::StateError;

/// A state type with its own versioned encoding: one part of an encoded VM state.
pub trait Versioned: Serialize + DeserializeOwned {
    /// Name of the part in an encoded state (`"nic"`, `"vcpu"`); never changes.
    const NAME: &'static str;
    /// Version of this type's encoding; bumped on every change of its fields or their meaning.
    const VERSION: u32;

    /// Checks that every restorable state of this type passes, whatever VM it goes into:
    /// refuses what the part could never have saved. `Err` says what is wrong.
    fn check(&self) -> Result<(), String> {
        Ok(())
    }
}

/// Save and restore of one device (the device keeps its state behind its own locks, so both
/// take `&self`).
pub(crate) trait Persist {
    /// The device's state type.
    type State: Versioned;

    /// The device's state now (the vCPUs must be paused for it to be consistent with memory).
    fn save(&self) -> Self::State;

    /// Replaces the device's state with a saved one, after [`Versioned::check`].
    fn restore(&self, state: &Self::State) -> Result<(), StateError>;
}

/// [`Versioned::check`] as a [`StateError`] naming the part.
pub(crate) fn check<S: Versioned>(state: &S, part: &dyn fmt::Display) -> Result<(), StateError> {
    state.check().map_err(|reason| StateError::Invalid {
        part: part.to_string(),
        reason,
    })
}

/// The encoding of one part: `name`, `version`, then its postcard bytes (length-prefixed).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct Section<'a> {
    /// [`Versioned::NAME`] of the part.
    pub(crate) name: &'a str,
    /// [`Versioned::VERSION`] it was encoded with.
    pub(crate) version: u32,
    /// `postcard` of the state.
    #[serde(serialize_with = "as_bytes")]
    pub(crate) data: &'a [u8],
}

fn as_bytes<S: Serializer>(data: &&[u8], s: S) -> Result<S::Ok, S::Error> {
    s.serialize_bytes(data)
}

/// `postcard` of a state, the bytes of its [`Section`].
pub(crate) fn to_bytes<S: Versioned>(state: &S) -> Vec<u8> {
    // Encoding into a Vec only fails for types serde cannot express; ours all can.
    postcard::to_allocvec(state).expect("VM state parts are always serializable")
}

impl<'a> Section<'a> {
    /// The section of `S` with the given bytes (from [`to_bytes`]).
    pub(crate) fn of<S: Versioned>(data: &'a [u8]) -> Self {
        Section {
            name: S::NAME,
            version: S::VERSION,
            data,
        }
    }

    /// Decodes the section as an `S`: refuses another part, another version of `S`'s encoding
    /// and bytes that are not exactly one `S`. `part` names it in errors ("vCPU 1").
    pub(crate) fn decode<S: Versioned>(&self, part: &dyn fmt::Display) -> Result<S, StateError> {
        if self.name != S::NAME {
            return Err(StateError::Mismatch(format!(
                "{part} holds a state of {:?}, not of {:?}",
                shorten(self.name),
                S::NAME
            )));
        }
        if self.version != S::VERSION {
            return Err(StateError::PartVersion {
                part: part.to_string(),
                found: self.version,
                supported: S::VERSION,
            });
        }
        let (state, rest) =
            postcard::take_from_bytes(self.data).map_err(|source| StateError::PartBody {
                part: part.to_string(),
                source,
            })?;
        if !rest.is_empty() {
            return Err(StateError::Mismatch(format!(
                "{} bytes of trailing data after the state of {part}",
                rest.len()
            )));
        }
        Ok(state)
    }
}

/// A name read from a state, cut to a length fit for an error message.
pub(crate) fn shorten(name: &str) -> String {
    const MAX: usize = 40;
    if name.chars().count() <= MAX {
        name.to_string()
    } else {
        name.chars().take(MAX).chain("...".chars()).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, PartialEq, Serialize, Deserialize)]
    struct Thing {
        a: u32,
        b: Vec<u8>,
    }

    impl Versioned for Thing {
        const NAME: &'static str = "thing";
        const VERSION: u32 = 3;

        fn check(&self) -> Result<(), String> {
            if self.b.len() > 4 {
                return Err(format!("{} bytes of b (at most 4)", self.b.len()));
            }
            Ok(())
        }
    }

    #[derive(Debug, Serialize, Deserialize)]
    struct Other;

    impl Versioned for Other {
        const NAME: &'static str = "other";
        const VERSION: u32 = 1;
    }

    #[test]
    fn a_section_decodes_only_as_its_own_part_and_version() {
        let thing = Thing {
            a: 7,
            b: vec![1, 2],
        };
        let data = to_bytes(&thing);
        let enc = postcard::to_allocvec(&Section::of::<Thing>(&data)).unwrap();
        let sec: Section = postcard::from_bytes(&enc).unwrap();
        assert_eq!(sec, Section::of::<Thing>(&data));
        assert_eq!(sec.decode::<Thing>(&"device thing").unwrap(), thing);

        let err = sec.decode::<Other>(&"device other").unwrap_err();
        assert!(
            err.to_string()
                .contains("device other holds a state of \"thing\""),
            "{err}"
        );
        let old = Section { version: 2, ..sec };
        let err = old.decode::<Thing>(&"device thing").unwrap_err();
        assert!(matches!(
            err,
            StateError::PartVersion {
                found: 2,
                supported: 3,
                ..
            }
        ));
        assert!(
            err.to_string().contains("device thing has version 2")
                && err.to_string().contains("version 3"),
            "{err}"
        );
        let cut = Section {
            data: &data[..data.len() - 1],
            ..sec
        };
        assert!(matches!(
            cut.decode::<Thing>(&"device thing"),
            Err(StateError::PartBody { .. })
        ));
        let mut long = data.clone();
        long.push(0);
        let err = Section { data: &long, ..sec }
            .decode::<Thing>(&"device thing")
            .unwrap_err();
        assert!(
            err.to_string().contains("1 bytes of trailing data"),
            "{err}"
        );
        // A hostile name is cut short in the message.
        let name = "x".repeat(10_000);
        let err = Section { name: &name, ..sec }
            .decode::<Thing>(&"device thing")
            .unwrap_err();
        assert!(err.to_string().len() < 200, "{err}");
    }

    #[test]
    fn checks_name_the_part() {
        let bad = Thing {
            a: 0,
            b: vec![0; 9],
        };
        let err = check(&bad, &"device thing").unwrap_err();
        assert!(
            err.to_string().contains("device thing") && err.to_string().contains("9 bytes of b"),
            "{err}"
        );
        check(&Thing { a: 0, b: vec![] }, &"device thing").unwrap();
    }
}
