//! RFC 6962 (§2.1) Merkle tree hashing, proofs, and their verification (RFC 9162 §2.1.3.2 and
//! §2.1.4.2). Trees are append-only and their nodes are addressed as perfect subtrees:
//! `(level, index)` covers leaves `[index << level, (index + 1) << level)`.

use sha2::{Digest, Sha256};

pub type Hash = [u8; 32];

/// SHA-256 of nothing: the root of the empty tree.
pub fn empty_root() -> Hash {
    Sha256::digest([]).into()
}

pub fn leaf_hash(data: &[u8]) -> Hash {
    let mut h = Sha256::new();
    h.update([0x00]);
    h.update(data);
    h.finalize().into()
}

pub fn node_hash(left: &Hash, right: &Hash) -> Hash {
    let mut h = Sha256::new();
    h.update([0x01]);
    h.update(left);
    h.update(right);
    h.finalize().into()
}

/// A stored perfect subtree: level 0 is a leaf hash.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Node {
    pub level: u8,
    pub index: u64,
    pub hash: Hash,
}

/// The right edge of a tree: the roots of the perfect subtrees that cover `[0, size)`, largest
/// first (one per set bit of `size`). Enough to append and to compute the root.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Frontier {
    size: u64,
    peaks: Vec<Hash>,
}

impl Frontier {
    pub fn size(&self) -> u64 {
        self.size
    }

    /// Appends a leaf hash; every perfect subtree it completes (level ≥ 1) goes to `completed`.
    pub fn append(&mut self, leaf: Hash, completed: &mut Vec<Node>) {
        let index = self.size;
        let mut hash = leaf;
        let mut level = 0u8;
        // Each trailing one bit of the old size is a peak of that level to merge with.
        while (index >> level) & 1 == 1 {
            let left = self.peaks.pop().expect("a peak per set bit");
            hash = node_hash(&left, &hash);
            level += 1;
            completed.push(Node { level, index: index >> level, hash });
        }
        self.peaks.push(hash);
        self.size += 1;
        debug_assert_eq!(self.peaks.len() as u32, self.size.count_ones());
    }

    /// MTH of the whole tree.
    pub fn root(&self) -> Hash {
        let mut peaks = self.peaks.iter().rev();
        match peaks.next() {
            None => empty_root(),
            Some(last) => peaks.fold(*last, |right, left| node_hash(left, &right)),
        }
    }

    /// `size` as 8 big-endian bytes, then the peaks.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(8 + 32 * self.peaks.len());
        out.extend_from_slice(&self.size.to_be_bytes());
        for p in &self.peaks {
            out.extend_from_slice(p);
        }
        out
    }

    pub fn decode(bytes: &[u8]) -> Result<Frontier, String> {
        if bytes.len() < 8 || !(bytes.len() - 8).is_multiple_of(32) {
            return Err(format!("audit frontier of {} bytes is malformed", bytes.len()));
        }
        let size = u64::from_be_bytes(bytes[..8].try_into().expect("8 bytes"));
        let peaks: Vec<Hash> = bytes[8..].chunks(32).map(|c| c.try_into().expect("32 bytes")).collect();
        if peaks.len() as u32 != size.count_ones() {
            return Err(format!("audit frontier holds {} peaks for size {size}", peaks.len()));
        }
        Ok(Frontier { size, peaks })
    }
}

/// Reads stored perfect subtrees.
pub trait Nodes {
    type Error;
    fn node(&self, level: u8, index: u64) -> Result<Hash, Self::Error>;
}

/// Largest power of two strictly less than `n` (n ≥ 2).
fn split(n: u64) -> u64 {
    debug_assert!(n >= 2);
    1 << (63 - (n - 1).leading_zeros())
}

/// MTH(D[start..end]), from the stored perfect subtrees.
pub fn subtree_root<N: Nodes>(nodes: &N, start: u64, end: u64) -> Result<Hash, N::Error> {
    let n = end - start;
    if n == 0 {
        return Ok(empty_root());
    }
    if n.is_power_of_two() && start.is_multiple_of(n) {
        return nodes.node(n.trailing_zeros() as u8, start >> n.trailing_zeros());
    }
    let k = split(n);
    Ok(node_hash(&subtree_root(nodes, start, start + k)?, &subtree_root(nodes, start + k, end)?))
}

/// PATH(index, D[0..size]) of RFC 6962 §2.1.1: the audit path from the leaf up. `index < size`.
pub fn inclusion_proof<N: Nodes>(nodes: &N, index: u64, size: u64) -> Result<Vec<Hash>, N::Error> {
    assert!(index < size, "leaf {index} is not in a tree of {size}");
    let mut proof = Vec::new();
    path(nodes, index, 0, size, &mut proof)?;
    Ok(proof)
}

fn path<N: Nodes>(nodes: &N, m: u64, start: u64, end: u64, out: &mut Vec<Hash>) -> Result<(), N::Error> {
    let n = end - start;
    if n <= 1 {
        return Ok(());
    }
    let k = split(n);
    if m < k {
        path(nodes, m, start, start + k, out)?;
        out.push(subtree_root(nodes, start + k, end)?);
    } else {
        path(nodes, m - k, start + k, end, out)?;
        out.push(subtree_root(nodes, start, start + k)?);
    }
    Ok(())
}

/// PROOF(first, D[0..second]) of RFC 6962 §2.1.2. `0 < first <= second`.
pub fn consistency_proof<N: Nodes>(nodes: &N, first: u64, second: u64) -> Result<Vec<Hash>, N::Error> {
    assert!(0 < first && first <= second, "no consistency proof from {first} to {second}");
    let mut proof = Vec::new();
    subproof(nodes, first, 0, second, true, &mut proof)?;
    Ok(proof)
}

fn subproof<N: Nodes>(nodes: &N, m: u64, start: u64, end: u64, b: bool, out: &mut Vec<Hash>) -> Result<(), N::Error> {
    let n = end - start;
    if m == n {
        if !b {
            out.push(subtree_root(nodes, start, end)?);
        }
        return Ok(());
    }
    let k = split(n);
    if m <= k {
        subproof(nodes, m, start, start + k, b, out)?;
        out.push(subtree_root(nodes, start + k, end)?);
    } else {
        subproof(nodes, m - k, start + k, end, false, out)?;
        out.push(subtree_root(nodes, start, start + k)?);
    }
    Ok(())
}

/// RFC 9162 §2.1.3.2: does `proof` show leaf `index` with hash `leaf` in the tree of `size` with
/// `root`?
pub fn verify_inclusion(index: u64, size: u64, leaf: &Hash, proof: &[Hash], root: &Hash) -> bool {
    if index >= size {
        return false;
    }
    let (mut f, mut s) = (index, size - 1);
    let mut r = *leaf;
    for p in proof {
        if s == 0 {
            return false;
        }
        if f & 1 == 1 || f == s {
            r = node_hash(p, &r);
            while f & 1 == 0 && f != 0 {
                f >>= 1;
                s >>= 1;
            }
        } else {
            r = node_hash(&r, p);
        }
        f >>= 1;
        s >>= 1;
    }
    s == 0 && r == *root
}

/// RFC 9162 §2.1.4.2: does `proof` show the tree of `first` leaves with `first_root` is a prefix
/// of the tree of `second` leaves with `second_root`?
pub fn verify_consistency(first: u64, second: u64, first_root: &Hash, second_root: &Hash, proof: &[Hash]) -> bool {
    if first > second {
        return false;
    }
    if first == second {
        return proof.is_empty() && first_root == second_root;
    }
    if first == 0 {
        // The empty tree is a prefix of every tree, and its root is the hash of nothing: any
        // other `first_root` is not a head of the empty tree.
        return proof.is_empty() && *first_root == empty_root();
    }
    let mut path: Vec<Hash> = Vec::with_capacity(proof.len() + 1);
    if first.is_power_of_two() {
        path.push(*first_root);
    }
    path.extend_from_slice(proof);
    let Some((seed, rest)) = path.split_first() else {
        return false;
    };
    let (mut f, mut s) = (first - 1, second - 1);
    while f & 1 == 1 {
        f >>= 1;
        s >>= 1;
    }
    let (mut fr, mut sr) = (*seed, *seed);
    for c in rest {
        if s == 0 {
            return false;
        }
        if f & 1 == 1 || f == s {
            fr = node_hash(c, &fr);
            sr = node_hash(c, &sr);
            while f & 1 == 0 && f != 0 {
                f >>= 1;
                s >>= 1;
            }
        } else {
            sr = node_hash(&sr, c);
        }
        f >>= 1;
        s >>= 1;
    }
    fr == *first_root && sr == *second_root && s == 0
}
