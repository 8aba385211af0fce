//! The ids of what agents and their owners name: jobs, requests, agreements and peers. Each is
//! its own type, so a job id cannot be passed where an agreement id belongs; on the wire and in
//! the API each is a plain JSON string.
//!
//! The agent mints the ids of [`Minted`] types with one generator (`proto::new_id` in the agent),
//! `BYTES` random bytes as lowercase hex. A peer's id is not minted: it is the base58 text of the
//! libp2p identity that signed.

use std::borrow::Borrow;
use std::fmt;
use std::ops::Deref;

/// An id type the agent mints: how many random bytes its ids carry.
pub trait Minted: From<String> {
    /// Random bytes per id, written as twice as many hex digits.
    const BYTES: usize;
}

macro_rules! id_type {
    ($(#[$doc:meta])* $name:ident) => {
        $(#[$doc])*
        #[derive(
            Debug, Clone, Default, PartialEq, Eq, Hash, PartialOrd, Ord,
            serde::Serialize, serde::Deserialize, utoipa::ToSchema,
        )]
        #[serde(transparent)]
        #[schema(value_type = String)]
        pub struct $name(String);

        impl $name {
            /// The id as text.
            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl Deref for $name {
            type Target = str;

            fn deref(&self) -> &str {
                &self.0
            }
        }

        impl AsRef<str> for $name {
            fn as_ref(&self) -> &str {
                &self.0
            }
        }

        impl Borrow<str> for $name {
            fn borrow(&self) -> &str {
                &self.0
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }

        impl From<String> for $name {
            fn from(id: String) -> Self {
                Self(id)
            }
        }

        impl From<&str> for $name {
            fn from(id: &str) -> Self {
                Self(id.to_owned())
            }
        }

        impl From<$name> for String {
            fn from(id: $name) -> Self {
                id.0
            }
        }

        impl PartialEq<str> for $name {
            fn eq(&self, other: &str) -> bool {
                self.0 == other
            }
        }

        impl PartialEq<&str> for $name {
            fn eq(&self, other: &&str) -> bool {
                self.0 == *other
            }
        }

        impl PartialEq<String> for $name {
            fn eq(&self, other: &String) -> bool {
                &self.0 == other
            }
        }
    };
}

id_type! {
    /// A job's id: one this agent runs (`hearth jobs`, `/api/v1/jobs/{id}`) or one it asked
    /// another agent to run (`/api/v1/remote-jobs/{id}`, where it is also the request's id).
    JobId
}

id_type! {
    /// A request's id: what `hearth submit` prints for a request package
    /// (`hearth request status ID`), and the `request_id` of the signed documents that ask a
    /// provider for a job or a reservation.
    RequestId
}

id_type! {
    /// An agreement's id, chosen by the provider that offered its terms.
    AgreementId
}

id_type! {
    /// A peer's id: the base58 text of its libp2p identity (`12D3KooW…`).
    PeerId
}

impl Minted for JobId {
    const BYTES: usize = 6;
}

impl Minted for RequestId {
    const BYTES: usize = 8;
}

impl Minted for AgreementId {
    const BYTES: usize = 16;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_id_is_a_plain_string_on_the_wire() {
        let id = JobId::from("a1b2c3");
        assert_eq!(serde_json::to_string(&id).unwrap(), "\"a1b2c3\"");
        assert_eq!(serde_json::from_str::<JobId>("\"a1b2c3\"").unwrap(), id);
        assert!(serde_json::from_str::<JobId>("7").is_err(), "a number is not an id");
        assert_eq!(id, "a1b2c3");
        assert_eq!(id.to_string(), "a1b2c3");
        let map: std::collections::HashMap<JobId, u8> = [(id.clone(), 1)].into();
        assert_eq!(map.get("a1b2c3"), Some(&1), "looked up by its text");
    }
}
