//! Signatures of approval buttons.
//!
//! Mattermost posts button clicks to the integration URL without any signature or auth header
//! (`integration_action.go`); authenticity comes from the button's `context`, which only the
//! server and the bot see. Each button carries its request id, action and expiry (Unix ms) and
//! `signature = hex(HMAC-SHA256(SM_CALLBACK_SECRET, len‖request_id ‖ len‖action ‖ len‖expires))`,
//! each field prefixed by its length as a big-endian u32 so no two field lists encode alike.
//! Verification is constant-time (`hmac`'s `verify_slice`).

use hmac::{Hmac, Mac};
use secrecy::{ExposeSecret, SecretString};
use sha2::Sha256;

type HmacSha256 = Hmac<Sha256>;

fn mac(secret: &SecretString, request_id: &str, action: &str, expires_at: i64) -> HmacSha256 {
    // HMAC accepts keys of any length.
    let mut mac = HmacSha256::new_from_slice(secret.expose_secret().as_bytes())
        .unwrap_or_else(|_| unreachable!("HMAC takes keys of any length"));
    let expires = expires_at.to_string();
    for field in [request_id, action, expires.as_str()] {
        let len = u32::try_from(field.len()).unwrap_or(u32::MAX);
        mac.update(&len.to_be_bytes());
        mac.update(field.as_bytes());
    }
    mac
}

/// The hex signature of one button.
pub fn sign(secret: &SecretString, request_id: &str, action: &str, expires_at: i64) -> String {
    hex::encode(
        mac(secret, request_id, action, expires_at)
            .finalize()
            .into_bytes(),
    )
}

/// Whether `signature` (hex) is the signature of these fields; constant-time.
pub fn verify(
    secret: &SecretString,
    request_id: &str,
    action: &str,
    expires_at: i64,
    signature: &str,
) -> bool {
    let Ok(bytes) = hex::decode(signature) else {
        return false;
    };
    mac(secret, request_id, action, expires_at)
        .verify_slice(&bytes)
        .is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn secret(s: &str) -> SecretString {
        SecretString::from(s.to_owned())
    }

    #[test]
    fn a_signature_verifies_only_for_its_own_fields() {
        let k = secret("0123456789abcdef0123456789abcdef");
        let sig = sign(&k, "req-1", "approve", 1_700_000_000_000);
        assert_eq!(sig.len(), 64);
        assert!(verify(&k, "req-1", "approve", 1_700_000_000_000, &sig));
        assert!(
            !verify(&k, "req-1", "deny", 1_700_000_000_000, &sig),
            "other action"
        );
        assert!(
            !verify(&k, "req-2", "approve", 1_700_000_000_000, &sig),
            "other request"
        );
        assert!(
            !verify(&k, "req-1", "approve", 1_700_000_000_001, &sig),
            "other expiry"
        );
        assert!(!verify(
            &secret("another secret of enough length!!"),
            "req-1",
            "approve",
            1_700_000_000_000,
            &sig
        ));
        assert!(
            !verify(&k, "req-1", "approve", 1_700_000_000_000, "zz"),
            "not hex"
        );
        assert!(
            !verify(&k, "req-1", "approve", 1_700_000_000_000, &sig[..62]),
            "truncated"
        );
        let mut flipped = sig.clone().into_bytes();
        flipped[0] = if flipped[0] == b'0' { b'1' } else { b'0' };
        assert!(!verify(
            &k,
            "req-1",
            "approve",
            1_700_000_000_000,
            &String::from_utf8(flipped).expect("utf8")
        ));
    }

    #[test]
    fn length_prefixes_keep_field_boundaries() {
        let k = secret("0123456789abcdef0123456789abcdef");
        // Without length prefixes these two would hash the same bytes.
        assert_ne!(sign(&k, "ab", "c", 1), sign(&k, "a", "bc", 1));
        assert_ne!(sign(&k, "a1", "", 2), sign(&k, "a", "12", 0));
    }
}
