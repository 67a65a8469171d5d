//! Constrained decoding: a sequence under a [`JsonGrammar`] (OpenAI's
//! `response_format`) may only sample tokens whose bytes extend what it
//! wrote so far to a prefix of a value the grammar allows, and ends as soon
//! as the value is whole.
//!
//! Each step masks the logits with the set of allowed tokens: one walk of the
//! vocabulary trie ([`vocab`]) against the automaton ([`automaton`]), which
//! prunes a subtree at its first refused byte. The sets are cached by
//! automaton state, so the many steps inside one string cost a lookup.

pub mod automaton;
pub mod vocab;

use std::collections::HashMap;
use std::sync::Arc;

use automaton::State;
pub use vocab::Vocab;

use crate::proto::openai::JsonGrammar;

/// Allowed-token sets kept per sequence.
const MAX_CACHED_MASKS: usize = 256;

/// The grammar state of one sequence. A clone goes on from the same state
/// (the completions of `n` fork before their first token).
#[derive(Clone)]
pub struct Constraint {
    grammar: Arc<JsonGrammar>,
    vocab: Arc<Vocab>,
    state: State,
    cache: HashMap<State, Arc<Vec<u64>>>,
    /// One automaton state per depth of the trie walk, reused.
    scratch: Vec<State>,
}

impl std::fmt::Debug for Constraint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Constraint")
            .field("state", &self.state)
            .finish()
    }
}

impl Constraint {
    pub fn new(grammar: Arc<JsonGrammar>, vocab: Arc<Vocab>) -> Self {
        let state = State::start(&grammar);
        Constraint {
            grammar,
            vocab,
            state,
            cache: HashMap::new(),
            scratch: Vec::new(),
        }
    }

    /// The whole value has been written: generation ends here.
    pub fn is_complete(&self) -> bool {
        self.state.is_complete()
    }

    /// The tokens allowed next, as a bitset over token ids.
    pub fn allowed(&mut self) -> Arc<Vec<u64>> {
        if let Some(m) = self.cache.get(&self.state) {
            return m.clone();
        }
        let v = &*self.vocab;
        let g = &*self.grammar;
        let mut bits = vec![0u64; v.size.div_ceil(64)];
        let depth = v.max_len() + 1;
        if self.scratch.len() < depth {
            self.scratch.resize_with(depth, State::default);
        }
        self.scratch[0].clone_from(&self.state);
        let scratch = &mut self.scratch;
        v.walk(
            &mut |d, b| {
                let (done, rest) = scratch.split_at_mut(d + 1);
                done[d].step_into(g, b, &mut rest[0])
            },
            &mut |t| bits[t as usize / 64] |= 1u64 << (t % 64),
        );
        if self.state.can_end(g) {
            for &t in &v.stop_ids {
                if (t as usize) < v.size {
                    bits[t as usize / 64] |= 1u64 << (t % 64);
                }
            }
        }
        let bits = Arc::new(bits);
        if self.cache.len() < MAX_CACHED_MASKS {
            self.cache.insert(self.state.clone(), bits.clone());
        }
        bits
    }

    /// Set the logits of refused tokens to minus infinity; false when no
    /// token is allowed (the grammar cannot go on in this vocabulary).
    pub fn mask(&mut self, logits: &mut [f32]) -> bool {
        let bits = self.allowed();
        let mut any = false;
        for (i, l) in logits.iter_mut().enumerate() {
            let ok = bits.get(i / 64).is_some_and(|w| (w >> (i % 64)) & 1 == 1);
            if ok {
                any = true;
            } else {
                *l = f32::NEG_INFINITY;
            }
        }
        any
    }

    /// Take the sampled token; false when the grammar refuses it.
    pub fn accept(&mut self, id: u32) -> bool {
        if self.vocab.stop_ids.contains(&id) {
            return self.state.can_end(&self.grammar);
        }
        match self.vocab.bytes.get(id as usize) {
            Some(Some(b)) => self.state.advance(&self.grammar, b),
            _ => false,
        }
    }
}
