//! Secrets from the configuration (passwords, tokens, keys): never printed.

use std::fmt;

use serde::{Deserialize, Serialize};

/// A string that never prints: Debug and Display show `[REDACTED]`, and a value of the wrong
/// type is refused without being quoted.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl<'de> Deserialize<'de> for Secret {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Secret, D::Error> {
        struct Visitor;
        impl serde::de::Visitor<'_> for Visitor {
            type Value = Secret;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a string")
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<Secret, E> {
                Ok(Secret(v.to_owned()))
            }
            fn visit_string<E: serde::de::Error>(self, v: String) -> Result<Secret, E> {
                Ok(Secret(v))
            }
        }
        d.deserialize_str(Visitor).map_err(|_: D::Error| {
            <D::Error as serde::de::Error>::custom("a secret must be a string (value not shown)")
        })
    }
}

impl Secret {
    pub fn new(s: impl Into<String>) -> Secret {
        Secret(s.into())
    }

    pub fn expose(&self) -> &str {
        &self.0
    }

    /// Whether `presented` is this secret, compared in constant time (for a given length:
    /// only the length may show in the time taken). An empty secret matches an empty
    /// presentation; callers to whom an empty secret means none refuse it themselves.
    pub fn matches(&self, presented: &[u8]) -> bool {
        let secret = self.0.as_bytes();
        presented.len() == secret.len()
            && presented
                .iter()
                .zip(secret)
                .fold(0u8, |acc, (a, b)| acc | (a ^ b))
                == 0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("[REDACTED]")
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("[REDACTED]")
    }
}

/// Serialized as `[REDACTED]` too, so that a printed config (`pullthrough config check`)
/// shows that a secret is set without showing it.
impl Serialize for Secret {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str("[REDACTED]")
    }
}

#[cfg(test)]
mod tests {
    use super::Secret;

    #[test]
    fn matches_only_the_same_bytes() {
        let s = Secret::new("s3cret-token");
        assert!(s.matches(b"s3cret-token"));
        assert!(!s.matches(b"s3cret-tokem"));
        assert!(!s.matches(b"s3cret-token "));
        assert!(!s.matches(b"s3cret"));
        assert!(!s.matches(b""));
        assert!(Secret::new("").matches(b""));
        assert!(!Secret::new("").matches(b"x"));
    }
}
