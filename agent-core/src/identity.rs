//! The agent's one Ed25519 identity.
//!
//! A 32-byte seed, drawn from `ring`'s `SystemRandom` on first start, lives in
//! `<data-dir>/identity.key` with mode 0600. The same seed yields the libp2p keypair, so the
//! agent's [`PeerId`] is also the key that signs its adverts, agreements and receipts: anyone can
//! check a signature against the peer it came from.
//!
//! The file is created atomically and never replaced: a key that is unreadable, has loose
//! permissions we cannot trust, or is corrupt is an error that names the file and changes nothing.
//! Losing an identity loses the agent's reputation and ledger continuity, so only the owner may
//! decide to throw one away.

use std::fs::File;
use std::io::{self, Read};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use libp2p_identity::{Keypair, PeerId, PublicKey, ed25519};
use ring::rand::{SecureRandom, SystemRandom};

use crate::secret_file;

/// File name of the identity seed inside the data dir.
pub const KEY_FILE: &str = "identity.key";

/// Length of an Ed25519 seed.
const SEED_LEN: usize = 32;

/// Why the identity could not be loaded or created.
#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    /// The key file exists but could not be read.
    #[error("cannot read identity key {path}: {source}")]
    Unreadable {
        /// The key file.
        path: PathBuf,
        /// What the OS said.
        source: io::Error,
    },
    /// The key file does not hold a valid seed.
    #[error(
        "identity key {path} is corrupt ({reason}); it was left untouched. Restore it from a backup, \
         or move it away to start this agent with a new identity"
    )]
    Corrupt {
        /// The key file.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
    /// The key file can be read by other users, so it may have been copied.
    #[error(
        "identity key {path} has mode {mode:o}, open to other users who may have copied it; run \
         `chmod 600 {path}` if you trust it"
    )]
    Exposed {
        /// The key file.
        path: PathBuf,
        /// Its permission bits.
        mode: u32,
    },
    /// A new key could not be written.
    #[error("cannot create identity key {path}: {source}")]
    Create {
        /// The key file.
        path: PathBuf,
        /// What the OS said.
        source: io::Error,
    },
    /// The system's random source failed.
    #[error("the system random number generator failed")]
    Random,
}

/// A domain-separation tag: the first bytes of every signed message, so that a signature made for
/// one kind of object can never be replayed as another.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DomainTag(&'static [u8]);

impl DomainTag {
    /// Creates a tag; by convention `b"hearth/<object>/v<N>"`.
    pub const fn new(tag: &'static [u8]) -> Self {
        Self(tag)
    }

    fn prefixed(self, message: &[u8]) -> Vec<u8> {
        let mut out = Vec::with_capacity(self.0.len() + message.len());
        out.extend_from_slice(self.0);
        out.extend_from_slice(message);
        out
    }
}

/// The agent's keypair, its libp2p form and the [`PeerId`] derived from it.
#[derive(Clone)]
pub struct Identity {
    signer: ed25519::Keypair,
    keypair: Keypair,
    peer_id: PeerId,
}

impl std::fmt::Debug for Identity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print key material.
        f.debug_struct("Identity").field("peer_id", &self.peer_id).finish()
    }
}

impl Identity {
    /// Loads the identity from `data_dir`, creating it on first start.
    pub fn load_or_create(data_dir: &Path) -> Result<(Self, Created), IdentityError> {
        let path = data_dir.join(KEY_FILE);
        match File::open(&path) {
            Ok(file) => Ok((Self::read(&path, file)?, Created::No)),
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                let seed = new_seed()?;
                match secret_file::create(&path, &seed) {
                    Ok(()) => Ok((Self::from_seed(seed, &path)?, Created::Yes)),
                    // Another process created it between our open and our link: use theirs.
                    Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
                        let file = File::open(&path)
                            .map_err(|source| IdentityError::Unreadable { path: path.clone(), source })?;
                        Ok((Self::read(&path, file)?, Created::No))
                    }
                    Err(source) => Err(IdentityError::Create { path, source }),
                }
            }
            Err(source) => Err(IdentityError::Unreadable { path, source }),
        }
    }

    /// Loads the identity from `data_dir`; `None` where it has none (it is never created here).
    pub fn load(data_dir: &Path) -> Result<Option<Self>, IdentityError> {
        let path = data_dir.join(KEY_FILE);
        match File::open(&path) {
            Ok(file) => Self::read(&path, file).map(Some),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(source) => Err(IdentityError::Unreadable { path, source }),
        }
    }

    /// The agent's peer id: its name on the network and the identity behind its signatures.
    pub fn peer_id(&self) -> PeerId {
        self.peer_id
    }

    /// The libp2p keypair, for the swarm.
    pub fn keypair(&self) -> &Keypair {
        &self.keypair
    }

    /// The public key that verifies this agent's signatures.
    pub fn public(&self) -> PublicKey {
        self.keypair.public()
    }

    /// Signs `tag || message`.
    pub fn sign(&self, tag: DomainTag, message: &[u8]) -> Vec<u8> {
        self.signer.sign(&tag.prefixed(message))
    }

    fn read(path: &Path, mut file: File) -> Result<Self, IdentityError> {
        let unreadable = |source| IdentityError::Unreadable { path: path.to_owned(), source };
        let meta = file.metadata().map_err(unreadable)?;
        if !meta.is_file() {
            return Err(unreadable(io::Error::other("not a regular file")));
        }
        let mode = meta.permissions().mode() & 0o777;
        if mode & 0o077 != 0 {
            return Err(IdentityError::Exposed { path: path.to_owned(), mode });
        }
        // Read one byte more than a seed so that a longer file is caught, not truncated.
        let mut buf = Vec::with_capacity(SEED_LEN + 1);
        (&mut file).take(SEED_LEN as u64 + 1).read_to_end(&mut buf).map_err(unreadable)?;
        let seed: [u8; SEED_LEN] = buf.as_slice().try_into().map_err(|_| IdentityError::Corrupt {
            path: path.to_owned(),
            reason: format!("expected {SEED_LEN} bytes, found {}", describe_len(buf.len())),
        })?;
        Self::from_seed(seed, path)
    }

    fn from_seed(mut seed: [u8; SEED_LEN], path: &Path) -> Result<Self, IdentityError> {
        let secret = ed25519::SecretKey::try_from_bytes(&mut seed)
            .map_err(|e| IdentityError::Corrupt { path: path.to_owned(), reason: e.to_string() })?;
        let signer = ed25519::Keypair::from(secret);
        let keypair = Keypair::from(signer.clone());
        let peer_id = keypair.public().to_peer_id();
        Ok(Self { signer, keypair, peer_id })
    }
}

/// Whether [`Identity::load_or_create`] made a new identity.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Created {
    /// A new key was generated and stored.
    Yes,
    /// An existing key was loaded.
    No,
}

/// Verifies a signature made by [`Identity::sign`] with the same tag.
pub fn verify(public: &PublicKey, tag: DomainTag, message: &[u8], signature: &[u8]) -> bool {
    public.verify(&tag.prefixed(message), signature)
}

fn describe_len(n: usize) -> String {
    if n > SEED_LEN { format!("more than {SEED_LEN}") } else { n.to_string() }
}

fn new_seed() -> Result<[u8; SEED_LEN], IdentityError> {
    let mut seed = [0u8; SEED_LEN];
    SystemRandom::new().fill(&mut seed).map_err(|_| IdentityError::Random)?;
    Ok(seed)
}

#[cfg(test)]
mod tests {
    use std::fs;

    use super::*;

    const TAG: DomainTag = DomainTag::new(b"hearth/test/v1");

    #[test]
    fn first_start_creates_a_private_key_and_later_starts_reuse_it() {
        let dir = tempfile::tempdir().unwrap();
        let (first, created) = Identity::load_or_create(dir.path()).unwrap();
        assert_eq!(created, Created::Yes);
        let mode = fs::metadata(dir.path().join(KEY_FILE)).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        let (again, created) = Identity::load_or_create(dir.path()).unwrap();
        assert_eq!(created, Created::No);
        assert_eq!(first.peer_id(), again.peer_id());
        // No temporary file is left behind.
        assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 1);
    }

    #[test]
    fn signatures_verify_against_the_peer_id_and_only_with_their_tag() {
        let dir = tempfile::tempdir().unwrap();
        let (id, _) = Identity::load_or_create(dir.path()).unwrap();
        let sig = id.sign(TAG, b"receipt bytes");
        assert_eq!(id.public().to_peer_id(), id.peer_id());
        assert!(verify(&id.public(), TAG, b"receipt bytes", &sig));
        assert!(!verify(&id.public(), TAG, b"receipt bytez", &sig));
        assert!(!verify(&id.public(), DomainTag::new(b"hearth/other/v1"), b"receipt bytes", &sig));
    }

    #[test]
    fn the_peer_id_is_the_ed25519_public_key_of_the_seed() {
        // The same seed through ring must give the same public key that libp2p derives, so a
        // signature made by either library is checkable against the PeerId.
        let dir = tempfile::tempdir().unwrap();
        let (id, _) = Identity::load_or_create(dir.path()).unwrap();
        let seed = fs::read(dir.path().join(KEY_FILE)).unwrap();
        let ring_pair = ring::signature::Ed25519KeyPair::from_seed_unchecked(&seed).unwrap();
        use ring::signature::KeyPair as _;
        let ours = id.public().try_into_ed25519().unwrap().to_bytes();
        assert_eq!(ring_pair.public_key().as_ref(), ours.as_slice());
    }

    #[test]
    fn corrupt_keys_are_reported_and_left_untouched() {
        for content in [&b""[..], &[7u8; 31][..], &[7u8; 33][..], &[7u8; 4096][..]] {
            let dir = tempfile::tempdir().unwrap();
            let path = dir.path().join(KEY_FILE);
            fs::write(&path, content).unwrap();
            fs::set_permissions(&path, fs::Permissions::from_mode(0o600)).unwrap();
            let err = Identity::load_or_create(dir.path()).unwrap_err();
            assert!(matches!(err, IdentityError::Corrupt { .. }), "{err}");
            assert!(err.to_string().contains(&path.display().to_string()));
            assert_eq!(fs::read(&path).unwrap(), content, "the key file must not change");
        }
    }

    #[test]
    fn a_key_readable_by_others_is_refused_and_left_untouched() {
        let dir = tempfile::tempdir().unwrap();
        Identity::load_or_create(dir.path()).unwrap();
        let path = dir.path().join(KEY_FILE);
        let before = fs::read(&path).unwrap();
        fs::set_permissions(&path, fs::Permissions::from_mode(0o644)).unwrap();
        let err = Identity::load_or_create(dir.path()).unwrap_err();
        assert!(matches!(err, IdentityError::Exposed { mode: 0o644, .. }), "{err}");
        assert_eq!(fs::read(&path).unwrap(), before);
    }

    #[test]
    fn an_unreadable_key_is_an_error_not_a_new_identity() {
        let dir = tempfile::tempdir().unwrap();
        // A directory where the key should be: open succeeds, reading fails.
        fs::create_dir(dir.path().join(KEY_FILE)).unwrap();
        let err = Identity::load_or_create(dir.path()).unwrap_err();
        assert!(matches!(err, IdentityError::Unreadable { .. }), "{err}");
        assert!(dir.path().join(KEY_FILE).is_dir());
    }
}
