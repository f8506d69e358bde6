//! The audit log's rules, with no I/O: what an entry is and how it is hashed (one canonical byte
//! form), the RFC 6962 Merkle tree over the entries, and Ed25519-signed tree heads.
//!
//! Invariant: an entry's leaf hash depends on every field of the entry and on nothing else, so
//! any edit, removal, reordering or insertion in storage changes the root of every tree head that
//! covers it — and tree heads are signed by a key storage does not hold.

pub mod merkle;

pub use merkle::{Frontier, Hash, Node};

/// Longest text in any field of an entry, in bytes: bounded like everything else.
pub const FIELD_LEN_MAX: usize = 1024;

/// What is recorded, before the log assigns its place (`seq`, `time`).
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct Draft {
    /// The tenant the action belongs to; `None` for operator actions and anonymous failures.
    pub tenant: Option<u128>,
    /// Who acted: `operator`, `key:<uuid>`, `client:<uuid>`, `anonymous`.
    pub actor: String,
    /// What was done, e.g. `POST /v1/transfers`, `auth.failed`, `keys.rotate`.
    pub action: String,
    /// The resource acted on (an id or a path); may be empty.
    pub resource: String,
    pub request_id: String,
    /// The client's address.
    pub source: String,
    /// How it ended: an HTTP status, a ledger result.
    pub outcome: String,
}

/// An entry as stored: its place in the log and what happened.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Entry {
    /// 1-based; leaf `seq - 1` of the tree.
    pub seq: u64,
    /// Nanoseconds since the UNIX epoch.
    pub time: u64,
    pub draft: Draft,
}

const ENTRY_FORMAT: u8 = 1;

impl Entry {
    /// The one byte form that is hashed: a format byte, then every field in order, integers
    /// big-endian, texts length-prefixed (u32) so no two entries share a form.
    pub fn canonical(&self) -> Vec<u8> {
        entry_canonical(self.seq, self.time, &self.draft)
    }

    pub fn leaf_hash(&self) -> Hash {
        entry_leaf_hash(self.seq, self.time, &self.draft)
    }
}

/// [`Entry::canonical`] of the entry `seq`, at `time`, recording `d`.
pub fn entry_canonical(seq: u64, time: u64, d: &Draft) -> Vec<u8> {
    let mut out = Vec::with_capacity(64 + d.actor.len() + d.action.len() + d.resource.len() + 64);
    out.push(ENTRY_FORMAT);
    out.extend_from_slice(&seq.to_be_bytes());
    out.extend_from_slice(&time.to_be_bytes());
    match d.tenant {
        None => out.push(0),
        Some(t) => {
            out.push(1);
            out.extend_from_slice(&t.to_be_bytes());
        }
    }
    for text in [&d.actor, &d.action, &d.resource, &d.request_id, &d.source, &d.outcome] {
        out.extend_from_slice(&(text.len() as u32).to_be_bytes());
        out.extend_from_slice(text.as_bytes());
    }
    out
}

/// [`Entry::leaf_hash`] of the entry `seq`, at `time`, recording `d`: without building the entry.
pub fn entry_leaf_hash(seq: u64, time: u64, d: &Draft) -> Hash {
    merkle::leaf_hash(&entry_canonical(seq, time, d))
}

impl Draft {
    /// Cuts every field to [`FIELD_LEN_MAX`] bytes (at a character boundary).
    pub fn bounded(mut self) -> Draft {
        for text in [
            &mut self.actor,
            &mut self.action,
            &mut self.resource,
            &mut self.request_id,
            &mut self.source,
            &mut self.outcome,
        ] {
            if text.len() > FIELD_LEN_MAX {
                let mut cut = FIELD_LEN_MAX;
                while !text.is_char_boundary(cut) {
                    cut -= 1;
                }
                text.truncate(cut);
            }
        }
        self
    }
}

/// A tree head: the log's size and root at a time.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TreeHead {
    pub size: u64,
    pub root: Hash,
    pub time: u64,
}

const HEAD_CONTEXT: &[u8] = b"rtpay audit tree head v1\0";

impl TreeHead {
    /// The signed message: a context string, then size, time and root.
    pub fn message(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(HEAD_CONTEXT.len() + 48);
        out.extend_from_slice(HEAD_CONTEXT);
        out.extend_from_slice(&self.size.to_be_bytes());
        out.extend_from_slice(&self.time.to_be_bytes());
        out.extend_from_slice(&self.root);
        out
    }
}

/// The Ed25519 key that signs tree heads.
pub struct Signer {
    pair: ring::signature::Ed25519KeyPair,
}

impl std::fmt::Debug for Signer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the private key.
        write!(f, "Signer({})", hex(self.public_key()))
    }
}

impl Signer {
    /// A new key as PKCS#8 (v2) bytes, to be kept secret.
    pub fn generate_pkcs8() -> Result<Vec<u8>, String> {
        let rng = ring::rand::SystemRandom::new();
        let doc = ring::signature::Ed25519KeyPair::generate_pkcs8(&rng)
            .map_err(|_| "the system random generator failed".to_owned())?;
        Ok(doc.as_ref().to_vec())
    }

    pub fn from_pkcs8(pkcs8: &[u8]) -> Result<Signer, String> {
        let pair = ring::signature::Ed25519KeyPair::from_pkcs8_maybe_unchecked(pkcs8)
            .map_err(|e| format!("not an Ed25519 PKCS#8 key: {e}"))?;
        Ok(Signer { pair })
    }

    pub fn public_key(&self) -> &[u8] {
        ring::signature::KeyPair::public_key(&self.pair).as_ref()
    }

    pub fn sign(&self, head: &TreeHead) -> Vec<u8> {
        self.pair.sign(&head.message()).as_ref().to_vec()
    }
}

/// Checks a tree head's Ed25519 signature under `public_key`.
pub fn verify_head(public_key: &[u8], head: &TreeHead, signature: &[u8]) -> bool {
    ring::signature::UnparsedPublicKey::new(&ring::signature::ED25519, public_key)
        .verify(&head.message(), signature)
        .is_ok()
}

/// Lowercase hex.
pub fn hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        s.push(DIGITS[(b >> 4) as usize] as char);
        s.push(DIGITS[(b & 15) as usize] as char);
    }
    s
}

/// Hex (either case) to bytes; `None` for odd lengths or other characters.
pub fn unhex(text: &str) -> Option<Vec<u8>> {
    // `from_str_radix` alone would take a sign: `+f` read as `0f`.
    if !text.len().is_multiple_of(2) || !text.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    (0..text.len()).step_by(2).map(|i| u8::from_str_radix(text.get(i..i + 2)?, 16).ok()).collect()
}

/// What `verify_log` found wrong first.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Finding {
    /// Entries must be numbered 1, 2, 3, … with no gap or repeat.
    Sequence { expected: u64, found: u64 },
    /// The stored leaf hash does not match the entry's fields.
    LeafHash { seq: u64 },
    /// A signed head's root differs from the recomputed tree of that size: some entry up to
    /// `size` was changed (after `covered_by_previous`, the size of the last head that matched).
    Root { size: u64, after: u64 },
    /// A head's signature does not verify under the key.
    Signature { size: u64 },
    /// A head claims more entries than are stored: entries were removed from the end.
    Missing { size: u64, stored: u64 },
    /// Time went backwards between two entries.
    Time { seq: u64 },
    /// Entries past the last signed head: every append signs a head in the same commit, so
    /// these were inserted behind the log's back.
    Unsigned { from: u64 },
    /// A tree head saved outside storage (see [`LogVerifier::pin`]) differs from the stored
    /// entries of its size: the log was cut back to before it and written on.
    Rewritten { size: u64 },
}

impl std::fmt::Display for Finding {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Finding::Sequence { expected, found } => write!(
                f,
                "entry {expected} expected, entry {found} found: entries were removed, inserted or reordered"
            ),
            Finding::LeafHash { seq } => write!(f, "entry {seq} was altered: its fields do not match its leaf hash"),
            Finding::Root { size, after } => write!(
                f,
                "the signed tree head of size {size} does not match the entries: an entry between {} and {size} was altered",
                after + 1
            ),
            Finding::Signature { size } => write!(f, "the tree head of size {size} has an invalid signature"),
            Finding::Missing { size, stored } => write!(
                f,
                "a signed tree head covers {size} entries but only {stored} are stored: entries were removed"
            ),
            Finding::Time { seq } => write!(f, "entry {seq} is older than the entry before it"),
            Finding::Unsigned { from } => write!(
                f,
                "entries from {from} on are covered by no signed tree head: they were inserted"
            ),
            Finding::Rewritten { size } => write!(
                f,
                "the saved tree head of size {size} does not match the first {size} stored entries: the log \
                 was cut back and written on"
            ),
        }
    }
}

/// Recomputes the log from its entries, in order, against the signed heads (in increasing size):
/// streaming, so memory stays bounded by the tree height.
pub struct LogVerifier<'k> {
    public_key: &'k [u8],
    frontier: Frontier,
    last_time: u64,
    verified_size: u64,
    pinned: Option<TreeHead>,
    pub entries: u64,
}

impl<'k> LogVerifier<'k> {
    pub fn new(public_key: &'k [u8]) -> Self {
        LogVerifier {
            public_key,
            frontier: Frontier::default(),
            last_time: 0,
            verified_size: 0,
            pinned: None,
            entries: 0,
        }
    }

    /// A signed head kept outside storage (as `GET /v1/audit/tree-head` gave it) that the log
    /// must still contain: the heads in storage prove nothing about entries cut off together with
    /// them. Refused if its signature does not verify under the key.
    pub fn pin(&mut self, head: TreeHead, signature: &[u8]) -> Result<(), Finding> {
        if !verify_head(self.public_key, &head, signature) {
            return Err(Finding::Signature { size: head.size });
        }
        self.pinned = Some(head);
        Ok(())
    }

    /// Feeds the next stored entry with its stored leaf hash.
    pub fn entry(&mut self, entry: &Entry, stored_leaf: &Hash) -> Result<(), Finding> {
        let expected = self.frontier.size() + 1;
        if entry.seq != expected {
            return Err(Finding::Sequence { expected, found: entry.seq });
        }
        if entry.time < self.last_time {
            return Err(Finding::Time { seq: entry.seq });
        }
        let leaf = entry.leaf_hash();
        if leaf != *stored_leaf {
            return Err(Finding::LeafHash { seq: entry.seq });
        }
        self.last_time = entry.time;
        self.frontier.append(leaf, &mut Vec::new());
        self.entries += 1;
        if let Some(pinned) = self.pinned.as_ref().filter(|p| p.size == self.frontier.size()) {
            if self.frontier.root() != pinned.root {
                return Err(Finding::Rewritten { size: pinned.size });
            }
        }
        Ok(())
    }

    /// The size the verifier has reached: heads of this size can be checked now.
    pub fn size(&self) -> u64 {
        self.frontier.size()
    }

    /// Checks a signed head of exactly the current size.
    pub fn head(&mut self, head: &TreeHead, signature: &[u8]) -> Result<(), Finding> {
        assert_eq!(head.size, self.size(), "heads are checked when the verifier reaches their size");
        if !verify_head(self.public_key, head, signature) {
            return Err(Finding::Signature { size: head.size });
        }
        if self.frontier.root() != head.root {
            return Err(Finding::Root { size: head.size, after: self.verified_size });
        }
        self.verified_size = head.size;
        Ok(())
    }

    /// After the last entry: a head beyond what is stored means entries were cut off.
    pub fn beyond(&self, head_size: u64) -> Result<(), Finding> {
        if head_size > self.size() {
            return Err(Finding::Missing { size: head_size, stored: self.size() });
        }
        Ok(())
    }

    /// After everything: `last_head` is the largest signed size seen (0 for none).
    pub fn finish(&self, last_head: u64) -> Result<(), Finding> {
        self.beyond(last_head.max(self.pinned.as_ref().map_or(0, |p| p.size)))?;
        if self.size() > last_head {
            return Err(Finding::Unsigned { from: last_head + 1 });
        }
        Ok(())
    }
}
