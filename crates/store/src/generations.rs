//! A bounded map that forgets what was not used lately, in two generations.
//!
//! New and touched entries live in the young generation; once it holds over half the bound, it
//! becomes the old one and the previous old one is forgotten. An entry used in either of the last
//! two generations stays (unless one batch alone names more than the bound: then nothing can);
//! one used in neither goes. Forgetting is a swap, and a large forgotten map is dropped on a
//! thread of its own. The writer's cache before session 36 halved one map in place,
//! walking every entry and freeing half of them on the writer's thread, and grew that map to the
//! whole bound. Creating accounts 8,000 to a batch past the default bound (a median batch 25 ms),
//! the batch that halved it took 42 ms, and the one that grew it past 917,504 entries 200 ms;
//! with generations, the batch that turns one took 36 ms and the slowest (growing the first
//! generation past 458,752) 114 ms. Every request in flight waits for such a batch.
//!
//! Invariant: a key is in at most one generation, so what [`Generations::get`] finds is the one
//! value held for it.

use std::hash::Hash;

use ledger::Map;

pub(crate) struct Generations<K, V> {
    young: Map<K, V>,
    old: Map<K, V>,
}

impl<K, V> Default for Generations<K, V> {
    fn default() -> Self {
        Generations { young: Map::default(), old: Map::default() }
    }
}

impl<K, V> Generations<K, V>
where
    K: Hash + Eq + Copy + Send + 'static,
    V: Send + 'static,
{
    pub(crate) fn len(&self) -> usize {
        self.young.len() + self.old.len()
    }

    pub(crate) fn contains_key(&self, key: &K) -> bool {
        self.young.contains_key(key) || self.old.contains_key(key)
    }

    pub(crate) fn get(&self, key: &K) -> Option<&V> {
        self.young.get(key).or_else(|| self.old.get(key))
    }

    pub(crate) fn get_mut(&mut self, key: &K) -> Option<&mut V> {
        match self.young.get_mut(key) {
            Some(value) => Some(value),
            None => self.old.get_mut(key),
        }
    }

    /// Marks `key` as used (it moves to the young generation); whether it is held.
    pub(crate) fn touch(&mut self, key: &K) -> bool {
        if self.young.contains_key(key) {
            return true;
        }
        match self.old.remove(key) {
            Some(value) => {
                self.young.insert(*key, value);
                true
            }
            None => false,
        }
    }

    /// Holds `value` for `key`, as used now (in place of any value held before).
    pub(crate) fn insert(&mut self, key: K, value: V) {
        self.old.remove(&key);
        self.young.insert(key, value);
    }

    /// Forgets everything held (what it held may no longer be current).
    pub(crate) fn clear(&mut self) {
        drop_elsewhere(std::mem::take(&mut self.young));
        drop_elsewhere(std::mem::take(&mut self.old));
    }

    /// Makes the young generation hold at most half of `max`, and both at most `max`: past that,
    /// the young one becomes the old one, and the old one is forgotten; if the young one alone
    /// held more than `max`, it is forgotten as well.
    pub(crate) fn bound(&mut self, max: usize) {
        if self.young.len() > max / 2 || self.len() > max {
            // The next young generation starts as large as this one ended: a map growing past
            // 458,752 entries rehashes all of them at once (114 ms in the batch that did).
            let young = Map::with_capacity_and_hasher(self.young.len(), Default::default());
            let old = std::mem::replace(&mut self.young, young);
            drop_elsewhere(std::mem::replace(&mut self.old, old));
        }
        if self.len() > max {
            drop_elsewhere(std::mem::take(&mut self.old));
            self.young = Map::default();
        }
    }
}

/// Entries this many or more are dropped on a thread of their own (fewer cost less than starting
/// one).
const DROP_ELSEWHERE_MIN: usize = 4096;

fn drop_elsewhere<K: Send + 'static, V: Send + 'static>(map: Map<K, V>) {
    if map.len() < DROP_ELSEWHERE_MIN {
        return;
    }
    // If no thread can be started, the map is dropped here with the closure that held it.
    let _ = std::thread::Builder::new().name("rtpay-forget".into()).spawn(move || drop(map));
}

#[cfg(test)]
mod tests {
    use super::Generations;

    #[test]
    fn what_was_used_in_the_last_two_generations_stays_and_the_rest_goes() {
        let mut cache = Generations::<u32, &str>::default();
        for key in 0..4 {
            cache.insert(key, "first");
        }
        // Young holds 4 > 6 / 2: it becomes the old generation; nothing is forgotten yet.
        cache.bound(6);
        assert_eq!(cache.len(), 4);
        // 0 and 1 are used again (moved back to young), 4 to 6 are new.
        assert!(cache.touch(&0) && cache.touch(&1) && !cache.touch(&9));
        for key in 4..7 {
            cache.insert(key, "second");
        }
        assert_eq!(cache.len(), 7);
        cache.bound(6);
        // 2 and 3, used in neither of the last two generations, are forgotten.
        let mut held: Vec<u32> = (0..10).filter(|k| cache.contains_key(k)).collect();
        held.sort_unstable();
        assert_eq!(held, [0, 1, 4, 5, 6]);
        assert_eq!((cache.get(&0), cache.get(&4), cache.get(&2)), (Some(&"first"), Some(&"second"), None));
    }

    #[test]
    fn a_key_has_one_value_whichever_generation_holds_it() {
        let mut cache = Generations::<u32, u32>::default();
        cache.insert(1, 10);
        cache.bound(0); // young (1 key) over 0: all forgotten
        assert_eq!(cache.len(), 0);
        cache.insert(1, 10);
        cache.insert(2, 20);
        cache.bound(2); // young 2 > 1: becomes old
        cache.insert(1, 11); // replaces the old generation's value
        *cache.get_mut(&2).unwrap() += 1; // updated where it is
        assert_eq!((cache.len(), cache.get(&1), cache.get(&2)), (2, Some(&11), Some(&21)));
        cache.bound(2); // young (1) not over 1, both (2) not over 2: nothing forgotten
        assert_eq!(cache.len(), 2);
        cache.insert(3, 30);
        cache.bound(2); // 3 held > 2: young {1, 3} becomes old, {2} forgotten
        assert_eq!((cache.get(&1), cache.get(&2), cache.get(&3)), (Some(&11), None, Some(&30)));
        cache.clear();
        assert_eq!((cache.len(), cache.get(&1), cache.get(&3)), (0, None, None));
    }

    #[test]
    fn a_batch_start_never_holds_more_than_the_bound() {
        let mut cache = Generations::<u32, ()>::default();
        for max in [1usize, 2, 3, 10, 1000] {
            for round in 0..50u32 {
                // A batch adds more keys than the bound at times.
                for key in 0..(round % 7) * (max as u32 % 5 + 1) {
                    cache.insert(round * 10_000 + key, ());
                }
                cache.bound(max);
                assert!(cache.len() <= max, "{} held after bound({max})", cache.len());
            }
        }
        // Forgetting a generation too large to drop in place leaves the cache empty at once.
        for key in 0..10_000 {
            cache.insert(key, ());
        }
        cache.bound(0);
        assert_eq!(cache.len(), 0);
    }
}
