//! The Merkle tree against Certificate Transparency's reference vectors (RFC 6962 roots, audit
//! paths and consistency proofs from google/certificate-transparency-go `merkle/log_verifier_test.go`,
//! Apache-2.0), and against a direct recursive MTH for every size up to 70.

use std::collections::HashMap;
use std::convert::Infallible;

use audit::merkle::*;
use audit::*;

const LEAVES: [&str; 8] =
    ["", "00", "10", "2021", "3031", "40414243", "5051525354555657", "606162636465666768696a6b6c6d6e6f"];

const ROOTS: [&str; 8] = [
    "6e340b9cffb37a989ca544e6bb780a2c78901d3fb33738768511a30617afa01d",
    "fac54203e7cc696cf0dfcb42c92a1d9dbaf70ad9e621f4bd8d98662f00e3c125",
    "aeb6bcfe274b70a14fb067a5e5578264db0fa9b51af5e0ba159158f329e06e77",
    "d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7",
    "4e3bbb1f7b478dcfe71fb631631519a3bca12c9aefca1612bfce4c13a86264d4",
    "76e67dadbcdf1e10e1b74ddc608abd2f98dfb16fbce75277b5232a127f2087ef",
    "ddb89be403809e325750d3d263cd78929c2942b7942a34b77e122c9594a74c8c",
    "5dc9da79a70659a9ad559cb701ded9a2ab9d823aad2f4960cfe370eff4604328",
];

/// (leaf index, tree size, audit path)
const INCLUSION: [(u64, u64, &[&str]); 4] = [
    (
        0,
        8,
        &[
            "96a296d224f285c67bee93c30f8a309157f0daa35dc5b87e410b78630a09cfc7",
            "5f083f0a1a33ca076a95279832580db3e0ef4584bdff1f54c8a360f50de3031e",
            "6b47aaf29ee3c2af9af889bc1fb9254dabd31177f16232dd6aab035ca39bf6e4",
        ],
    ),
    (
        5,
        8,
        &[
            "bc1a0643b12e4d2d7c77918f44e0f4f79a838b6cf9ec5b5c283e1f4d88599e6b",
            "ca854ea128ed050b41b35ffc1b87b8eb2bde461e9e3b5596ece6b9d5975a0ae0",
            "d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7",
        ],
    ),
    (2, 3, &["fac54203e7cc696cf0dfcb42c92a1d9dbaf70ad9e621f4bd8d98662f00e3c125"]),
    (
        1,
        5,
        &[
            "6e340b9cffb37a989ca544e6bb780a2c78901d3fb33738768511a30617afa01d",
            "5f083f0a1a33ca076a95279832580db3e0ef4584bdff1f54c8a360f50de3031e",
            "bc1a0643b12e4d2d7c77918f44e0f4f79a838b6cf9ec5b5c283e1f4d88599e6b",
        ],
    ),
];

/// (first size, second size, proof)
const CONSISTENCY: [(u64, u64, &[&str]); 4] = [
    (1, 1, &[]),
    (
        1,
        8,
        &[
            "96a296d224f285c67bee93c30f8a309157f0daa35dc5b87e410b78630a09cfc7",
            "5f083f0a1a33ca076a95279832580db3e0ef4584bdff1f54c8a360f50de3031e",
            "6b47aaf29ee3c2af9af889bc1fb9254dabd31177f16232dd6aab035ca39bf6e4",
        ],
    ),
    (
        6,
        8,
        &[
            "0ebc5d3437fbe2db158b9f126a1d118e308181031d0a949f8dededebc558ef6a",
            "ca854ea128ed050b41b35ffc1b87b8eb2bde461e9e3b5596ece6b9d5975a0ae0",
            "d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7",
        ],
    ),
    (
        2,
        5,
        &[
            "5f083f0a1a33ca076a95279832580db3e0ef4584bdff1f54c8a360f50de3031e",
            "bc1a0643b12e4d2d7c77918f44e0f4f79a838b6cf9ec5b5c283e1f4d88599e6b",
        ],
    ),
];

fn h(text: &str) -> Hash {
    unhex(text).unwrap().try_into().unwrap()
}

/// Every stored node of a tree built by appending, as a store would keep them.
#[derive(Default)]
struct Store {
    frontier: Frontier,
    nodes: HashMap<(u8, u64), Hash>,
}

impl Store {
    fn append(&mut self, leaf: Hash) {
        self.nodes.insert((0, self.frontier.size()), leaf);
        let mut done = Vec::new();
        self.frontier.append(leaf, &mut done);
        for n in done {
            assert!(self.nodes.insert((n.level, n.index), n.hash).is_none(), "each node completes once");
        }
    }
}

impl Nodes for Store {
    type Error = Infallible;
    fn node(&self, level: u8, index: u64) -> Result<Hash, Infallible> {
        Ok(*self.nodes.get(&(level, index)).expect("node asked for exists"))
    }
}

fn ct_store() -> Store {
    let mut store = Store::default();
    for leaf in LEAVES {
        store.append(leaf_hash(&unhex(leaf).unwrap()));
    }
    store
}

/// MTH straight from RFC 6962 §2.1.
fn reference_root(leaves: &[Hash]) -> Hash {
    match leaves.len() {
        0 => empty_root(),
        1 => leaves[0],
        n => {
            let k = 1usize << (usize::BITS - 1 - (n - 1).leading_zeros());
            node_hash(&reference_root(&leaves[..k]), &reference_root(&leaves[k..]))
        }
    }
}

#[test]
fn roots_match_the_reference_vectors_at_every_size() {
    let mut store = Store::default();
    assert_eq!(hex(&store.frontier.root()), "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855");
    for (i, leaf) in LEAVES.iter().enumerate() {
        store.append(leaf_hash(&unhex(leaf).unwrap()));
        assert_eq!(hex(&store.frontier.root()), ROOTS[i], "root of size {}", i + 1);
        assert_eq!(hex(&subtree_root(&store, 0, i as u64 + 1).unwrap()), ROOTS[i]);
    }
}

#[test]
fn inclusion_proofs_match_the_reference_vectors() {
    let store = ct_store();
    for (index, size, expected) in INCLUSION {
        let proof = inclusion_proof(&store, index, size).unwrap();
        let proof_hex: Vec<String> = proof.iter().map(|p| hex(p)).collect();
        assert_eq!(proof_hex, expected, "PATH({index}, D[{size}])");
        let leaf = leaf_hash(&unhex(LEAVES[index as usize]).unwrap());
        let root = h(ROOTS[size as usize - 1]);
        assert!(verify_inclusion(index, size, &leaf, &proof, &root));
        // Wrong index, size, leaf, root, or a changed/extra/missing proof element: refused.
        assert!(!verify_inclusion(index + 1, size, &leaf, &proof, &root));
        assert!(!verify_inclusion(index ^ 2, size, &leaf, &proof, &root));
        assert!(!verify_inclusion(index, size * 2, &leaf, &proof, &root));
        assert!(!verify_inclusion(index, size, &leaf_hash(b"WrongLeaf"), &proof, &root));
        assert!(!verify_inclusion(index, size, &leaf, &proof, &empty_root()));
        for i in 0..proof.len() {
            let mut bad = proof.clone();
            bad[i] = empty_root();
            assert!(!verify_inclusion(index, size, &leaf, &bad, &root));
        }
        let mut longer = proof.clone();
        longer.push(root);
        assert!(!verify_inclusion(index, size, &leaf, &longer, &root));
        assert!(!verify_inclusion(index, size, &leaf, &proof[..proof.len() - 1], &root));
    }
}

#[test]
fn consistency_proofs_match_the_reference_vectors() {
    let store = ct_store();
    for (first, second, expected) in CONSISTENCY {
        let proof = consistency_proof(&store, first, second).unwrap();
        let proof_hex: Vec<String> = proof.iter().map(|p| hex(p)).collect();
        assert_eq!(proof_hex, expected, "PROOF({first}, D[{second}])");
        let (r1, r2) = (h(ROOTS[first as usize - 1]), h(ROOTS[second as usize - 1]));
        assert!(verify_consistency(first, second, &r1, &r2, &proof));
        if !proof.is_empty() {
            assert!(!verify_consistency(first, second, &r2, &r1, &proof), "swapped roots");
            assert!(!verify_consistency(first + 1, second, &r1, &r2, &proof));
            assert!(!verify_consistency(first, second, &r1, &r2, &proof[..proof.len() - 1]));
            for i in 0..proof.len() {
                let mut bad = proof.clone();
                bad[i] = empty_root();
                assert!(!verify_consistency(first, second, &r1, &r2, &bad));
            }
        }
    }
}

#[test]
fn every_proof_verifies_for_every_size_up_to_70() {
    let mut store = Store::default();
    let mut leaves = Vec::new();
    let mut roots = vec![empty_root()];
    for i in 0..70u64 {
        let leaf = leaf_hash(&i.to_be_bytes());
        leaves.push(leaf);
        store.append(leaf);
        assert_eq!(store.frontier.root(), reference_root(&leaves));
        roots.push(store.frontier.root());
        // The frontier survives its own encoding.
        assert_eq!(Frontier::decode(&store.frontier.encode()).unwrap(), store.frontier);
    }
    for size in 1..=70u64 {
        for index in 0..size {
            let proof = inclusion_proof(&store, index, size).unwrap();
            assert!(verify_inclusion(index, size, &leaves[index as usize], &proof, &roots[size as usize]));
            assert!(!verify_inclusion(index, size, &leaves[(index as usize + 1) % 70], &proof, &roots[size as usize]));
        }
        // The empty tree is a prefix of every tree with nothing to prove, and only under its own
        // root.
        assert!(verify_consistency(0, size, &empty_root(), &roots[size as usize], &[]));
        assert!(!verify_consistency(0, size, &roots[1], &roots[size as usize], &[]));
        for first in 1..=size {
            let proof = consistency_proof(&store, first, size).unwrap();
            assert!(verify_consistency(first, size, &roots[first as usize], &roots[size as usize], &proof));
            if first < size {
                assert!(!verify_consistency(first, size, &roots[first as usize - 1], &roots[size as usize], &proof));
            }
        }
    }
}

fn entry(seq: u64, action: &str) -> Entry {
    Entry {
        seq,
        time: 1_000 + seq,
        draft: Draft {
            tenant: Some(7),
            actor: "key:1".into(),
            action: action.into(),
            resource: "r".into(),
            request_id: format!("req-{seq}"),
            source: "127.0.0.1".into(),
            outcome: "201".into(),
        },
    }
}

#[test]
fn every_field_changes_the_leaf_hash_and_fields_cannot_be_shifted() {
    let base = entry(1, "POST /v1/accounts");
    let mut variants = vec![base.clone()];
    let mut e = base.clone();
    e.seq = 2;
    variants.push(e);
    let mut e = base.clone();
    e.time += 1;
    variants.push(e);
    let mut e = base.clone();
    e.draft.tenant = None;
    variants.push(e);
    for i in 0..6 {
        let mut e = base.clone();
        let d = &mut e.draft;
        let field = [&mut d.actor, &mut d.action, &mut d.resource, &mut d.request_id, &mut d.source, &mut d.outcome];
        field.into_iter().nth(i).unwrap().push('x');
        variants.push(e);
    }
    // Moving a character from one field to the next keeps the concatenation but not the hash.
    let mut e = base.clone();
    e.draft.actor = "key:1r".into();
    e.draft.action = "OST /v1/accounts".into();
    variants.push(e);
    let hashes: std::collections::HashSet<Hash> = variants.iter().map(Entry::leaf_hash).collect();
    assert_eq!(hashes.len(), variants.len());
}

#[test]
fn signed_heads_verify_only_under_their_key_and_content() {
    let signer = Signer::from_pkcs8(&Signer::generate_pkcs8().unwrap()).unwrap();
    let other = Signer::from_pkcs8(&Signer::generate_pkcs8().unwrap()).unwrap();
    let head = TreeHead { size: 3, root: leaf_hash(b"x"), time: 9 };
    let signature = signer.sign(&head);
    assert!(verify_head(signer.public_key(), &head, &signature));
    assert!(!verify_head(other.public_key(), &head, &signature));
    assert!(!verify_head(signer.public_key(), &TreeHead { size: 4, ..head.clone() }, &signature));
    assert!(!verify_head(signer.public_key(), &TreeHead { time: 10, ..head.clone() }, &signature));
    assert!(!format!("{signer:?}").is_empty());
    assert!(Signer::from_pkcs8(b"not a key").is_err());
}

#[test]
fn the_log_verifier_names_the_first_problem() {
    let signer = Signer::from_pkcs8(&Signer::generate_pkcs8().unwrap()).unwrap();
    let entries: Vec<Entry> = (1..=6).map(|s| entry(s, "POST /v1/transfers")).collect();
    let mut frontier = Frontier::default();
    let mut heads = Vec::new();
    for e in &entries {
        frontier.append(e.leaf_hash(), &mut Vec::new());
        if e.seq % 3 == 0 {
            let head = TreeHead { size: e.seq, root: frontier.root(), time: e.time };
            heads.push((head.clone(), signer.sign(&head)));
        }
    }
    let run = |entries: &[(Entry, Hash)], heads: &[(TreeHead, Vec<u8>)]| -> Result<u64, Finding> {
        let mut v = LogVerifier::new(signer.public_key());
        let mut heads = heads.iter().peekable();
        let mut last = 0;
        for (e, leaf) in entries {
            v.entry(e, leaf)?;
            while let Some((head, sig)) = heads.next_if(|(h, _)| h.size == v.size()) {
                v.head(head, sig)?;
                last = head.size;
            }
        }
        if let Some((head, _)) = heads.last() {
            last = last.max(head.size);
        }
        v.finish(last)?;
        Ok(v.entries)
    };
    let stored: Vec<(Entry, Hash)> = entries.iter().map(|e| (e.clone(), e.leaf_hash())).collect();
    assert_eq!(run(&stored, &heads), Ok(6));

    // Altered field, stored hash left alone.
    let mut altered = stored.clone();
    altered[3].0.draft.outcome = "500".into();
    assert_eq!(run(&altered, &heads), Err(Finding::LeafHash { seq: 4 }));
    // Altered field with its leaf hash recomputed: the signed head catches it.
    altered[3].1 = altered[3].0.leaf_hash();
    assert_eq!(run(&altered, &heads), Err(Finding::Root { size: 6, after: 3 }));
    // Removed from the middle, and from the end.
    let mut removed = stored.clone();
    removed.remove(1);
    assert_eq!(run(&removed, &heads), Err(Finding::Sequence { expected: 2, found: 3 }));
    assert_eq!(run(&stored[..5], &heads), Err(Finding::Missing { size: 6, stored: 5 }));
    // Reordered.
    let mut reordered = stored.clone();
    reordered.swap(1, 2);
    assert_eq!(run(&reordered, &heads), Err(Finding::Sequence { expected: 2, found: 3 }));
    // One appended behind the log's back: no signed head covers it.
    let mut appended = stored.clone();
    let extra = entry(7, "forged");
    appended.push((extra.clone(), extra.leaf_hash()));
    assert_eq!(run(&appended, &heads), Err(Finding::Unsigned { from: 7 }));
    // A forged signature.
    let mut forged = heads.clone();
    forged[0].1[0] ^= 1;
    assert_eq!(run(&stored, &forged), Err(Finding::Signature { size: 3 }));
}

/// The signed heads in storage prove nothing about entries cut off together with them; a head
/// saved elsewhere does: cut back before it (and written on, as a node would after the cut), the
/// log no longer contains it.
#[test]
fn a_saved_head_catches_a_log_cut_back_with_its_heads() {
    let signer = Signer::from_pkcs8(&Signer::generate_pkcs8().unwrap()).unwrap();
    let make = |entries: &[Entry]| {
        let mut frontier = Frontier::default();
        let mut heads = Vec::new();
        for e in entries {
            frontier.append(e.leaf_hash(), &mut Vec::new());
            let head = TreeHead { size: e.seq, root: frontier.root(), time: e.time };
            heads.push((head.clone(), signer.sign(&head)));
        }
        heads
    };
    let run = |entries: &[Entry], heads: &[(TreeHead, Vec<u8>)], pinned: Option<&(TreeHead, Vec<u8>)>| {
        let mut v = LogVerifier::new(signer.public_key());
        if let Some((head, signature)) = pinned {
            v.pin(head.clone(), signature)?;
        }
        for (e, (head, signature)) in entries.iter().zip(heads) {
            v.entry(e, &e.leaf_hash())?;
            v.head(head, signature)?;
        }
        v.finish(heads.last().map_or(0, |(h, _)| h.size))?;
        Ok::<u64, Finding>(v.entries)
    };
    let entries: Vec<Entry> = (1..=6).map(|s| entry(s, "POST /v1/transfers")).collect();
    let heads = make(&entries);
    let saved = heads[5].clone();
    assert_eq!(run(&entries, &heads, Some(&saved)), Ok(6));
    assert_eq!(run(&entries, &heads, Some(&heads[2])), Ok(6), "an older saved head is contained");
    // Cut back to 4 entries with their heads: consistent in itself.
    assert_eq!(run(&entries[..4], &heads[..4], None), Ok(4));
    assert_eq!(run(&entries[..4], &heads[..4], Some(&saved)), Err(Finding::Missing { size: 6, stored: 4 }));
    // Written on after the cut: as many entries again, other ones, with heads signed properly.
    let mut rewritten = entries[..4].to_vec();
    rewritten.extend((5..=7).map(|s| entry(s, "DELETE /v1/api-keys")));
    let rewritten_heads = make(&rewritten);
    assert_eq!(run(&rewritten, &rewritten_heads, None), Ok(7));
    assert_eq!(run(&rewritten, &rewritten_heads, Some(&saved)), Err(Finding::Rewritten { size: 6 }));
    // A saved head must carry the key's signature.
    let mut forged = saved.clone();
    forged.1[0] ^= 1;
    assert_eq!(run(&entries, &heads, Some(&forged)), Err(Finding::Signature { size: 6 }));
}
