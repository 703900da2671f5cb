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

/// A card button whose context carries the card `kind`, `request_id`, `action`, `expires` and
/// the signature of those three ([`sign`]); what [`verified_click`] reads back.
pub fn signed_action(
    secret: &SecretString,
    kind: &str,
    request_id: &str,
    action: &str,
    expires: i64,
    label: String,
    style: &str,
) -> crate::chat::CardAction {
    let mut context = serde_json::Map::new();
    context.insert("kind".into(), serde_json::json!(kind));
    context.insert("request_id".into(), serde_json::json!(request_id));
    context.insert("action".into(), serde_json::json!(action));
    context.insert("expires".into(), serde_json::json!(expires));
    context.insert(
        "signature".into(),
        serde_json::json!(sign(secret, request_id, action, expires)),
    );
    crate::chat::CardAction {
        id: action.to_owned(),
        label,
        style: style.to_owned(),
        context,
    }
}

/// The `(request_id, action, expires)` of a click on a [`signed_action`] button.
///
/// # Errors
/// [`ClickError::BadRequest`](crate::chat::ClickError::BadRequest) when a field is missing,
/// [`ClickError::Forbidden`](crate::chat::ClickError::Forbidden) when the signature does not
/// match.
pub fn verified_click<'a>(
    secret: &SecretString,
    context: &'a serde_json::Map<String, serde_json::Value>,
) -> Result<(&'a str, &'a str, i64), crate::chat::ClickError> {
    let field = |k: &str| context.get(k);
    let (Some(request_id), Some(action), Some(expires), Some(signature)) = (
        field("request_id").and_then(serde_json::Value::as_str),
        field("action").and_then(serde_json::Value::as_str),
        field("expires").and_then(serde_json::Value::as_i64),
        field("signature").and_then(serde_json::Value::as_str),
    ) else {
        return Err(crate::chat::ClickError::BadRequest(
            "context must carry request_id, action, expires and signature".into(),
        ));
    };
    if verify(secret, request_id, action, expires, signature) {
        Ok((request_id, action, expires))
    } else {
        Err(crate::chat::ClickError::Forbidden)
    }
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

    #[test]
    fn a_signed_button_reads_back_and_a_tampered_one_is_refused() {
        let key = secret("a-secret-of-enough-length-for-tests");
        let button = signed_action(
            &key,
            "tool",
            "perm-1",
            "allowonce",
            99,
            "Allow".into(),
            "good",
        );
        assert_eq!(button.context["kind"], "tool");
        assert_eq!(
            verified_click(&key, &button.context),
            Ok(("perm-1", "allowonce", 99))
        );
        let mut forged = button.context.clone();
        forged.insert("action".into(), serde_json::json!("allowsession"));
        assert_eq!(
            verified_click(&key, &forged),
            Err(crate::chat::ClickError::Forbidden),
            "another action with the same signature"
        );
        let other = secret("another-secret-of-enough-length-xx");
        assert_eq!(
            verified_click(&other, &button.context),
            Err(crate::chat::ClickError::Forbidden)
        );
        let mut bare = button.context.clone();
        bare.remove("signature");
        assert!(matches!(
            verified_click(&key, &bare),
            Err(crate::chat::ClickError::BadRequest(_))
        ));
    }
}
