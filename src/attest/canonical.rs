//! RFC 8785 (JSON Canonicalization Scheme) for the values a policy holds:
//! objects, arrays, strings, booleans, null and integers. Floats are refused
//! rather than formatted, because a policy has no use for them and ES6 number
//! formatting is where implementations disagree.

use serde_json::Value;

/// Canonical JSON text of `v`, or `None` when it holds a non-integer number.
pub fn canonical_json(v: &Value) -> Option<String> {
    let mut out = String::new();
    write_value(v, &mut out)?;
    Some(out)
}

fn write_value(v: &Value, out: &mut String) -> Option<()> {
    match v {
        Value::Null => out.push_str("null"),
        Value::Bool(b) => out.push_str(if *b { "true" } else { "false" }),
        Value::Number(n) => {
            // RFC 8785 §3.2.2.3: integers in the IEEE-754 safe range print as
            // plain decimal; anything else would need ES6 float formatting.
            if let Some(i) = n.as_i64() {
                if i.unsigned_abs() > (1u64 << 53) {
                    return None;
                }
                out.push_str(&i.to_string());
            } else if let Some(u) = n.as_u64() {
                if u > (1u64 << 53) {
                    return None;
                }
                out.push_str(&u.to_string());
            } else {
                return None;
            }
        }
        Value::String(s) => write_string(s, out),
        Value::Array(a) => {
            out.push('[');
            for (i, item) in a.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                write_value(item, out)?;
            }
            out.push(']');
        }
        Value::Object(m) => {
            // §3.2.3: members sorted by the UTF-16 code units of their names.
            let mut keys: Vec<&String> = m.keys().collect();
            keys.sort_by(|a, b| a.encode_utf16().cmp(b.encode_utf16()));
            out.push('{');
            for (i, k) in keys.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                write_string(k, out);
                out.push(':');
                write_value(&m[k.as_str()], out)?;
            }
            out.push('}');
        }
    }
    Some(())
}

/// §3.2.2.2: the ES6 `JSON.stringify` string escapes.
fn write_string(s: &str, out: &mut String) {
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\u{08}' => out.push_str("\\b"),
            '\u{0c}' => out.push_str("\\f"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if (c as u32) < 0x20 => out.push_str(&format!("\\u{:04x}", c as u32)),
            c => out.push(c),
        }
    }
    out.push('"');
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sorts_keys_and_escapes_like_es6() {
        let v: Value = serde_json::from_str(
            r#"{"b": [1, true, null], "a": "x\n\u0001\"", "\u20ac": 0, "\ud83d\ude00": -5}"#,
        )
        .unwrap();
        // U+20AC sorts before U+1F600 (D83D DE00 in UTF-16), as in RFC 8785 §3.2.3.
        assert_eq!(
            canonical_json(&v).unwrap(),
            "{\"a\":\"x\\n\\u0001\\\"\",\"b\":[1,true,null],\"\u{20ac}\":0,\"\u{1F600}\":-5}"
        );
    }

    #[test]
    fn refuses_floats() {
        let v: Value = serde_json::from_str(r#"{"a": 1.5}"#).unwrap();
        assert!(canonical_json(&v).is_none());
    }
}
