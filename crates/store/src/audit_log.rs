//! The audit log's storage side, shared by both engines: appending drafts inside the writer's
//! batch transaction (so an action and its audit entry commit together, in one fsync), and the
//! read-side proofs built from stored nodes.
//!
//! Invariant: entries are numbered 1, 2, 3, … in commit order across all nodes (the writer holds
//! the ledger lock), every completed perfect subtree of [`STORED_LEVEL_MIN`] levels or more is
//! stored once, and every batch that appends entries stores a tree head of its new size signed by
//! the process's key.

use audit::merkle::{self, Nodes};
use audit::{Draft, Entry, Frontier, Hash, Node, Signer, TreeHead};
use ledger::Timestamp;

use crate::{Queries, Result, StoreError};

/// Perfect subtrees below this level are not stored (data written by earlier versions holds them;
/// they are no longer read). Each entry completes one subtree on average, seven in eight of them
/// below level 4: storing them doubled the audit rows a request writes. A proof that needs one
/// hashes it from its leaves, at most eight.
pub(crate) const STORED_LEVEL_MIN: u8 = 4;

/// The key a perfect subtree is stored under: the index of the last leaf it covers.
pub(crate) fn last_leaf(level: u8, index: u64) -> u64 {
    ((index + 1) << level) - 1
}

/// Entries one listing returns at most.
pub const AUDIT_PAGE_LEN_MAX: usize = 1000;

/// A tree head with its signature, as stored.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SignedHead {
    pub head: TreeHead,
    pub signature: Vec<u8>,
}

/// What one batch writes to the audit tables; its entries' drafts are the caller's.
pub(crate) struct Append<'a> {
    pub entries: Vec<Appended<'a>>,
    pub nodes: Vec<Node>,
    pub head: SignedHead,
    pub frontier: Frontier,
}

/// An entry of an [`Append`]: its place, its time, what it records, and its leaf hash.
pub(crate) struct Appended<'a> {
    pub seq: u64,
    pub time: u64,
    pub draft: &'a Draft,
    pub leaf: Hash,
}

/// Places `drafts` after `frontier` (times come from the ledger clock, so they are unique and
/// increasing across nodes) and signs the new head.
pub(crate) fn append<'a>(frontier: &Frontier, drafts: &'a [(Timestamp, Draft)], signer: &Signer) -> Append<'a> {
    assert!(!drafts.is_empty(), "an append has entries");
    let mut frontier = frontier.clone();
    let mut entries = Vec::with_capacity(drafts.len());
    let mut nodes = Vec::with_capacity(drafts.len() + 8);
    for (time, draft) in drafts {
        let seq = frontier.size() + 1;
        let leaf = audit::entry_leaf_hash(seq, *time, draft);
        frontier.append(leaf, &mut nodes);
        entries.push(Appended { seq, time: *time, draft, leaf });
    }
    nodes.retain(|n| n.level >= STORED_LEVEL_MIN);
    let last_time = entries.last().expect("non-empty").time;
    let head = TreeHead { size: frontier.size(), root: frontier.root(), time: last_time };
    let signature = signer.sign(&head);
    Append { entries, nodes, head: SignedHead { head, signature }, frontier }
}

/// The tree's right edge: its size and root.
pub(crate) type Edge = (u64, Hash);

pub(crate) fn edge_of(frontier: &Frontier) -> Edge {
    (frontier.size(), frontier.root())
}

/// Holds the right edge a writer read from storage to the newest signed head: the edge must be
/// that head's tree, and the head signed by the writer's own key (an empty log has neither).
/// Otherwise storage was changed behind rtpay's back (entries rewritten, their edge recomputed
/// and the heads after them removed; the log wiped), and appending would sign the changed
/// history as if it were rtpay's: the writer appends nothing, and every write fails until the
/// storage is restored. Checked where an edge is read that this process did not write (at start,
/// after another writer's commit), once per edge.
pub(crate) fn check_edge(frontier: &Frontier, newest: Option<&SignedHead>, signer: &Signer) -> Result<Edge> {
    let edge = edge_of(frontier);
    let held = match newest {
        None => edge.0 == 0,
        Some(h) => (h.head.size, h.head.root) == edge && audit::verify_head(signer.public_key(), &h.head, &h.signature),
    };
    if held {
        return Ok(edge);
    }
    let head =
        newest.map_or("no signed head".to_owned(), |h| format!("the newest signed head's size is {}", h.head.size));
    Err(StoreError::Corrupt(format!(
        "the audit log's stored edge (size {}) is not its newest head signed by this node's key ({head}): \
         the log was changed in storage; nothing is written until it is restored (`rtpay audit verify`)",
        edge.0
    )))
}

/// One item of a full scan: entries in order, each head right after the entry that completes it.
pub enum AuditItem {
    Entry(Entry, Hash),
    Head(SignedHead),
}

/// Feeds `visit` the entries in order, each head right after the entry that completes it, and the
/// heads beyond the last entry at the end; stops early when `visit` says false. Both engines read
/// their two ordered streams and hand them here.
pub(crate) fn merge_scan(
    mut entries: impl FnMut() -> Result<Option<(Entry, Hash)>>,
    mut heads: impl FnMut() -> Result<Option<SignedHead>>,
    visit: &mut dyn FnMut(AuditItem) -> bool,
) -> Result<()> {
    let mut next_head = heads()?;
    let mut emitted = 0u64;
    while let Some((entry, leaf)) = entries()? {
        emitted += 1;
        if !visit(AuditItem::Entry(entry, leaf)) {
            return Ok(());
        }
        while let Some(head) = next_head.take_if(|h| h.head.size <= emitted) {
            if !visit(AuditItem::Head(head)) {
                return Ok(());
            }
            next_head = heads()?;
        }
    }
    while let Some(head) = next_head.take() {
        if !visit(AuditItem::Head(head)) {
            return Ok(());
        }
        next_head = heads()?;
    }
    Ok(())
}

/// Stored nodes through `Queries`, for proofs.
struct Stored<'q>(&'q dyn Queries);

impl Nodes for Stored<'_> {
    type Error = StoreError;
    fn node(&self, level: u8, index: u64) -> Result<Hash> {
        if level > 0 && level < STORED_LEVEL_MIN {
            let left = self.node(level - 1, 2 * index)?;
            let right = self.node(level - 1, 2 * index + 1)?;
            return Ok(merkle::node_hash(&left, &right));
        }
        self.0
            .audit_node(level, index)?
            .ok_or_else(|| StoreError::Corrupt(format!("audit node ({level}, {index}) is missing")))
    }
}

/// Root of the first `size` entries.
pub fn audit_root(queries: &dyn Queries, size: u64) -> Result<Hash> {
    merkle::subtree_root(&Stored(queries), 0, size)
}

/// Audit path of entry `seq` in the tree of `size` entries.
pub fn audit_inclusion(queries: &dyn Queries, seq: u64, size: u64) -> Result<Vec<Hash>> {
    assert!(seq >= 1 && seq <= size, "checked by the caller");
    merkle::inclusion_proof(&Stored(queries), seq - 1, size)
}

/// Consistency proof from the tree of `first` entries to the tree of `second`.
pub fn audit_consistency(queries: &dyn Queries, first: u64, second: u64) -> Result<Vec<Hash>> {
    assert!(first >= 1 && first <= second, "checked by the caller");
    merkle::consistency_proof(&Stored(queries), first, second)
}

/// What `audit verify` found.
#[derive(Debug)]
pub struct AuditReport {
    pub entries: u64,
    pub heads: u64,
    /// The first problem, if any.
    pub finding: Option<audit::Finding>,
}

/// Whether `public_key` is the audit log's own: its first signed head verifies under it (true
/// while the log has none). The first, not the latest: a head a stray key signed (an older rtpay's
/// `keys rotate` made one) would otherwise shut out the log's own key and let the stray one on.
pub fn audit_key_signs(queries: &dyn Queries, public_key: &[u8]) -> Result<bool> {
    Ok(queries.audit_first_head()?.is_none_or(|h| audit::verify_head(public_key, &h.head, &h.signature)))
}

/// Recomputes every leaf and every signed head from storage, streaming; and checks that the log
/// still contains `saved`, a signed head kept outside storage (see [`audit::LogVerifier::pin`]).
pub fn audit_verify(
    queries: &dyn Queries,
    public_key: &[u8],
    saved: Option<(audit::TreeHead, Vec<u8>)>,
) -> Result<AuditReport> {
    let mut verifier = audit::LogVerifier::new(public_key);
    let mut heads = 0;
    let mut finding = None;
    if let Some((head, signature)) = saved {
        if let Err(f) = verifier.pin(head, &signature) {
            return Ok(AuditReport { entries: 0, heads: 0, finding: Some(f) });
        }
    }
    let mut last_head = 0;
    queries.audit_scan(&mut |item| {
        let result = match item {
            AuditItem::Entry(entry, leaf) => verifier.entry(&entry, &leaf),
            AuditItem::Head(signed) => {
                heads += 1;
                last_head = last_head.max(signed.head.size);
                if signed.head.size == verifier.size() {
                    verifier.head(&signed.head, &signed.signature)
                } else {
                    // Heads come right after their entry; one that does not fit was moved or
                    // its entries are gone.
                    verifier
                        .beyond(signed.head.size)
                        .and(Err(audit::Finding::Root { size: signed.head.size, after: verifier.size() }))
                }
            }
        };
        match result {
            Ok(()) => true,
            Err(f) => {
                finding = Some(f);
                false
            }
        }
    })?;
    if finding.is_none() {
        if let Err(f) = verifier.finish(last_head) {
            finding = Some(f);
        }
    }
    Ok(AuditReport { entries: verifier.entries, heads, finding })
}
