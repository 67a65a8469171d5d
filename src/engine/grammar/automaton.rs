//! A byte-level pushdown automaton for the JSON a [`JsonGrammar`] allows.
//!
//! A configuration is a stack of [`Frame`]s, the innermost value on top; a
//! byte either moves it on or kills it. `anyOf` makes it nondeterministic,
//! so a [`State`] is a small set of configurations, expanded lazily at the
//! start of a value. A configuration whose stack is empty has read one whole
//! value: nothing more may follow.

use crate::proto::openai::json_schema::{
    JsonGrammar, NodeId, SchemaNode, ANY_ARRAY, ANY_KEYWORD, ANY_OBJECT, ANY_STRING,
};

/// Whitespace bytes allowed in a row between tokens of JSON: enough for
/// pretty printing, not enough for a model to idle in it.
const MAX_WS: u8 = 24;
/// Digits in each part of a number.
const MAX_DIGITS: u8 = 20;
/// Nesting of values.
const MAX_STACK: usize = 48;
/// Configurations alive at once (anyOf branches).
const MAX_CONFIGS: usize = 16;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ObjPhase {
    /// After `{`.
    Open,
    /// After a key: `:` next.
    Colon,
    /// After a member's value: `,` or `}` next.
    Next,
    /// After `,`: a key next.
    Comma,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ArrPhase {
    Open,
    Next,
    Comma,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum NumPhase {
    Start,
    Minus,
    Zero,
    Int,
    Dot,
    Frac,
    Exp,
    ExpSign,
    ExpDigits,
}

/// One level of the stack.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Frame {
    /// A value of `node` is next (after optional whitespace).
    Value { node: NodeId, ws: u8 },
    Obj {
        node: NodeId,
        phase: ObjPhase,
        /// Properties written so far (declared-key objects).
        seen: u64,
        /// The property whose value comes next.
        cur: u8,
        ws: u8,
    },
    Arr {
        node: NodeId,
        phase: ArrPhase,
        count: u32,
        ws: u8,
    },
    /// Inside a string of `node`, after its opening quote. `count`:
    /// characters so far, kept only when the node bounds the length (so that
    /// unbounded strings stay one state). `esc`: 0 none, 1 after a
    /// backslash, 2..=5 hex digits of `\u` left plus one. `utf8`:
    /// continuation bytes left; `lo`/`hi` bound the next one.
    Str {
        node: NodeId,
        count: u32,
        esc: u8,
        utf8: u8,
        lo: u8,
        hi: u8,
    },
    /// A declared key of object `node`, after its opening quote: the
    /// properties still matching and the bytes matched.
    Key { node: NodeId, cands: u64, pos: u16 },
    /// One of the literal texts of `node`.
    Lit { node: NodeId, cands: u64, pos: u16 },
    Num {
        integer: bool,
        phase: NumPhase,
        digits: u8,
    },
}

/// One configuration: the stack.
pub type Config = Vec<Frame>;

/// The automaton's state: live configurations (`cfgs[..len]`; the slots
/// past `len` are kept for their allocations).
#[derive(Debug, Clone, Default)]
pub struct State {
    cfgs: Vec<Config>,
    len: usize,
}

impl PartialEq for State {
    fn eq(&self, other: &Self) -> bool {
        self.live() == other.live()
    }
}
impl Eq for State {}
impl std::hash::Hash for State {
    fn hash<H: std::hash::Hasher>(&self, h: &mut H) {
        self.live().hash(h)
    }
}

fn is_ws(b: u8) -> bool {
    matches!(b, b' ' | b'\n' | b'\r' | b'\t')
}

fn bit(i: usize) -> u64 {
    1u64 << i
}

/// Bits 0..n set.
fn all(n: usize) -> u64 {
    if n >= 64 {
        u64::MAX
    } else {
        bit(n) - 1
    }
}

impl State {
    /// Before the first byte of a value of the grammar's root.
    pub fn start(g: &JsonGrammar) -> Self {
        State {
            cfgs: vec![vec![Frame::Value {
                node: g.root,
                ws: 0,
            }]],
            len: 1,
        }
    }

    pub fn live(&self) -> &[Config] {
        &self.cfgs[..self.len]
    }

    /// No configuration is alive: the bytes so far are not a valid prefix.
    pub fn is_dead(&self) -> bool {
        self.len == 0
    }

    /// A whole value has been read.
    pub fn is_complete(&self) -> bool {
        self.live().iter().any(Vec::is_empty)
    }

    /// The bytes so far are a whole value that more bytes could still
    /// extend (a top-level number or literal): the end may come now.
    pub fn can_end(&self, g: &JsonGrammar) -> bool {
        self.live().iter().any(|c| match c.as_slice() {
            [] => true,
            [Frame::Num { phase, .. }] => {
                matches!(
                    phase,
                    NumPhase::Zero | NumPhase::Int | NumPhase::Frac | NumPhase::ExpDigits
                )
            }
            [Frame::Lit { node, cands, pos }] => lits(g, *node)
                .iter()
                .enumerate()
                .any(|(i, l)| cands & bit(i) != 0 && l.len() == *pos as usize),
            _ => false,
        })
    }

    /// Move `self` on by `b` into `out` (whose allocations are reused);
    /// false when `out` is dead.
    pub fn step_into(&self, g: &JsonGrammar, b: u8, out: &mut State) -> bool {
        out.len = 0;
        for c in self.live() {
            out.push_stepped(g, c, b, 0);
        }
        out.len > 0
    }

    /// Feed several bytes; false (and dead) when one is refused.
    pub fn advance(&mut self, g: &JsonGrammar, bytes: &[u8]) -> bool {
        let mut next = State::default();
        for &b in bytes {
            if !self.step_into(g, b, &mut next) {
                *self = next;
                return false;
            }
            std::mem::swap(self, &mut next);
        }
        true
    }

    /// Step a copy of `c` by `b` and keep it when it lives; a value start
    /// of an `anyOf` forks first.
    fn push_stepped(&mut self, g: &JsonGrammar, c: &Config, b: u8, depth: usize) {
        if let Some(&Frame::Value { node, ws }) = c.last() {
            if let SchemaNode::AnyOf(alts) = &g.nodes[node as usize] {
                if depth > 8 {
                    return;
                }
                let mut fork = c.clone();
                for &alt in alts {
                    if let Some(top) = fork.last_mut() {
                        *top = Frame::Value { node: alt, ws };
                    }
                    self.push_stepped(g, &fork, b, depth + 1);
                }
                return;
            }
        }
        if self.len >= MAX_CONFIGS {
            return;
        }
        if self.cfgs.len() == self.len {
            self.cfgs.push(Vec::with_capacity(8));
        }
        let slot = &mut self.cfgs[self.len];
        slot.clone_from(c);
        if step(g, slot, b) {
            // Two branches may meet again (an anyOf of overlapping kinds).
            let dup = self.cfgs[..self.len].contains(&self.cfgs[self.len]);
            if !dup {
                self.len += 1;
            }
        }
    }
}

fn lits(g: &JsonGrammar, node: NodeId) -> &[Vec<u8>] {
    match &g.nodes[node as usize] {
        SchemaNode::Literals(l) => l,
        _ => &[],
    }
}

/// An object's declared properties: each key's bytes and value node.
type Props<'a> = &'a [(Vec<u8>, NodeId)];

fn props(g: &JsonGrammar, node: NodeId) -> (Props<'_>, u64, Option<NodeId>) {
    match &g.nodes[node as usize] {
        SchemaNode::Object {
            props,
            required,
            extra,
        } => (props, *required, *extra),
        _ => (&[], 0, None),
    }
}

fn push(stack: &mut Config, f: Frame) -> bool {
    if stack.len() >= MAX_STACK {
        return false;
    }
    stack.push(f);
    true
}

/// Move one configuration on by one byte, in place; false when it dies.
fn step(g: &JsonGrammar, stack: &mut Config, b: u8) -> bool {
    loop {
        let Some(top) = stack.last_mut() else {
            // A whole value was read; nothing may follow it.
            return false;
        };
        match top {
            Frame::Value { node, ws } => {
                if is_ws(b) {
                    *ws += 1;
                    return *ws <= MAX_WS;
                }
                let node = *node;
                stack.pop();
                return start_value(g, stack, node, b);
            }
            Frame::Str {
                node,
                count,
                esc,
                utf8,
                lo,
                hi,
            } => {
                let (min, max) = match &g.nodes[*node as usize] {
                    SchemaNode::String { min, max } => (*min, *max),
                    _ => (0, None),
                };
                return match string_byte(esc, utf8, lo, hi, b) {
                    None => false,
                    Some(StrByte::Close) => {
                        if *count < min {
                            return false;
                        }
                        stack.pop();
                        true
                    }
                    Some(StrByte::CharStart) if min > 0 || max.is_some() => {
                        if max.is_some_and(|m| *count >= m) {
                            return false;
                        }
                        *count += 1;
                        true
                    }
                    Some(_) => true,
                };
            }
            Frame::Key { node, cands, pos } => {
                let (ps, _, _) = props(g, *node);
                let p = *pos as usize;
                let mut next = 0u64;
                for (i, (k, _)) in ps.iter().enumerate() {
                    if *cands & bit(i) != 0 && k.get(p) == Some(&b) {
                        next |= bit(i);
                    }
                }
                if next == 0 {
                    return false;
                }
                *cands = next;
                *pos += 1;
                // Keys end with their closing quote, so a key matched in full
                // is the only candidate left.
                let done = ps
                    .iter()
                    .enumerate()
                    .find(|(i, (k, _))| next & bit(*i) != 0 && k.len() == p + 1)
                    .map(|(i, _)| i);
                if let Some(i) = done {
                    stack.pop();
                    if let Some(Frame::Obj { seen, cur, .. }) = stack.last_mut() {
                        *seen |= bit(i);
                        *cur = i as u8;
                    }
                }
                return true;
            }
            Frame::Lit { node, cands, pos } => {
                let ls = lits(g, *node);
                let p = *pos as usize;
                let mut next = 0u64;
                for (i, l) in ls.iter().enumerate() {
                    if *cands & bit(i) != 0 && l.get(p) == Some(&b) {
                        next |= bit(i);
                    }
                }
                if next != 0 {
                    *cands = next;
                    *pos += 1;
                    // Done as soon as no candidate can grow: the value ends
                    // here, and a top-level one completes now.
                    let longer = ls
                        .iter()
                        .enumerate()
                        .any(|(i, l)| next & bit(i) != 0 && l.len() > p + 1);
                    if !longer {
                        stack.pop();
                    }
                    return true;
                }
                let complete = ls
                    .iter()
                    .enumerate()
                    .any(|(i, l)| *cands & bit(i) != 0 && l.len() == p);
                if !complete {
                    return false;
                }
                // The literal ended before this byte: the level below reads it.
                stack.pop();
            }
            Frame::Num {
                integer,
                phase,
                digits,
            } => match num_byte(*integer, phase, digits, b) {
                Some(true) => return true,
                Some(false) => {
                    // The number ended before this byte.
                    stack.pop();
                }
                None => return false,
            },
            Frame::Obj {
                node,
                phase,
                seen,
                cur,
                ws,
            } => {
                if is_ws(b) {
                    *ws += 1;
                    return *ws <= MAX_WS;
                }
                *ws = 0;
                let node = *node;
                let (ps, required, extra) = props(g, node);
                let unseen = all(ps.len()) & !*seen;
                let can_close = if ps.is_empty() {
                    true
                } else {
                    required & !*seen == 0
                };
                let key_next = if ps.is_empty() {
                    extra.is_some()
                } else {
                    unseen != 0
                };
                match (*phase, b) {
                    (ObjPhase::Open | ObjPhase::Next, b'}') if can_close => {
                        stack.pop();
                        return true;
                    }
                    (ObjPhase::Open | ObjPhase::Comma, b'"') if key_next => {
                        *phase = ObjPhase::Colon;
                        let f = if ps.is_empty() {
                            str_frame(ANY_STRING)
                        } else {
                            Frame::Key {
                                node,
                                cands: unseen,
                                pos: 0,
                            }
                        };
                        return push(stack, f);
                    }
                    (ObjPhase::Colon, b':') => {
                        let value = if ps.is_empty() {
                            extra
                        } else {
                            ps.get(*cur as usize).map(|p| p.1)
                        };
                        *phase = ObjPhase::Next;
                        return match value {
                            Some(v) => push(stack, Frame::Value { node: v, ws: 0 }),
                            None => false,
                        };
                    }
                    (ObjPhase::Next, b',') if key_next => {
                        *phase = ObjPhase::Comma;
                        return true;
                    }
                    _ => return false,
                }
            }
            Frame::Arr {
                node,
                phase,
                count,
                ws,
            } => {
                if is_ws(b) {
                    *ws += 1;
                    return *ws <= MAX_WS;
                }
                *ws = 0;
                let (items, min, max) = match &g.nodes[*node as usize] {
                    SchemaNode::Array { items, min, max } => (*items, *min, *max),
                    _ => return false,
                };
                let room = max.is_none_or(|m| *count < m);
                match (*phase, b) {
                    (ArrPhase::Open | ArrPhase::Next, b']') if *count >= min => {
                        stack.pop();
                        return true;
                    }
                    (ArrPhase::Next, b',') if room => {
                        *phase = ArrPhase::Comma;
                        return true;
                    }
                    (ArrPhase::Open | ArrPhase::Comma, _) if room => {
                        *count += 1;
                        *phase = ArrPhase::Next;
                        if !push(stack, Frame::Value { node: items, ws: 0 }) {
                            return false;
                        }
                        // The item's first byte: the loop feeds it.
                    }
                    _ => return false,
                }
            }
        }
    }
}

fn str_frame(node: NodeId) -> Frame {
    Frame::Str {
        node,
        count: 0,
        esc: 0,
        utf8: 0,
        lo: 0,
        hi: 0,
    }
}

/// The first byte of a value of `node`.
fn start_value(g: &JsonGrammar, stack: &mut Config, node: NodeId, b: u8) -> bool {
    let obj = |node| Frame::Obj {
        node,
        phase: ObjPhase::Open,
        seen: 0,
        cur: 0,
        ws: 0,
    };
    let arr = |node| Frame::Arr {
        node,
        phase: ArrPhase::Open,
        count: 0,
        ws: 0,
    };
    let num = |integer| Frame::Num {
        integer,
        phase: NumPhase::Start,
        digits: 0,
    };
    let lit = |node| Frame::Lit {
        node,
        cands: all(lits(g, node).len()),
        pos: 0,
    };
    let (frame, feed) = match (&g.nodes[node as usize], b) {
        (SchemaNode::Any, b'{') => (obj(ANY_OBJECT), false),
        (SchemaNode::Any, b'[') => (arr(ANY_ARRAY), false),
        (SchemaNode::Any, b'"') => (str_frame(ANY_STRING), false),
        (SchemaNode::Any, b'-' | b'0'..=b'9') => (num(false), true),
        (SchemaNode::Any, b't' | b'f' | b'n') => (lit(ANY_KEYWORD), true),
        (SchemaNode::Object { .. }, b'{') => (obj(node), false),
        (SchemaNode::Array { .. }, b'[') => (arr(node), false),
        (SchemaNode::String { .. }, b'"') => (str_frame(node), false),
        (SchemaNode::Number { integer }, b'-' | b'0'..=b'9') => (num(*integer), true),
        (SchemaNode::Literals(_), _) => (lit(node), true),
        _ => return false,
    };
    if !push(stack, frame) {
        return false;
    }
    !feed || step(g, stack, b)
}

/// What a byte inside a string is.
enum StrByte {
    /// The closing quote.
    Close,
    /// The first byte of a character (an escape's backslash included).
    CharStart,
    /// A later byte of a character.
    Inside,
}

/// One byte inside a string; `None` when refused.
fn string_byte(esc: &mut u8, utf8: &mut u8, lo: &mut u8, hi: &mut u8, b: u8) -> Option<StrByte> {
    if *utf8 > 0 {
        if b < *lo || b > *hi {
            return None;
        }
        *utf8 -= 1;
        *lo = 0x80;
        *hi = 0xBF;
        return Some(StrByte::Inside);
    }
    match *esc {
        0 => match b {
            b'"' => Some(StrByte::Close),
            b'\\' => {
                *esc = 1;
                Some(StrByte::CharStart)
            }
            0x00..=0x1F | 0x7F => None,
            0x20..=0x7E => Some(StrByte::CharStart),
            // UTF-8 leads, with the ranges that keep the text well formed
            // (no overlongs, no surrogates, nothing past U+10FFFF).
            0xC2..=0xDF => utf8_lead(utf8, lo, hi, 1, 0x80, 0xBF),
            0xE0 => utf8_lead(utf8, lo, hi, 2, 0xA0, 0xBF),
            0xE1..=0xEC | 0xEE..=0xEF => utf8_lead(utf8, lo, hi, 2, 0x80, 0xBF),
            0xED => utf8_lead(utf8, lo, hi, 2, 0x80, 0x9F),
            0xF0 => utf8_lead(utf8, lo, hi, 3, 0x90, 0xBF),
            0xF1..=0xF3 => utf8_lead(utf8, lo, hi, 3, 0x80, 0xBF),
            0xF4 => utf8_lead(utf8, lo, hi, 3, 0x80, 0x8F),
            _ => None,
        },
        1 => match b {
            b'"' | b'\\' | b'/' | b'b' | b'f' | b'n' | b'r' | b't' => {
                *esc = 0;
                Some(StrByte::Inside)
            }
            b'u' => {
                *esc = 5;
                Some(StrByte::Inside)
            }
            _ => None,
        },
        _ => {
            if !b.is_ascii_hexdigit() {
                return None;
            }
            *esc = if *esc == 2 { 0 } else { *esc - 1 };
            Some(StrByte::Inside)
        }
    }
}

fn utf8_lead(utf8: &mut u8, lo: &mut u8, hi: &mut u8, n: u8, l: u8, h: u8) -> Option<StrByte> {
    *utf8 = n;
    *lo = l;
    *hi = h;
    Some(StrByte::CharStart)
}

/// One byte of a number: `Some(true)` taken, `Some(false)` the number ended
/// before it (it was complete), `None` refused.
fn num_byte(integer: bool, phase: &mut NumPhase, digits: &mut u8, b: u8) -> Option<bool> {
    use NumPhase::*;
    let digit = b.is_ascii_digit();
    fn more(p: &mut NumPhase, next: NumPhase, d: &mut u8) -> Option<bool> {
        if *p == next {
            *d += 1;
            if *d > MAX_DIGITS {
                return None;
            }
        } else {
            *d = 1;
        }
        *p = next;
        Some(true)
    }
    match (*phase, b) {
        (Start, b'-') => {
            *phase = Minus;
            Some(true)
        }
        (Start | Minus, b'0') => {
            *phase = Zero;
            Some(true)
        }
        (Start | Minus, _) if digit => more(phase, Int, digits),
        (Int, _) if digit => more(phase, Int, digits),
        (Zero | Int, b'.') if !integer => {
            *phase = Dot;
            Some(true)
        }
        (Zero | Int | Frac, b'e' | b'E') if !integer => {
            *phase = Exp;
            Some(true)
        }
        (Dot | Frac, _) if digit => more(phase, Frac, digits),
        (Exp, b'+' | b'-') => {
            *phase = ExpSign;
            Some(true)
        }
        (Exp | ExpSign | ExpDigits, _) if digit => more(phase, ExpDigits, digits),
        (Zero | Int | Frac | ExpDigits, _) => Some(false),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn accepts(g: &JsonGrammar, text: &str) -> (bool, bool) {
        let mut s = State::start(g);
        let ok = s.advance(g, text.as_bytes());
        (ok, ok && s.is_complete())
    }

    fn schema(v: serde_json::Value) -> JsonGrammar {
        JsonGrammar::from_schema(&v).unwrap()
    }

    #[test]
    fn json_object_mode() {
        let g = JsonGrammar::any_object();
        for whole in [
            r#"{}"#,
            r#"{"a": 1}"#,
            r#"{"a": [1, 2.5e-3, -0, "x\"y\u00e9", true, null, {"b": {}}]}"#,
            "{\n  \"k\": \"caf\u{e9} \u{1F600}\"\n}",
        ] {
            assert_eq!(accepts(&g, whole), (true, true), "{whole}");
        }
        for prefix in [r#"{"a": 1"#, r#"{"#, r#"{"a": [1, "#, r#"{"x": tr"#] {
            assert_eq!(accepts(&g, prefix), (true, false), "{prefix}");
        }
        for bad in [
            r#"[1]"#,
            r#"{"a": 01}"#,
            r#"{"a": 1,}"#,
            r#"{"a" 1}"#,
            r#"{a: 1}"#,
            r#"{"a": tru "#,
            r#"{"a": "\x"}"#,
            r#"{} "#,
            "{\"a\": \"\n\"}",
            r#"{"a": 1}}"#,
        ] {
            assert!(!accepts(&g, bad).0, "{bad}");
        }
        // Bytes that are not UTF-8 are refused inside strings.
        let mut s = State::start(&g);
        assert!(!s.advance(&g, b"{\"a\": \"\xC0\xAF\""));
        let mut s = State::start(&g);
        assert!(!s.advance(&g, b"{\"a\": \"\xED\xA0\x80\""));
        // Whitespace is capped.
        assert!(!accepts(&g, &format!("{{{}}}", " ".repeat(40))).0);
    }

    #[test]
    fn schema_mode() {
        let g = schema(json!({
            "type": "object",
            "properties": {
                "name": {"type": "string"},
                "age": {"type": "integer"},
                "pet": {"enum": ["cat", "dog", 3]},
                "tags": {"type": "array", "items": {"type": "boolean"}, "minItems": 1, "maxItems": 2},
                "spouse": {"type": ["string", "null"]}
            },
            "required": ["name", "age"],
            "additionalProperties": false
        }));
        for whole in [
            r#"{"name": "Ada", "age": 36}"#,
            r#"{"age": -3, "name": "", "pet": "dog", "tags": [true, false]}"#,
            r#"{"name":"x","age":0,"spouse":null,"pet":3}"#,
            r#"{"name":"x","age":0,"spouse":"y"}"#,
        ] {
            assert_eq!(accepts(&g, whole), (true, true), "{whole}");
        }
        for bad in [
            r#"{"name": "Ada"}"#,
            r#"{"name": "Ada", "age": 3.5}"#,
            r#"{"name": "Ada", "name": "B"}"#,
            r#"{"nick": "Ada"}"#,
            r#"{"name": 1}"#,
            r#"{"name": "a", "age": 1, "pet": "cow"}"#,
            r#"{"name": "a", "age": 1, "tags": []}"#,
            r#"{"name": "a", "age": 1, "tags": [true, true, true]}"#,
            r#"{"name": "a", "age": 1, "spouse": 1}"#,
        ] {
            let (ok, complete) = accepts(&g, bad);
            assert!(!(ok && complete), "{bad}");
        }
        // Once every property is written, only the end may come.
        assert!(
            !accepts(
                &g,
                r#"{"name":"x","age":0,"spouse":null,"pet":3,"tags":[true],"#
            )
            .0
        );
    }

    #[test]
    fn top_level_scalars_may_end_on_eos() {
        let g = schema(json!({"type": "integer"}));
        let mut s = State::start(&g);
        assert!(s.advance(&g, b"42"));
        assert!(!s.is_complete() && s.can_end(&g));
        let g = schema(json!({"enum": ["a", "ab"]}));
        let mut s = State::start(&g);
        assert!(s.advance(&g, b"\"a\""));
        assert!(s.is_complete());
        let g = schema(json!({"type": "boolean"}));
        let mut s = State::start(&g);
        assert!(s.advance(&g, b"true") && s.is_complete());
    }

    #[test]
    fn string_lengths_count_characters() {
        let g = schema(json!({"type": "string", "minLength": 2, "maxLength": 3}));
        assert_eq!(accepts(&g, r#""ab""#), (true, true));
        assert_eq!(accepts(&g, "\"\u{e9}\\n\u{1F600}\""), (true, true));
        assert_eq!(accepts(&g, r#""\u00e9x""#), (true, true));
        assert!(!accepts(&g, r#""a""#).0);
        assert!(!accepts(&g, r#""abcd""#).0);
    }

    #[test]
    fn recursive_refs() {
        let g = schema(json!({
            "$ref": "#/$defs/node",
            "$defs": {"node": {"type": "object", "properties": {
                "v": {"type": "integer"},
                "next": {"anyOf": [{"$ref": "#/$defs/node"}, {"type": "null"}]}
            }, "required": ["v", "next"], "additionalProperties": false}}
        }));
        assert_eq!(
            accepts(&g, r#"{"v": 1, "next": {"v": 2, "next": null}}"#),
            (true, true)
        );
    }
}
