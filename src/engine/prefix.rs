//! Prefix caching: the KV rows of prompts (and of the text generated after
//! them) kept after their sequences move on, so that a later prompt starting
//! with the same tokens (a chat's system prompt and history, resent every
//! turn) prefills only the rest.
//!
//! The cache holds blocks of [`BLOCK_TOKENS`] tokens. A block is found by the
//! hash of its tokens chained with the hash of the block before it, so one
//! key names a whole prefix; each block also keeps its tokens and its
//! parent's key, and a lookup compares them, so a hash collision is a miss,
//! never a wrong answer. A block is referenced by the blocks that extend it
//! and is evicted only once none does: the least recently used of those
//! leaves goes first when a new block needs room in the budget.
//!
//! The engine's KV caches are one contiguous buffer per sequence, not pages,
//! so blocks are not shared in place: a block holds a copy of its positions'
//! K and V rows (every layer), copied out when a sequence has prefilled its
//! prompt or finishes, and copied into a new sequence's cache before its
//! prefill. Copying a position costs far less than computing it.
//!
//! Every row of a step is computed from its own token, its position and the
//! cached K/V rows before it, with the same operations whatever the batch or
//! chunk around it (see `cpu/mod.rs` and `qmat`), so the rows a hit restores
//! are bit for bit the rows a full prefill would compute, and the logits
//! after them are too (the engine tests check this on the real model).

use std::collections::{BTreeSet, HashMap};
use std::hash::{BuildHasher, RandomState};

use super::model::KvCache;
use super::EngineError;

/// Tokens per block: small enough that little of a shared prefix is lost to
/// the last partial block, large enough that the map and the copies stay
/// cheap.
pub const BLOCK_TOKENS: usize = 32;

struct Block {
    /// The key of the block before, `None` for a prompt's first block.
    parent: Option<u64>,
    tokens: Box<[u32]>,
    /// Every layer's K and V rows of the block's positions
    /// (`KvCache::export`'s layout).
    kv: Box<[f32]>,
    /// Blocks that extend this one; it is evicted only at zero.
    children: u32,
    /// When it was last looked up or inserted.
    used: u64,
}

/// What a lookup restored.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Hit {
    /// Prompt positions copied into the sequence's cache.
    pub tokens: usize,
}

/// The cache; owned by the engine thread.
pub struct PrefixCache {
    map: HashMap<u64, Block>,
    /// Blocks with no children, by (last use, key): the eviction order.
    leaves: BTreeSet<(u64, u64)>,
    max_blocks: usize,
    block_bytes: usize,
    clock: u64,
    hasher: RandomState,
}

impl PrefixCache {
    /// A cache of at most `budget_bytes` of KV rows, for a model whose
    /// positions take `floats_per_position` floats. `None` where the budget
    /// holds not even one block (prefix caching off).
    pub fn new(budget_bytes: u64, floats_per_position: usize) -> Option<Self> {
        let block_bytes = floats_per_position
            .checked_mul(BLOCK_TOKENS * std::mem::size_of::<f32>())
            .filter(|&b| b > 0)?;
        let max_blocks = usize::try_from(budget_bytes / block_bytes as u64).ok()?;
        if max_blocks == 0 {
            return None;
        }
        Some(PrefixCache {
            map: HashMap::new(),
            leaves: BTreeSet::new(),
            max_blocks,
            block_bytes,
            clock: 0,
            // Keyed per process: prompts are client input, and a fixed hash
            // would let a client aim collisions at another's prefix (a
            // collision only costs a miss, but a miss is still a cost).
            hasher: RandomState::new(),
        })
    }

    /// Blocks held.
    pub fn blocks(&self) -> usize {
        self.map.len()
    }

    /// Bytes of KV rows held.
    pub fn bytes(&self) -> u64 {
        (self.map.len() * self.block_bytes) as u64
    }

    fn key(&self, parent: Option<u64>, tokens: &[u32]) -> u64 {
        self.hasher.hash_one((parent, tokens))
    }

    fn tick(&mut self) -> u64 {
        self.clock += 1;
        self.clock
    }

    /// Mark a block used now.
    fn touch(&mut self, key: u64) {
        let now = self.tick();
        if let Some(b) = self.map.get_mut(&key) {
            if b.children == 0 {
                self.leaves.remove(&(b.used, key));
                self.leaves.insert((now, key));
            }
            b.used = now;
        }
    }

    /// Copy the longest cached prefix of `prompt` into `cache` (which must be
    /// empty), whole blocks only and at most `limit` tokens: the caller keeps
    /// at least the prompt's last token to prefill, for its logits.
    pub fn restore(
        &mut self,
        prompt: &[u32],
        limit: usize,
        cache: &mut KvCache,
    ) -> Result<Hit, EngineError> {
        if !cache.is_empty() {
            return Err(EngineError::Model(
                "prefix restored into a used cache".into(),
            ));
        }
        let mut parent = None;
        let mut hit = Hit::default();
        for chunk in prompt[..limit.min(prompt.len())].chunks_exact(BLOCK_TOKENS) {
            let key = self.key(parent, chunk);
            match self.map.get(&key) {
                Some(b) if b.parent == parent && *b.tokens == *chunk => {
                    cache.append(&b.kv)?;
                }
                _ => break,
            }
            self.touch(key);
            hit.tokens += BLOCK_TOKENS;
            parent = Some(key);
        }
        Ok(hit)
    }

    /// Keep the whole blocks of `tokens` whose rows `cache` holds (its first
    /// `cache.len()` positions are those of `tokens`); blocks already held
    /// are only marked used.
    pub fn insert(&mut self, tokens: &[u32], cache: &KvCache) -> Result<(), EngineError> {
        let held = tokens.len().min(cache.len());
        let mut parent = None;
        for (i, chunk) in tokens[..held].chunks_exact(BLOCK_TOKENS).enumerate() {
            let key = self.key(parent, chunk);
            match self.map.get(&key) {
                Some(b) if b.parent == parent && *b.tokens == *chunk => self.touch(key),
                // Another prefix under this key: this one cannot be kept.
                Some(_) => return Ok(()),
                None => {
                    let mut kv = Vec::new();
                    cache.export(i * BLOCK_TOKENS, BLOCK_TOKENS, &mut kv)?;
                    // The parent gains its child before any eviction, so
                    // that it is not the leaf evicted to make room.
                    self.adopt(parent, 1);
                    if self.map.len() >= self.max_blocks && !self.evict_one() {
                        self.adopt(parent, -1);
                        return Ok(());
                    }
                    let now = self.tick();
                    self.map.insert(
                        key,
                        Block {
                            parent,
                            tokens: chunk.into(),
                            kv: kv.into(),
                            children: 0,
                            used: now,
                        },
                    );
                    self.leaves.insert((now, key));
                }
            }
            parent = Some(key);
        }
        Ok(())
    }

    /// Count a child more (`1`) or less (`-1`) on `parent`, moving it out of
    /// or into the leaves.
    fn adopt(&mut self, parent: Option<u64>, delta: i32) {
        let Some(pk) = parent else { return };
        let Some(p) = self.map.get_mut(&pk) else {
            return;
        };
        if delta > 0 {
            if p.children == 0 {
                self.leaves.remove(&(p.used, pk));
            }
            p.children += 1;
        } else {
            p.children = p.children.saturating_sub(1);
            if p.children == 0 {
                self.leaves.insert((p.used, pk));
            }
        }
    }

    /// Drop the least recently used block that no other extends.
    fn evict_one(&mut self) -> bool {
        let Some(&(used, key)) = self.leaves.iter().next() else {
            return false;
        };
        self.leaves.remove(&(used, key));
        let Some(b) = self.map.remove(&key) else {
            return false;
        };
        self.adopt(b.parent, -1);
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::model::{Arch, ModelConfig};

    /// Two layers of one KV head of two values: 8 floats a position.
    fn cfg() -> ModelConfig {
        ModelConfig {
            arch: Arch::Llama,
            architecture: "llama".into(),
            n_layer: 2,
            n_head: 1,
            n_kv_head: 1,
            head_dim: 2,
            hidden: 2,
            ffn: 2,
            eps: 1e-5,
            rope_theta: 10_000.0,
            context_length: 1024,
            vocab_size: 1000,
        }
    }

    const PER: usize = 8;
    const BLOCK_BYTES: u64 = (PER * BLOCK_TOKENS * 4) as u64;

    /// A cache holding `tokens`, each position's rows made of its token and
    /// position, so restored rows show where they came from.
    fn filled(tokens: &[u32]) -> KvCache {
        let mut c = KvCache::host(&cfg(), tokens.len());
        for (p, &t) in tokens.iter().enumerate() {
            let v = (t * 1000 + p as u32) as f32;
            c.append(&[v; PER]).unwrap();
        }
        c
    }

    /// `n` tokens of one block-run, distinct per `tag`.
    fn run(tag: u32, n: usize) -> Vec<u32> {
        (0..n as u32).map(|i| tag * 100 + i % 50).collect()
    }

    fn restored(p: &mut PrefixCache, prompt: &[u32]) -> (usize, KvCache) {
        let mut c = KvCache::host(&cfg(), prompt.len());
        let hit = p.restore(prompt, prompt.len() - 1, &mut c).unwrap();
        (hit.tokens, c)
    }

    #[test]
    fn a_budget_below_one_block_is_off() {
        assert!(PrefixCache::new(0, PER).is_none());
        assert!(PrefixCache::new(BLOCK_BYTES - 1, PER).is_none());
        assert!(PrefixCache::new(BLOCK_BYTES, PER).is_some());
    }

    #[test]
    fn a_hit_restores_whole_blocks_of_the_same_rows() {
        let mut p = PrefixCache::new(64 * BLOCK_BYTES, PER).unwrap();
        let a = run(1, 100);
        let src = filled(&a);
        p.insert(&a, &src).unwrap();
        assert_eq!(p.blocks(), 3);
        assert_eq!(p.bytes(), 3 * BLOCK_BYTES);
        // The same first 70 tokens, then others: two whole blocks.
        let mut b = a[..70].to_vec();
        b.extend(run(2, 30));
        let (n, got) = restored(&mut p, &b);
        assert_eq!(n, 64);
        let (mut want, mut have) = (Vec::new(), Vec::new());
        src.export(0, 64, &mut want).unwrap();
        got.export(0, 64, &mut have).unwrap();
        assert_eq!(want, have);
        // The last prompt token is never restored: a prompt of exactly the
        // cached blocks gets all but the last block.
        let (n, _) = restored(&mut p, &a[..96]);
        assert_eq!(n, 64);
    }

    #[test]
    fn a_block_matches_only_after_the_same_prefix() {
        let mut p = PrefixCache::new(64 * BLOCK_BYTES, PER).unwrap();
        let (x, y, z) = (run(1, 32), run(2, 32), run(3, 32));
        let first = [x.clone(), y.clone(), z.clone()].concat();
        p.insert(&first, &filled(&first)).unwrap();
        // Block y after z instead of x: nothing, though y itself is held.
        let other = [z.clone(), y.clone(), x.clone()].concat();
        assert_eq!(restored(&mut p, &other).0, 0);
        let again = [x, y, run(4, 40)].concat();
        assert_eq!(restored(&mut p, &again).0, 64);
    }

    #[test]
    fn eviction_takes_the_least_recently_used_leaf() {
        let mut p = PrefixCache::new(3 * BLOCK_BYTES, PER).unwrap();
        let ab = [run(1, 32), run(2, 32), vec![7]].concat();
        let c = [run(3, 32), vec![7]].concat();
        let d = [run(4, 32), vec![7]].concat();
        p.insert(&ab, &filled(&ab)).unwrap();
        p.insert(&c, &filled(&c)).unwrap();
        assert_eq!(p.blocks(), 3);
        // Use `ab` again: `c` is now the oldest leaf.
        assert_eq!(restored(&mut p, &ab).0, 64);
        p.insert(&d, &filled(&d)).unwrap();
        assert_eq!(p.blocks(), 3);
        assert_eq!(restored(&mut p, &c).0, 0);
        assert_eq!(restored(&mut p, &ab).0, 64);
        assert_eq!(restored(&mut p, &d).0, 32);
        // `a` was used before `b`, but `b` extends it: `b` is the leaf to go.
        p.insert(&c, &filled(&c)).unwrap();
        assert_eq!(restored(&mut p, &ab).0, 32);
        assert_eq!(restored(&mut p, &d).0, 32);
        assert_eq!(restored(&mut p, &c).0, 32);
    }

    #[test]
    fn a_full_cache_keeps_parents_before_children() {
        let mut p = PrefixCache::new(2 * BLOCK_BYTES, PER).unwrap();
        let abc = [run(1, 32), run(2, 32), run(3, 32), vec![7]].concat();
        p.insert(&abc, &filled(&abc)).unwrap();
        // Only two blocks fit, and the chain's own blocks are not evicted
        // to make room for its tail.
        assert_eq!(p.blocks(), 2);
        assert_eq!(restored(&mut p, &abc).0, 64);
        // A new prompt evicts the chain from its tail.
        let d = [run(4, 32), vec![7]].concat();
        p.insert(&d, &filled(&d)).unwrap();
        assert_eq!(restored(&mut p, &abc).0, 32);
        assert_eq!(restored(&mut p, &d).0, 32);
    }
}
