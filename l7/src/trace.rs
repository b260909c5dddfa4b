//! Random ids (the edge's `x-request-id`). Trace context itself — W3C
//! and B3, read and written — is the OpenTelemetry propagators' job
//! (`crate::spans`).

/// `bytes` random bytes as lowercase hex: a new trace id (16) or span id (8).
pub fn random_id(rng: &mut fastrand::Rng, bytes: usize) -> String {
    (0..bytes).map(|_| format!("{:02x}", rng.u8(..))).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn random_ids_are_hex_of_the_asked_length() {
        let mut rng = fastrand::Rng::with_seed(7);
        let (t, s) = (random_id(&mut rng, 16), random_id(&mut rng, 8));
        assert_eq!((t.len(), s.len()), (32, 16));
        assert!(t.bytes().chain(s.bytes()).all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)), "{t} {s}");
        assert_eq!(t, random_id(&mut fastrand::Rng::with_seed(7), 16), "same seed, same id");
    }
}
