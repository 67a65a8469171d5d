//! `sgl proto selftest`: the whole E2E path on this machine, step by step, as
//! a client and a node would run it.

use anyhow::{ensure, Context};
use clap::{Args, Subcommand};
use sgl::node::identity_files;
use sgl::proto::api::SealedReplyPlaintext;
use sgl::proto::e2e::{self, EncEnvelope, ResponseKey, StreamSealer};
use sgl::proto::envelope::{self, ResultKind};
use sgl::proto::identity::{verify_keybind, NodeId, NodeIdentity, KEY_VERSION};
use sgl::proto::openai::Usage;

use super::node::DirArgs;

#[derive(Debug, Subcommand)]
pub enum ProtoCommand {
    /// Check the E2E v2 crypto end to end: the protocol's cross-language
    /// vector, then a sealed request, a sealed signed reply and a signed
    /// stream, with this node's identity (or a throwaway one).
    Selftest(SelftestArgs),
}

#[derive(Debug, Args)]
pub struct SelftestArgs {
    #[command(flatten)]
    pub dir: DirArgs,
    /// Use a throwaway identity even if this machine has one.
    #[arg(long)]
    pub ephemeral: bool,
}

pub fn run(cmd: ProtoCommand) -> anyhow::Result<()> {
    match cmd {
        ProtoCommand::Selftest(args) => selftest(args),
    }
}

fn step(name: &str) {
    println!("  ok  {name}");
}

/// PROTOCOL.md §3.8: sealed by the TypeScript client to the node with seed 0x42×32.
fn cross_language_vector() -> anyhow::Result<()> {
    let node = NodeIdentity::from_seed(&[0x42; 32]);
    let enc = EncEnvelope {
        ciphertext: "gbEA6dFFVPxdar6e8QsjPKWj7xHcBo32nAqweQC5arnt4M5LmHhjREKoUTdVZsU6mmkxKu1XmvEo4oG8EUySndq2ytTyzDgyfMjyBSmPE2fqjdPDzKYtdrC2kZbAfCXv227GczHgmtQBqchA5qMB5ydxgxYnk9V8jb8sifTjHM61iEQkisdwYCqna".into(),
        client_ephemeral_pubkey: "DQFdwcBsqukJEBn9UNfQruaTHKHxHFMVRA2B5qZuFdfB".into(),
        client_response_pubkey: "2L54SXdEHm5mraF2X2GPid3m4PSkwVehEvhk487mWTx8".into(),
        algorithm: Some(e2e::ALG_V2.into()),
    };
    let opened = e2e::open_input(&node, &enc)?;
    ensure!(
        &opened.plaintext[..]
            == br#"{"messages":[{"role":"user","content":"cross-lang v2 test"}],"temperature":0.7,"max_tokens":512}"#,
        "cross-language vector decrypted to the wrong text"
    );
    let swapped = EncEnvelope {
        client_response_pubkey: "11111111111111111111111111111111".into(),
        ..enc
    };
    ensure!(
        e2e::open_input(&node, &swapped).is_err(),
        "a swapped response key was accepted"
    );
    Ok(())
}

fn selftest(args: SelftestArgs) -> anyhow::Result<()> {
    println!("SGL E2E v2 self-test");
    cross_language_vector().context("protocol vector §3.8")?;
    step("protocol vector §3.8 opens; a swapped response key is refused");

    let dir = args.dir.resolve()?;
    let node = if args.ephemeral {
        None
    } else {
        match identity_files::load_identity(&dir) {
            Ok(id) => Some(id),
            Err(identity_files::IdentityError::Missing(_)) => None,
            Err(e) => return Err(e.into()),
        }
    };
    let (node, which) = match node {
        Some(id) => (id, format!("node identity in {}", dir.display())),
        None => (NodeIdentity::generate(), "throwaway identity".to_string()),
    };
    println!("  --  using the {which}: ed25519 {}", node.ed25519_public());

    // What a coordinator would publish in a reservation.
    let node_id = NodeId::new_random();
    let keybind = node.sign_keybind(&node_id, KEY_VERSION);
    verify_keybind(
        &node_id.to_string(),
        &node.ed25519_public(),
        &node.x25519_public(),
        KEY_VERSION,
        &keybind,
    )?;
    step("keybind signature binds the X25519 key to the identity");

    // Client: seal a chat request to the node's X25519 key.
    let request = br#"{"messages":[{"role":"user","content":"What is the capital of France?"}],"temperature":0.7,"max_tokens":64}"#;
    let (enc, response_key) = e2e::seal_input(&node.x25519_public(), request)?;
    step("client sealed a request (X25519 + HKDF-SHA256 + XChaCha20-Poly1305)");

    // Node: open it; a tampered copy must fail.
    let opened = e2e::open_input(&node, &enc)?;
    ensure!(
        &opened.plaintext[..] == request,
        "node opened different bytes"
    );
    opened.json_object()?;
    let mut tampered = enc.clone();
    tampered.ciphertext = flip_last_char(&tampered.ciphertext);
    ensure!(
        e2e::open_input(&node, &tampered).is_err(),
        "a tampered request was accepted"
    );
    step("node opened it; a tampered copy is refused");

    // Node: seal and sign a non-stream reply.
    let job_id = uuid::Uuid::new_v4().to_string();
    let usage = Usage::new(12, 3);
    let reply = SealedReplyPlaintext {
        content: "Paris.".into(),
        model: "smollm2-135m".into(),
        usage,
        finish_reason: Some("stop".into()),
        choices: None,
    };
    let sealed = e2e::seal_output(&opened.reply_to, serde_json::to_string(&reply)?.as_bytes())?;
    let sig = envelope::sign_result(&node, &job_id, ResultKind::Sealed, &sealed.ciphertext);
    let usage_sig = envelope::sign_usage(&node, &job_id, "smollm2-135m", &usage);
    step("node sealed the reply and signed it (sgl-result-v1, kind sealed) with a usage receipt");

    // Client: verify before opening, then open.
    let body = serde_json::json!({
        "id": format!("chatcmpl-{job_id}"), "job_id": job_id, "sealed_result": sealed,
        "result_envelope_signature": sig.to_b58(), "result_envelope_version": "v1",
    });
    envelope::verify_sealed_reply(Some(&node.ed25519_public().to_b58()), &body)?;
    envelope::verify_usage(
        &node.ed25519_public(),
        &job_id,
        "smollm2-135m",
        &usage,
        Some(&usage_sig.to_b58()),
    )?;
    let plain = response_key.open_output(&sealed)?;
    let got: SealedReplyPlaintext = serde_json::from_slice(&plain)?;
    ensure!(got == reply, "client opened a different reply");
    let stranger = ResponseKey::from_secret_bytes([7; 32]);
    ensure!(
        stranger.open_output(&sealed).is_err(),
        "another key opened the reply"
    );
    step("client verified the signatures and opened the reply; no other key can");

    // Stream: one ephemeral key, seq from 0, a final empty chunk, each signed.
    let nonce = "12drXXUifSrRnXLGbXg8E";
    let mut sealer = StreamSealer::new(&opened.reply_to, nonce)?;
    let mut chunks = vec![
        sealer.seal("The capital ")?,
        sealer.seal("of France is ")?,
        sealer.seal("Paris. ✓")?,
    ];
    chunks.push(sealer.finish("")?);
    let mut opener = response_key.stream_opener(nonce)?;
    let mut text = String::new();
    for c in &chunks {
        let kind = ResultKind::Stream {
            seq: c.seq,
            is_final: c.is_final,
        };
        let sig = envelope::sign_result(&node, &job_id, kind, &c.ciphertext).to_b58();
        envelope::verify_result(
            &node.ed25519_public(),
            &job_id,
            kind,
            &c.ciphertext,
            Some(&sig),
            Some("v1"),
        )?;
        text.push_str(&opener.open(
            c.seq,
            c.is_final,
            c.ephemeral_public_key.as_deref(),
            &c.ciphertext,
        )?);
    }
    opener.finish()?;
    ensure!(
        text == "The capital of France is Paris. ✓",
        "stream text differs"
    );
    let mut reordered = response_key.stream_opener(nonce)?;
    let first = &chunks[0];
    reordered.open(
        0,
        false,
        first.ephemeral_public_key.as_deref(),
        &first.ciphertext,
    )?;
    ensure!(
        reordered
            .open(2, false, None, &chunks[2].ciphertext)
            .is_err(),
        "a gap was accepted"
    );
    let mut truncated = response_key.stream_opener(nonce)?;
    for c in &chunks[..3] {
        truncated.open(
            c.seq,
            c.is_final,
            c.ephemeral_public_key.as_deref(),
            &c.ciphertext,
        )?;
    }
    ensure!(
        truncated.finish().is_err(),
        "a stream without its final chunk was accepted"
    );
    step("stream of 4 signed chunks opened in order; a gap and a truncation are refused");

    println!("all checks passed");
    Ok(())
}

fn flip_last_char(s: &str) -> String {
    let mut out: String = s
        .chars()
        .take(s.chars().count().saturating_sub(1))
        .collect();
    out.push(if s.ends_with('2') { '3' } else { '2' });
    out
}
