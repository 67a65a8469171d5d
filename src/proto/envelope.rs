//! Result envelope signatures (PROTOCOL.md §4) and the signed usage receipt
//! (§7d, an sgl extension).
//!
//! The signed payload is always the literal string as transmitted (the b58
//! ciphertext text, not its decoded bytes), and verification fails closed: a
//! missing signature, a missing job id or a version other than `v1` is invalid.

use std::fmt;

use sha2::{Digest, Sha256};

use super::identity::{Ed25519Public, NodeIdentity, Signature};
use super::openai::Usage;
use super::ProtoError;

/// `result_envelope_version` / `sigv`.
pub const ENVELOPE_VERSION: &str = "v1";

/// What a result signature covers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ResultKind {
    /// The `encrypted_result` JSON text of a plain `/complete`.
    Plain,
    /// The b58 text of `sealed_result.ciphertext`.
    Sealed,
    /// The `ciphertext` text of one stream chunk.
    Stream { seq: u64, is_final: bool },
    /// PYSDK's audio kind: verified for the vectors, never produced by sgl.
    Transcription,
}

impl ResultKind {
    /// Parse `plain`, `sealed`, `transcription` or `stream:{seq}:{0|1}` (canonical decimal).
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "plain" => Some(ResultKind::Plain),
            "sealed" => Some(ResultKind::Sealed),
            "transcription" => Some(ResultKind::Transcription),
            _ => {
                let rest = s.strip_prefix("stream:")?;
                let (seq, f) = rest.split_once(':')?;
                let canonical = !seq.is_empty() && (seq == "0" || !seq.starts_with('0'));
                let seq: u64 = if canonical && seq.bytes().all(|b| b.is_ascii_digit()) {
                    seq.parse().ok()?
                } else {
                    return None;
                };
                let is_final = match f {
                    "1" => true,
                    "0" => false,
                    _ => return None,
                };
                Some(ResultKind::Stream { seq, is_final })
            }
        }
    }
}

impl fmt::Display for ResultKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ResultKind::Plain => f.write_str("plain"),
            ResultKind::Sealed => f.write_str("sealed"),
            ResultKind::Transcription => f.write_str("transcription"),
            ResultKind::Stream { seq, is_final } => {
                write!(f, "stream:{seq}:{}", if *is_final { 1 } else { 0 })
            }
        }
    }
}

/// `sgl-result-v1\n{job_id}\n{kind}\n{sha256_hex(payload)}`.
pub fn result_message(job_id: &str, kind: ResultKind, payload: &str) -> String {
    let digest = hex::encode(Sha256::digest(payload.as_bytes()));
    format!("sgl-result-v1\n{job_id}\n{kind}\n{digest}")
}

pub fn sign_result(
    node: &NodeIdentity,
    job_id: &str,
    kind: ResultKind,
    payload: &str,
) -> Signature {
    node.sign(result_message(job_id, kind, payload).as_bytes())
}

/// Check a result signature as the coordinator and the SDK must: a missing
/// signature is invalid, and a version that is present must be `v1`.
pub fn verify_result(
    signer: &Ed25519Public,
    job_id: &str,
    kind: ResultKind,
    payload: &str,
    signature_b58: Option<&str>,
    version: Option<&str>,
) -> Result<(), ProtoError> {
    check_version(version)?;
    let sig = Signature::from_b58(
        signature_b58.ok_or(ProtoError::Missing("result_envelope_signature"))?,
    )?;
    if job_id.is_empty() {
        return Err(ProtoError::Missing("job id"));
    }
    signer.verify(result_message(job_id, kind, payload).as_bytes(), &sig)
}

fn check_version(version: Option<&str>) -> Result<(), ProtoError> {
    match version {
        None | Some(ENVELOPE_VERSION) => Ok(()),
        Some(v) => Err(ProtoError::UnsupportedVersion(v.chars().take(16).collect())),
    }
}

/// `sgl-usage-v1\n{job_id}\n{model}\n{prompt_tokens}\n{completion_tokens}` (§7d).
pub fn usage_message(job_id: &str, model: &str, usage: &Usage) -> String {
    format!(
        "sgl-usage-v1\n{job_id}\n{model}\n{}\n{}",
        usage.prompt_tokens, usage.completion_tokens
    )
}

pub fn sign_usage(node: &NodeIdentity, job_id: &str, model: &str, usage: &Usage) -> Signature {
    node.sign(usage_message(job_id, model, usage).as_bytes())
}

/// Check a usage receipt: present, consistent (`total = prompt + completion`)
/// and signed by the node.
pub fn verify_usage(
    signer: &Ed25519Public,
    job_id: &str,
    model: &str,
    usage: &Usage,
    signature_b58: Option<&str>,
) -> Result<(), ProtoError> {
    if !usage.is_consistent() {
        return Err(ProtoError::UsageInconsistent);
    }
    let sig = Signature::from_b58(signature_b58.ok_or(ProtoError::Missing("usage_signature"))?)?;
    signer.verify(usage_message(job_id, model, usage).as_bytes(), &sig)
}

/// The client's check of a sealed non-stream reply, as PYSDK's
/// `require_verified_reply` does (§4.3): the reservation must name the node's
/// ed25519 key; the job id comes from `job_id` or from `id` minus `chatcmpl-`;
/// the `sealed` signature must verify over the ciphertext string. The legacy
/// `result_signature` is never a substitute.
pub fn verify_sealed_reply(
    reservation_ed25519_b58: Option<&str>,
    reply: &serde_json::Value,
) -> Result<(), ProtoError> {
    let signer = Ed25519Public::from_b58(
        reservation_ed25519_b58.ok_or(ProtoError::Missing("node_ed25519_pubkey"))?,
    )?;
    let job_id = reply
        .get("job_id")
        .and_then(|v| v.as_str())
        .filter(|s| !s.is_empty())
        .or_else(|| {
            reply
                .get("id")
                .and_then(|v| v.as_str())
                .and_then(|id| id.strip_prefix("chatcmpl-"))
        })
        .ok_or(ProtoError::Missing("job id"))?;
    let ciphertext = reply
        .get("sealed_result")
        .and_then(|s| s.get("ciphertext"))
        .and_then(|c| c.as_str())
        .ok_or(ProtoError::Missing("sealed_result.ciphertext"))?;
    let str_field = |name: &str| match reply.get(name) {
        None | Some(serde_json::Value::Null) => Ok(None),
        Some(serde_json::Value::String(s)) => Ok(Some(s.as_str())),
        Some(_) => Err(ProtoError::Json(format!("{name} is not a string"))),
    };
    verify_result(
        &signer,
        job_id,
        ResultKind::Sealed,
        ciphertext,
        str_field("result_envelope_signature")?,
        str_field("result_envelope_version")?,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    const JOB: &str = "9b2f6c1e-4a7d-4c3b-8e21-5f0a9d3c7b64";
    const CT: &str = "gbEA6dFFVPxdar6e8QsjPKWj7xHcBo32nAqweQC5arnt4M5LmHhjREKoUTdVZsU6mmkxKu1XmvEo4oG8EUySndq2ytTyzDgyfMjyBSmPE2fqjdPDzKYtdrC2kZbAfCXv227GczHgmtQBqchA5qMB5ydxgxYnk9V8jb8sifTjHM61iEQkisdwYCqna";

    #[test]
    fn protocol_section_4_4_vector() {
        let node = NodeIdentity::from_seed(&[0x42; 32]);
        assert_eq!(
            hex::encode(Sha256::digest(CT.as_bytes())),
            "9fe99adfd7d8bdfd3eb6db559f8e5d7c4ebd3d0b40d2060024a710b9fd25b349"
        );
        let cases = [
            (ResultKind::Sealed, "51RQoo2VbhYU2riu3YgjbZmC8nDBEfwe2U7xThH8FpWmfmpDeD1HjaH1NTkEYLZktBo9DK4Kh22winz4tqfHLetK"),
            (
                ResultKind::Stream { seq: 0, is_final: false },
                "52f9SPC7uiXiiYSbeAGUHtv8gij5yT8zUzEsG44MMj5kaT76M9vovhwS4vo5QtAsfGJKjEXTtpbgpZV1hxvS8HYw",
            ),
            (
                ResultKind::Stream { seq: 3, is_final: true },
                "4mShKsVv3mrKn8zBDRryKZLiaMzgdN8DcjqUCk3tKkzskyuYwnvtfPRRYTWcWZrcn24Aw8pdqpqqRxAJ6nxCxEyc",
            ),
        ];
        for (kind, sig) in cases {
            assert_eq!(sign_result(&node, JOB, kind, CT).to_b58(), sig);
            verify_result(&node.ed25519_public(), JOB, kind, CT, Some(sig), Some("v1")).unwrap();
        }
    }

    #[test]
    fn usage_receipt_vector() {
        let node = NodeIdentity::from_seed(&[0x42; 32]);
        let usage = Usage::new(12, 34);
        assert!(usage_message(JOB, "smollm2-135m", &usage).ends_with("\nsmollm2-135m\n12\n34"));
        let sig = sign_usage(&node, JOB, "smollm2-135m", &usage).to_b58();
        assert_eq!(
            sig,
            "3VPGca8GMwcVNjKSzMM835iP47VfMTcywXzqF2yry2VaPA8zp7a2MGq4XqRW6RuzPKBKRZZt8NZEsDD82acCs9NC"
        );
        let pk = node.ed25519_public();
        verify_usage(&pk, JOB, "smollm2-135m", &usage, Some(&sig)).unwrap();
        assert!(verify_usage(&pk, JOB, "smollm2-135m", &Usage::new(12, 35), Some(&sig)).is_err());
        let bad_total = Usage {
            prompt_tokens: 12,
            completion_tokens: 34,
            total_tokens: 47,
            prompt_tokens_details: None,
        };
        assert_eq!(
            verify_usage(&pk, JOB, "smollm2-135m", &bad_total, Some(&sig)),
            Err(ProtoError::UsageInconsistent)
        );
        assert!(verify_usage(&pk, JOB, "smollm2-135m", &usage, None).is_err());
    }

    #[test]
    fn missing_and_wrong_version_fail_closed() {
        let node = NodeIdentity::from_seed(&[0x42; 32]);
        let pk = node.ed25519_public();
        let sig = sign_result(&node, JOB, ResultKind::Sealed, CT).to_b58();
        assert_eq!(
            verify_result(&pk, JOB, ResultKind::Sealed, CT, None, Some("v1")),
            Err(ProtoError::Missing("result_envelope_signature"))
        );
        assert!(matches!(
            verify_result(&pk, JOB, ResultKind::Sealed, CT, Some(&sig), Some("v2")),
            Err(ProtoError::UnsupportedVersion(_))
        ));
        verify_result(&pk, JOB, ResultKind::Sealed, CT, Some(&sig), None).unwrap();
    }

    #[test]
    fn kind_text_round_trips() {
        for s in [
            "plain",
            "sealed",
            "transcription",
            "stream:0:0",
            "stream:12:1",
        ] {
            assert_eq!(ResultKind::parse(s).unwrap().to_string(), s);
        }
        for s in [
            "stream:01:0",
            "stream:1:2",
            "stream::0",
            "stream:-1:0",
            "Sealed",
            "stream:1",
        ] {
            assert!(ResultKind::parse(s).is_none(), "{s}");
        }
    }
}
