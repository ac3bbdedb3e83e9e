//! A small least-recently-used map keyed by host offset, shared by the L2 table cache and the
//! refcount block cache.

use std::collections::HashMap;

#[derive(Debug)]
pub struct Lru<V> {
    map: HashMap<u64, (V, u64)>,
    tick: u64,
    capacity: usize,
}

impl<V> Lru<V> {
    pub fn new(capacity: usize) -> Self {
        Lru {
            map: HashMap::new(),
            tick: 0,
            capacity: capacity.max(1),
        }
    }

    pub fn get(&mut self, key: u64) -> Option<&mut V> {
        self.tick += 1;
        let tick = self.tick;
        self.map.get_mut(&key).map(|(v, t)| {
            *t = tick;
            v
        })
    }

    /// Inserts a value, evicting the least recently used one when full.
    pub fn insert(&mut self, key: u64, value: V) -> &mut V {
        if !self.map.contains_key(&key) && self.map.len() >= self.capacity {
            if let Some(&victim) = self.map.iter().min_by_key(|(_, (_, t))| *t).map(|(k, _)| k) {
                self.map.remove(&victim);
            }
        }
        self.tick += 1;
        let tick = self.tick;
        self.map.insert(key, (value, tick));
        &mut self.map.get_mut(&key).expect("just inserted").0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn evicts_least_recently_used() {
        let mut lru = Lru::new(2);
        lru.insert(1, "a");
        lru.insert(2, "b");
        lru.get(1);
        lru.insert(3, "c");
        assert!(lru.get(2).is_none());
        assert!(lru.get(1).is_some());
        assert!(lru.get(3).is_some());
    }
}
