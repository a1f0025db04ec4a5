//! SCRAM-SHA-256 (RFC 5802, RFC 7677) on the server side, against verifiers in PostgreSQL's
//! format: `SCRAM-SHA-256$<iterations>:<salt>$<StoredKey>:<ServerKey>`. The server keeps only
//! StoredKey = H(HMAC(SaltedPassword, "Client Key")) and ServerKey, so the file never holds
//! anything a client could log in with.

use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use ring::{digest, hmac};

pub use crate::plan::access::Verifier;

impl Verifier {
    /// A verifier no password matches, the same for every call with the same name, so that
    /// an unknown user goes through the same exchange (and time) as a known one with a wrong
    /// password, and repeated attempts see the same salt.
    pub fn decoy(secret: &[u8], user: &str) -> Verifier {
        let key = hmac::Key::new(hmac::HMAC_SHA256, secret);
        let tag = |label: &str| {
            let mut ctx = hmac::Context::with_key(&key);
            ctx.update(label.as_bytes());
            ctx.update(user.as_bytes());
            ctx.sign().as_ref().to_vec()
        };
        Verifier {
            iterations: 4096,
            salt: tag("salt")[..16].to_vec(),
            stored_key: tag("stored"),
            server_key: tag("server"),
        }
    }
}

/// What went wrong in an exchange.
#[derive(Debug, PartialEq, Eq)]
pub enum ScramError {
    /// The client's message is not valid SCRAM.
    Malformed(&'static str),
    /// The proof does not match: wrong password (or unknown user).
    WrongProof,
}

/// State after the server-first message.
#[derive(Debug)]
pub struct Pending {
    client_first_bare: String,
    server_first: String,
    gs2_header: String,
    nonce: String,
    verifier: Verifier,
}

/// Handle the client-first message; returns the server-first message to send.
pub fn server_first(
    client_first: &[u8],
    verifier: Verifier,
    server_nonce: &str,
) -> Result<(String, Pending), ScramError> {
    let msg = std::str::from_utf8(client_first).map_err(|_| ScramError::Malformed("not UTF-8"))?;
    // gs2-header: cbind-flag "," [authzid] ","
    let (flag, rest) = msg
        .split_once(',')
        .ok_or(ScramError::Malformed("no GS2 header"))?;
    match flag {
        "n" | "y" => {}
        f if f.starts_with("p=") => {
            return Err(ScramError::Malformed(
                "channel binding was requested but is not offered",
            ));
        }
        _ => return Err(ScramError::Malformed("bad channel-binding flag")),
    }
    let (authzid, bare) = rest
        .split_once(',')
        .ok_or(ScramError::Malformed("no GS2 header"))?;
    if !authzid.is_empty() {
        return Err(ScramError::Malformed(
            "authorization identities are not supported",
        ));
    }
    let gs2_header = format!("{flag},{authzid},");
    let client_nonce = bare
        .split(',')
        .find_map(|a| a.strip_prefix("r="))
        .filter(|n| !n.is_empty())
        .ok_or(ScramError::Malformed("no client nonce"))?;
    let nonce = format!("{client_nonce}{server_nonce}");
    let server_first = format!(
        "r={nonce},s={},i={}",
        B64.encode(&verifier.salt),
        verifier.iterations
    );
    Ok((
        server_first.clone(),
        Pending {
            client_first_bare: bare.to_string(),
            server_first,
            gs2_header,
            nonce,
            verifier,
        },
    ))
}

impl Pending {
    /// Check the client-final message; returns the server-final message on success.
    pub fn finish(self, client_final: &[u8]) -> Result<String, ScramError> {
        let msg =
            std::str::from_utf8(client_final).map_err(|_| ScramError::Malformed("not UTF-8"))?;
        let (without_proof, proof) = msg
            .rsplit_once(",p=")
            .ok_or(ScramError::Malformed("no proof"))?;
        let mut channel = None;
        let mut nonce = None;
        for attr in without_proof.split(',') {
            if let Some(c) = attr.strip_prefix("c=") {
                channel = Some(c);
            } else if let Some(r) = attr.strip_prefix("r=") {
                nonce = Some(r);
            }
        }
        if channel != Some(B64.encode(&self.gs2_header).as_str()) {
            return Err(ScramError::Malformed("channel binding does not match"));
        }
        if nonce != Some(self.nonce.as_str()) {
            return Err(ScramError::Malformed("nonce does not match"));
        }
        let proof = B64
            .decode(proof)
            .map_err(|_| ScramError::Malformed("proof is not base64"))?;
        let auth_message = format!(
            "{},{},{}",
            self.client_first_bare, self.server_first, without_proof
        );
        let stored = hmac::Key::new(hmac::HMAC_SHA256, &self.verifier.stored_key);
        let client_signature = hmac::sign(&stored, auth_message.as_bytes());
        if proof.len() != client_signature.as_ref().len() {
            return Err(ScramError::WrongProof);
        }
        let client_key: Vec<u8> = proof
            .iter()
            .zip(client_signature.as_ref())
            .map(|(a, b)| a ^ b)
            .collect();
        let computed = digest::digest(&digest::SHA256, &client_key);
        // Constant-time comparison through HMAC verification of the two digests.
        let check = hmac::Key::new(hmac::HMAC_SHA256, b"kbcrm-scram-compare");
        let tag = hmac::sign(&check, computed.as_ref());
        if hmac::verify(&check, &self.verifier.stored_key, tag.as_ref()).is_err() {
            return Err(ScramError::WrongProof);
        }
        let server = hmac::Key::new(hmac::HMAC_SHA256, &self.verifier.server_key);
        let server_signature = hmac::sign(&server, auth_message.as_bytes());
        Ok(format!("v={}", B64.encode(server_signature.as_ref())))
    }
}

/// A fresh random nonce for the server's half.
pub fn random_nonce() -> String {
    use rand::RngCore;
    let mut b = [0u8; 18];
    rand::rng().fill_bytes(&mut b);
    B64.encode(b)
}

#[cfg(test)]
mod tests {
    use super::*;
    use ring::pbkdf2;

    /// The client's side, written from RFC 5802, to drive the server in tests.
    fn client_final(password: &str, server_first: &str, client_first_bare: &str) -> String {
        let mut nonce = "";
        let mut salt = Vec::new();
        let mut iters = 0u32;
        for a in server_first.split(',') {
            if let Some(v) = a.strip_prefix("r=") {
                nonce = v;
            } else if let Some(v) = a.strip_prefix("s=") {
                salt = B64.decode(v).unwrap();
            } else if let Some(v) = a.strip_prefix("i=") {
                iters = v.parse().unwrap();
            }
        }
        let mut salted = [0u8; 32];
        pbkdf2::derive(
            pbkdf2::PBKDF2_HMAC_SHA256,
            std::num::NonZeroU32::new(iters).unwrap(),
            &salt,
            password.as_bytes(),
            &mut salted,
        );
        let key = hmac::Key::new(hmac::HMAC_SHA256, &salted);
        let client_key = hmac::sign(&key, b"Client Key");
        let stored = digest::digest(&digest::SHA256, client_key.as_ref());
        let without_proof = format!("c=biws,r={nonce}");
        let auth = format!("{client_first_bare},{server_first},{without_proof}");
        let sig = hmac::sign(
            &hmac::Key::new(hmac::HMAC_SHA256, stored.as_ref()),
            auth.as_bytes(),
        );
        let proof: Vec<u8> = client_key
            .as_ref()
            .iter()
            .zip(sig.as_ref())
            .map(|(a, b)| a ^ b)
            .collect();
        format!("{without_proof},p={}", B64.encode(proof))
    }

    fn attempt(verifier: Verifier, password: &str) -> Result<String, ScramError> {
        let bare = "n=,r=abcdefghijklmnop";
        let (sf, pending) = server_first(format!("n,,{bare}").as_bytes(), verifier, "XYZ")?;
        pending.finish(client_final(password, &sf, bare).as_bytes())
    }

    #[test]
    fn right_password_passes_wrong_and_decoy_fail() {
        let v =
            Verifier::parse(&postgres_protocol::password::scram_sha_256(b"s3cret pass")).unwrap();
        let ok = attempt(v.clone(), "s3cret pass").unwrap();
        assert!(ok.starts_with("v="));
        assert_eq!(attempt(v, "s3cret Pass"), Err(ScramError::WrongProof));
        let decoy = Verifier::decoy(b"server secret", "mallory");
        assert_eq!(
            decoy.salt,
            Verifier::decoy(b"server secret", "mallory").salt
        );
        assert_eq!(attempt(decoy, ""), Err(ScramError::WrongProof));
    }

    #[test]
    fn malformed_messages_are_refused() {
        let v = Verifier::decoy(b"k", "u");
        assert!(server_first(b"garbage", v.clone(), "n").is_err());
        assert!(server_first(b"p=tls-server-end-point,,n=,r=x", v.clone(), "n").is_err());
        let (_, pending) = server_first(b"n,,n=,r=abc", v, "n").unwrap();
        assert_eq!(
            pending.finish(b"c=biws,r=wrong,p=AAAA"),
            Err(ScramError::Malformed("nonce does not match"))
        );
    }
}
