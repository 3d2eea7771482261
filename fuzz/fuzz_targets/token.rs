//! Token parsing: `keys::check_format` with arbitrary prefixes and presented
//! strings, checked against an independent model of the format (README:
//! `<prefix><32 base62><6 base62 digits of CRC32(prefix + random part)>`),
//! plus the invariants of generated tokens.
//!
//! Input: `PREFIX\nPRESENTED` (no newline: the prefix is `kg_`). The last
//! byte also picks a position and a character for the one-character typo
//! checks.

#![no_main]

use keygate::keys::{
    CHECKSUM_LEN, FormatError, MAX_PREFIX_LEN, RANDOM_LEN, Token, TokenHash, check_format,
};
use libfuzzer_sys::fuzz_target;

const BASE62: &[u8; 62] = b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz";

/// The format as documented, written independently of `keys.rs`.
fn model(prefix: &str, presented: &str) -> Result<(), FormatError> {
    let Some(rest) = presented.strip_prefix(prefix) else {
        return Err(FormatError::WrongPrefix);
    };
    if rest.len() != RANDOM_LEN + CHECKSUM_LEN || !rest.bytes().all(|b| b.is_ascii_alphanumeric()) {
        return Err(FormatError::Malformed);
    }
    let (body, sum) = presented.split_at(prefix.len() + RANDOM_LEN);
    let mut crc = u64::from(crc32fast::hash(body.as_bytes()));
    let mut digits = [0u8; CHECKSUM_LEN];
    for d in digits.iter_mut().rev() {
        *d = BASE62[(crc % 62) as usize];
        crc /= 62;
    }
    assert_eq!(crc, 0, "a CRC32 always fits in 6 base62 digits");
    if sum.as_bytes() == digits {
        Ok(())
    } else {
        Err(FormatError::BadChecksum)
    }
}

/// `token` with the character at `pos` (within the part after the prefix)
/// replaced by another base62 character chosen by `pick`.
fn typo(token: &str, prefix_len: usize, pos: usize, pick: u8) -> String {
    let mut bytes = token.as_bytes().to_vec();
    let i = prefix_len + pos % (RANDOM_LEN + CHECKSUM_LEN);
    let mut c = BASE62[usize::from(pick) % 62];
    if c == bytes[i] {
        c = BASE62[(usize::from(pick) + 1) % 62];
    }
    bytes[i] = c;
    String::from_utf8(bytes).expect("ASCII in, ASCII out")
}

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    let (prefix, presented) = text.split_once('\n').unwrap_or(("kg_", &text));
    let pick = data.last().copied().unwrap_or(0);

    // 1. The verdict on any string matches the documented format.
    let verdict = check_format(prefix, presented);
    assert_eq!(
        verdict,
        model(prefix, presented),
        "{prefix:?} {presented:?}"
    );

    // 2. A token that checks has the right shape, and any one-character typo
    //    after the prefix fails its checksum (CRC32 catches every single-byte
    //    error, and 6 base62 digits encode a CRC32 one-to-one).
    if verdict.is_ok() {
        assert!(presented.starts_with(prefix));
        assert_eq!(presented.len(), prefix.len() + RANDOM_LEN + CHECKSUM_LEN);
        let rest = &presented.as_bytes()[prefix.len()..];
        assert!(rest.iter().all(u8::is_ascii_alphanumeric));
        let bad = typo(
            presented,
            prefix.len(),
            usize::from(pick),
            pick.wrapping_mul(7),
        );
        assert_eq!(check_format(prefix, &bad), Err(FormatError::BadChecksum));
        let t = Token::from_presented(presented);
        assert_eq!(t.hash(), TokenHash::of(presented));
        assert_eq!(TokenHash::from_hex(&t.hash().to_hex()), Some(t.hash()));
        let tail = &presented[presented.len() - 4..];
        assert_eq!(t.hint(prefix), format!("{prefix}…{tail}"));
    }

    // 3. A generated token always checks, under its own prefix only, and is
    //    never shown by Debug or Display.
    if prefix.len() <= MAX_PREFIX_LEN {
        let g = Token::generate(prefix);
        let s = g.expose();
        assert_eq!(check_format(prefix, s), Ok(()), "{prefix:?}");
        assert_eq!(s.len(), prefix.len() + RANDOM_LEN + CHECKSUM_LEN);
        let bad = typo(s, prefix.len(), usize::from(pick), pick);
        assert_eq!(check_format(prefix, &bad), Err(FormatError::BadChecksum));
        if presented != prefix {
            // No other prefix accepts it: the length pins the prefix down.
            assert_ne!(check_format(presented, s), Ok(()));
        }
        let secret = &s[prefix.len()..];
        assert!(!format!("{g:?}").contains(secret));
        assert!(!format!("{g}").contains(secret));
    }
});
