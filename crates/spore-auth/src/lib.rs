//! Who may call a Spore daemon: access keys and AWS Signature Version 4.
//!
//! Every AWS SDK and the AWS CLI sign their requests with SigV4, so Spore's HTTP API checks
//! exactly that ([`sigv4::verify`]) against the daemon's keys ([`keys::KeyStore`]); Spore's
//! own clients sign the same way ([`sigv4::sign`]) with a key found as the AWS tools find
//! theirs ([`credentials::resolve`]). Files holding secrets are written with mode 0600.
//!
//! This crate does no I/O beyond those files and knows nothing of HTTP servers or clients:
//! callers hand it a request's method, path, query, headers and body.
#![forbid(unsafe_code)]

pub mod credentials;
pub mod keys;
pub mod sigv4;

pub use keys::{Action, Key, KeyStore};
pub use sigv4::{RequestParts, SignatureError, Verified};

/// An access key id and its secret.
#[derive(Clone, PartialEq, Eq)]
pub struct Credentials {
    /// The access key id (public: requests name it).
    pub access_key_id: String,
    /// The secret access key.
    pub secret_access_key: String,
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Credentials")
            .field("access_key_id", &self.access_key_id)
            .field("secret_access_key", &"<secret>")
            .finish()
    }
}

impl Credentials {
    /// A new random key: an id of the AWS form (20 upper-case characters, `SPK` first) and
    /// a 40-character secret, from the operating system's random source.
    pub fn generate() -> Credentials {
        const ID: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZ234567";
        const SECRET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
        let mut bytes = Vec::with_capacity(64);
        while bytes.len() < 64 {
            bytes.extend_from_slice(uuid::Uuid::new_v4().as_bytes());
        }
        let id: String = std::iter::once("SPK".to_string())
            .chain(
                bytes[..17]
                    .iter()
                    .map(|b| (ID[(*b as usize) % ID.len()] as char).to_string()),
            )
            .collect();
        let secret: String = bytes[17..57]
            .iter()
            .map(|b| SECRET[(*b as usize) % SECRET.len()] as char)
            .collect();
        Credentials {
            access_key_id: id,
            secret_access_key: secret,
        }
    }
}

pub use spore_registry::store::{make_private, write_atomic as write_private};

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_keys_look_like_aws_keys_and_differ() {
        let (a, b) = (Credentials::generate(), Credentials::generate());
        assert_eq!(a.access_key_id.len(), 20);
        assert!(a.access_key_id.starts_with("SPK"));
        assert_eq!(a.secret_access_key.len(), 40);
        assert_ne!(a, b);
        assert!(!format!("{a:?}").contains(&a.secret_access_key));
    }
}
