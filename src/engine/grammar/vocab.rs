//! The vocabulary as bytes, once per model: each token's decoded bytes, in a
//! trie, so that a mask is one walk of the trie against the automaton, and
//! tokens sharing a prefix share its steps.

use super::super::tokenizer::TextTokenizer;

/// A node of the trie: its children by byte and the tokens that end here.
#[derive(Debug, Default)]
struct Node {
    children: Vec<(u8, u32)>,
    tokens: Vec<u32>,
}

/// The model's tokens as bytes.
#[derive(Debug)]
pub struct Vocab {
    nodes: Vec<Node>,
    /// Tokens that end generation.
    pub stop_ids: Vec<u32>,
    /// Ids below this are the tokenizer's.
    pub size: usize,
    /// Each token's bytes; `None` for special tokens, which a grammar never
    /// allows.
    pub bytes: Vec<Option<Vec<u8>>>,
    max_len: usize,
}

/// GPT-2's byte-level alphabet, backwards: the character a byte-level BPE
/// vocabulary writes for each byte.
fn byte_level_inverse() -> std::collections::HashMap<char, u8> {
    let printable: Vec<u32> = (33..=126).chain(161..=172).chain(174..=255).collect();
    let mut map = std::collections::HashMap::with_capacity(256);
    for &b in &printable {
        map.insert(char::from_u32(b).unwrap_or('\0'), b as u8);
    }
    let mut n = 0;
    for b in 0u32..256 {
        if !printable.contains(&b) {
            if let Some(c) = char::from_u32(256 + n) {
                map.insert(c, b as u8);
            }
            n += 1;
        }
    }
    map
}

/// A token's bytes from its vocabulary string: byte-level BPE (GPT-2,
/// SmolLM, Llama 3, Qwen2), else SentencePiece (`▁` for a space, `<0xNN>`
/// for a byte).
fn token_bytes(
    piece: &str,
    byte_level: Option<&std::collections::HashMap<char, u8>>,
) -> Option<Vec<u8>> {
    if let Some(inverse) = byte_level {
        return piece.chars().map(|c| inverse.get(&c).copied()).collect();
    }
    if let Some(hex) = piece.strip_prefix("<0x").and_then(|s| s.strip_suffix('>')) {
        return u8::from_str_radix(hex, 16).ok().map(|b| vec![b]);
    }
    Some(piece.replace('\u{2581}', " ").into_bytes())
}

impl Vocab {
    pub fn new(tok: &TextTokenizer) -> Self {
        let hf = tok.hf();
        let size = hf.get_vocab_size(true);
        let special: std::collections::HashSet<u32> =
            hf.get_added_tokens_decoder().keys().copied().collect();
        let inverse = byte_level_inverse();
        // Byte-level vocabularies write a space as `Ġ`, SentencePiece as `▁`.
        let count = |c: char| {
            (0..size as u32)
                .filter_map(|id| hf.id_to_token(id))
                .filter(|p| p.starts_with(c))
                .count()
        };
        let byte_level = (count('\u{120}') >= count('\u{2581}')).then_some(&inverse);
        let bytes: Vec<Option<Vec<u8>>> = (0..size as u32)
            .map(|id| {
                if special.contains(&id) || tok.is_stop(id) {
                    return None;
                }
                hf.id_to_token(id)
                    .and_then(|p| token_bytes(&p, byte_level))
                    .filter(|b| !b.is_empty())
            })
            .collect();
        let mut nodes = vec![Node::default()];
        for (id, b) in bytes.iter().enumerate() {
            let Some(b) = b else { continue };
            let mut at = 0usize;
            for &byte in b {
                at = match nodes[at].children.iter().find(|c| c.0 == byte) {
                    Some(&(_, child)) => child as usize,
                    None => {
                        nodes.push(Node::default());
                        let child = nodes.len() - 1;
                        nodes[at].children.push((byte, child as u32));
                        child
                    }
                };
            }
            nodes[at].tokens.push(id as u32);
        }
        let max_len = bytes.iter().flatten().map(Vec::len).max().unwrap_or(0);
        Vocab {
            nodes,
            stop_ids: tok.stop_ids().to_vec(),
            size,
            bytes,
            max_len,
        }
    }

    /// Walk the trie from the root: `live(depth, byte)` steps the walker at
    /// `depth` by `byte` into `depth + 1` and says whether it lives; `hit`
    /// gets each token whose every byte lived.
    pub fn walk(&self, live: &mut impl FnMut(usize, u8) -> bool, hit: &mut impl FnMut(u32)) {
        self.visit(0, 0, live, hit);
    }

    fn visit(
        &self,
        node: usize,
        depth: usize,
        live: &mut impl FnMut(usize, u8) -> bool,
        hit: &mut impl FnMut(u32),
    ) {
        for &(b, child) in &self.nodes[node].children {
            if live(depth, b) {
                for &t in &self.nodes[child as usize].tokens {
                    hit(t);
                }
                self.visit(child as usize, depth + 1, live, hit);
            }
        }
    }

    /// The longest token, in bytes: the walk's depth.
    pub fn max_len(&self) -> usize {
        self.max_len
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pieces_decode_to_bytes() {
        let inv = byte_level_inverse();
        assert_eq!(inv.len(), 256);
        let bl = Some(&inv);
        assert_eq!(token_bytes("\u{120}the", bl).unwrap(), b" the");
        assert_eq!(token_bytes("\u{10A}", bl).unwrap(), b"\n");
        assert_eq!(token_bytes("{\"", bl).unwrap(), b"{\"");
        assert_eq!(token_bytes("<0x0A>", None).unwrap(), b"\n");
        assert_eq!(
            token_bytes("\u{2581}hi\u{3b1}", None).unwrap(),
            " hi\u{3b1}".as_bytes()
        );
    }
}
